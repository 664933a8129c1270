"""KD on standardised logits (Sun et al. 2024, Logit Standardization in Knowledge
Distillation, arXiv:2403.01427).

Classic KD asks the student's logits to match the teacher's up to a shift, at one shared
temperature: a small student that cannot reach the teacher's logit range pays for the range,
not for the ranking. Standardising each sample's logits (subtract their mean, divide by their
standard deviation) before the softened KL lets the student match the relations between the
classes at its own scale: the loss is invariant to shifting and (positively) scaling either
side's logits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """(B, C) logits -> per-sample z-scores (B, C), in fp32."""
    x = logits.float()
    return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + eps)


class LogitStdConfig(MethodConfig):
    """loss = α·T²·KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α)·CE(labels), z the
    per-sample z-scores of the logits. The paper's base temperature is 2 (z-scores have unit
    spread, so T plays a smaller role than in plain KD)."""

    name: Literal["logit_std"] = "logit_std"
    temperature: Temperature = Field(2.0, description="temperature on the z-scored logits")
    alpha: UnitWeight = Field(0.9, description="weight of the KD term; 1 − α on the labels' CE")


class LogitStd(Method):
    """Soft targets from the teacher's standardised logits (scale- and shift-free)."""

    config_type = LogitStdConfig
    paper = ("Sun et al. 2024, Logit Standardization in Knowledge Distillation "
             "(arXiv:2403.01427)")
    example = Example(config={"temperature": 2.0, "alpha": 0.8})
    cfg: LogitStdConfig

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "logit_std needs teacher logits"
        s = self.scalars(progress)
        kd = kd_kl(standardize(out.student_logits), standardize(out.teacher_logits),
                   temperature=s["temperature"])
        ce = hard_cross_entropy(out.student_logits, batch["label"])
        return {"kd": s["alpha"] * kd, "ce": (1.0 - s["alpha"]) * ce}
