"""A run that exits cleanly but did not learn says so (console, report.md, report.html)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kdistill import load_config, run
from kdistill.pipeline.health import diverged


def test_explosions_are_found_and_ordinary_overfitting_is_not() -> None:
    def records(train: list[float], val: list[float]) -> list[dict]:
        return ([{"split": "train", "loss": v} for v in train]
                + [{"split": "val", "nll": v} for v in val])

    assert diverged(records([2.0, 1.0, 0.5], [1.2, 1.1, 2.9])) == []  # 2.6x: overfitting
    found = diverged(records([2.0, 1.0, 40.0], [1.2, 1.1, math.nan]))
    assert len(found) == 2
    assert "training loss rose from 1 at best to 40" in found[0]
    assert "validation NLL rose from 1.1 at best to nan" in found[1]


def test_a_collapse_of_validation_accuracy_is_found() -> None:
    # The curve of dafl with generator_lr 0.2 on 24 epochs (runs/datafree-mnist-24): 72.9 %
    # after one epoch, then 44.8 % with a KD loss of exactly 0 (the generator collapsed).
    def records(loss: list[float], accuracy: list[float]) -> list[dict]:
        return ([{"split": "train", "loss": v} for v in loss]
                + [{"split": "val", "accuracy": a, "nll": 1.0} for a in accuracy])

    found = diverged(records([1.6, 1.0, 0.0], [0.7288, 0.4482, 0.4480]))
    assert found == ["the validation accuracy fell from 72.88% at best to 44.80%: the training "
                     "loss is 0: the training inputs carry no signal (a data-free generator "
                     "collapsed: lower method.generator_lr)"]
    assert "the training collapsed" in diverged(records([1.0, 0.9], [0.9, 0.5]))[0]
    # An ordinary dip of a long schedule is not a collapse.
    assert diverged(records([1.0, 0.5, 0.4], [0.60, 0.64, 0.59])) == []


def test_a_student_at_chance_is_reported(tiny_recipe: Path) -> None:
    # The largest learning rate the schema allows, with heavy momentum: the student collapses
    # to answering one class.
    cfg = load_config(tiny_recipe, ["teacher.train.epochs=1", "train.epochs=1",
                                    "baseline=false", "train.optimizer.name=sgd",
                                    "train.optimizer.lr=10", "train.optimizer.momentum=0.99"])
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    warned = [line for line in lines if line.startswith("warning: ")]
    assert warned and "the distilled student (seed 0) is at chance level" in warned[0]
    assert json.loads((result.run_dir / "warnings.json").read_text()) == [
        w.removeprefix("warning: ") for w in warned]
    assert "**Warnings**" in (result.run_dir / "report.md").read_text()
    html = (result.run_dir / "report.html").read_text()
    assert 'class="warn"' in html and "at chance level" in html


def test_a_healthy_run_has_no_warnings(tiny_recipe: Path) -> None:
    result = run(load_config(tiny_recipe, ["teacher.train.epochs=2", "train.epochs=2",
                                           "baseline=false"]), echo=lambda _: None)
    assert json.loads((result.run_dir / "warnings.json").read_text()) == []
    assert 'class="warn"' not in (result.run_dir / "report.html").read_text()
