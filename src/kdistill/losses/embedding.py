"""Losses between the sentence embeddings of a student and a teacher.

General (task-agnostic) distillation of a sentence encoder: the student's pooled embedding
regresses the teacher's (Reimers & Gurevych 2020, arXiv:2004.09813: MSE), or turns towards it
(DistilBERT, Sanh et al. 2019, arXiv:1910.01108: cosine embedding loss on hidden states), and
its token hidden states may follow the teacher's through a layer map (TinyBERT,
arXiv:1909.10351: `kdistill.losses.features.hidden_mse`, shared with `tinybert`). Every loss
is computed in float32 and is zero when student equals teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdistill.losses._reduce import Reduction, check_reduction, reduce_loss


def _pair(student: Tensor, teacher: Tensor, dims: int, what: str) -> tuple[Tensor, Tensor]:
    if student.dim() != dims or student.shape != teacher.shape:
        raise ValueError(f"{what} needs student and teacher tensors of one {dims}-D shape; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)} (project the "
                         "student with the method's adapter first)")
    return student.float(), teacher.float()


def embedding_mse(student: Tensor, teacher: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Mean squared error between sentence embeddings (arXiv:2004.09813, its eq. 1).

    Args:
        student: (B, D), already projected to the teacher's width D.
        teacher: (B, D). Not detached here (a cached teacher carries no graph).
        reduction: over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else (B,).

    Convention: per sample the mean over D of (s − t)², so "mean" equals `F.mse_loss`.
    """
    check_reduction(reduction)
    s, t = _pair(student, teacher, 2, "embedding_mse")
    return reduce_loss((s - t).pow(2).mean(dim=1), reduction=reduction)


def cosine_distance(student: Tensor, teacher: Tensor, *, eps: float = 1e-8,
                    reduction: Reduction = "mean") -> Tensor:
    """1 − cos(student, teacher) per sample: DistilBERT's cosine embedding loss (arXiv:1910.01108).

    Args:
        student: (B, D), in the teacher's width.
        teacher: (B, D).
        eps: floor on each norm, so an all-zero embedding gives a finite loss (cos = 0).
        reduction: over samples; see `reduce_loss`.

    Returns:
        A scalar for "mean"/"sum", else (B,), each in [0, 2]. Scale-invariant: only the
        direction of the student embedding is trained.
    """
    check_reduction(reduction)
    s, t = _pair(student, teacher, 2, "cosine_distance")
    cos = (s * t).sum(dim=1) / (s.norm(dim=1).clamp(min=eps) * t.norm(dim=1).clamp(min=eps))
    return reduce_loss(1.0 - cos, reduction=reduction)


@torch.no_grad()
def mean_cosine(student: Tensor, teacher: Tensor) -> float:
    """The evaluation figure: mean cosine similarity of (N, D) embeddings, as a float."""
    return 1.0 - float(cosine_distance(student, teacher))
