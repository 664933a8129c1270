"""The probes: one training micro-step and one evaluation forward of the recipe's own models,
at two small batches, measured with `kdistill.planning.probe`, as lines in the batch size.

Why linear: at a fixed sequence length every activation, logit tensor and loss buffer holds
one row per sample, so its bytes are a + b·batch (a: what does not grow with the batch, e.g.
the bf16 copies of the weights that autocast saves; measured at two batches, so a and b are
both known). Chunked losses bound their buffers by the chunk, not the batch: their part is in
a. The training step mirrors `kdistill.engine` (autocast over student and teacher, the
method's loss terms in fp32, one backward); the teacher's outputs come from the live network
or, for a cached teacher, as rows of the batch (what the cache reads: fp32 values, int64
indices).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.capture import capture
from kdistill.methods.base import Method, Outputs
from kdistill.planning.probe import LiveBytes, Trace, saved_bytes, storage_keys, tensor_bytes
from kdistill.schedules import Progress
from kdistill.teachers import EnsembleTeacher, OnlineTeacher, Teacher, TopK
from kdistill.types import Batch, DataSplits

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def probe_batches(n: int) -> tuple[int, int]:
    """The two probe batches: 2 and 4 samples (batch-norm needs 2), fewer on tiny data."""
    return max(1, min(2, n)), max(1, min(4, n))


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each storage once (tied embeddings are one tensor)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = AUTOCAST[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype)


@dataclass(frozen=True)
class Forward:
    """A no-grad forward: everything it allocates (captured layers included), and its output,
    by batch."""

    peak: Trace
    output: Trace


@torch.no_grad()
def _forward_once(model: nn.Module, x: Tensor, layers: tuple[str, ...]
                  ) -> tuple[tuple[int, ...], int]:
    was_training = model.training
    model.eval()
    try:
        with capture(model, layers, where="method.teacher_layers"), \
                LiveBytes([*model.parameters(), *model.buffers(), x]) as live:
            out = model(x)
            size = tensor_bytes(out)
            del out
        return live.deltas(), size
    finally:
        model.train(was_training)


def probe_forward(model: nn.Module, inputs: Tensor, layers: tuple[str, ...] = ()) -> Forward:
    """The evaluation / cache / online-teacher forward of `model` on `inputs`' first rows."""
    b1, b2 = probe_batches(len(inputs))
    d1, o1 = _forward_once(model, inputs[:b1], layers)
    d2, o2 = _forward_once(model, inputs[:b2], layers)
    return Forward(Trace(b1, d1, b2, d2), Trace.sizes(b1, [o1], b2, [o2]))


@dataclass(frozen=True)
class StepProbe:
    """One training micro-step by batch: what autograd saves in the student's forward plus its
    output (`activations`); the peak of everything the step allocates but the parameters'
    gradients (`peak`: activations, the teacher's outputs, loss buffers, backward
    temporaries); the teacher's outputs alone (`teacher`)."""

    activations: Trace
    peak: Trace
    teacher: Trace


class _Rows:
    """A cached teacher for the probe: the batch's rows, copied as a cache read copies them."""

    forwards = 0

    def __init__(self, out: Tensor | TopK, feats: dict[str, Tensor]) -> None:
        self.out, self.feats = out, feats

    def __call__(self, batch: Batch, layers: Any) -> tuple[Tensor | TopK, dict[str, Tensor]]:
        out = (TopK(*(t.clone() for t in self.out)) if isinstance(self.out, TopK)
               else self.out.clone())
        return out, {name: self.feats[name].clone() for name in layers}


@torch.no_grad()
def cached_rows(model: nn.Module, x: Tensor, layers: tuple[str, ...], topk: int | None
                ) -> _Rows:
    """What a cache of `model` would return for inputs `x` (top-k: log-probabilities at T = 1
    and their indices, as `kdistill.cache.build_cache` stores them)."""
    model.eval()
    with capture(model, layers, where="method.teacher_layers") as feats:
        logits = model(x)
        kept = {name: feats[name].float() for name in layers}
    if topk is None:
        return _Rows(logits.float(), kept)
    top = torch.log_softmax(logits.float(), dim=-1).topk(topk, dim=-1)
    return _Rows(TopK(top.values, top.indices), kept)


