"""Relational knowledge distillation (Park et al. 2019, arXiv:1904.05068)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.losses.features import rkd_angle, rkd_distance
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, value_at


class RKDConfig(MethodConfig):
    """loss = CE + w_d·distance-wise + w_a·angle-wise relations of the batch's embeddings.

    Embeddings of any width on either side (relations are width-free); 25 and 50 are the
    paper's weights.
    """

    name: Literal["rkd"] = "rkd"
    student_layer: str
    teacher_layer: str
    distance_weight: Schedule = 25.0
    angle_weight: Schedule = 50.0


class RKD(Method):
    """Match pairwise distances and triplet angles between samples' embeddings."""

    config_type = RKDConfig
    paper = "Park et al. 2019, Relational Knowledge Distillation (arXiv:1904.05068)"
    example = Example({"student_layer": "3", "teacher_layer": "3"})
    cfg: RKDConfig

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.cfg.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.cfg.teacher_layer,)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"distance_weight": value_at(self.cfg.distance_weight, progress),
                "angle_weight": value_at(self.cfg.angle_weight, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        w = self.scalars(progress)
        s = out.student_feats[self.cfg.student_layer].flatten(1)
        t = out.teacher_feats[self.cfg.teacher_layer].flatten(1)
        return {
            "rkd_distance": w["distance_weight"] * rkd_distance(s, t),
            "rkd_angle": w["angle_weight"] * rkd_angle(s, t),
            "ce": hard_cross_entropy(out.student_logits, batch["label"]),
        }
