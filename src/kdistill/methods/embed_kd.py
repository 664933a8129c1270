"""General (task-agnostic) distillation of a sentence encoder: the student's embedding follows
the teacher's on unlabelled text (Sentence-BERT multilingual distillation, arXiv:2004.09813;
DistilBERT's cosine loss, arXiv:1910.01108), optionally with TinyBERT's hidden-state term
(arXiv:1909.10351)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill.adapters import make_adapter, probe_shapes
from kdistill.errors import ConfigError
from kdistill.losses import cosine_distance, embedding_mse
from kdistill.losses.features import hidden_mse
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, value_at


class EmbedKDConfig(MethodConfig):
    """loss = w_mse·MSE(P e_s, e_t) + w_cos·(1 − cos(P e_s, e_t)) + w_h·Σ_pairs MSE_tok(W h_s, h_t).

    e_s, e_t: the student's and the teacher's sentence embeddings (the models' (B, D)
    outputs; the teacher's read from the cache). P: a linear projection owned by the method
    when the widths differ (identity otherwise: a student copied from the teacher's layers
    already lives in its space). `hidden_pairs` lists [student_layer, teacher_layer] of
    channels-first hidden states (`tokens.<k>` of the text encoders, TinyBERT's numbering:
    [tokens.1, tokens.3] maps student layer 1 to teacher layer 3); each pair gets a 1x1
    convolution W when widths differ, and its MSE is averaged over real tokens only (the
    padding mask is `ids != student.pad_id`). No labels are read.
    """

    name: Literal["embed_kd"] = "embed_kd"
    mse_weight: Schedule = 1.0
    cos_weight: Schedule = 1.0
    hidden_pairs: list[tuple[str, str]] = Field(
        [], description="[student_layer, teacher_layer] hidden states to match per token")
    hidden_weight: Schedule = 1.0


@torch.no_grad()
def _output_width(model: nn.Module, x: Tensor) -> int:
    """The width of `model`'s (B, D) output on `x`, in eval mode (its mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return int(model(x).shape[1])
    finally:
        model.train(was_training)


class EmbedKD(Method):
    """Embedding MSE + cosine through an owned projection, plus optional hidden states."""

    config_type = EmbedKDConfig
    tasks = ("embedding",)
    paper = ("Reimers & Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual "
             "using Knowledge Distillation (arXiv:2004.09813); Sanh et al. 2019, DistilBERT "
             "(arXiv:1910.01108)")
    # (B, 10) "embeddings" to (B, 12): the projection (an adapter) must get gradients.
    example = Example({"mse_weight": 1.0, "cos_weight": 0.5}, nets="embedding")
    cfg: EmbedKDConfig

    def __init__(self, cfg: EmbedKDConfig) -> None:
        super().__init__(cfg)
        self.projection: nn.Module = nn.Identity()
        self.hidden_adapters = nn.ModuleList(nn.Identity() for _ in cfg.hidden_pairs)
        self.pad_id: int | None = None

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.cfg.hidden_pairs)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.cfg.hidden_pairs)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        """Probe both output widths (and hidden shapes) on `example`; build the adapters."""
        if teacher is None:
            raise ConfigError("method", "embed_kd needs the teacher network to probe its width")
        d_s, d_t = _output_width(student, example[:2]), _output_width(teacher, example[:2])
        self.projection = nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t)
        self.pad_id = getattr(student, "pad_id", None)
        if not self.cfg.hidden_pairs:
            return
        s = probe_shapes(student, self.student_layers, example, where="method.hidden_pairs")
        t = probe_shapes(teacher, self.teacher_layers, example, where="method.hidden_pairs")
        adapters = []
        for s_name, t_name in self.cfg.hidden_pairs:
            if len(s[s_name]) != 2 or s[s_name][1:] != t[t_name][1:]:
                raise ConfigError("method.hidden_pairs", (
                    f"'{s_name}' gives {s[s_name]} and '{t_name}' {t[t_name]} per sample; pairs "
                    f"must be channels-first token states (hidden, T) of one length, such as "
                    f"the text encoders' tokens.<k>"))
            adapters.append(nn.Identity() if s[s_name] == t[t_name]
                            else make_adapter(s[s_name], t[t_name]))
        self.hidden_adapters = nn.ModuleList(adapters)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"mse_weight": value_at(self.cfg.mse_weight, progress),
                "cos_weight": value_at(self.cfg.cos_weight, progress),
                "hidden_weight": value_at(self.cfg.hidden_weight, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "embed_kd needs the teacher's embeddings"
        w = self.scalars(progress)
        student = self.projection(out.student_logits.float())  # fp32 under bf16 autocast too
        terms = {"mse": w["mse_weight"] * embedding_mse(student, out.teacher_logits),
                 "cos": w["cos_weight"] * cosine_distance(student, out.teacher_logits)}
        if self.cfg.hidden_pairs:
            ids = batch["input"]
            mask = None if self.pad_id is None else ids != self.pad_id
            total: Tensor | float = 0.0
            for adapter, (s_name, t_name) in zip(self.hidden_adapters, self.cfg.hidden_pairs,
                                                 strict=True):
                total = total + hidden_mse(adapter(out.student_feats[s_name].float()),
                                                 out.teacher_feats[t_name], mask=mask)
            terms["hidden"] = w["hidden_weight"] * total
        return terms
