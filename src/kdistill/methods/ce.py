"""Plain supervised training: the baseline every distillation method must beat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy, shift_labels
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs, label_loss
from kdistill.schedules import Progress


class CEConfig(MethodConfig):
    """Cross-entropy with the labels only; no teacher. Used for the baseline and the teacher.

    On causal-LM data (logits (B, T, V), labels (B, T)) it is the next-token loss: position t
    is scored against label t + 1, labels -100 are skipped, the mean is per valid token.
    """

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class CE(Method):
    """Hard-label cross-entropy (optionally label-smoothed)."""

    config_type = CEConfig
    uses_teacher = False
    tasks = ("classification", "causal_lm", "seq2seq")
    paper = "supervised baseline (no teacher)"
    mixed_inputs = True
    example = Example()
    cfg: CEConfig

    def batch_items(self, batch: Batch) -> int:
        labels = batch["label"]
        return len(labels) if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        labels = batch["label"]
        if labels.dim() == 2:  # causal LM / seq2seq decoder: next-token targets
            ce = hard_cross_entropy(out.student_logits, shift_labels(labels),
                                    label_smoothing=self.cfg.label_smoothing)
            return {"ce": ce}
        return {"ce": label_loss(out.student_logits, batch,
                                 label_smoothing=self.cfg.label_smoothing)}
