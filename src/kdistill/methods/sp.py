"""Similarity-preserving distillation (Tung & Mori 2019, arXiv:1907.09682)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.losses.features import similarity_preserving
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, value_at


class SPConfig(MethodConfig):
    """loss = CE + γ · Σ_pairs ‖G_s − G_t‖²_F / B², G = row-normalised batch similarity.

    Layers may differ in shape and width; γ = 3000 is the paper's CIFAR value.
    """

    name: Literal["sp"] = "sp"
    pairs: list[tuple[str, str]] = Field(min_length=1)
    gamma: Schedule = 3000.0


class SP(Method):
    """Preserve which samples the teacher finds similar to each other."""

    config_type = SPConfig
    paper = "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (arXiv:1907.09682)"
    example = Example({"pairs": [["2", "2"]]})
    cfg: SPConfig

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.cfg.pairs)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.cfg.pairs)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"gamma": value_at(self.cfg.gamma, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        total: Tensor | float = 0.0
        for s_name, t_name in self.cfg.pairs:
            total = total + similarity_preserving(out.student_feats[s_name],
                                                  out.teacher_feats[t_name])
        return {"sp": self.scalars(progress)["gamma"] * total,
                "ce": hard_cross_entropy(out.student_logits, batch["label"])}
