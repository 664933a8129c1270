"""Attention-matrix distillation for transformers (MiniLM arXiv:2002.10957, TinyBERT
arXiv:1909.10351): the student's self-attention probabilities follow the teacher's."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill.capture import capture
from kdistill.errors import ConfigError
from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.losses.attention import attention_probs_loss
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, UnitWeight, value_at


class AttentionDistillConfig(MethodConfig):
    """loss = α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE + w · Σ_pairs attn(A_s, A_t).

    `pairs` lists [student_module, teacher_module]: modules whose forward output is the
    (B, heads, Lq, Lk) attention-probability tensor (in the zoo's `transformer`:
    `blocks.<i>.attn.probs`), or a tuple holding it at `output_index` (Hugging Face attention
    modules with eager attention and `output_attentions=True` return (attn_output,
    attn_weights): index 1). The list *is* the layer map: TinyBERT's student layer i <-
    teacher layer g(i) is one pair per mapped layer. Both models must see the same sequence
    (equal Lq, Lk). attn is `attention_probs_loss`: `kind` "kl" (MiniLM: KL(teacher ‖
    student) per query row) or "mse" (TinyBERT, here on probabilities, not scores), averaged
    over rows; `heads` "mean" averages each side's heads first (widths and head counts may
    differ), "match" compares head by head (MiniLM; needs equal head counts).

    Defaults: KL with heads averaged, w = 1, plus the KD term with T = 4, α = 0.9 as in `kd`.
    MiniLM's own setting is one pair (the last layers), `heads: match`, KL; its value-relation
    term is not part of this method. α = 0 leaves CE + attention (no logit KD).
    """

    name: Literal["attn"] = "attn"
    pairs: list[tuple[str, str]] = Field(min_length=1)
    kind: Literal["kl", "mse"] = "kl"
    heads: Literal["mean", "match"] = "mean"
    output_index: int | None = Field(
        None, ge=0, description="tuple outputs: the element holding the probabilities (HF: 1)"
    )
    weight: Schedule = 1.0
    temperature: Temperature = 4.0
    alpha: UnitWeight = 0.9


class AttentionDistill(Method):
    """Match the attention probabilities of paired student and teacher layers, plus KD."""

    config_type = AttentionDistillConfig
    paper = ("Wang et al. 2020, MiniLM: Deep Self-Attention Distillation (arXiv:2002.10957); "
             "Jiao et al. 2020, TinyBERT (arXiv:1909.10351)")
    example = Example({"pairs": [["blocks.0.attn.probs", "blocks.1.attn.probs"]]},
                      nets="transformer")
    cfg: AttentionDistillConfig

    def _key(self, name: str) -> str:
        # `capture` reads element i of a tuple output when the name ends in "[i]".
        index = self.cfg.output_index
        return name if index is None else f"{name}[{index}]"

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(self._key(s) for s, _ in self.cfg.pairs)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(self._key(t) for _, t in self.cfg.pairs)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        """Check on one example that every pair yields probabilities of compatible shapes,
        so `kdistill validate` catches a wrongly hooked module before any training."""
        if teacher is None:
            return
        feats = [self._probe(model, layers, example, side)
                 for model, layers, side in ((student, self.student_layers, "student"),
                                             (teacher, self.teacher_layers, "teacher"))]
        for s_key, t_key in zip(self.student_layers, self.teacher_layers, strict=True):
            self._check_pair(feats[0][s_key], feats[1][t_key], s_key, t_key)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {
            "temperature": value_at(self.cfg.temperature, progress),
            "alpha": value_at(self.cfg.alpha, progress),
            "weight": value_at(self.cfg.weight, progress),
        }

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "attn needs teacher logits"
        s = self.scalars(progress)
        total: Tensor | float = 0.0
        for s_key, t_key in zip(self.student_layers, self.teacher_layers, strict=True):
            a_s, a_t = out.student_feats[s_key], out.teacher_feats[t_key]
            self._check_pair(a_s, a_t, s_key, t_key)  # shapes only: no host sync per step
            total = total + attention_probs_loss(a_s, a_t, kind=self.cfg.kind,
                                                 heads=self.cfg.heads)
        kd = kd_kl(out.student_logits, out.teacher_logits, temperature=s["temperature"])
        ce = hard_cross_entropy(out.student_logits, batch["label"])
        return {"attn": s["weight"] * total, "kd": s["alpha"] * kd,
                "ce": (1.0 - s["alpha"]) * ce}

    # --- checks: errors name the recipe field the user has to fix ------------------------

    def _probe(self, model: nn.Module, layers: tuple[str, ...], example: Tensor,
               side: str) -> dict[str, Tensor]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), capture(model, layers, where="method.pairs") as feats:
                model(example[:2])
                found = dict(feats)
        finally:
            model.train(was_training)
        for key, a in found.items():
            self._check_shape(a, key, side)
            # Probabilities are non-negative and each row sums to 1 (eval mode: no dropout).
            rows = a.float().sum(dim=-1)
            if a.min() < -1e-6 or not torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
                raise ConfigError("method.pairs", (
                    f"{side} module '{key}' gives a 4-D tensor {tuple(a.shape)} whose rows are "
                    f"not probability distributions (min {float(a.min()):.3g}, row sums "
                    f"{float(rows.min()):.3g}..{float(rows.max()):.3g}); hook the softmax "
                    f"output, not the scores or a feature map"))
        return found

    def _check_shape(self, a: Tensor, key: str, side: str) -> None:
        if a.dim() != 4:
            hint = ("" if self.cfg.output_index is not None else
                    "; if the module returns a tuple (e.g. Hugging Face attention: (output, "
                    "weights)), set method.output_index to the element holding the weights")
            raise ConfigError("method.pairs", (
                f"{side} module '{key}' gives shape {tuple(a.shape)}, not attention "
                f"probabilities (B, heads, Lq, Lk): hook the module that outputs them "
                f"(zoo 'transformer': blocks.<i>.attn.probs){hint}"))

    def _check_pair(self, a_s: Tensor, a_t: Tensor, s_key: str, t_key: str) -> None:
        self._check_shape(a_s, s_key, "student")
        self._check_shape(a_t, t_key, "teacher")
        if a_s.shape[2:] != a_t.shape[2:]:
            raise ConfigError("method.pairs", (
                f"'{s_key}' gives {tuple(a_s.shape)} and '{t_key}' {tuple(a_t.shape)}: the "
                f"attention maps differ in (Lq, Lk); both models must see the same tokens "
                f"(same patch size / tokenizer)"))
        if self.cfg.heads == "match" and a_s.shape[1] != a_t.shape[1]:
            raise ConfigError("method.heads", (
                f"'match' compares head by head, but '{s_key}' has {a_s.shape[1]} heads and "
                f"'{t_key}' {a_t.shape[1]}; use heads: mean"))
