"""On-policy distillation: GKD (Agarwal et al. 2023, arXiv:2306.13649).

With probability λ a micro-batch is replaced by the student's own continuations of its prompts,
which the (online) teacher then scores; the loss is the generalized JSD(β) between the teacher's
and the student's next-token distributions on those samples. Training on its own samples
removes the train/inference mismatch (exposure bias) of distilling on fixed text only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.losses import hard_cross_entropy, shift_labels, token_kd
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at
from kdistill.types import IGNORE_INDEX


class GKDConfig(MethodConfig):
    """loss = α·JSD(β)(teacher_T ‖ student_T)·T² + (1 − α)·CE(next token), per valid token.

    Each micro-batch draws u ~ U(0, 1) from torch's global RNG (seeded by the engine and saved
    in its checkpoints, so a resumed run draws the same). If u < λ (`lmbda`) the batch is
    on-policy: the first `prompt_tokens` tokens of each block are kept and the student samples
    the rest of the block (at `sample_temperature`, with `top_k` / `top_p`), one token at a
    time and without gradients; the labels are -100 on the prompt, so only the sampled tokens
    are scored. Otherwise the batch is the real data, every token scored. JSD(β) is
    `token_kd(kind="jsd")`: β = 0 / 1 give forward / reverse KL exactly; T² as in `token_kd`.

    Two temperatures, kept apart as in TRL's GKDTrainer: `sample_temperature` shapes what the
    student generates (the paper samples at 1, TRL defaults to 0.9); `temperature` softens both
    distributions in the loss (1 in the paper and TRL). The CE term is computed on off-policy
    batches only: on a student sample the "target" is the token the student itself drew, so its
    CE would just reinforce the student's own guesses; on on-policy batches "ce" is 0. GKD uses
    no CE (α = 1, the default). Defaults are the paper's / TRL's: λ = 0.5, β = 0.5.

    No EOS stop: the student always fills the block (an EOS it samples stays, and sampling goes
    on after it), so shapes stay (B, T); packed training blocks hold document boundaries
    mid-block anyway. Inputs must be unpadded token blocks (as `causal_lm` data are).
    """

    name: Literal["gkd"] = "gkd"
    lmbda: UnitWeight = Field(0.5, description="λ, the probability that a micro-batch is "
                              "replaced by the student's samples (0: off-policy only)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight β")
    temperature: Temperature = Field(1.0, description="the loss temperature")
    sample_temperature: float = Field(1.0, gt=0, description="the student's sampling temperature")
    prompt_tokens: int | None = Field(None, ge=1, description="leading tokens of each block kept "
                                      "as the prompt; null: half the block")
    alpha: UnitWeight = Field(1.0, description="weight of JSD; 1 − α on next-token CE "
                              "(off-policy batches only)")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0: all")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass; 1: off")


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits (B, V) with the tokens outside the top k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)  # ties with the k-th are kept
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token once the likelier ones already hold top_p (the likeliest always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
    return logits


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """One token per row (B, 1) from softmax(logits / temperature), filtered; global RNG."""
    probs = _filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1)


@torch.no_grad()
def sample_continuation(student: nn.Module, prompt: Tensor, length: int, *,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        vocab: int | None = None) -> Tensor:
    """`prompt` (B, P) int64 extended to (B, length) by sampling from `student` (ids -> logits).

    A wrapped transformers LM (`kdistill.models.hf.CausalLM`: the transformers model as
    `.model`, see `_kv_cached`) reuses its key/value cache (one forward of the prompt, then one
    token per step); any other causal model is re-run over the whole prefix for each new token.
    Both draw from torch's global RNG, so `torch.manual_seed` makes the samples reproducible.
    `vocab` limits the tokens drawn to the first `vocab` ids (a teacher with a smaller table).
    """
    ids = prompt
    if ids.shape[1] >= length:
        return ids[:, :length]
    cached = _kv_cached(student)
    if cached:
        out = student.model(input_ids=ids, use_cache=True)
        logits, past = out.logits[:, -1], out.past_key_values
    else:
        logits = student(ids)[:, -1]
    while True:
        token = _sample(logits[:, :vocab], temperature, top_k, top_p)
        ids = torch.cat([ids, token], dim=1)
        if ids.shape[1] == length:
            return ids
        if cached:
            out = student.model(input_ids=token, past_key_values=past, use_cache=True)
            logits, past = out.logits[:, -1], out.past_key_values
        else:
            logits = student(ids)[:, -1]


def _kv_cached(model: nn.Module) -> bool:
    """True for a wrapper whose `.model` is a transformers generation model (it takes
    `input_ids`, `past_key_values` and `use_cache` and returns `.logits`, `.past_key_values`):
    duck typing, so methods import no model code."""
    inner = getattr(model, "model", None)
    return isinstance(inner, nn.Module) and callable(
        getattr(inner, "prepare_inputs_for_generation", None))


def _embedding_rows(model: nn.Module | None) -> int | None:
    """Rows of a transformers model's input embedding table (None when there is none)."""
    inner = getattr(model, "model", model)
    get = getattr(inner, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


class GKD(Method):
    """Generalized KD: JSD(β) on the student's own samples with probability λ, else on data."""

    config_type = GKDConfig
    tasks = ("causal_lm",)
    on_policy = True
    paper = "Agarwal et al. 2023, On-Policy Distillation of Language Models (arXiv:2306.13649)"
    example = Example({"lmbda": 0.5, "beta": 0.5, "alpha": 0.9, "prompt_tokens": 4},
                      nets="llama")
    cfg: GKDConfig

    def __init__(self, cfg: GKDConfig) -> None:
        super().__init__(cfg)
        self.vocab: int | None = None  # the tokens the student may draw (setup)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        # A sampled id must exist in both embedding tables: with padded tables of different
        # sizes (same tokenizer), draw only from the shared rows.
        rows = [r for r in (_embedding_rows(student), _embedding_rows(teacher)) if r is not None]
        self.vocab = min(rows) if rows else None

    def prompt_length(self, seq_len: int) -> int:
        """Tokens kept as the prompt in a block of `seq_len` tokens."""
        prompt = self.cfg.prompt_tokens or max(1, seq_len // 2)
        if prompt >= seq_len:
            raise ConfigError("method.prompt_tokens", f"{prompt} prompt tokens leave nothing "
                              f"to generate in blocks of {seq_len} tokens; use fewer")
        return prompt

    def prepare_batch(self, batch: Batch, student: nn.Module, progress: Progress) -> Batch:
        lmbda = value_at(self.cfg.lmbda, progress)
        # Always draw, even at λ = 0 or 1, so the RNG stream does not depend on λ's value.
        if float(torch.rand(())) >= lmbda:
            return {**batch, "on_policy": torch.tensor(False)}
        ids = batch["input"]
        prompt = self.prompt_length(ids.shape[1])
        was_training = student.training
        student.eval()  # no dropout while sampling: the student's own distribution
        try:
            new = sample_continuation(student, ids[:, :prompt], ids.shape[1],
                                      temperature=self.cfg.sample_temperature,
                                      top_k=self.cfg.top_k, top_p=self.cfg.top_p,
                                      vocab=self.vocab)
        finally:
            student.train(was_training)
        labels = new.clone()
        labels[:, :prompt] = IGNORE_INDEX  # score the sampled tokens only, as in GKD
        return {**batch, "input": new, "label": labels, "on_policy": torch.tensor(True)}

    def batch_items(self, batch: Batch) -> int:
        return int((batch["label"][:, 1:] != IGNORE_INDEX).sum())

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"lmbda": value_at(self.cfg.lmbda, progress),
                "temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = self.scalars(progress)
        assert out.teacher_logits is not None, "gkd needs the online teacher's logits"
        student_logits, teacher_logits = out.student_logits, out.teacher_logits
        vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            # Padded embedding tables for one tokenizer: compare the shared prefix.
            student_logits = student_logits[..., :vocab]
            teacher_logits = teacher_logits[..., :vocab]
        labels = shift_labels(batch["label"], ignore_index=IGNORE_INDEX)
        kd = token_kd(student_logits, teacher_logits, kind="jsd", beta=self.cfg.beta,
                      temperature=s["temperature"], labels=labels, ignore_index=IGNORE_INDEX)
        on_policy = bool(batch.get("on_policy", torch.tensor(False)))
        if on_policy or s["alpha"] == 1.0:
            # No CE on the student's own samples (see GKDConfig). A constant zero is enough:
            # the "kd" term, always present, carries the graph.
            ce = kd.new_zeros(())
        else:
            ce = hard_cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX)
        return {"kd": s["alpha"] * kd, "ce": (1 - s["alpha"]) * ce}
