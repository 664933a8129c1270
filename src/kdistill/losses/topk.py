"""Token-level distillation against a sparse teacher: its top-k log-probabilities per token.

A top-k teacher cache (`kdistill.cache`, `CacheKey.topk`) keeps, per token, the k largest
log-probabilities lp_i = log p_i of the teacher at T = 1 (a log-softmax over the full vocabulary
V) and their vocabulary indices S. The missing mass r = 1 − Σ_S exp(lp_i) is not stored; the
loss makes it explicit, `missing`:

- "renormalize": the teacher is p on S renormalised to sum to 1, and 0 elsewhere; the KL runs
  over S only: Σ_S p̂_i (log p̂_i − log q_i) with q the student's full-vocabulary softmax.
- "uniform": r is spread evenly over the V − k other tokens, u = r / (V − k) each; the KL adds
  the tail term Σ_{j∉S} u (log u − log q_j) = (V − k) u log u − u (Σ_V log q − Σ_S log q),
  computed from the student's log-normaliser and logit sum, with no (..., V) teacher tensor.
  Stored values rounded to fp16/bf16 can sum above 1: r is clamped at 0 and the result
  renormalised (then "uniform" equals "renormalize" for that token).

Both are exactly `kd_kl(student, ℓ, temperature=T)` on a dense teacher "logit" vector ℓ:
ℓ = lp on S and −inf elsewhere ("renormalize"), ℓ = lp on S and log u elsewhere ("uniform");
the tests check that, value and gradient. With k = V both equal `kd_kl` on the dense teacher.

Temperature (the cached values are at T = 1): the teacher at T is softmax(ℓ / T).
- "renormalize" is exact: softmax(teacher_logits / T) restricted to S and renormalised is
  softmax over S of lp / T (lp and the logits differ by a per-token constant), and the top-k
  set does not depend on T.
- "uniform" is exact on S up to one normaliser (the ratios p_i / p_j, i, j ∈ S, are the true
  tempered ones), but the tail is flat: its tempered mass is (V − k) (r / (V − k))^(1/T),
  where the true one is Σ_{j∉S} p_j^(1/T). By the power-mean inequality the flat tail
  over-states the tail mass for T > 1 and under-states it for T < 1; it is exact at T = 1,
  for k ≥ V − 1, and for a teacher whose tail is really flat.

Reverse KL, JSD(β) and TV need the teacher's probability of every token the student puts
mass on, so for them the top-k teacher is first made dense (`densify_topk`: the vector ℓ
above, (..., V), built per micro-batch; the cache on disk stays k values per token) and the
dense `token_kd` runs on it. With "renormalize" the teacher is 0 outside its top-k, so reverse
KL is infinite wherever the student is not: that pair is refused. With "uniform" the tail mass
r is floored at `MIN_TAIL` (1e-6) for these kinds: fp16-rounded values often sum to 1 for a
confident teacher, and a zero tail would make reverse KL infinite; the floor turns it into a
large finite penalty (−log(1e-6 / (V − k)) ≈ 25 nats per unit of student mass at V = 49,152).

Other conventions as in `kdistill.losses.tokens`: math in float32 (float64 if an input is
float64), T² applied by default, masking by `labels != ignore_index` and `mask`, "mean" over
the valid tokens or `normalizer`.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_reduction, reduce_loss
from kdistill.losses.logits import (
    _check_logits,
    _check_temperature,
    _compute_dtype,
    _prepare,
    hard_cross_entropy,
)
from kdistill.losses.tokens import (
    TokenLoss,
    _kl_terms,
    check_alpha,
    check_kind_and_beta,
    token_kd,
    token_valid_mask,
)

__all__ = ["MIN_TAIL", "NO_MASS", "TOPK_KINDS", "TopKMissing", "densify_topk",
           "sparse_targets", "topk_distill_loss", "topk_kd"]

TopKMissing = Literal["renormalize", "uniform"]
_MISSING: tuple[str, ...] = get_args(TopKMissing)
# The token_kd kinds a top-k teacher supports: forward KL sparsely, the others densified.
TOPK_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tv")
MIN_TAIL = 1e-6  # the smallest tail mass r for the densified kinds (see the module docstring)
NO_MASS = -1e4  # a stored log-probability standing for zero mass (caches refuse -inf)


def sparse_targets(logprobs: Tensor, k: int, tail_samples: int = 0, *,
                   seed: int = 0, systematic: bool = False) -> tuple[Tensor, Tensor]:
    """(values, indices), each (..., k), sorted by value descending: what a top-k cache stores
    per token, from the teacher's full log-probabilities `logprobs` (..., V).

    `tail_samples` m = 0: the k largest. m > 0: the k − m largest exactly, then m draws with
    replacement (seeded by `seed`) from the teacher's distribution outside them; a distinct
    drawn token j stores log(r·c_j / m), r the tail mass and c_j its count, and slots left
    unused by repeated draws store `NO_MASS` on tokens outside the head. E[r·c_j / m] = p_j for
    every tail token, so the stored distribution sums to 1 and is an unbiased estimate of the
    teacher's: forward KL's gradient on it is unbiased (the plain top-k renormalised is not).
    The sampling idea is Anshumann et al. 2025 (arXiv:2503.16870), who draw all k; keeping
    the head exact removes most of the variance.

    `systematic`: the m draws are the points (j + u)/m, j = 0..m − 1, one u ~ U(0, 1) per
    row, through the tail's inverse CDF (systematic resampling): each draw is still marginally
    from the tail, so the estimate stays unbiased, but a token of tail share q is drawn ⌊m·q⌋
    or ⌈m·q⌉ times, never far from its expectation (lower variance than independent draws)."""
    if tail_samples == 0:
        top = logprobs.topk(k, dim=-1)
        return top.values, top.indices
    vocab, m = logprobs.shape[-1], tail_samples
    head = logprobs.topk(k - m, dim=-1)
    flat_head = head.indices.reshape(-1, k - m)
    tail = logprobs.reshape(-1, vocab).exp().scatter(1, flat_head, 0.0)
    mass = tail.sum(-1, keepdim=True)
    # A row whose tail rounds to 0 draws from anything: its slots get zero mass below.
    gen = torch.Generator(device=logprobs.device).manual_seed(seed)
    weights = torch.where(mass > 0, tail, 1.0)
    if systematic:
        draws = _systematic_draws(weights, m, gen)
    else:
        draws = torch.multinomial(weights, m, replacement=True, generator=gen)
    counts = torch.zeros_like(tail).scatter_add_(1, draws, torch.ones_like(draws, dtype=tail.dtype))
    counts.scatter_(1, flat_head, -1.0)  # unused slots never land on a head token
    counts, ids = counts.topk(m, dim=-1)
    share = mass * counts.clamp(min=0) / m
    tail_lp = torch.where(share > 0, share.log(), torch.full_like(share, NO_MASS))
    values = torch.cat([head.values.reshape(-1, k - m), tail_lp], dim=-1)
    indices = torch.cat([flat_head, ids], dim=-1)
    values, order = values.sort(dim=-1, descending=True)
    shape = (*logprobs.shape[:-1], k)
    return values.reshape(shape), indices.gather(-1, order).reshape(shape)


_CDF_ROWS = 512  # rows per float64 CDF: 512 x 49 k tokens = 200 MB


def _systematic_draws(weights: Tensor, m: int, gen: torch.Generator) -> Tensor:
    """m draws per row of `weights` (rows, V) ≥ 0: the points (j + u)/m of the row's
    normalised CDF, one u ~ U(0, 1) per row (systematic resampling), in row chunks."""
    # float64 (float32 on MPS, which has none): 49 k float32 sums drift by ~1e-4
    dtype = torch.float32 if weights.device.type == "mps" else torch.float64
    u = torch.rand(len(weights), 1, generator=gen, device=weights.device, dtype=dtype)
    points = (torch.arange(m, device=weights.device, dtype=dtype) + u) / m
    out = []
    for start in range(0, len(weights), _CDF_ROWS):
        cdf = weights[start:start + _CDF_ROWS].to(dtype).cumsum_(-1)
        cdf /= cdf[:, -1:].clone()  # 1 at the end: every point below 1 finds a token
        # right=True: a point on a flat stretch (a head token, mass 0) goes past it
        found = torch.searchsorted(cdf, points[start:start + _CDF_ROWS], right=True)
        out.append(found.clamp_max(weights.shape[-1] - 1))
    return torch.cat(out)


def densify_topk(teacher_logprobs: Tensor, teacher_indices: Tensor, vocab: int,
                 missing: TopKMissing, *, min_tail: float = 0.0) -> Tensor:
    """The dense teacher "logits" ℓ (..., V) a top-k teacher stands for (module docstring):
    the stored log-probabilities on the top-k ids; −inf elsewhere ("renormalize") or
    log(r / (V − k)) with r = max(1 − Σ_S p_i, `min_tail`) ("uniform"). float32 (float64 for
    float64 input); softmax(ℓ / T) is the teacher at temperature T."""
    dtype = torch.float64 if teacher_logprobs.dtype == torch.float64 else torch.float32
    lp = teacher_logprobs.to(dtype)
    k = lp.shape[-1]
    if missing == "renormalize" or k == vocab:
        fill = lp.new_full((*lp.shape[:-1], 1), float("-inf"))
    else:
        covered = torch.logsumexp(lp, dim=-1, keepdim=True)
        r = (-torch.expm1(covered)).clamp(min=min_tail)  # 0 (log: -inf) only if min_tail = 0
        fill = torch.log(r) - math.log(vocab - k)
    dense = fill.expand(*lp.shape[:-1], vocab).clone()
    return dense.scatter_(-1, teacher_indices.long(), lp)


def _check_topk(student: Tensor, logprobs: Tensor, indices: Tensor, kind: str,
                missing: str) -> None:
    if kind not in TOPK_KINDS:
        raise ValueError(
            f"a top-k teacher supports kind {', '.join(map(repr, TOPK_KINDS))} only; got "
            f"{kind!r}"
        )
    if missing not in _MISSING:
        raise ValueError(f"missing must be one of {', '.join(map(repr, _MISSING))}; "
                         f"got {missing!r}")
    if kind == "reverse_kl" and missing == "renormalize" and logprobs.shape[-1] < student.shape[-1]:
        raise ValueError(
            "reverse KL against a renormalised top-k teacher is infinite (the teacher is 0 "
            "outside its top-k, the student is not): use missing='uniform'"
        )
    _check_logits(student, "student_logits")
    _check_logits(logprobs, "teacher_logprobs")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"teacher_indices must be an integer tensor; got {indices.dtype}")
    if logprobs.shape != indices.shape or logprobs.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"teacher_logprobs {tuple(logprobs.shape)} and teacher_indices "
            f"{tuple(indices.shape)} must both be (..., k) with ... = the student's leading "
            f"shape {tuple(student.shape[:-1])}"
        )
    if not 1 <= logprobs.shape[-1] <= student.shape[-1]:
        raise ValueError(f"k = {logprobs.shape[-1]} must be in 1 .. V = {student.shape[-1]}")


def topk_kd(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    *,
    kind: str = "forward_kl",
    missing: TopKMissing = "renormalize",
    temperature: float | Tensor = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    scale_by_t2: bool = True,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """A token-level divergence against a top-k teacher; KL(teacher ‖ student) by default.

    See the module docstring for `missing`, for what temperature does to each mode, and for
    the densified kinds (reverse KL, JSD(β), TV; `token_kd` on `densify_topk`).

    Args:
        student_logits: shape (..., V), e.g. (B, T, V).
        teacher_logprobs: (..., k), the teacher's log-softmax at T = 1 on its top-k tokens
            (any order; fp16/bf16 are computed in float32). Not detached here.
        teacher_indices: (..., k) integer vocabulary ids of those tokens, distinct per token.
        kind: one of `TOPK_KINDS`: "forward_kl" (sparse, exact), "reverse_kl" (needs
            missing="uniform"), "jsd", "tv" (densified).
        missing: "renormalize" or "uniform", how the mass outside the top-k is treated.
        temperature: T > 0, a float or a scalar tensor.
        beta: β of "jsd", in [0, 1].
        labels: optional integer targets, shape (...); `ignore_index` marks a skipped token.
        ignore_index: the label value that marks a position to skip.
        mask: optional bool, shape (...); True where the token counts (ANDed with labels).
        reduction: "mean", "sum" or "none"; see `reduce_loss`.
        scale_by_t2: multiply by T² (default True, as `kd_kl`).
        normalizer: denominator for "mean" (e.g. `token_normalizer(...)`).

    Returns:
        A scalar for "mean"/"sum", else shape (...) with 0 at masked positions; float32
        (float64 for float64 inputs).
    """
    check_reduction(reduction)
    _check_topk(student_logits, teacher_logprobs, teacher_indices, kind, missing)
    _check_temperature(temperature)
    if kind != "forward_kl":
        check_kind_and_beta(kind, beta)
        dense = densify_topk(teacher_logprobs, teacher_indices, student_logits.shape[-1],
                             missing, min_tail=MIN_TAIL)
        return token_kd(student_logits, dense, kind=kind, beta=beta, temperature=temperature,
                        labels=labels, ignore_index=ignore_index, mask=mask,
                        reduction=reduction, scale_by_t2=scale_by_t2, normalizer=normalizer)
    valid = token_valid_mask(labels, mask, student_logits.shape[:-1], ignore_index)
    vocab, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    t: Tensor | float = temperature
    if isinstance(temperature, Tensor):
        t = temperature.to(device=student_logits.device, dtype=dtype).reshape(())

    # Student: log q_i = z_i / T − logsumexp(z / T) on S only; masked rows zeroed first, so an
    # inf or NaN at a padded token reaches neither the value nor the gradient.
    z = _prepare(student_logits, valid, dtype) / t
    log_norm = torch.logsumexp(z, dim=-1)  # (...)
    lp = teacher_logprobs.to(dtype)
    idx = teacher_indices.long()
    if valid is not None:  # placeholders on masked rows (never read): finite, in range
        lp = torch.where(valid.unsqueeze(-1), lp, lp.new_zeros(()))
        idx = torch.where(valid.unsqueeze(-1), idx, idx.new_zeros(()))
    log_q = z.gather(-1, idx) - log_norm.unsqueeze(-1)  # (..., k)

    a = lp / t  # the teacher's tempered log-weights on S (an unnormalised log-softmax)
    if missing == "renormalize" or k == vocab:  # k = V: nothing missing, both modes agree
        log_p = a - torch.logsumexp(a, dim=-1, keepdim=True)
        per_token = _kl_terms(log_p, log_q)
    else:
        n = vocab - k
        # r = 1 − Σ_S p_i in log space; clamped at 0 (log r = −inf) when rounding of the
        # stored values pushed Σ_S p_i to 1 or above.
        covered = torch.logsumexp(lp, dim=-1)  # log Σ_S p_i, at T = 1
        log_r = torch.log((-torch.expm1(covered)).clamp(min=0.0))
        b = (log_r - math.log(n)) / t  # tempered log-weight of each tail token
        # softmax(ℓ / T) over the dense vector (k entries a, n entries b): one normaliser.
        log_z = torch.logaddexp(torch.logsumexp(a, dim=-1), b + math.log(n))
        log_p = a - log_z.unsqueeze(-1)
        log_u = b - log_z  # log of each tail token's probability at T (−inf when r = 0)
        u = log_u.exp()
        # Σ_{j∉S} log q_j = Σ_V (z_j / T − log_norm) − Σ_S log q_i
        tail_log_q = z.sum(dim=-1) - vocab * log_norm - log_q.sum(dim=-1)
        # where, not a product: u = 0 makes u · n · log u = 0 · (−inf) = NaN.
        tail = torch.where(u > 0, u * (n * log_u - tail_log_q), u.new_zeros(()))
        per_token = _kl_terms(log_p, log_q) + tail
    if scale_by_t2:
        per_token = per_token * (t * t)
    return reduce_loss(per_token, mask=valid, reduction=reduction, normalizer=normalizer)


def topk_distill_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    labels: Tensor,
    *,
    alpha: float | Tensor = 0.5,
    kind: str = "forward_kl",
    missing: TopKMissing = "renormalize",
    temperature: float | Tensor = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    normalizer: float | Tensor | None = None,
) -> TokenLoss:
    """alpha · topk_kd + (1 − alpha) · next-token cross-entropy, over the same valid tokens.

    The top-k counterpart of `token_distill_loss`: same arguments, with the teacher given as
    `teacher_logprobs` / `teacher_indices` (..., k) and `missing` as in `topk_kd`. Returns
    TokenLoss(loss, kd, ce), per-valid-token means (or sums / normalizer).
    """
    check_alpha(alpha)
    kd = topk_kd(
        student_logits, teacher_logprobs, teacher_indices, kind=kind, missing=missing,
        temperature=temperature, beta=beta, labels=labels, ignore_index=ignore_index, mask=mask,
        scale_by_t2=scale_by_t2, normalizer=normalizer,
    )
    ce = hard_cross_entropy(
        student_logits, labels, ignore_index=ignore_index, mask=mask, normalizer=normalizer
    )
    return TokenLoss(alpha * kd + (1 - alpha) * ce, kd, ce)
