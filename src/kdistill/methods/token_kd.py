"""Token-level distillation for causal LMs: forward/reverse KL, JSD(β), TV per next token."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor

from kdistill.errors import ConfigError
from kdistill.losses import (
    TOPK_KINDS,
    TopKMissing,
    chunked_token_distill_loss,
    shift_labels,
    token_distill_loss,
    topk_distill_loss,
)
from kdistill.losses.tokens import TokenKDKind
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at
from kdistill.types import IGNORE_INDEX


class TokenKDConfig(MethodConfig):
    """loss = α·D(teacher_T, student_T)·T² + (1 − α)·CE(next token), per valid token.

    D is `kind`: `forward_kl` KL(p ‖ q) (Hinton; DistilBERT), `reverse_kl` KL(q ‖ p) (MiniLLM,
    arXiv:2306.08543, mode-seeking), `jsd` the generalized JSD(β) of GKD (arXiv:2306.13649;
    β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q; β = 0 / 1 give forward / reverse KL
    exactly), `tv` total variation. Position t of the logits is scored against token t + 1;
    tokens labelled -100 are skipped. Both terms are means over the valid tokens, and the
    engine weights micro-batches by their valid-token counts, so gradient accumulation gives
    the mean over every token of the step. α, T accept schedules. `chunk_size` computes the
    same loss and gradients `chunk_size` tokens at a time (about half the peak memory of the
    naive form at a 49k vocabulary; see benchmarks/bench_llm_loss.py).

    With a top-k teacher cache (`Outputs.teacher_topk`), D is `kdistill.losses.topk_kd`, the
    mass outside the teacher's top-k handled as `topk_missing` says ("renormalize": the
    teacher renormalised on its top-k; "uniform": the missing mass spread evenly over the
    other tokens): forward KL sparsely; reverse KL (uniform only), JSD and TV on the teacher
    made dense per micro-batch. `chunk_size` (dense teachers) and `topk_missing` (top-k caches)
    are each refused beside the other kind of target.
    """

    name: Literal["token_kd"] = "token_kd"
    kind: TokenKDKind = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight (kind: jsd)")
    temperature: Temperature = 1.0
    alpha: UnitWeight = 0.5
    scale_by_t2: bool = True
    chunk_size: int | None = Field(None, ge=1, description="tokens per chunk; null: naive")
    topk_missing: TopKMissing = Field(
        "renormalize", description="top-k cache only: how the teacher's mass outside its "
        "top-k is treated (renormalize or uniform)")

    @model_validator(mode="after")
    def _beta_is_read(self) -> TokenKDConfig:
        # Judged by value: overrides re-validate the whole dumped recipe.
        if self.kind != "jsd" and self.beta != type(self).model_fields["beta"].default:
            raise ValueError(f"beta: the JSD mixture weight; kind {self.kind} does not read it "
                             "(set kind: jsd or remove beta)")
        return self


class TokenKD(Method):
    """Match the teacher's next-token distribution at every position, plus next-token CE."""

    config_type = TokenKDConfig
    tasks = ("causal_lm", "seq2seq")  # seq2seq: word-level KD (Kim & Rush, 1606.07947)
    reads_topk = True
    paper = ("Hinton et al. 2015 (arXiv:1503.02531); MiniLLM (arXiv:2306.08543); "
             "GKD (arXiv:2306.13649)")
    example = Example({"kind": "jsd", "beta": 0.3, "alpha": 0.7}, nets="llama")
    cfg: TokenKDConfig

    def batch_items(self, batch: Batch) -> int:
        return int((batch["label"][:, 1:] != IGNORE_INDEX).sum())

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = self.scalars(progress)
        labels = shift_labels(batch["label"], ignore_index=IGNORE_INDEX)
        if out.teacher_topk is not None:
            if self.cfg.kind not in TOPK_KINDS:
                raise ConfigError("method.kind", f"{self.cfg.kind!r} is not supported with a "
                                  f"top-k teacher cache (supported: {', '.join(TOPK_KINDS)}); "
                                  "use a dense cache (cache.topk: null) or another kind")
            if self.cfg.kind == "reverse_kl" and self.cfg.topk_missing == "renormalize":
                raise ConfigError("method.topk_missing", "reverse KL against a renormalised "
                                  "top-k teacher is infinite (0 outside its top-k); set "
                                  "method.topk_missing: uniform")
            logprobs, indices = out.teacher_topk
            res = topk_distill_loss(
                out.student_logits, logprobs, indices, labels, alpha=s["alpha"],
                kind=self.cfg.kind, missing=self.cfg.topk_missing, beta=self.cfg.beta,
                temperature=s["temperature"], scale_by_t2=self.cfg.scale_by_t2)
            return {"kd": s["alpha"] * res.kd, "ce": (1 - s["alpha"]) * res.ce}
        assert out.teacher_logits is not None, "token_kd needs teacher outputs"
        student_logits, teacher_logits = out.student_logits, out.teacher_logits
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            # Padded embedding tables (e.g. 151,936 vs 152,064 rows for one tokenizer): the
            # rows past the tokenizer's size are never targets; compare the shared prefix.
            student_logits = student_logits[..., :vocab]
            teacher_logits = teacher_logits[..., :vocab]
        kwargs = {"alpha": s["alpha"], "kind": self.cfg.kind, "beta": self.cfg.beta,
                  "temperature": s["temperature"], "scale_by_t2": self.cfg.scale_by_t2}
        if self.cfg.chunk_size is None:
            res = token_distill_loss(student_logits, teacher_logits, labels, **kwargs)
            return {"kd": s["alpha"] * res.kd, "ce": (1 - s["alpha"]) * res.ce}
        res = chunked_token_distill_loss(student_logits, teacher_logits.detach(),
                                         labels, chunk_size=self.cfg.chunk_size, **kwargs)
        # The chunked form returns the weighted total with gradients and detached parts:
        # log the parts, let the total carry the gradient (it equals their sum).
        ce = (1 - s["alpha"]) * res.ce  # detached: "kd" = total - ce carries the gradient
        return {"kd": res.loss - ce, "ce": ce}
