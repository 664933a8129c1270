"""Evaluation rows: per-class accuracy (what the HTML report's gap plot reads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdistill.evaluate import model_report, per_class_accuracy


def test_per_class_accuracy_by_hand() -> None:
    # Predictions 0, 0, 1, 2, 2 against labels 0, 1, 1, 2, 2; class 3 has no test sample.
    logits = torch.eye(4)[[0, 0, 1, 2, 2]]
    labels = torch.tensor([0, 1, 1, 2, 2])
    assert per_class_accuracy(logits, labels) == [1.0, 0.5, 1.0, None]


def test_model_report_holds_per_class_accuracy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), weights)
    x, y = torch.randn(60, 8), torch.arange(60) % 3
    row = model_report(model, weights, x, y, teacher_logits=None, batch_size=16, ece_bins=5,
                       throughput_batch=4, repeats=1)
    per_class = row["per_class_accuracy"]
    assert len(per_class) == 3
    # Equal class sizes: overall accuracy is the mean of the per-class ones.
    assert sum(per_class) / 3 == pytest.approx(row["accuracy"], abs=1e-6)
