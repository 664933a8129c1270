"""What does distillation cost on top of plain student training? Epoch time, three variants.

Measures the wall-clock time of one training epoch through the real engine
(`kdistill.engine.train`) for the same student, data, batch order and optimizer in three ways:

1. `plain`: method `ce`, no teacher (the baseline's cost);
2. `cached_kd`: method `kd`, teacher logits read from a cache really built by
   `kdistill.cache.build_cache` in a temporary directory (`CachedTeacher`);
3. `online_kd`: method `kd`, the teacher network run on every batch (`OnlineTeacher`).

How: one process, `torch.set_num_threads(1)` (2-vCPU VMs stall with 2 intra-op threads; see
DESIGN.md, "Measuring on these machines"). After a short untimed warm-up, `--repeats` rounds
each run every variant for one epoch back to back, in an order that rotates every round, so
slow stretches of the machine hit all variants alike. Reported per variant: the median and the
minimum epoch time, and the ratios cached_kd/plain and online_kd/plain (ratio of medians and
ratio of minima). The cache build is timed once and reported on its own line.

Tasks: `mnist1d` (teacher `cnn1d` [32, 32, 32] at random init -- a timing needs no trained
teacher -- -> student `mlp` [100, 100], batch 100) and `mnist` (the pretrained ccexam MNIST CNN
-> student `mlp` [800, 800] on 55,000 real MNIST training images, batch 128).

With `--compile`, every variant also runs with `train.compile: true` (student forward and
loss through `torch.compile`, inductor on the CPU), side by side with the eager ones: ratios
are then given for both (compiled KD over compiled plain). The compiled variants' warm-up is a
whole epoch, so compilation (and the recompilation for a smaller last batch) stays out of the
timed epochs; the compile time is reported on its own line.

Target: cached KD <= 1.05 x plain. Reference on MNIST-1D with hand-written loops: cached
1.26x, online 5.9x; torchdistill online 5.95x.

Run:  .venv/bin/python benchmarks/bench_overhead.py --repeats 5   (`--quick` for a smoke check)
      .venv/bin/python benchmarks/bench_overhead.py --tasks mnist1d --compile --repeats 7
The last line reads `cached_kd/plain=<x> online_kd/plain=<y>` for the MNIST task (with
`--compile`, also `compiled_cached_kd/plain=<z> compiled_online_kd/plain=<w>`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdistill.build import build_data, build_network, build_optimizer
from kdistill.cache import CacheKey, build_cache
from kdistill.cache_key import fingerprint_model
from kdistill.config import DataConfig, ModelSpec, OptimizerConfig, TrainConfig, data_source
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.methods import Method, build_method
from kdistill.methods.ce import CEConfig
from kdistill.methods.kd import KDConfig
from kdistill.teachers import CachedTeacher, OnlineTeacher, Teacher

KINDS = ("plain", "cached_kd", "online_kd")
WARMUP_STEPS = 10


@dataclass(frozen=True)
class Task:
    data: DataConfig
    teacher: ModelSpec
    student: ModelSpec
    batch_size: int
    teacher_note: str


TASKS = {
    "mnist1d": Task(
        data_source(name="mnist1d", val_size=500),
        ModelSpec(arch="cnn1d", args={"channels": [32, 32, 32]}),
        ModelSpec(arch="mlp", args={"hidden": [100, 100]}),
        100, "cnn1d [32, 32, 32], random init (untrained; timing only)",
    ),
    "mnist": Task(
        data_source(name="mnist", val_size=5000),
        ModelSpec(arch="ccexam_mnist_cnn", args={"pretrained": True}),
        ModelSpec(arch="mlp", args={"hidden": [800, 800]}),
        128, "ccexam_mnist_cnn, pretrained",
    ),
}


@dataclass
class Variant:
    student: nn.Module
    teacher: Teacher | None
    method: Method
    optimizer: torch.optim.Optimizer
    compile: bool = False


def make_variant(student: nn.Module, teacher: Teacher | None, kd: bool,
                 compile: bool = False) -> Variant:
    """A private copy of the (identically initialised) student with its own optimizer."""
    student = copy.deepcopy(student)
    method = build_method(KDConfig() if kd else CEConfig())
    params = list(student.parameters()) + list(method.parameters())
    return Variant(student, teacher, method, build_optimizer(params, OptimizerConfig()), compile)


def run_epoch(v: Variant, loader: BatchLoader, max_steps: int | None = None) -> float:
    """Seconds for one epoch (or `max_steps` steps) through `kdistill.engine.train`."""
    cfg = TrainConfig(epochs=1, batch_size=loader.batch_size, log_every=10**9,
                      eval_every_epochs=1, max_steps=max_steps, compile=v.compile,
                      device="cpu")
    gc.collect()
    start = time.perf_counter()
    train(v.student, v.teacher, v.method, loader, v.optimizer, cfg, seed=0)
    return time.perf_counter() - start


def bench_task(name: str, repeats: int, tmp: Path, compiled: bool) -> dict[str, float]:
    task = TASKS[name]
    splits = build_data(task.data)
    torch.manual_seed(0)
    student = build_network(task.student, splits, where="bench.student")
    teacher_net = build_network(task.teacher, splits, where="bench.teacher")
    loader = BatchLoader(splits.train_x, splits.train_y, batch_size=task.batch_size, seed=0)

    key = CacheKey(teacher=fingerprint_model(teacher_net), data=splits.fingerprint)
    start = time.perf_counter()
    cache = build_cache(tmp / name / "teacher", teacher_net, splits.train_x, key)
    cache_s = time.perf_counter() - start

    teachers = {"plain": None, "cached_kd": CachedTeacher(cache),
                "online_kd": OnlineTeacher(teacher_net)}
    variants = {k: make_variant(student, t, kd=k != "plain") for k, t in teachers.items()}
    if compiled:
        variants |= {f"compiled_{k}": make_variant(student, t, kd=k != "plain", compile=True)
                     for k, t in teachers.items()}
    names = tuple(variants)
    print(f"\n== task {name}: {len(splits.train_x)} train samples, batch {task.batch_size}, "
          f"{len(loader)} steps/epoch; teacher {task.teacher_note}; student {task.student.arch} "
          f"{task.student.args['hidden']}")
    print(f"cache build (teacher over {len(splits.train_x)} samples, not in epoch times): "
          f"{cache_s:.2f} s")
    for k, v in variants.items():  # untimed warm-up: allocator, kernels, page cache, compiling
        seconds = run_epoch(v, loader, max_steps=None if v.compile else WARMUP_STEPS)
        if v.compile:
            print(f"{k}: warm-up epoch with compilation {seconds:.1f} s (not in epoch times)")
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for k in order:
            times[k].append(run_epoch(variants[k], loader))
        print(f"round {r + 1}/{repeats}: " + "  ".join(f"{k} {times[k][-1]:.3f}s" for k in order),
              flush=True)
    assert variants["cached_kd"].teacher is not None and variants["cached_kd"].teacher.forwards == 0

    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"\n{'variant':<19} {'median s':>9} {'min s':>8} {'ratio (median)':>15} "
          f"{'ratio (min)':>12}   (ratios over the plain variant of the same mode)")
    for k in names:
        base = "compiled_plain" if k.startswith("compiled_") else "plain"
        print(f"{k:<19} {med[k]:>9.3f} {low[k]:>8.3f} {med[k] / med[base]:>15.2f} "
              f"{low[k] / low[base]:>12.2f}")
    out = {}
    for prefix in ("", "compiled_") if compiled else ("",):
        for kind, key in (("cached_kd", "cached"), ("online_kd", "online")):
            a, b = f"{prefix}{kind}", f"{prefix}plain"
            out[f"{prefix}{key}"] = med[a] / med[b]
            out[f"{prefix}{key}_min"] = low[a] / low[b]
    if compiled:
        out["compiled_plain/plain"] = med["compiled_plain"] / med["plain"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist1d,mnist", help="comma-separated: mnist1d,mnist")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each variant per round)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, for a smoke check")
    parser.add_argument("--compile", action="store_true",
                        help="also every variant with train.compile: true (torch.compile)")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        parser.error(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    repeats = 2 if args.quick else max(1, args.repeats)

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torch.set_num_threads(1): one intra-op thread, CPU; "
          f"{repeats} interleaved rounds (rotating order) after a {WARMUP_STEPS}-step warm-up; "
          "median and min epoch time per variant; ratios = KD / plain")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        for name in tasks:
            results[name] = bench_task(name, repeats, Path(tmp), args.compile)

    print()
    for name, r in results.items():
        print(f"task={name} cached_kd/plain={r['cached']:.2f} online_kd/plain={r['online']:.2f} "
              f"(ratio of minima: cached_kd/plain={r['cached_min']:.2f} "
              f"online_kd/plain={r['online_min']:.2f})")
    final = "mnist" if "mnist" in results else tasks[-1]
    if final != "mnist":
        print(f"(the mnist task was not run: the last line gives the {final} numbers)")
    r = results[final]
    compiled = (f" compiled_cached_kd/plain={r['compiled_cached']:.2f} "
                f"compiled_online_kd/plain={r['compiled_online']:.2f} "
                f"compiled_plain/eager_plain={r['compiled_plain/plain']:.2f}"
                if args.compile else "")
    print(f"cached_kd/plain={r['cached']:.2f} online_kd/plain={r['online']:.2f}{compiled}")


if __name__ == "__main__":
    main()
