"""Masked, token-normalised reduction shared by every loss in `kdistill.losses`.

A loss first computes one value per item (per sample of shape (N,), or per token of shape
(B, T)), then hands it here. Masked positions are removed with `torch.where`, never by
multiplying with the mask, so an inf or NaN at a padded position contributes neither value
nor gradient (0 * inf is NaN; a `where` simply does not select it).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_reduction(reduction: str) -> None:
    """Raise ValueError unless `reduction` is one of "mean", "sum", "none"."""
    if reduction not in _REDUCTIONS:
        allowed = ", ".join(repr(r) for r in _REDUCTIONS)
        raise ValueError(f"reduction must be one of {allowed}; got {reduction!r}")


def check_mask(mask: Tensor | None, shape: torch.Size, what: str = "per-item loss") -> None:
    """Raise ValueError unless `mask` is None or a bool tensor of exactly `shape`."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = valid); got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the {what} shape {tuple(shape)}"
        )


def reduce_loss(
    per_item: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-sample or per-token loss, ignoring masked positions.

    Args:
        per_item: the loss, one value per item; shape (N,), (B, T) or any other shape.
        mask: bool tensor of the same shape as `per_item`, True where the item counts;
            None means every item counts.
        reduction: "none" returns `per_item` with masked positions set to 0; "sum" sums the
            valid positions; "mean" divides that sum by `normalizer`, or by the number of
            valid positions when `normalizer` is None.
        normalizer: the denominator for "mean", e.g. the global number of valid tokens over a
            gradient-accumulation window and all DDP ranks, so that summing the per-micro-batch
            losses gives the true token mean. Must be >= 0; a zero normalizer (a window with
            no valid token) gives 0. Ignored by "sum" and "none".

    Returns:
        A scalar for "mean" and "sum"; a tensor shaped like `per_item` for "none".

    The default "mean" is normalised per valid item and never NaN: an all-masked batch
    gives 0 (the count is clamped to at least 1).
    """
    check_reduction(reduction)
    check_mask(mask, per_item.shape)
    if isinstance(normalizer, (int, float)) and not (math.isfinite(normalizer) and normalizer >= 0):
        raise ValueError(f"normalizer must be a finite number >= 0; got {normalizer!r}")

    values = per_item if mask is None else torch.where(mask, per_item, per_item.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total

    if normalizer is None:
        count = per_item.numel() if mask is None else mask.sum()
        if isinstance(count, Tensor):
            return total / count.clamp(min=1).to(total.dtype)
        return total / max(count, 1)
    # A zero normalizer only happens with an all-masked window, where `total` is 0 too:
    # clamping to the smallest positive number turns 0 / 0 into 0 without a host sync.
    tiny = torch.finfo(total.dtype).tiny
    if isinstance(normalizer, Tensor):
        return total / normalizer.to(device=total.device, dtype=total.dtype).clamp(min=tiny)
    return total / max(float(normalizer), tiny)
