"""Classic knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import kd_kl, soft_cross_entropy
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs, label_loss
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at


class KDConfig(MethodConfig):
    """loss = α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE(labels, student).

    `temperature` and `alpha` are schedules: a number, or e.g.
    `{kind: linear, start: 8, end: 2}` for a temperature that falls during training.
    """

    name: Literal["kd"] = "kd"
    temperature: Temperature = 4.0
    alpha: UnitWeight = 0.9
    soft_loss: Literal["kl", "soft_ce"] = Field(
        "kl", description="kl: KL divergence; soft_ce: cross-entropy to soft targets (same grad)"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class KD(Method):
    """Soft targets from the teacher at temperature T, mixed with the hard-label loss."""

    config_type = KDConfig
    paper = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network (arXiv:1503.02531)"
    example = Example()
    mixed_inputs = True  # the teacher labels a mixed view itself; CE mixes the two labels
    cfg: KDConfig

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {
            "temperature": value_at(self.cfg.temperature, progress),
            "alpha": value_at(self.cfg.alpha, progress),
        }

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "kd needs teacher logits"
        s = self.scalars(progress)
        soft = kd_kl if self.cfg.soft_loss == "kl" else soft_cross_entropy
        kd = soft(out.student_logits, out.teacher_logits, temperature=s["temperature"])
        ce = label_loss(out.student_logits, batch, label_smoothing=self.cfg.label_smoothing)
        return {"kd": s["alpha"] * kd, "ce": (1.0 - s["alpha"]) * ce}
