"""Deep-supervision self-distillation (Zhang et al. 2019, "Be Your Own Teacher",
arXiv:1905.08094): shallow exits of the student learn from its own final output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from kdistill.adapters import make_adapter, probe_shapes
from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.methods.base import Batch, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at


class SelfDistillConfig(MethodConfig):
    """loss = CE(final) + Σ_i [(1 − α)·CE(head_i) + α·T²·KL(final_T ‖ head_i_T)].

    One auxiliary classifier (global pooling + linear) per listed student layer, owned by the
    method and trained with it; the final output is the teacher (detached). The paper's third
    term, an L2 hint from each exit's features to the final ones, is not implemented.
    No external teacher is used.
    """

    name: Literal["self_distill"] = "self_distill"
    layers: list[str] = Field(min_length=1, description="student layers that get an exit")
    temperature: Temperature = 3.0
    alpha: UnitWeight = 0.3


class SelfDistill(Method):
    """Auxiliary exits on intermediate layers, distilled from the network's own final head."""

    config_type = SelfDistillConfig
    uses_teacher = False
    paper = "Zhang et al. 2019, Be Your Own Teacher (arXiv:1905.08094)"
    cfg: SelfDistillConfig

    def __init__(self, cfg: SelfDistillConfig) -> None:
        super().__init__(cfg)
        self.heads = nn.ModuleDict()

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(self.cfg.layers)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        shapes = probe_shapes(student, self.student_layers, example, where="method.layers")
        was_training = student.training
        student.eval()
        num_classes = student(example[:1]).shape[-1]
        student.train(was_training)
        # ModuleDict keys may not contain dots: index the heads by position.
        self.heads = nn.ModuleDict({str(i): make_adapter(shapes[name], (num_classes,))
                                    for i, name in enumerate(self.cfg.layers)})

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = self.scalars(progress)
        final = out.student_logits
        target = final.detach()  # the network's own final output teaches its exits
        ce_exits: Tensor | float = 0.0
        kd_exits: Tensor | float = 0.0
        for i, name in enumerate(self.cfg.layers):
            logits = self.heads[str(i)](out.student_feats[name])
            ce_exits = ce_exits + hard_cross_entropy(logits, batch["label"])
            kd_exits = kd_exits + kd_kl(logits, target, temperature=s["temperature"])
        return {
            "ce": hard_cross_entropy(final, batch["label"]),
            "exit_ce": (1 - s["alpha"]) * ce_exits,
            "exit_kd": s["alpha"] * kd_exits,
        }
