"""Losses on intermediate features and embeddings: hints, attention, relations, similarities.

Every function here is pure: tensors in, a tensor out, hyper-parameters keyword-only. Nothing
is detached inside (callers detach the teacher); projecting a student feature to the teacher's
width is the method's adapter's job, not the loss's. Math runs in float32 (float64 when an
input is float64), whatever the input dtype, and the result has that dtype. Axis 0 is always
the batch; relational losses (RKD, SP, PKT) compare samples of the batch with each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_reduction, reduce_loss

__all__ = [
    "attention_map",
    "attention_transfer",
    "hidden_mse",
    "hint_mse",
    "pkt",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
]

_EPS = 1e-12  # guards every L2 normalisation and square root against zero vectors


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 math is never used)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_pair(student: Tensor, teacher: Tensor, names: tuple[str, str], min_dim: int) -> None:
    """Floating point, at least `min_dim` axes, and the same batch size."""
    for x, name in zip((student, teacher), names, strict=True):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
        if x.dim() < min_dim:
            raise ValueError(
                f"{name} must have at least {min_dim} axes (batch first); "
                f"got shape {tuple(x.shape)}"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same batch size; got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def _flat(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, ...) -> (B, prod(...)) in the compute dtype."""
    return x.reshape(x.shape[0], -1).to(dtype)


