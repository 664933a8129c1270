"""Contrastive losses over scores of an anchor against one positive and K negatives.

Tian, Krishnan and Isola, "Contrastive Representation Distillation" (arXiv:1910.10699).

Every function takes `scores` of shape (B, 1 + K): row i holds the dot products between the
L2-normalised anchor embedding of sample i and 1 + K candidate embeddings (for CRD: rows of
the other network's memory bank), column 0 the positive, columns 1..K the negatives. Building
the candidates (sampling, memory banks) is the method's job. Functions are pure: nothing is
detached inside, math runs in float32 (float64 when `scores` is float64) and the result has
that dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_reduction, reduce_loss

__all__ = ["crd_nce", "info_nce", "nce_normalizer"]


def _checked(scores: Tensor, temperature: float, num_samples: int = 1) -> Tensor:
    """Validate (B, 1 + K) scores, K >= 1, T > 0, N >= 1; return scores in the compute dtype."""
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor; got dtype {scores.dtype}")
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must have shape (B, 1 + K) with K >= 1 negatives (column 0 the positive); "
            f"got shape {tuple(scores.shape)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples!r}")
    return scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)


def nce_normalizer(scores: Tensor, *, temperature: float, num_samples: int) -> Tensor:
    """The NCE normalisation constant Z = N · mean(exp(s / T)) over every entry of `scores`.

    The original CRD code estimates Z once, from the first training batch, and keeps it fixed
    (a Monte-Carlo estimate of Σ_j exp(s_j / T) over the N training samples, so that
    exp(s / T) / Z approximates a probability over the data set).

    Args:
        scores: shape (B, 1 + K), see the module docstring. Callers pass it detached.
        temperature: τ > 0 (the paper's 0.07).
        num_samples: N, the training-set size (the memory bank's rows).

    Returns:
        A positive scalar, computed in log space (exp(1 / 0.07) alone is ~1.6e6).
    """
    s = _checked(scores, temperature, num_samples)
    log_mean = torch.logsumexp(s.flatten() / temperature, dim=0) - math.log(s.numel())
    return (log_mean + math.log(num_samples)).exp()


def crd_nce(
    scores: Tensor,
    *,
    temperature: float,
    z: Tensor | float,
    num_samples: int,
    eps: float = 1e-7,
    reduction: Reduction = "mean",
) -> Tensor:
    """CRD's NCE loss for one anchor side (the paper's Eq. 18, as in the authors' code).

    Args:
        scores: shape (B, 1 + K); column 0 the positive, columns 1..K the negatives, which
            are drawn from the noise distribution P_n = 1 / N (uniform over the data set).
        temperature: τ > 0 (the paper's 0.07).
        z: the normalisation constant Z > 0, see `nce_normalizer` (held fixed by the caller).
        num_samples: N, the training-set size.
        eps: > 0, added to each denominator, as in the authors' code (1e-7).
        reduction: "mean", "sum" or "none" over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (B,).

    Convention: P_ik = exp(s_ik / τ) / Z, c = K / N (K · P_n) and per sample i
        loss_i = −[ log(P_i0 / (P_i0 + c + eps)) + Σ_{k=1..K} log(c / (P_ik + c + eps)) ],
    the negative log-likelihood of a binary classifier h = P / (P + c) telling the positive
    (the data) from the K noise samples; "mean" divides the sum over samples by B, as the
    original `ContrastLoss` does. Computed in log space with softplus, so it is exact and
    finite for any score.
    """
    check_reduction(reduction)
    s = _checked(scores, temperature, num_samples)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")
    k = s.shape[1] - 1
    c = k / num_samples
    log_p = s / temperature - torch.as_tensor(z, dtype=s.dtype, device=s.device).log()
    log_c_eps = math.log(c + eps)
    # log(P0 / (P0 + c + eps)) = −softplus(log(c + eps) − log P0)
    log_d1 = -F.softplus(log_c_eps - log_p[:, 0])
    # log(c / (Pk + c + eps)) = log c − log(c + eps) − softplus(log Pk − log(c + eps))
    log_d0 = math.log(c) - log_c_eps - F.softplus(log_p[:, 1:] - log_c_eps)
    return reduce_loss(-(log_d1 + log_d0.sum(dim=1)), reduction=reduction)


def info_nce(scores: Tensor, *, temperature: float, reduction: Reduction = "mean") -> Tensor:
    """InfoNCE (softmax) form: cross-entropy of the positive among the 1 + K candidates.

    The widely used alternative to `crd_nce` (no Z, no noise ratio); the paper's Eq. 18 is
    the NCE form.

    Args:
        scores: shape (B, 1 + K); column 0 the positive.
        temperature: τ > 0.
        reduction: "mean", "sum" or "none" over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (B,).

    Convention: loss_i = −log softmax(s_i / τ)_0 = logsumexp_k(s_ik / τ) − s_i0 / τ.
    """
    check_reduction(reduction)
    s = _checked(scores, temperature) / temperature
    return reduce_loss(torch.logsumexp(s, dim=1) - s[:, 0], reduction=reduction)
