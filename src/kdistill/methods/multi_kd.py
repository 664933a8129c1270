"""Multi-teacher KD: one student learns from an ensemble of teachers' soft targets
(Hinton et al. 2015 ensemble distillation; per-sample teacher weighting as in Fukuda et al.
2017 and You et al. 2017, "Learning from Multiple Teacher Networks")."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at


class MultiKDConfig(MethodConfig):
    """loss = α·T²·KL(p̄ ‖ q_T) + (1 − α)·CE, with p̄ = Σ_k w_k·softmax(teacher_k / T_k).

    `weights` (one per teacher, normalised to sum 1; default equal) mix the teachers;
    `temperatures` gives each teacher its own softening (default: `temperature`).
    `confidence: true` reweights teachers per sample by the probability each gives the true
    label, so the teacher that is right about a sample speaks loudest for it.
    """

    name: Literal["multi_kd"] = "multi_kd"
    temperature: Temperature = 4.0
    alpha: UnitWeight = 0.9
    weights: list[float] | None = Field(None, description="one non-negative weight per teacher")
    temperatures: list[float] | None = Field(None, description="one temperature per teacher")
    confidence: bool = False

    @field_validator("weights")
    @classmethod
    def _weights_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (min(v) < 0 or sum(v) <= 0):
            raise ValueError("weights must be >= 0 with a positive sum")
        return v

    @field_validator("temperatures")
    @classmethod
    def _temperatures_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError("temperatures must be > 0")
        return v


class MultiKD(Method):
    """Distil the (weighted, per-sample reweighted) mixture of several teachers' soft targets."""

    config_type = MultiKDConfig
    multi_teacher = True
    paper = "Hinton et al. 2015 (arXiv:1503.02531) ensemble targets; You et al. 2017 (KDD)"
    example = Example({"confidence": True})  # one teacher here
    cfg: MultiKDConfig

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def mixture(self, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        """p̄ (B, C) from stacked teacher logits (K, B, C)."""
        k = teacher_logits.shape[0]
        for name, given in (("weights", self.cfg.weights), ("temperatures", self.cfg.temperatures)):
            if given is not None and len(given) != k:
                raise ValueError(f"method.{name} has {len(given)} entries for {k} teachers")
        temps = torch.tensor(self.cfg.temperatures or [temperature] * k)
        probs = (teacher_logits.float() / temps[:, None, None]).softmax(dim=-1)  # (K, B, C)
        w = torch.tensor(self.cfg.weights or [1.0] * k)[:, None]  # (K, 1)
        if self.cfg.confidence:
            right = probs.gather(-1, labels[None, :, None].expand(k, -1, 1)).squeeze(-1)
            w = w * right  # (K, B): trust each teacher by its belief in the true label
        w = w / w.sum(dim=0, keepdim=True).clamp_min(1e-12)
        return (w[..., None] * probs).sum(dim=0)

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "multi_kd needs teacher logits"
        s = self.scalars(progress)
        t = s["temperature"]
        logits = out.teacher_logits if out.teacher_logits.dim() == 3 else out.teacher_logits[None]
        target = self.mixture(logits, batch["label"], t)
        # kd_kl on (student / T, log p̄) at T = 1 is KL(p̄ ‖ q_T); × T² keeps Hinton's scaling.
        kd = kd_kl(out.student_logits / t, target.clamp_min(1e-30).log()) * (t * t)
        ce = hard_cross_entropy(out.student_logits, batch["label"])
        return {"kd": s["alpha"] * kd, "ce": (1 - s["alpha"]) * ce}
