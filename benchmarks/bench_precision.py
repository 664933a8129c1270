"""What does `train.precision: bf16` do on this CPU? Step time and accuracy vs fp32.

Speed: training steps through the real engine (`kdistill.engine.train`, `max_steps` steps after
an untimed warm-up) for two students, fp32 then bf16 autocast, in an order that rotates every
round, one intra-op thread (DESIGN.md, "Measuring"); median and minimum time per step, and the
ratio bf16/fp32 of medians:
- `mlp`: the default recipe's MNIST-1D student (40-100-100-10 MLP), KD from a random cnn1d
  teacher run online, batch 100;
- `llama`: a 4-layer Llama of SmolLM2's width (576, vocabulary 49,152) trained with next-token
  CE on 8 x 128 tokens of the standard library's docstrings (random init: a timing needs no
  trained weights).
Accuracy: the built-in default recipe (MNIST-1D, KD, 200 epochs) trained with fp32 and with
bf16, same seeds, test accuracy mean ± std (the teacher stage is shared and stays fp32).

bf16 autocast covers the networks' forward; loss math stays fp32 (kdistill.engine.step).
Everything runs on the CPU (`train.device: cpu`), also on a machine with a GPU; for GPUs see
benchmarks/gpu_check.py.

Run:  .venv/bin/python benchmarks/bench_precision.py --repeats 3 --seeds 0 1 2 [--quick]
The last line reads `bf16/fp32 mlp=<x> llama=<y> accuracy_delta=<points>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdistill import load_config, run
from kdistill.build import build_data, build_network, build_optimizer
from kdistill.config import ModelSpec, OptimizerConfig, TrainConfig, data_source
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.methods import build_method
from kdistill.methods.ce import CEConfig
from kdistill.methods.kd import KDConfig
from kdistill.teachers import OnlineTeacher


def _setup(task: str) -> tuple:
    if task == "mlp":
        splits = build_data(data_source(name="mnist1d", val_size=500))
        student_spec = ModelSpec(arch="mlp", args={"hidden": [100, 100]})
        teacher = OnlineTeacher(build_network(
            ModelSpec(arch="cnn1d", args={"channels": [32, 32, 32]}), splits, where="teacher")
            .eval())
        return splits, student_spec, teacher, build_method(KDConfig()), 100
    splits = build_data(data_source(name="stdlib_docs", tokenizer="smollm2", seq_len=128,
                                   val_size=0.05, max_train_tokens=16384,
                                   max_eval_tokens=1024))
    spec = ModelSpec(arch="llama", args={"layers": 4, "hidden": 576, "heads": 9})
    return splits, spec, None, build_method(CEConfig()), 8


def time_steps(task: str, precision: str, steps: int, state: tuple) -> float:
    """Seconds per optimiser step over `steps` steps (after 2 untimed warm-up steps)."""
    splits, spec, teacher, method, batch = state
    torch.manual_seed(0)
    student = build_network(spec, splits, where="student")
    loader = BatchLoader(splits.train_x, splits.train_y, batch_size=batch, seed=0)
    times = []
    for n in (2, 2 + steps):
        cfg = TrainConfig(epochs=1000, batch_size=batch, max_steps=n, precision=precision,
                          log_every=10_000, optimizer=OptimizerConfig(name="adam", lr=1e-3),
                          device="cpu")
        opt = build_optimizer(student.parameters(), cfg.optimizer)
        start = time.perf_counter()
        train(student, teacher, method, loader, opt, cfg)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="few steps, one seed, 10 epochs")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = {"mlp": 20 if args.quick else 100, "llama": 2 if args.quick else 5}
    ratios: dict[str, float] = {}
    print("| student | fp32 ms/step (median, min) | bf16 ms/step (median, min) | bf16/fp32 |")
    print("|---|---|---|---|")
    for task in ("mlp", "llama"):
        state = _setup(task)
        timings: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(args.repeats):
            order = ["fp32", "bf16"] if r % 2 == 0 else ["bf16", "fp32"]
            for precision in order:
                timings[precision].append(time_steps(task, precision, steps[task], state))
        med = {p: statistics.median(t) * 1e3 for p, t in timings.items()}
        low = {p: min(t) * 1e3 for p, t in timings.items()}
        ratios[task] = med["bf16"] / med["fp32"]
        print(f"| {task} | {med['fp32']:.2f}, {low['fp32']:.2f} | {med['bf16']:.2f}, "
              f"{low['bf16']:.2f} | {ratios[task]:.2f} |", flush=True)

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="kdistill-precision-"))
    seeds = [args.seeds[0]] if args.quick else args.seeds
    acc: dict[str, list[float]] = {}
    for precision in ("fp32", "bf16"):
        overrides = [f"output_dir={out}", "name=precision", "baseline=false", "threads=1",
                     f"train.precision={precision}", "train.device=cpu",
                     "train.seeds=[" + ",".join(map(str, seeds)) + "]"]
        if args.quick:
            overrides += ["train.epochs=10", "teacher.train.epochs=5"]
        res = run(load_config(None, overrides), echo=lambda _line: None)
        acc[precision] = [100 * r["accuracy"] for r in res.rows["student"]]
    print("\n| precision | MNIST-1D KD student test acc % (mean ± std, seeds "
          f"{seeds}) |\n|---|---|")
    for precision, values in acc.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {precision} | {statistics.fmean(values):.2f} ± {std:.2f} |")
    delta = statistics.fmean(acc["bf16"]) - statistics.fmean(acc["fp32"])
    print(f"bf16/fp32 mlp={ratios['mlp']:.2f} llama={ratios['llama']:.2f} "
          f"accuracy_delta={delta:+.2f}")


if __name__ == "__main__":
    main()
