"""Plain supervised training: the baseline every distillation method must beat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.methods.base import Batch, Method, MethodConfig, Outputs
from kdistill.schedules import Progress


class CEConfig(MethodConfig):
    """Cross-entropy with the labels only; no teacher. Used for the baseline and the teacher."""

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class CE(Method):
    """Hard-label cross-entropy (optionally label-smoothed)."""

    config_type = CEConfig
    uses_teacher = False
    paper = "supervised baseline (no teacher)"
    cfg: CEConfig

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        ce = hard_cross_entropy(
            out.student_logits, batch["label"], label_smoothing=self.cfg.label_smoothing
        )
        return {"ce": ce}
