"""Pieces of one optimiser step: the forward (student, teacher or its cache, the method's loss
terms, in one module so that DDP sees exactly what it synchronises; compiled with
`train.compile`), the gradient norm and the non-finite checks; and the collectives a method
gets under torchrun."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kdistill import distributed
from kdistill.engine.placement import to_device
from kdistill.errors import TrainingError
from kdistill.methods.base import Batch, Collectives, Method, Outputs
from kdistill.schedules import Progress
from kdistill.teachers import Teacher, TopK

if TYPE_CHECKING:
    from kdistill.engine.precision import Amp


class RankCollectives(Collectives):
    """The process group's collectives, given to the method under torchrun."""

    def __init__(self, world: int) -> None:
        self.world = world

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        return distributed.all_reduce_sum(x)

    def all_gather_rows(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return distributed.all_gather_rows(*tensors)


def outputs(
    student: Callable[[Tensor], Tensor],
    teacher: Teacher | None,
    method: Method,
    batch: Batch,
    student_feats: dict[str, Tensor],
    device: torch.device,
) -> Outputs:
    """The student's and the teacher's outputs for `batch`, all on the student's `device`
    (a teacher elsewhere, or its cache in CPU memory, is brought here)."""
    logits = student(batch["input"])
    t_logits, t_feats, t_topk = None, {}, None
    if teacher is not None:
        t_out, t_feats = teacher(batch, method.teacher_layers)
        t_out, t_feats = to_device(t_out, device), to_device(t_feats, device)
        if isinstance(t_out, TopK):  # a top-k cache: sparse targets, no dense logits
            t_topk = t_out
        else:
            t_logits = t_out
    return Outputs(logits, t_logits, dict(student_feats), t_feats, teacher_topk=t_topk)


# torch.compile's backend for `train.compile`; tests may use "aot_eager" (no C++ compiler).
COMPILE_BACKEND = "inductor"


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` through torch.compile. Inductor draws dropout's random numbers with torch's own
    generator (`fallback_random`), as eager does: the compiled run then takes the eager run's
    dropout masks, so both give the same values (and a resume stays exact either way)."""
    options = {"fallback_random": True} if COMPILE_BACKEND == "inductor" else None
    return torch.compile(fn, backend=COMPILE_BACKEND, options=options)


def scheduled(method: Method) -> bool:
    """Whether the method's hyper-parameters move during training (a temperature or weight
    schedule). torch.compile specialises a graph on such Python floats, so a compiled loss
    would be recompiled at every step and then fall back to eager: its loss runs eager."""
    start, end = Progress(0, 0, 101, 10), Progress(100, 10, 101, 10)
    return method.scalars(start) != method.scalars(end)


class StepModule(nn.Module):
    """Student and method (its adapters) as one module whose forward returns the loss terms:
    DDP synchronises the gradients of exactly the module it wraps and whose forward it runs,
    so both must be inside. Holds references only; the models are not changed.

    With `compile`, the student's forward and the method's `loss_terms` (unless the method's
    hyper-parameters follow a schedule: `scheduled`) run through `torch.compile` (the teacher
    and its cache read stay eager: a cache read is a NumPy gather); the compiled callables
    are kept outside the module tree, so DDP and state dicts see the same parameters either
    way."""

    def __init__(self, student: nn.Module, method: Method, teacher: Teacher | None,
                 student_feats: dict[str, Tensor], amp: Amp, *, compile: bool = False) -> None:
        super().__init__()
        self.student, self.method = student, method
        self.teacher, self.student_feats, self.amp = teacher, student_feats, amp
        self.run_student: Callable[[Tensor], Tensor] = student
        self.loss_terms: Callable[[Outputs, Batch, Progress], dict[str, Tensor]] = (
            method.loss_terms)
        if compile:
            self.run_student = _compiled(student)
            if not scheduled(method):
                self.loss_terms = _compiled(method.loss_terms)

    def forward(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        # Autocast covers the networks only; the loss math stays in fp32.
        with self.amp.autocast():
            out = outputs(self.run_student, self.teacher, self.method, batch,
                          self.student_feats, self.amp.device)
        return self.loss_terms(out, batch, progress)


def grad_norm(params: list[nn.Parameter], world: int = 1) -> Tensor:
    """This rank's share of the squared L2 norm of all of `params`' gradients: summed over
    ranks (`distributed.all_reduce_sum`) it is the squared norm of the whole gradient. A
    gradient every rank holds alike (DDP, a method's adapters) counts 1/`world` per rank; a
    sharded one (FSDP's DTensor) counts its local shard. Without ranks: the squared norm.
    Norms come from torch's foreach kernels (a few ops however many parameters); squares are
    taken in float64 (float32 on MPS, which has none) so a large finite norm stays finite."""
    whole, shards = [], []
    for p in params:
        if p.grad is not None:
            g = p.grad.detach()
            (shards if isinstance(g, DTensor) else whole).append(g)
    share = torch.zeros((), dtype=torch.float64)
    for grads, weight in ((whole, 1.0 / world), ([g.to_local() for g in shards], 1.0)):
        if grads:
            norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])
            wide = torch.float32 if norms.device.type == "mps" else torch.float64
            share = share.to(norms.device, wide) + norms.to(wide).square().sum() * weight
    return share


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
