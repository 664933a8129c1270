"""FitNets hints (Romero et al. 2015, arXiv:1412.6550), with classic KD on the logits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from kdistill.adapters import adapt_target, make_adapter, probe_shapes, target_shape
from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.losses.features import hint_mse
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, UnitWeight, value_at


class FitNetConfig(MethodConfig):
    """A student layer, through a trained adapter, regresses a teacher layer (the "hint").

    `hint_epochs: 0` trains hint + KD + CE jointly. `hint_epochs: N > 0` is the paper's two
    stages: the hint alone for N epochs, then KD + CE without the hint.
    """

    name: Literal["fitnet"] = "fitnet"
    student_layer: str = Field(description="student module name (the guided layer)")
    teacher_layer: str = Field(description="teacher module name (the hint layer)")
    hint_weight: Schedule = 1.0
    hint_epochs: int = Field(0, ge=0)
    temperature: Temperature = 4.0
    alpha: UnitWeight = 0.9


class FitNet(Method):
    """Hint MSE through a linear / 1x1-conv adapter (shapes probed), plus Hinton KD."""

    config_type = FitNetConfig
    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (arXiv:1412.6550)"
    example = Example({"student_layer": "2", "teacher_layer": "2"})  # (6, 8, 8) -> (8, 8, 8)
    cfg: FitNetConfig

    def __init__(self, cfg: FitNetConfig) -> None:
        super().__init__(cfg)
        self.adapter: nn.Module = nn.Identity()
        self._target: tuple[int, ...] = ()

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.cfg.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.cfg.teacher_layer,)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        if teacher is None:
            raise ValueError("fitnet needs the teacher network to probe its hint layer")
        s = probe_shapes(student, self.student_layers, example, where="method.student_layer")
        t = probe_shapes(teacher, self.teacher_layers, example, where="method.teacher_layer")
        self._target = target_shape(s[self.cfg.student_layer], t[self.cfg.teacher_layer])
        self.adapter = make_adapter(s[self.cfg.student_layer], t[self.cfg.teacher_layer])

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {
            "temperature": value_at(self.cfg.temperature, progress),
            "alpha": value_at(self.cfg.alpha, progress),
            "hint_weight": value_at(self.cfg.hint_weight, progress),
        }

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "fitnet needs teacher outputs"
        s = self.scalars(progress)
        hint_stage = progress.epoch < self.cfg.hint_epochs
        terms: dict[str, Tensor] = {}
        if hint_stage or self.cfg.hint_epochs == 0:
            student = self.adapter(out.student_feats[self.cfg.student_layer].float())
            teacher = adapt_target(out.teacher_feats[self.cfg.teacher_layer], self._target)
            terms["hint"] = s["hint_weight"] * hint_mse(student, teacher)
        if not hint_stage:
            kd = kd_kl(out.student_logits, out.teacher_logits, temperature=s["temperature"])
            terms["kd"] = s["alpha"] * kd
            terms["ce"] = (1 - s["alpha"]) * hard_cross_entropy(out.student_logits, batch["label"])
        return terms
