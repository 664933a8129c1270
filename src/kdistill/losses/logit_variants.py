"""Variants of logit distillation: Decoupled KD (DKD) and DIST's correlation matching.

Same conventions as `kdistill.losses.logits`: pure functions, hyper-parameters keyword-only,
nothing detached inside (callers detach the teacher), softmax in float32 (float64 when an
input is float64) and the result in that dtype. Both take per-sample logits of shape (N, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_reduction, reduce_loss
from kdistill.losses.logits import _check_pair, _check_temperature, _compute_dtype

__all__ = ["dist_loss", "dkd"]


def _check_weight(value: float, name: str) -> None:
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def _scaled(
    student: Tensor, teacher: Tensor, temperature: float | Tensor
) -> tuple[Tensor, Tensor, Tensor | float]:
    """Validate the pair (shape (N, C)) and T; return (student / T, teacher / T, T) in fp32/64."""
    _check_pair(student, teacher, None)
    if student.dim() != 2:
        raise ValueError(f"logits must have shape (N, C); got {tuple(student.shape)}")
    _check_temperature(temperature)
    dtype = _compute_dtype(student, teacher)
    t: Tensor | float = temperature
    if isinstance(temperature, Tensor):
        t = temperature.to(device=student.device, dtype=dtype).reshape(())
    return student.to(dtype) / t, teacher.to(dtype) / t, t


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ_c p (log p − log q) over the last axis, with 0 · log 0 = 0 (as in `kd_kl`)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), p.new_zeros(())).sum(dim=-1)


def _binary_and_rest(z: Tensor, labels: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Log of [p_target, 1 − p_target] (N, 2) and of the non-target distribution (N, C).

    The target logit is set to −inf before the log-sum-exp, so 1 − p_target is a sum over the
    other classes (accurate even when p_target rounds to 1) and the non-target distribution is
    an exact softmax over them. The target's entry of the latter is log 1 = 0 (not −inf), the
    same for both models, so it adds 1 · (0 − 0) = 0 to the KL and no NaN reaches the forward
    or backward pass.
    """
    rest = z.masked_fill(target, -math.inf)
    lse_all = torch.logsumexp(z, dim=-1, keepdim=True)
    lse_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
    log_pt = z.gather(-1, labels.unsqueeze(-1)) - lse_all
    log_binary = torch.cat([log_pt, lse_rest - lse_all], dim=-1)
    log_rest = torch.where(target, z.new_zeros(()), rest - lse_rest)
    return log_binary, log_rest


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float | Tensor = 4.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Decoupled KD: alpha · TCKD + beta · NCKD, the two parts of the classical KD loss.

    Zhao et al., "Decoupled Knowledge Distillation" (arXiv:2203.08679). With p = softmax(z / T)
    for teacher and student: TCKD is the KL between the binary distributions
    [p_target, 1 − p_target]; NCKD is the KL between the distributions over the non-target
    classes (the target removed and the rest renormalised, computed as a softmax with the
    target logit set to −inf). Classical KD equals TCKD + (1 − p_target of the teacher) · NCKD;
    DKD drops that factor and weighs the two parts freely.

    Args:
        student_logits: shape (N, C), C >= 2.
        teacher_logits: shape (N, C). Not detached here.
        labels: integer ground-truth classes, shape (N,), each in [0, C).
        alpha: weight of TCKD, >= 0.
        beta: weight of NCKD, >= 0 (the paper uses 8 on CIFAR-100, 0.5 on ImageNet).
        temperature: T > 0, a float or a scalar tensor.
        reduction: "mean", "sum" or "none"; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (N,).

    Convention: T² applied; "mean" is per sample; the paper's warm-up of the DKD weight is a
    schedule for the method, not part of this loss; computed and returned in float32 (float64
    if an input is float64). Exactly 0 when student and teacher logits are equal.
    """
    check_reduction(reduction)
    _check_weight(alpha, "alpha")
    _check_weight(beta, "beta")
    s, t, temp = _scaled(student_logits, teacher_logits, temperature)
    n, c = s.shape
    if c < 2:
        raise ValueError(f"dkd needs at least 2 classes; got logits of shape {(n, c)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
    if n and bool((labels < 0).any() | (labels >= c).any()):  # one host sync
        raise ValueError(
            f"labels must lie in [0, {c}); got min {int(labels.min())}, max {int(labels.max())}"
        )

    labels = labels.long()
    target = F.one_hot(labels, c).to(torch.bool)
    log_bin_q, log_rest_q = _binary_and_rest(s, labels, target)
    log_bin_p, log_rest_p = _binary_and_rest(t, labels, target)
    tckd = _kl_rows(log_bin_p, log_bin_q)
    nckd = _kl_rows(log_rest_p, log_rest_q)  # target entries: 1 · (0 − 0) = 0
    per_item = (alpha * tckd + beta * nckd) * (temp * temp)
    return reduce_loss(per_item, reduction=reduction)


def _pearson_distance(x: Tensor, y: Tensor, *, dim: int, eps: float = 1e-8) -> Tensor:
    """1 − Pearson correlation of x and y along `dim`, as ½ ‖x̂ − ŷ‖² (x̂ = centred, unit norm).

    Equal to 1 − r whenever neither vector is constant, but exactly 0 when x equals y and never
    negative. A constant vector (centred norm below `eps`) becomes the zero vector: two
    constant vectors are at distance 0, a constant and a varying one at ½. Invariant to
    x ↦ a·x + b with a > 0 (a < 0 turns d into 2 − d).
    """

    def unit(v: Tensor) -> Tensor:
        v = v - v.mean(dim=dim, keepdim=True)
        return v / v.norm(dim=dim, keepdim=True).clamp(min=eps)

    return 0.5 * (unit(x) - unit(y)).square().sum(dim=dim)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float | Tensor = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """DIST: match the teacher's inter-class and intra-class relations by Pearson correlation.

    Huang et al., "Knowledge Distillation from A Stronger Teacher" (arXiv:2205.10536). With
    probabilities p = softmax(z / T), the inter-class term is 1 − r(student row, teacher row)
    averaged over samples, the intra-class term 1 − r(student column, teacher column) (one
    class across the batch) averaged over classes; loss = T² · (beta · inter + gamma · intra).
    1 − r is computed as ½ ‖x̂ − ŷ‖² of the centred unit vectors (see `_pearson_distance`), so
    the loss is 0 at equality, never negative, and a constant column (e.g. any column of a
    batch of one) adds 0 to the intra term when both models agree on it.

    Args:
        student_logits: shape (N, C).
        teacher_logits: shape (N, C). Not detached here.
        beta: weight of the inter-class term, >= 0.
        gamma: weight of the intra-class term, >= 0.
        temperature: T > 0, a float or a scalar tensor (the paper: 1 on ImageNet, 4 on CIFAR).
        reduction: "mean" gives the paper's loss; "none" gives shape (N,), sample n holding
            T² · (beta · inter_n + gamma · intra), the batch-level intra term added to every
            sample, so that its mean is the "mean" loss; "sum" is N times the "mean" loss.

    Returns:
        A scalar for "mean"/"sum", else shape (N,).

    Convention: T² applied; the intra term couples the samples of a batch, so the loss is not
    a sum of per-sample losses; computed and returned in float32 (float64 if an input is
    float64).
    """
    check_reduction(reduction)
    _check_weight(beta, "beta")
    _check_weight(gamma, "gamma")
    s, t, temp = _scaled(student_logits, teacher_logits, temperature)
    q, p = s.softmax(dim=-1), t.softmax(dim=-1)
    inter = _pearson_distance(q, p, dim=1)  # (N,)
    intra = _pearson_distance(q, p, dim=0).mean()  # (C,) -> ()
    per_item = (beta * inter + gamma * intra) * (temp * temp)
    return reduce_loss(per_item, reduction=reduction)
