"""Pieces of one optimiser step: the forward (student, teacher or its cache, the method's loss
terms, in one module so that DDP sees exactly what it synchronises), the gradient norm and the
non-finite checks; and the collectives a method gets under torchrun."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.errors import TrainingError
from kdistill.methods.base import Batch, Collectives, Method, Outputs
from kdistill.schedules import Progress
from kdistill.teachers import Teacher, TopK


class RankCollectives(Collectives):
    """The process group's collectives, given to the method under torchrun."""

    def __init__(self, world: int) -> None:
        self.world = world

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        return distributed.all_reduce_sum(x)

    def all_gather_rows(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return distributed.all_gather_rows(*tensors)


def outputs(
    student: nn.Module,
    teacher: Teacher | None,
    method: Method,
    batch: Batch,
    student_feats: dict[str, Tensor],
) -> Outputs:
    logits = student(batch["input"])
    t_logits, t_feats, t_topk = None, {}, None
    if teacher is not None:
        t_out, t_feats = teacher(batch, method.teacher_layers)
        if isinstance(t_out, TopK):  # a top-k cache: sparse targets, no dense logits
            t_topk = t_out
        else:
            t_logits = t_out
    return Outputs(logits, t_logits, dict(student_feats), t_feats, teacher_topk=t_topk)


class StepModule(nn.Module):
    """Student and method (its adapters) as one module whose forward returns the loss terms:
    DDP synchronises the gradients of exactly the module it wraps and whose forward it runs,
    so both must be inside. Holds references only; the models are not changed."""

    def __init__(self, student: nn.Module, method: Method, teacher: Teacher | None,
                 student_feats: dict[str, Tensor], precision: str) -> None:
        super().__init__()
        self.student, self.method = student, method
        self.teacher, self.student_feats, self.precision = teacher, student_feats, precision

    def forward(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        # Autocast covers the networks only; the loss math stays in fp32.
        with torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
            out = outputs(self.student, self.teacher, self.method, batch, self.student_feats)
        return self.method.loss_terms(out, batch, progress)


def grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The L2 norm of all of `params`' gradients together (0 when none has one)."""
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def check_finite(terms: dict[str, float], norm: float, progress: Progress, aux: str = "") -> None:
    """A finite loss can still give inf/NaN gradients (a sqrt or a norm at 0, an overflow in
    bf16): stepping on them would poison the weights silently, so both are checked. `aux`:
    the auxiliary network's name, for its own step."""
    at = f"at step {progress.step}, epoch {progress.epoch}"
    where = f" in the auxiliary network '{aux}'" if aux else ""
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(f"non-finite loss{where} {at}: term '{bad[0]}' = {terms[bad[0]]}; "
                            "the last good checkpoint is kept")
    if not math.isfinite(norm):
        raise TrainingError(
            f"non-finite gradient{where} {at} (loss terms finite: "
            f"{', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); not stepping on it; "
            "the last good checkpoint is kept")
