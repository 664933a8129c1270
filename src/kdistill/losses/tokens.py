"""Token-level distillation losses for language models, over (B, T, V) logits.

Divergences between the teacher's and the student's next-token distributions, one value per
token, then reduced over the valid tokens only: forward KL (Hinton, arXiv:1503.02531), reverse
KL (MiniLLM, arXiv:2306.08543), the generalized Jensen-Shannon divergence JSD(β) (GKD,
arXiv:2306.13649) and the total variation distance. `token_distill_loss` mixes one of them with
the hard next-token cross-entropy.

Conventions, shared with `kdistill.losses.logits` (whose checks and `kd_kl` are reused):

- p = softmax(teacher / T) is the teacher, q = softmax(student / T) the student; all math runs
  in float32 (float64 if an input is float64) whatever the input dtype, and the result has
  that dtype. Mixtures are formed in log space (`logaddexp` of log-probabilities plus log
  weights), never as the log of a sum of probabilities.
- T²: applied by default (`scale_by_t2=True`), as in `kd_kl`, to every kind, so that gradient
  magnitudes stay comparable across temperatures. With T = 1, the usual LLM setting, it is moot.
- Masking: a token counts where `labels != ignore_index` (and `mask`, when given, is True).
  Labels are aligned with the logits: `labels[b, t]` is the target of `logits[b, t]`; use
  `shift_labels` on the raw input ids rather than slicing (and copying) the logits.
- "mean" divides by the number of valid tokens, or by `normalizer` when given. Pass the count
  over the whole gradient-accumulation window and all DDP ranks (`token_normalizer`), so that
  summing the micro-batch losses gives the true per-token mean.
- Nothing is detached here: callers run the teacher under `torch.no_grad()`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_mask, check_reduction, reduce_loss
from kdistill.losses.logits import _scaled_log_softmax, hard_cross_entropy, kd_kl

__all__ = [
    "TokenKDKind",
    "TokenLoss",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "shift_labels",
    "token_distill_loss",
    "token_kd",
    "token_normalizer",
    "total_variation",
]

TokenKDKind = Literal["forward_kl", "reverse_kl", "jsd", "tv"]
_KINDS: tuple[str, ...] = get_args(TokenKDKind)


class TokenLoss(NamedTuple):
    """`loss` = alpha · kd + (1 − alpha) · ce; `kd` and `ce` are the unweighted parts (for logs)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def check_kind_and_beta(kind: str, beta: float) -> None:
    """Raise ValueError for an unknown `kind` or a β outside [0, 1]."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, _KINDS))}; got {kind!r}")
    if not (math.isfinite(float(beta)) and 0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must be in [0, 1]; got {beta!r}")


def check_alpha(alpha: float | Tensor) -> None:
    """Raise ValueError unless a float `alpha` is in [0, 1] (tensors are trusted: no sync)."""
    if not isinstance(alpha, Tensor) and not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")


def token_valid_mask(
    labels: Tensor | None, mask: Tensor | None, shape: torch.Size, ignore_index: int
) -> Tensor | None:
    """`labels != ignore_index` ANDed with `mask`; None when neither is given."""
    check_mask(mask, shape, what="logits' leading")
    if labels is None:
        return mask
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"{tuple(shape)}"
        )
    valid = labels != ignore_index
    return valid if mask is None else valid & mask


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ_v a (log a − log b), with 0 · log 0 = 0 (`where`, so log b = -inf there is no NaN)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), a.new_zeros(())).sum(dim=-1)


def token_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: TokenKDKind = "forward_kl",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    scale_by_t2: bool = True,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """A token-level divergence between teacher and student next-token distributions.

    kinds (p = teacher, q = student, both softened by T):
      - "forward_kl": KL(p ‖ q), mass-covering; exactly `kd_kl` (Hinton, arXiv:1503.02531).
      - "reverse_kl": KL(q ‖ p), mode-seeking (MiniLLM, arXiv:2306.08543).
      - "jsd": JSD(β) = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m), m = β · p + (1 − β) · q
        (GKD, arXiv:2306.13649, eq. 3; TRL's `generalized_jsd_loss`). β = 0.5 is the usual
        symmetric JSD, bounded by log 2. JSD(β) itself vanishes at both ends:
        JSD(β) = β · KL(p ‖ q) + O(β²) and (1 − β) · KL(q ‖ p) + O((1 − β)²), i.e.
        JSD(β) / β → forward KL and JSD(β) / (1 − β) → reverse KL. As in TRL, β = 0 and β = 1
        return forward and reverse KL themselves (no 1/β factor): the ends are those losses,
        the interior is the (smaller-valued) JSD; a β near an end scales the loss down by β.
      - "tv": total variation ½ Σ_v |p − q|, in [0, 1] (times T² if scaled).

    Args:
        student_logits: shape (..., V), e.g. (B, T, V).
        teacher_logits: same shape. Not detached here.
        kind: which divergence, see above.
        beta: β in [0, 1], used by "jsd" only.
        temperature: T > 0, a float or a scalar tensor.
        labels: optional integer targets, shape (...); positions equal to `ignore_index` are
            masked.
        ignore_index: the label value that marks a position to skip.
        mask: optional bool, shape (...); True where the token counts (ANDed with labels).
        reduction: "mean", "sum" or "none"; see `reduce_loss`.
        scale_by_t2: multiply by T² (default True, as `kd_kl`).
        normalizer: denominator for "mean" (e.g. `token_normalizer(...)`).

    Returns:
        A scalar for "mean"/"sum", else shape (...) with 0 at masked positions.
    """
    check_reduction(reduction)
    check_kind_and_beta(kind, beta)
    valid = token_valid_mask(labels, mask, student_logits.shape[:-1], ignore_index)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kd_kl(
            student_logits, teacher_logits, temperature=temperature, mask=valid,
            reduction=reduction, scale_by_t2=scale_by_t2, normalizer=normalizer,
        )
    log_q, log_p, t = _scaled_log_softmax(student_logits, teacher_logits, temperature, valid)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        per_token = _kl_terms(log_q, log_p)
    elif kind == "jsd":
        # log m = log(β p + (1 − β) q) = logaddexp(log p + log β, log q + log(1 − β)): exact
        # where one distribution underflows, and never log(0) for a class either one covers.
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        per_token = beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    else:  # "tv"
        per_token = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if scale_by_t2:
        per_token = per_token * (t * t)
    return reduce_loss(per_token, mask=valid, reduction=reduction, normalizer=normalizer)


def _kind(kind: TokenKDKind, doc: str) -> Callable[..., Tensor]:
    """`token_kd` with `kind` fixed: the same keyword arguments and defaults otherwise."""
    fn = functools.partial(token_kd, kind=kind)
    fn.__doc__ = doc  # type: ignore[attr-defined]
    return fn


# The four divergences by name (one function, `token_kd`, underneath).
forward_kl = _kind("forward_kl", "KL(teacher ‖ student) per token (arXiv:1503.02531).")
reverse_kl = _kind("reverse_kl", "KL(student ‖ teacher) per token (MiniLLM, arXiv:2306.08543).")
generalized_jsd = _kind("jsd", "JSD(β) per token (GKD, arXiv:2306.13649); see `token_kd`.")
total_variation = _kind("tv", "½ Σ_v |p − q| per token, in [0, 1] at T = 1.")


def token_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float | Tensor = 0.5,
    kind: TokenKDKind = "forward_kl",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    normalizer: float | Tensor | None = None,
) -> TokenLoss:
    """alpha · token_kd + (1 − alpha) · next-token cross-entropy, over the same valid tokens.

    The reference (naive) form; `kdistill.losses.chunked` computes the same value and
    gradients without holding full-vocabulary intermediates for every token at once.

    Args:
        student_logits: shape (..., V), e.g. (B, T, V).
        teacher_logits: same shape. Not detached here.
        labels: integer targets aligned with the logits, shape (...); `ignore_index` = skip.
        alpha: weight of the distillation term, in [0, 1]; a float or a scalar tensor. To make
            it follow a schedule, pass `kdistill.schedules.value_at(schedule, progress)`.
        kind, beta, temperature, scale_by_t2: as in `token_kd` (T and T² act on the KD term
            only; the cross-entropy is at T = 1).
        ignore_index: the label value that marks a position to skip.
        mask: optional bool, shape (...); True where the token counts.
        normalizer: denominator of both means (e.g. `token_normalizer(...)`).

    Returns:
        TokenLoss(loss, kd, ce): scalars in float32 (float64 for float64 logits); each term is
        a per-valid-token mean (or sum / normalizer).
    """
    check_alpha(alpha)
    kd = token_kd(
        student_logits, teacher_logits, kind=kind, beta=beta, temperature=temperature,
        labels=labels, ignore_index=ignore_index, mask=mask, scale_by_t2=scale_by_t2,
        normalizer=normalizer,
    )
    ce = hard_cross_entropy(
        student_logits, labels, ignore_index=ignore_index, mask=mask, normalizer=normalizer
    )
    return TokenLoss(alpha * kd + (1 - alpha) * ce, kd, ce)


def shift_labels(labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Next-token targets aligned with the logits: out[..., t] = labels[..., t + 1].

    The last position has no next token and gets `ignore_index`. Shifting the labels (shape
    (B, T), cheap) instead of slicing the logits avoids a copy of the (B, T, V) tensor.
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def token_normalizer(
    labels: Tensor | Sequence[Tensor], *, ignore_index: int = -100, distributed: bool = True
) -> Tensor:
    """The `normalizer` that makes micro-batch losses sum to the global per-token mean.

    Counts `labels != ignore_index` over every micro-batch of one optimiser step. Under
    torch.distributed (when `distributed` and a process group is initialised) the count is
    summed over all ranks (one all_reduce) and divided by the world size: DDP averages the
    gradients over ranks, so each rank divides its token sum by N_global / world_size and the
    averaged gradient is that of Σ(all tokens) / N_global.

    Args:
        labels: the (shifted) labels of the micro-batches, one tensor or a sequence of them.
        ignore_index: the label value that marks a position to skip.
        distributed: reduce over ranks when a process group is initialised.

    Returns:
        A float32 scalar tensor on the labels' device (0 for a window with no valid token).
    """
    parts = [labels] if isinstance(labels, Tensor) else list(labels)
    if not parts:
        raise ValueError("labels must hold at least one micro-batch")
    count = sum((p != ignore_index).sum() for p in parts)
    assert isinstance(count, Tensor)
    count = count.to(torch.float32)
    if distributed and dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    return count
