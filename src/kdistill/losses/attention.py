"""Losses on transformer attention probabilities (self-attention distillation).

Every function here is pure: tensors in, a tensor out, hyper-parameters keyword-only. Nothing
is detached inside (callers detach the teacher). Inputs are attention *probabilities* of
shape (B, H, Lq, Lk) — each row over the Lk keys sums to 1, as a softmax (or a Hugging Face
eager attention module's `attn_weights`) gives them. Math runs in float32 (float64 when an
input is float64), whatever the input dtype, and the result has that dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_reduction, reduce_loss

__all__ = ["attention_probs_loss"]

# The student's log-probabilities are taken of max(p, _EPS): a key the student gives exactly
# zero mass (underflow in low precision, a masked key) costs a large finite value, not inf.
_EPS = 1e-12


def _check_probs(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be attention probabilities of shape (B, H, Lq, Lk); "
            f"got shape {tuple(x.shape)}"
        )


def attention_probs_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    kind: Literal["kl", "mse"] = "kl",
    heads: Literal["mean", "match"] = "mean",
    mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Distance between student and teacher attention distributions, one per query row.

    KL as in MiniLM (Wang et al., arXiv:2002.10957); MSE as in TinyBERT (Jiao et al.,
    arXiv:1909.10351), which applies it to the pre-softmax scores — here it is applied to the
    probabilities, so both kinds read the same tensor and need no temperature or masking of
    −inf scores.

    Args:
        student: shape (B, H_s, Lq, Lk), rows over keys sum to 1.
        teacher: shape (B, H_t, Lq, Lk), the same Lq and Lk. Not detached here.
        kind: "kl": KL(teacher row ‖ student row), summed over keys; "mse": the mean of
            (s − t)² over the keys of a row.
        heads: "mean" averages each side's probabilities over its heads first (a mean of
            distributions is a distribution), so H_s and H_t may differ; "match" compares
            head h with head h and needs H_s == H_t.
        mask: optional bool key-padding mask of shape (B, Lk), True = valid token. Padded
            keys are left out of every row and, since it is self-attention (Lq == Lk is
            required then), padded query rows are left out of the average.
        query_mask: optional bool (B, Lq), True = a query row that counts; for
            cross-attention (Lq != Lk), where `mask` cannot be used: the decoder's padded
            target rows. Combined with `mask` (both must hold) when both are given.
        reduction: "mean" over the (batch, head, valid query) rows, "sum" over them, or
            "none": the per-row values of shape (B, H', Lq), H' = 1 for "mean" heads and
            H_s for "match", 0 at padded rows.

    Returns:
        A scalar for "mean"/"sum", else shape (B, H', Lq).

    Convention: per row r, KL_r = Σ_k t_k (log t_k − log max(s_k, 1e-12)) with 0 · log 0 = 0,
    or MSE_r = Σ_k (s_k − t_k)² / (number of valid keys). "mean" then averages the rows, which
    is MiniLM's 1/(A_h·|x|) Σ_heads Σ_queries KL per sample (averaged over the batch too), and
    for MSE without a mask equals `F.mse_loss` over the (head-matched) tensors.
    """
    check_reduction(reduction)
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind must be 'kl' or 'mse'; got {kind!r}")
    if heads not in ("mean", "match"):
        raise ValueError(f"heads must be 'mean' or 'match'; got {heads!r}")
    _check_probs(student, "student")
    _check_probs(teacher, "teacher")
    b, h_s, lq, lk = student.shape
    if teacher.shape[0] != b or teacher.shape[2:] != (lq, lk):
        raise ValueError(
            f"student and teacher attention must have the same batch size and (Lq, Lk); got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} (pair layers "
            f"that see the same sequence)"
        )
    if heads == "match" and teacher.shape[1] != h_s:
        raise ValueError(
            f"heads='match' needs equal head counts; got student {h_s} and teacher "
            f"{teacher.shape[1]} heads (use heads='mean' to average each side's heads)"
        )

    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s, t = student.to(dtype), teacher.to(dtype)
    if heads == "mean":
        s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)

    key_mask: Tensor | None = None
    row_mask: Tensor | None = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (b, lk):
            raise ValueError(
                f"mask must be a bool tensor of shape (B, Lk) = {(b, lk)}, True = valid; got "
                f"{mask.dtype} of shape {tuple(mask.shape)} (HF attention_mask: use .bool())"
            )
        if lq != lk:
            raise ValueError(
                f"a key-padding mask is also used as the query mask, so it needs "
                f"self-attention (Lq == Lk); got Lq={lq}, Lk={lk}"
            )
        key_mask = mask[:, None, None, :]  # (B, 1, 1, Lk), broadcast over heads and queries
        row_mask = mask[:, None, :].expand(b, s.shape[1], lq)  # (B, H', Lq)

    if query_mask is not None:
        if query_mask.dtype != torch.bool or query_mask.shape != (b, lq):
            raise ValueError(f"query_mask must be a bool tensor of shape (B, Lq) = {(b, lq)}; "
                             f"got {query_mask.dtype} of shape {tuple(query_mask.shape)}")
        rows = query_mask[:, None, :].expand(b, s.shape[1], lq)
        row_mask = rows if row_mask is None else row_mask & rows

    if kind == "kl":
        # torch.where, not a multiplication by the mask: a padded key's NaN/inf never leaks.
        per_key = torch.special.xlogy(t, t) - t * s.clamp_min(_EPS).log()
    else:
        per_key = (s - t).pow(2)
    if key_mask is not None:
        per_key = torch.where(key_mask, per_key, per_key.new_zeros(()))
    per_row = per_key.sum(dim=-1)  # (B, H', Lq)
    if kind == "mse":
        valid_keys = lk if mask is None else mask.sum(dim=1).clamp_min(1)[:, None, None]
        per_row = per_row / valid_keys
    return reduce_loss(per_row, mask=row_mask, reduction=reduction)
