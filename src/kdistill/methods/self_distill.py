"""Deep-supervision self-distillation (Zhang et al. 2019, "Be Your Own Teacher",
arXiv:1905.08094): shallow exits of the student learn from its own final output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from kdistill.adapters import adapt_target, make_adapter, probe_shapes, target_shape
from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.losses.features import hint_mse
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, UnitWeight, value_at


class SelfDistillConfig(MethodConfig):
    """loss = CE(final) + Σ_i [(1 − α)·CE(head_i) + α·T²·KL(final_T ‖ head_i_T)
                               + λ·MSE(adapter_i(F_i), F_final)].

    One auxiliary classifier (global pooling + linear) per listed student layer, owned by the
    method and trained with it; the final output is the teacher (detached). The third term is
    the paper's feature hint: with `hint_layer` set (the student's deepest feature layer,
    F_final, detached), each exit's features F_i pass through an adapter (linear or 1×1 conv,
    spatial sizes matched) onto F_final's shape. Defaults follow the authors' code: T = 3,
    α = 0.3, λ = 0.03; that code sums squared errors, ours averages them (`hint_mse`), so λ
    does not depend on the batch or feature size. No external teacher is used.
    """

    name: Literal["self_distill"] = "self_distill"
    layers: list[str] = Field(min_length=1, description="student layers that get an exit")
    temperature: Temperature = 3.0
    alpha: UnitWeight = 0.3
    hint_layer: str | None = Field(
        None, description="the student's deepest feature layer; null: no feature-hint term")
    hint_weight: Schedule = 0.03


class SelfDistill(Method):
    """Auxiliary exits on intermediate layers, distilled from the network's own final head."""

    config_type = SelfDistillConfig
    uses_teacher = False
    paper = "Zhang et al. 2019, Be Your Own Teacher (arXiv:1905.08094)"
    example = Example({"layers": ["1", "3"], "hint_layer": "4"})  # exits hint the flat map
    cfg: SelfDistillConfig

    def __init__(self, cfg: SelfDistillConfig) -> None:
        super().__init__(cfg)
        self.heads = nn.ModuleDict()
        self.hint_adapters = nn.ModuleDict()
        self._hint_target: tuple[int, ...] = ()

    @property
    def student_layers(self) -> tuple[str, ...]:
        hint = () if self.cfg.hint_layer is None else (self.cfg.hint_layer,)
        return tuple(dict.fromkeys((*self.cfg.layers, *hint)))  # unique, in order

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        shapes = probe_shapes(student, self.student_layers, example, where="method.layers")
        if self.cfg.hint_layer is not None:
            final = shapes[self.cfg.hint_layer]
            # Target: F_final itself, or its channels when an exit's rank differs (MLP exits).
            self.hint_adapters = nn.ModuleDict({
                str(i): make_adapter(shapes[name], final) for i, name in enumerate(self.cfg.layers)
            })
            targets = {target_shape(shapes[name], final) for name in self.cfg.layers}
            if len(targets) > 1:
                raise ValueError(f"method.hint_layer: exits {self.cfg.layers} need one target "
                                 f"shape for '{self.cfg.hint_layer}'; got {sorted(targets)}")
            self._hint_target = targets.pop()
        was_training = student.training
        student.eval()
        num_classes = student(example[:1]).shape[-1]
        student.train(was_training)
        # ModuleDict keys may not contain dots: index the heads by position.
        self.heads = nn.ModuleDict({str(i): make_adapter(shapes[name], (num_classes,))
                                    for i, name in enumerate(self.cfg.layers)})

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress),
                **({} if self.cfg.hint_layer is None else
                   {"hint_weight": value_at(self.cfg.hint_weight, progress)})}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = self.scalars(progress)
        final = out.student_logits
        target = final.detach()  # the network's own final output teaches its exits
        ce_exits: Tensor | float = 0.0
        kd_exits: Tensor | float = 0.0
        hints: Tensor | float = 0.0
        hint_layer = self.cfg.hint_layer
        if hint_layer is not None:
            final_feat = adapt_target(out.student_feats[hint_layer].detach(), self._hint_target)
        for i, name in enumerate(self.cfg.layers):
            feat = out.student_feats[name].float()  # bf16 under autocast; heads stay fp32
            logits = self.heads[str(i)](feat)
            ce_exits = ce_exits + hard_cross_entropy(logits, batch["label"])
            kd_exits = kd_exits + kd_kl(logits, target, temperature=s["temperature"])
            if hint_layer is not None:
                adapted = self.hint_adapters[str(i)](feat)
                hints = hints + hint_mse(adapted, final_feat)
        terms = {
            "ce": hard_cross_entropy(final, batch["label"]),
            "exit_ce": (1 - s["alpha"]) * ce_exits,
            "exit_kd": s["alpha"] * kd_exits,
        }
        if hint_layer is not None:
            terms["exit_hint"] = s["hint_weight"] * hints  # type: ignore[assignment]
        return terms