Source = Teacher | None
MakeSource = Any  # (batch size) -> Source: teachers online, or cached rows of that batch


_StepLog = tuple[list[int], tuple[int, ...], list[int]]


def _step_once(student: nn.Module, method: Method, source: Source, splits: DataSplits,
               b: int, teachers: list[nn.Module], precision: str) -> _StepLog:
    """(the sizes of what autograd saved in the student's forward and its output, every
    allocation of the step but the parameters' gradients, the teacher's outputs) of one
    micro-step on the first `b` training samples."""
    params = trainable(student, method)
    for p in params:
        p.grad = None
    known: list[Tensor] = [splits.train_x, splits.train_y]
    for module in (student, method, *teachers):
        known += [*module.parameters(), *module.buffers()]
    if isinstance(source, _Rows):
        known += [*(source.out if isinstance(source.out, TopK) else [source.out]),
                  *source.feats.values()]
    student.train()
    method.train()
    progress = Progress(step=0, epoch=0, total_steps=1, steps_per_epoch=1)
    with capture(student, method.student_layers, where="method.student_layers") as feats, \
            LiveBytes(known) as live:
        index = torch.arange(b)  # the loader's batch: rows copied out of the split
        batch: Batch = {"index": index, "input": splits.train_x[index],
                        "label": splits.train_y[index]}
        batch = method.prepare_batch(batch, student, progress)
        with _autocast(precision):
            with saved_bytes(known) as saved:
                logits = student(batch["input"])
            t_out: Any = None
            t_feats: dict[str, Tensor] = {}
            if source is not None:
                t_out, t_feats = source(batch, method.teacher_layers)
        activations = [*saved.values(), *(
            tensor_bytes(t) for t in [logits] if storage_keys([t]) - set(saved))]
        teacher = [tensor_bytes(t) for t in (t_out, t_feats) if tensor_bytes(t)]
        topk = t_out if isinstance(t_out, TopK) else None
        out = Outputs(logits, None if topk is not None else t_out, dict(feats), t_feats,
                      teacher_topk=topk)
        terms = method.loss_terms(out, batch, progress)
        sum(terms.values()).backward()  # type: ignore[union-attr]
        del out, terms, logits, t_out, t_feats, topk
    grads = storage_keys(p.grad for p in params if p.grad is not None)
    for p in params:
        p.grad = None
    return activations, live.deltas(without=grads), teacher


def probe_step(student: nn.Module, method: Method, make_source: MakeSource,
               splits: DataSplits, teachers: list[nn.Module], precision: str) -> StepProbe:
    """A training micro-step of `student` with `method` at two small batches."""
    b1, b2 = probe_batches(len(splits.train_x))
    results = []
    for b in (b1, b2):
        results.append(_step_once(student, method, make_source(b), splits, b, teachers,
                                  precision))
    (a1, p1, t1), (a2, p2, t2) = results
    return StepProbe(Trace.sizes(b1, a1, b2, a2), Trace(b1, p1, b2, p2),
                     Trace.sizes(b1, t1, b2, t2))


def teacher_source(models: list[nn.Module], online: list[bool], splits: DataSplits,
                   layers: tuple[str, ...], topk: int | None) -> MakeSource:
    """(batch size) -> the teacher source the engine would get: the network for an online
    teacher, the batch's cached rows for a cached one, an ensemble for several."""

    def make(b: int) -> Source:
        x = splits.train_x[:b]
        sources: list[Teacher] = [
            OnlineTeacher(m) if live else cached_rows(m, x, layers, topk)
            for m, live in zip(models, online, strict=True)]
        if not sources:
            return None
        return sources[0] if len(sources) == 1 else EnsembleTeacher(sources)

    return make