def _off_diagonal(b: int, device: torch.device) -> Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def hint_mse(
    student_feat: Tensor, teacher_feat: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """FitNets hint loss: mean squared error between an adapted student feature and the teacher's.

    Romero et al., "FitNets: Hints for Thin Deep Nets" (arXiv:1412.6550).

    Args:
        student_feat: shape (B, ...), already projected to the teacher's shape by an adapter.
        teacher_feat: exactly the same shape. Not detached here.
        reduction: "mean", "sum" or "none" over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (B,).

    Convention: per sample, the mean over every non-batch element of (s − t)²; then reduced
    over samples, so "mean" equals `F.mse_loss`. The paper's ½ factor is not applied.
    """
    check_reduction(reduction)
    _check_pair(student_feat, teacher_feat, ("student_feat", "teacher_feat"), min_dim=1)
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_mse needs student and teacher features of the same shape; got student "
            f"{tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            f"(project the student with the method's adapter first)"
        )
    dtype = _compute_dtype(student_feat, teacher_feat)
    per_item = (_flat(student_feat, dtype) - _flat(teacher_feat, dtype)).pow(2).mean(dim=1)
    return reduce_loss(per_item, reduction=reduction)


def hidden_mse(
    student_feat: Tensor, teacher_feat: Tensor, *, mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Per-position hidden-state MSE, padded positions left out (TinyBERT's L_hidn).

    Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding"
    (arXiv:1909.10351), eq. 8: MSE(H_s·W_h, H_t), here with a padding mask.

    Args:
        student_feat: channels-first states (B, C, *P), e.g. token states (B, hidden, T),
            already projected to the teacher's width by the method's adapter.
        teacher_feat: the same shape. Not detached here.
        mask: optional bool (B, *P), True = a real position (token); padded positions
            contribute neither value nor gradient.
        reduction: "mean" over the valid positions of the batch, "sum", or "none" (the
            per-position values (B, *P), 0 at masked positions).

    Convention: each position's value is the mean over the C channels of (s − t)², so
    without a mask "mean" equals `F.mse_loss` (and `hint_mse`); with one it is that mean
    over real tokens only, whatever the padding length.
    """
    check_reduction(reduction)
    _check_pair(student_feat, teacher_feat, ("student_feat", "teacher_feat"), min_dim=2)
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hidden_mse needs student and teacher features of the same shape; got student "
            f"{tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} "
            f"(project the student with the method's adapter first)"
        )
    dtype = _compute_dtype(student_feat, teacher_feat)
    per_pos = (student_feat.to(dtype) - teacher_feat.to(dtype)).pow(2).mean(dim=1)
    return reduce_loss(per_pos, mask=mask, reduction=reduction)


def attention_map(feat: Tensor, *, p: float = 2) -> Tensor:
    """Spatial attention map: the channel mean of |a|^p, flattened and L2-normalised.

    Zagoruyko and Komodakis, "Paying More Attention to Attention" (arXiv:1612.03928).

    Args:
        feat: shape (B, C, H, W), (B, C, L) or (B, C, *spatial).
        p: the exponent, a finite number >= 1 (the paper uses 2; below 1, |a|^p has an
            infinite gradient at 0).

    Returns:
        Shape (B, H·W): one unit-L2-norm map per sample (an all-zero map stays 0).

    The paper sums over channels; the mean differs only by the factor C, which the
    normalisation removes.
    """
    if not feat.is_floating_point():
        raise ValueError(f"feat must be a floating-point tensor; got dtype {feat.dtype}")
    if feat.dim() < 3:
        raise ValueError(
            f"attention_map needs a feature map of shape (B, C, *spatial), e.g. (B, C, H, W); "
            f"got shape {tuple(feat.shape)}"
        )
    if not (math.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite number >= 1; got {p!r}")
    a = feat.to(_compute_dtype(feat)).abs().pow(p).mean(dim=1)
    return F.normalize(a.reshape(a.shape[0], -1), dim=1, eps=_EPS)


def attention_transfer(
    student_feat: Tensor, teacher_feat: Tensor, *, p: float = 2, reduction: Reduction = "mean"
) -> Tensor:
    """Attention transfer: squared L2 distance between normalised attention maps.

    Zagoruyko and Komodakis, "Paying More Attention to Attention" (arXiv:1612.03928).

    Args:
        student_feat: shape (B, C_s, *spatial), e.g. (B, C_s, H, W).
        teacher_feat: shape (B, C_t, *spatial), the same spatial size; C_t may differ from C_s.
            Not detached here.
        p: the exponent of `attention_map`.
        reduction: "mean", "sum" or "none" over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (B,).

    Convention: per sample ‖Q_s − Q_t‖₂², the squared distance summed over the H·W positions
    of the unit-norm maps Q = `attention_map(feat)` (so each value lies in [0, 4]). The
    paper's β/2 weight belongs to the method; a mean over positions instead of the sum is
    this value divided by H·W.
    """
    check_reduction(reduction)
    _check_pair(student_feat, teacher_feat, ("student_feat", "teacher_feat"), min_dim=3)
    if student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"attention_transfer needs student and teacher features with the same spatial "
            f"size; got student {tuple(student_feat.shape)} and teacher "
            f"{tuple(teacher_feat.shape)}. Pick layers with equal spatial size "
            f"(channel counts may differ)"
        )
    q_s, q_t = attention_map(student_feat, p=p), attention_map(teacher_feat, p=p)
    dtype = _compute_dtype(q_s, q_t)
    per_item = (q_s.to(dtype) - q_t.to(dtype)).pow(2).sum(dim=1)
    return reduce_loss(per_item, reduction=reduction)


def _pairwise_distances(emb: Tensor) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances, exactly 0 on the diagonal, eps-safe gradients."""
    # Distances ignore translation; centring first keeps |a|² + |b|² − 2a·b from cancelling
    # catastrophically in float32 when the embeddings share a large offset (e.g. post-ReLU).
    emb = emb - emb.mean(dim=0, keepdim=True)
    sq_norm = emb.pow(2).sum(dim=1)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * emb @ emb.T
    off = _off_diagonal(emb.shape[0], emb.device)
    return torch.where(off, sq.clamp_min(_EPS).sqrt(), sq.new_zeros(()))


def rkd_distance(
    student_emb: Tensor, teacher_emb: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """Distance-wise relational KD: Huber loss between mean-normalised pairwise distances.

    Park et al., "Relational Knowledge Distillation" (arXiv:1904.05068).

    Args:
        student_emb: shape (B, D_s) or (B, ...), flattened to (B, D_s).
        teacher_emb: shape (B, D_t) or (B, ...); D_t may differ from D_s. Not detached here.
        reduction: "mean" (over the B(B−1) ordered pairs i ≠ j), "sum" (over the same pairs)
            or "none".

    Returns:
        A scalar for "mean"/"sum"; for "none" the (B, B) per-pair matrix, 0 on the diagonal.

    Convention: ψ_D(i, j) = ‖e_i − e_j‖₂ / μ with μ the mean distance over pairs i ≠ j,
    compared with smooth L1 (Huber, β = 1). Invariant to scaling and translating either
    embedding. With B < 2 there is no pair and "mean" gives 0.
    """
    check_reduction(reduction)
    _check_pair(student_emb, teacher_emb, ("student_emb", "teacher_emb"), min_dim=2)
    dtype = _compute_dtype(student_emb, teacher_emb)
    b = student_emb.shape[0]
    off = _off_diagonal(b, student_emb.device)
    count = max(b * (b - 1), 1)

    def normalised(emb: Tensor) -> Tensor:
        d = _pairwise_distances(_flat(emb, dtype))
        return d / (d.sum() / count).clamp_min(_EPS)

    per_pair = F.smooth_l1_loss(
        normalised(student_emb), normalised(teacher_emb), reduction="none", beta=1.0
    )
    return reduce_loss(per_pair, mask=off, reduction=reduction)


def _triplet_cosines(emb: Tensor) -> Tensor:
    """(B, D) -> (B, B, B): [i, j, k] = cos of the angle at vertex j between e_i and e_k."""
    unit = F.normalize(emb[None, :, :] - emb[:, None, :], dim=2, eps=_EPS)  # [j, i] ∝ e_i − e_j
    return torch.bmm(unit, unit.transpose(1, 2)).permute(1, 0, 2)  # [j, i, k] -> [i, j, k]


def rkd_angle(student_emb: Tensor, teacher_emb: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Angle-wise relational KD: Huber loss between the cosines of angles in triplets.

    Park et al., "Relational Knowledge Distillation" (arXiv:1904.05068).

    Args:
        student_emb: shape (B, D_s) or (B, ...), flattened to (B, D_s).
        teacher_emb: shape (B, D_t) or (B, ...); D_t may differ from D_s. Not detached here.
        reduction: "mean" (over the B(B−1)(B−2) ordered triplets of distinct samples), "sum"
            (over the same triplets) or "none".

    Returns:
        A scalar for "mean"/"sum"; for "none" the (B, B, B) per-triplet tensor [i, j, k],
        0 where two indices coincide.

    Convention: ψ_A(i, j, k) = ⟨(e_i − e_j)/‖e_i − e_j‖, (e_k − e_j)/‖e_k − e_j‖⟩, the cosine
    of the angle at vertex j, compared with smooth L1 (Huber, β = 1). Invariant to scaling
    and translating either embedding. Memory is O(B²·D + B³). With B < 3 "mean" gives 0.
    """
    check_reduction(reduction)
    _check_pair(student_emb, teacher_emb, ("student_emb", "teacher_emb"), min_dim=2)
    dtype = _compute_dtype(student_emb, teacher_emb)
    idx = torch.arange(student_emb.shape[0], device=student_emb.device)
    i, j, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    distinct = (i != j) & (j != k) & (i != k)
    cos_s = _triplet_cosines(_flat(student_emb, dtype))
    cos_t = _triplet_cosines(_flat(teacher_emb, dtype))
    per_triplet = F.smooth_l1_loss(cos_s, cos_t, reduction="none", beta=1.0)
    return reduce_loss(per_triplet, mask=distinct, reduction=reduction)


def _similarity(feat: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, ...) -> (B, B): the Gram matrix of flattened features, each row L2-normalised."""
    flat = _flat(feat, dtype)
    return F.normalize(flat @ flat.T, dim=1, eps=_EPS)


def similarity_preserving(
    student_feat: Tensor, teacher_feat: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """Similarity-preserving KD: squared distance between row-normalised batch Gram matrices.

    Tung and Mori, "Similarity-Preserving Knowledge Distillation" (arXiv:1907.09682).

    Args:
        student_feat: shape (B, ...), any width; flattened to (B, D_s).
        teacher_feat: shape (B, ...), any width D_t. Not detached here.
        reduction: "mean", "sum" or "none" over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (B,).

    Convention: G = F·Fᵀ (B, B), each row L2-normalised; per sample i the mean over j of
    (G_s − G_t)²_ij, so "mean" is the paper's ‖G_s − G_t‖_F² / B² (one layer pair; the
    γ weight belongs to the method).
    """
    check_reduction(reduction)
    _check_pair(student_feat, teacher_feat, ("student_feat", "teacher_feat"), min_dim=2)
    dtype = _compute_dtype(student_feat, teacher_feat)
    diff = _similarity(student_feat, dtype) - _similarity(teacher_feat, dtype)
    return reduce_loss(diff.pow(2).mean(dim=1), reduction=reduction)


def _log_conditional(emb: Tensor, dtype: torch.dtype, eps: float, off: Tensor) -> Tensor:
    """(B, D) -> (B, B): log p(j | i) from the [0, 1] cosine kernel; 0 on the diagonal."""
    unit = F.normalize(_flat(emb, dtype), dim=1, eps=_EPS)
    kernel = ((unit @ unit.T).clamp(-1.0, 1.0) + 1.0) / 2.0 + eps
    kernel = torch.where(off, kernel, kernel.new_zeros(()))
    log_p = kernel.clamp_min(eps).log() - kernel.sum(dim=1, keepdim=True).clamp_min(eps).log()
    return torch.where(off, log_p, log_p.new_zeros(()))


def pkt(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    eps: float = 1e-7,
    reduction: Reduction = "mean",
) -> Tensor:
    """Probabilistic knowledge transfer: KL between cosine-kernel conditional probabilities.

    Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer" (arXiv:1803.10837).

    Args:
        student_emb: shape (B, D_s) or (B, ...), flattened to (B, D_s).
        teacher_emb: shape (B, D_t) or (B, ...); D_t may differ from D_s. Not detached here.
        eps: > 0, added to every kernel value so each probability is positive.
        reduction: "mean", "sum" or "none" over samples (rows); see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else shape (B,).

    Convention: K_ij = (cos(e_i, e_j) + 1) / 2 + eps, p(j | i) = K_ij / Σ_{k≠i} K_ik over
    j ≠ i (the paper's definition: the diagonal is excluded), per sample i the
    KL(p_t(· | i) ‖ p_s(· | i)); "mean" is the sum over rows / B. With B = 2 each row has a
    single neighbour, so the loss is 0.
    """
    check_reduction(reduction)
    _check_pair(student_emb, teacher_emb, ("student_emb", "teacher_emb"), min_dim=2)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")
    dtype = _compute_dtype(student_emb, teacher_emb)
    off = _off_diagonal(student_emb.shape[0], student_emb.device)
    log_p_s = _log_conditional(student_emb, dtype, eps, off)
    log_p_t = _log_conditional(teacher_emb, dtype, eps, off)
    per_pair = torch.where(off, log_p_t.exp() * (log_p_t - log_p_s), log_p_t.new_zeros(()))
    return reduce_loss(per_pair.sum(dim=1), reduction=reduction)
