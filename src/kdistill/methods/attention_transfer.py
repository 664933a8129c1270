"""Attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import hard_cross_entropy
from kdistill.losses.features import attention_transfer
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, value_at


class ATConfig(MethodConfig):
    """loss = CE + β/2 · Σ_pairs mean_positions (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², Q = mean_c |A|^p.

    `pairs` lists [student_layer, teacher_layer] feature maps of equal spatial size (channel
    counts may differ). β = 1000 is the paper's value for this per-position mean.
    """

    name: Literal["at"] = "at"
    pairs: list[tuple[str, str]] = Field(min_length=1)
    beta: Schedule = 1000.0
    p: float = Field(2.0, ge=1.0)


class AT(Method):
    """Match spatial attention maps of paired student and teacher layers."""

    config_type = ATConfig
    paper = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention (arXiv:1612.03928)"
    example = Example({"pairs": [["0", "0"], ["2", "2"]]})
    cfg: ATConfig

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.cfg.pairs)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.cfg.pairs)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"beta": value_at(self.cfg.beta, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        total: Tensor | float = 0.0
        for s_name, t_name in self.cfg.pairs:
            s, t = out.student_feats[s_name], out.teacher_feats[t_name]
            positions = s[0, 0].numel()  # attention_transfer sums over positions
            total = total + attention_transfer(s, t, p=self.cfg.p) / positions
        at = self.scalars(progress)["beta"] / 2 * total
        return {"at": at, "ce": hard_cross_entropy(out.student_logits, batch["label"])}
