"""Warnings about a finished run that exited cleanly but did not learn: a model at chance
level on the test split, a training loss or validation NLL that exploded. The run prints them
and the reports show them at the top, so a wrong result never passes as a number."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kdistill.logger import read_metrics
from kdistill.tasks import Rows, Task
from kdistill.types import DataSplits

ROLE_NAMES = {"baseline": "the student alone", "student": "the distilled student"}
FALL = 0.8  # a last validation accuracy under this share of its best collapsed
RISE = 3.0  # a last value this many times its best (and above its first) exploded; less is
# the ordinary overfitting of a long schedule (the demo's baseline ends at 2.6x its best NLL)


def run_warnings(task: Task, rows: Rows, splits: DataSplits,
                 stage_dirs: dict[str, Path]) -> list[str]:
    """Every warning: models at chance on the test split (their seeds), then stages whose
    training loss or validation NLL exploded."""
    out = []
    for role, seeds in rows.items():
        for row in seeds:
            why = task.at_chance(row, splits)
            if why:
                seed = "" if row.get("seed") is None else f" (seed {row['seed']})"
                out.append(f"{ROLE_NAMES.get(role, role)}{seed} is at chance level: {why}")
    for name, stage_dir in stage_dirs.items():
        out += [f"{name}: {why}" for why in diverged(read_metrics(stage_dir / "metrics.jsonl"))]
    return out


def _exploded(values: list[float]) -> tuple[float, float] | None:
    """(best, last) when the last value is non-finite, or over RISE times the best and above
    the first; None otherwise."""
    finite = [v for v in values if math.isfinite(v)]
    if len(values) < 2 or not finite:
        return None
    best, last = min(finite), values[-1]
    if not math.isfinite(last) or (last > RISE * max(best, 1e-8) and last > values[0]):
        return best, last
    return None


def diverged(records: list[dict[str, Any]]) -> list[str]:
    """What went up in one stage's metrics: the logged training loss, the validation NLL."""
    out = []
    train = [float(r["loss"]) for r in records
             if r.get("split") == "train" and isinstance(r.get("loss"), int | float)]
    val = [float(r["nll"]) for r in records
           if r.get("split") == "val" and isinstance(r.get("nll"), int | float)]
    for what, values, hint in (
            ("training loss", train, "the learning rate may be too high"),
            ("validation NLL", val, "it diverged or overfit; see its curve in report.html")):
        found = _exploded(values)
        if found:
            out.append(f"the {what} rose from {found[0]:.4g} at best to {found[1]:.4g}: {hint}")
    accuracy = [float(r["accuracy"]) for r in records
                if r.get("split") == "val" and isinstance(r.get("accuracy"), int | float)]
    if accuracy and accuracy[-1] < FALL * max(accuracy):
        # A zero loss on inputs the student no longer learns from: a collapsed data-free
        # generator (seen with dafl's generator_lr 0.2 on a long schedule), or a dead input.
        zero = bool(train) and train[-1] < 1e-6
        why = ("the training loss is 0: the training inputs carry no signal (a data-free "
               "generator collapsed: lower method.generator_lr)") if zero else (
               "the training collapsed; see its curve in report.html")
        out.append(f"the validation accuracy fell from {max(accuracy):.2%} at best to "
                   f"{accuracy[-1]:.2%}: {why}")
    return out
