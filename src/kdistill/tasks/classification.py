"""Classification: inputs (N, ...) -> logits (N, C), labels (N,) class ids.

Scores (`kdistill.evaluate`): accuracy, errors, NLL, ECE, agreement with the teacher's argmax,
per-class accuracy, parameters, bytes on disk, latency at batch 1 and throughput at batch N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from kdistill.evaluate import classification_scores, model_report, predict
from kdistill.tasks.base import Evaluation, Task
from kdistill.types import DataSplits


class Classification(Task):
    name: ClassVar[str] = "classification"
    title: ClassVar[str] = "classification"
    compressible: ClassVar[bool] = True

    def validation_scores(self, model: nn.Module, splits: DataSplits, *,
                          batch_size: int) -> dict[str, float]:
        scores = classification_scores(predict(model, splits.val_x, batch_size=batch_size),
                                       splits.val_y)
        return {"accuracy": scores["accuracy"], "nll": scores["nll"]}

    def at_chance(self, row: dict[str, Any], splits: DataSplits) -> str | None:
        # Guessing the most frequent test class is the floor a model must beat.
        majority = float(splits.test_y.bincount().max()) / max(len(splits.test_y), 1)
        accuracy = row.get("accuracy")
        if isinstance(accuracy, float) and accuracy <= majority + 0.01:
            return (f"test accuracy {100 * accuracy:.2f} % against {100 * majority:.2f} % for "
                    "always answering the most frequent class")
        return None

    def reference(self, teacher: nn.Module, ev: Evaluation) -> Tensor:
        return predict(teacher, ev.splits.test_x, batch_size=ev.cfg.eval.batch_size)

    def test_row(self, model: nn.Module, weights: Path, reference: Tensor | None,
                 ev: Evaluation) -> tuple[dict[str, Any], Any]:
        e = ev.cfg.eval
        row = model_report(model, weights, ev.splits.test_x, ev.splits.test_y,
                           teacher_logits=reference, batch_size=e.batch_size,
                           ece_bins=e.ece_bins, throughput_batch=e.throughput_batch,
                           repeats=e.latency_repeats)
        return row, None
