"""Cross-attention distillation for encoder-decoder translation models: the student's
decoder-over-source attention follows the teacher's, on top of word-level KD.

Cross-attention is where a translation model aligns target words with source words; matching
it transfers the teacher's alignment, not only its output distribution (attention transfer
for NMT in the spirit of MiniLM, arXiv:2002.10957, applied to cross-attention; word-level KD
of Kim & Rush, arXiv:1606.07947)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from kdistill.losses import shift_labels, token_distill_loss, topk_distill_loss
from kdistill.losses.attention import attention_probs_loss
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, UnitWeight, value_at
from kdistill.types import IGNORE_INDEX


class CrossAttnConfig(MethodConfig):
    """loss = α·KL(teacher_T ‖ student_T)·T² + (1 − α)·CE + w·Σ_pairs KL(A_t ‖ A_s).

    The first two are word-level KD per target token (as `token_kd` with kind forward_kl,
    dense teacher logits or a top-k cache). `pairs` lists [student_module, teacher_module]
    whose outputs are cross-attention probabilities (B, H, T, S) (zoo `seq2seq_transformer`:
    `decoder.<i>.cross_attn.probs`); each pair's term is KL(teacher row ‖ student row) over
    source positions, heads averaged on each side (head counts may differ), averaged over
    the target rows that predict a token (padded rows and the row after EOS are masked).
    """

    name: Literal["cross_attn"] = "cross_attn"
    pairs: list[tuple[str, str]] = Field(min_length=1)
    weight: Schedule = 1.0
    temperature: Temperature = 1.0
    alpha: UnitWeight = 0.5


class CrossAttentionDistill(Method):
    """Word-level KD plus KL between paired student / teacher cross-attention maps."""

    config_type = CrossAttnConfig
    tasks = ("seq2seq",)
    reads_topk = True
    paper = ("Kim & Rush 2016 (arXiv:1606.07947) word-level KD; attention KL as MiniLM "
             "(arXiv:2002.10957), on decoder cross-attention")
    example = Example({"pairs": [["decoder.0.cross_attn.probs",
                                  "decoder.1.cross_attn.probs"]]}, nets="seq2seq")
    cfg: CrossAttnConfig

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.cfg.pairs)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.cfg.pairs)

    def batch_items(self, batch: Batch) -> int:
        return int((batch["label"][:, 1:] != IGNORE_INDEX).sum())

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress),
                "weight": value_at(self.cfg.weight, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = self.scalars(progress)
        labels = shift_labels(batch["label"], ignore_index=IGNORE_INDEX)
        kwargs = {"alpha": s["alpha"], "temperature": s["temperature"], "kind": "forward_kl"}
        if out.teacher_topk is not None:
            res = topk_distill_loss(out.student_logits, *out.teacher_topk, labels,
                                    missing="renormalize", **kwargs)
        else:
            assert out.teacher_logits is not None, "cross_attn needs teacher outputs"
            res = token_distill_loss(out.student_logits, out.teacher_logits, labels, **kwargs)
        rows = labels != IGNORE_INDEX  # (B, T): decoder positions that predict a token
        attn: Tensor | float = 0.0
        for s_name, t_name in self.cfg.pairs:
            a_s, a_t = out.student_feats[s_name], out.teacher_feats[t_name]
            attn = attn + attention_probs_loss(a_s.float(), a_t.float(), kind="kl",
                                               heads="mean", query_mask=rows)
        return {"kd": s["alpha"] * res.kd, "ce": (1 - s["alpha"]) * res.ce,
                "attn": s["weight"] * attn}
