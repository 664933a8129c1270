"""Batch-1 latency of a finished run's teacher and students, interleaved, one intra-op thread.

A run's evaluation times each model in turn (median of `eval.latency_repeats` calls), so a
job that starts beside it in the middle slows one model and not another. Here every round
times the teacher and each student on the same test text, in an order shuffled per round
(seeded): the model that runs right after the teacher finds its weights pushed out of the
CPU caches, and a fixed order would charge that to the same model every round. Each model's
forward is run twice back to back and the second call timed, so every model is measured with
its weights as warm as a model serving requests one after another has them. Any load on the
machine then falls on all models alike; a model's speed-up is the median over rounds of
(teacher ms / model ms) in the same round. Texts cycle through the test split.

Run:  .venv/bin/python benchmarks/batch1_speed.py runs/NAME [runs/OTHER ...] [--rounds 300]
Prints one Markdown row per model: median ms, its interquartile range, the paired speed-up.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from kdistill import load_config
from kdistill.build import build_data, build_network
from kdistill.evaluate import timed_forward
from kdistill.weights import load_weights


def _models(run_dir: Path) -> tuple[nn.Module, dict[str, nn.Module], torch.Tensor]:
    """(teacher, {label: student}, test inputs) of a finished run directory."""
    cfg = load_config(run_dir / "config.yaml")
    splits = build_data(cfg.data)
    assert cfg.teacher is not None, "a run with one trained teacher"
    teacher = build_network(cfg.teacher.model, splits, where="teacher.model")
    load_weights(teacher, run_dir / "teacher" / "model.safetensors")
    students = {}
    for stage in sorted(run_dir.glob("seed-*/*/model.safetensors")):
        model = build_network(cfg.student.model, splits, where="student.model")
        load_weights(model, stage)
        students[f"{run_dir.name}/{stage.parent.parent.name}/{stage.parent.name}"] = model
    return teacher.eval(), {k: m.eval() for k, m in students.items()}, splits.test_x


@torch.no_grad()
def interleaved(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, list]:
    """Seconds of each model's batch-1 forward, per round, on text r mod N: models in a
    shuffled order, each timed on its second of two calls."""
    device = torch.device("cpu")
    for model in models.values():  # warm-up: first calls allocate
        for i in range(5):
            model(x[i:i + 1])
    names = list(models)
    order = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        one = x[r % len(x):r % len(x) + 1]
        for k in torch.randperm(len(names), generator=order).tolist():
            models[names[k]](one)  # brings its weights back into the caches
            times[names[k]].append(timed_forward(models[names[k]], one, device))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, students, x = _models(args.runs[0])
    for other in args.runs[1:]:
        students.update(_models(other)[1])
    times = interleaved({"teacher": teacher, **students}, x, args.rounds)
    print(f"{args.rounds} rounds, 1 thread, batch 1, test texts of {args.runs[0]}")
    print("| model | median ms | IQR ms | speed-up (median of paired ratios) |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        q = statistics.quantiles([s * 1e3 for s in seconds], n=4)
        ratio = statistics.median(t / s for t, s in zip(times["teacher"], seconds, strict=True))
        print(f"| {name} | {q[1]:.3f} | {q[0]:.3f}–{q[2]:.3f} | {ratio:.1f}× |")


if __name__ == "__main__":
    main()
