"""Decoupled knowledge distillation (Zhao et al. 2022, arXiv:2203.08679)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.losses.logit_variants import dkd
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, Warmup, value_at


class DKDConfig(MethodConfig):
    """loss = ce_weight·CE + weight·(α·TCKD + β·NCKD)·T².

    The paper warms the distillation weight up linearly over its first 20 of 240 epochs;
    `weight` is a schedule whose default ramps from 0 to 1 over the first 10 % of training.
    """

    name: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, description="target-class (TCKD) weight")
    beta: float = Field(8.0, ge=0, description="non-target-class (NCKD) weight")
    temperature: Temperature = 4.0
    weight: Schedule = Warmup(kind="warmup", value=1.0, warmup=0.1)
    ce_weight: Schedule = 1.0


class DKD(Method):
    """Target-class and non-target-class KL terms weighted separately."""

    config_type = DKDConfig
    paper = "Zhao et al. 2022, Decoupled Knowledge Distillation (arXiv:2203.08679)"
    example = Example({"weight": 1.0})
    cfg: DKDConfig

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {
            "temperature": value_at(self.cfg.temperature, progress),
            "weight": value_at(self.cfg.weight, progress),
            "ce_weight": value_at(self.cfg.ce_weight, progress),
        }

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "dkd needs teacher logits"
        s = self.scalars(progress)
        loss = dkd(out.student_logits, out.teacher_logits, batch["label"], alpha=self.cfg.alpha,
                   beta=self.cfg.beta, temperature=s["temperature"])
        ce = hard_cross_entropy(out.student_logits, batch["label"])
        return {"dkd": s["weight"] * loss, "ce": s["ce_weight"] * ce}
