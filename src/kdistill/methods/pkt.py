"""Probabilistic knowledge transfer (Passalis & Tefas 2018, arXiv:1803.10837)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.losses.features import pkt
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, value_at


class PKTConfig(MethodConfig):
    """loss = CE + w · KL(teacher ‖ student) between cosine-kernel neighbour distributions."""

    name: Literal["pkt"] = "pkt"
    student_layer: str
    teacher_layer: str
    weight: Schedule = 1.0


class PKT(Method):
    """Match each sample's distribution over its neighbours in embedding space."""

    config_type = PKTConfig
    paper = "Passalis & Tefas 2018, Learning Deep Representations with Probabilistic " \
            "Knowledge Transfer (arXiv:1803.10837)"
    example = Example({"student_layer": "3", "teacher_layer": "3"})
    cfg: PKTConfig

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.cfg.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.cfg.teacher_layer,)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"weight": value_at(self.cfg.weight, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = out.student_feats[self.cfg.student_layer].flatten(1)
        t = out.teacher_feats[self.cfg.teacher_layer].flatten(1)
        return {"pkt": self.scalars(progress)["weight"] * pkt(s, t),
                "ce": hard_cross_entropy(out.student_logits, batch["label"])}
