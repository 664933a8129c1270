"""Losses for data-free distillation: what a generator optimises when no training data exists.

DAFL (Chen et al. 2019, arXiv:1904.01186) trains the generator so that the teacher is confident
on its samples (`one_hot_loss`), its features are strongly active (`activation_loss`) and its
predicted classes are balanced over a batch (`class_balance_loss`). DFAD (Fang et al. 2019,
arXiv:1912.11006) trains it adversarially to maximise the teacher-student discrepancy
(`l1_discrepancy`). DeepInversion (Yin et al. 2020, arXiv:1912.08795) adds a prior from the
teacher's batch-norm running statistics (`bn_statistics_loss`).

Every function is pure: tensors in, a scalar tensor out, nothing detached inside. Softmax runs in
float32 (float64 when an input is float64), as in `logits.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "activation_loss",
    "bn_statistics_loss",
    "class_balance_loss",
    "l1_discrepancy",
    "one_hot_loss",
]


def _float(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def _check_logits(logits: Tensor, name: str) -> None:
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"{name} must be (B, C) with B >= 1; got {tuple(logits.shape)}")


def one_hot_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's one-hot loss (arXiv:1904.01186, eq. 2): cross-entropy of the teacher's outputs
    against their own argmax, so the generator makes inputs the teacher classifies confidently.

    Args:
        teacher_logits: (B, C), carrying the generator's graph.

    Returns: a scalar, the mean over the batch; 0 only for one-hot softmax outputs.
    """
    _check_logits(teacher_logits, "teacher_logits")
    logits = _float(teacher_logits)
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(features: Tensor) -> Tensor:
    """DAFL's activation loss (arXiv:1904.01186, eq. 3): minus the mean absolute value of the
    teacher's features (the paper writes −(1/n)·Σ‖f‖₁; the authors' code takes the mean over
    every element, which keeps the weight independent of the feature width, as here).

    Args:
        features: (B, ...) teacher activations, e.g. the input of its last linear layer.

    Returns: a scalar ≤ 0; lower when the features are more active.
    """
    if features.dim() < 2:
        raise ValueError(f"features must be (B, ...); got {tuple(features.shape)}")
    return -_float(features).abs().mean()


def class_balance_loss(teacher_logits: Tensor) -> Tensor:
    """DAFL's information-entropy loss (arXiv:1904.01186, eq. 4): minus the entropy of the
    batch's mean predicted distribution p̄ = (1/B)·Σ softmax(t_i), i.e. Σ_c p̄_c·log p̄_c.

    Minimal, −log C, when the teacher's predictions cover the C classes evenly (p̄ uniform);
    maximal, 0, when every sample goes to one class. Natural log (the authors' code uses log10,
    which only rescales it by 1/ln 10; weights are rescaled to match).

    Args:
        teacher_logits: (B, C).

    Returns: a scalar in [−log C, 0].
    """
    _check_logits(teacher_logits, "teacher_logits")
    mean = _float(teacher_logits).softmax(dim=1).mean(dim=0)
    # xlogy: 0·log 0 = 0, so a class nobody predicts adds nothing instead of NaN.
    return torch.special.xlogy(mean, mean).sum()


def bn_statistics_loss(inputs: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature-distribution prior for one batch-norm layer (arXiv:1912.08795,
    eq. 4): ‖μ(x) − μ_BN‖₂ + ‖σ²(x) − σ²_BN‖₂, the batch's per-channel mean and (biased)
    variance against the layer's running statistics. Sum it over the teacher's BN layers.

    Args:
        inputs: (B, C) or (B, C, *spatial), what enters the BN layer.
        running_mean, running_var: (C,), the layer's stored statistics.

    Returns: a scalar ≥ 0; 0 when the batch matches the stored statistics exactly.
    """
    if inputs.dim() < 2 or running_mean.shape != (inputs.shape[1],) or (
            running_var.shape != running_mean.shape):
        raise ValueError(f"inputs (B, C, ...) {tuple(inputs.shape)} do not match running "
                         f"statistics {tuple(running_mean.shape)}, {tuple(running_var.shape)}")
    x = _float(inputs).transpose(0, 1).reshape(inputs.shape[1], -1)  # (C, B·spatial)
    mean, var = x.mean(dim=1), x.var(dim=1, unbiased=False)
    return (torch.linalg.vector_norm(mean - running_mean.to(mean.dtype))
            + torch.linalg.vector_norm(var - running_var.to(var.dtype)))


def l1_discrepancy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DFAD's discrepancy (arXiv:1912.11006, eq. 3): the mean absolute difference of the logits,
    (1/(B·C))·Σ|s − t|. The student minimises it; the generator maximises it.

    Args:
        student_logits, teacher_logits: (B, C).

    Returns: a scalar ≥ 0.
    """
    _check_logits(student_logits, "student_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    return F.l1_loss(_float(student_logits), _float(teacher_logits))
