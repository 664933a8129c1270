"""DIST: distillation from a stronger teacher (Huang et al. 2022, arXiv:2205.10536)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.losses.logit_variants import dist_loss
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, value_at


class DISTConfig(MethodConfig):
    """loss = ce_weight·CE + T²·(β·inter-class + γ·intra-class (1 − Pearson) relations).

    Matches the teacher's relations rather than its exact probabilities, which the paper
    finds more robust when the teacher is much stronger than the student.
    """

    name: Literal["dist"] = "dist"
    beta: float = Field(1.0, ge=0, description="inter-class (per sample) relation weight")
    gamma: float = Field(1.0, ge=0, description="intra-class (per class) relation weight")
    temperature: Temperature = 1.0
    ce_weight: Schedule = 1.0


class DIST(Method):
    """Pearson-correlation relations between student and teacher probabilities."""

    config_type = DISTConfig
    paper = "Huang et al. 2022, Knowledge Distillation from A Stronger Teacher (arXiv:2205.10536)"
    example = Example()
    cfg: DISTConfig

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "ce_weight": value_at(self.cfg.ce_weight, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "dist needs teacher logits"
        s = self.scalars(progress)
        loss = dist_loss(out.student_logits, out.teacher_logits, beta=self.cfg.beta,
                         gamma=self.cfg.gamma, temperature=s["temperature"])
        ce = hard_cross_entropy(out.student_logits, batch["label"])
        return {"dist": loss, "ce": s["ce_weight"] * ce}
