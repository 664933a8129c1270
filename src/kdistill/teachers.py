"""Where teacher outputs come from during distillation: the live model, or the cache.

Devices: an `OnlineTeacher` runs its network where the network's parameters are (the pipeline
places it on `teacher.device`, by default `train.device`) and moves each batch's inputs there;
a `CachedTeacher` reads rows into CPU memory. Either way the outputs come back as they are and
the engine brings them to the student's device, in one place (`engine.placement.to_device`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from kdistill import devices
from kdistill.cache import TeacherCache
from kdistill.capture import capture
from kdistill.errors import ConfigError, TrainingError
from kdistill.types import Batch


class TopK(NamedTuple):
    """A sparse teacher target read from a top-k cache, in place of dense logits.

    `logprobs` (B, *P, k) float32: the teacher's k largest log-probabilities at T = 1 (a
    log-softmax over the full vocabulary, so Σ exp < 1 by the missing mass), sorted
    descending; `indices` (B, *P, k) int64: their vocabulary ids. P = (T,) for causal LMs.
    """

    logprobs: Tensor
    indices: Tensor


class Teacher(Protocol):
    """`teacher(batch, layers) -> (logits, features)`; never carries gradients.

    `logits` is a (B, ..., C) tensor, or a `TopK` when the source is a top-k cache (the engine
    then fills `Outputs.teacher_topk` and leaves `Outputs.teacher_logits` None).
    """

    forwards: int  # how many batches went through a teacher network (0 for a pure cache read)

    def __call__(
        self, batch: Batch, layers: Sequence[str]
    ) -> tuple[Tensor | TopK, dict[str, Tensor]]:
        ...


def freeze_teacher(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (dropout off, batch-norm statistics fixed)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class OnlineTeacher:
    """Runs the teacher network on every batch (needed when inputs are augmented), on the
    network's own device; outputs stay there (the engine moves them to the student)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = freeze_teacher(model)
        self.forwards = 0

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        self.model.eval()  # re-applied each call: a caller's .train() must never reach it
        inputs = batch["input"].to(devices.model_device(self.model))  # no copy when there
        with torch.no_grad(), capture(self.model, layers, where="method.teacher_layers") as feats:
            logits = self.model(inputs)
            if self.forwards == 0:
                _check_outputs(logits)  # once: a broken teacher, not the loss, gets the blame
            self.forwards += 1
            return logits, dict(feats)


def _check_outputs(logits: Tensor) -> None:
    """NaN or +inf in the teacher's first outputs (-inf is a masked logit, kept)."""
    bad = torch.isnan(logits) | (logits == float("inf"))
    if bool(bad.any()):
        row = int(bad.reshape(len(logits), -1).any(dim=1).nonzero()[0])
        raise TrainingError(f"teacher: non-finite outputs (NaN or +inf) for row {row} of the "
                            "first batch; check the teacher's weights (teacher.model.weights) "
                            "and its inputs' scale")


class CachedTeacher:
    """Reads teacher outputs stored by `build_cache`, by the batch's sample indices: dense
    logits, or a `TopK` (log-probabilities, indices) from a top-k cache."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.forwards = 0

    def __call__(
        self, batch: Batch, layers: Sequence[str]
    ) -> tuple[Tensor | TopK, dict[str, Tensor]]:
        missing = [name for name in layers if name not in self.cache.fields()]
        if missing:
            raise ConfigError(
                "cache", f"teacher features {missing} are not in the cache; disable the cache"
            )
        index = _rows(batch, self.cache.views)
        feats = {name: self.cache.read(name, index) for name in layers}
        if self.cache.topk is not None:
            topk = TopK(self.cache.read("topk_logprobs", index),
                        self.cache.read("topk_indices", index))
            return topk, feats
        return self.cache.read("logits", index), feats


def _rows(batch: Batch, views: int) -> Tensor:
    """The cache rows of a batch: its sample ids, or over a transfer set of K views per sample
    (`kdistill.data.transfer`) row index·K + view."""
    if views == 1 and "view" not in batch:
        return batch["index"]
    if "view" not in batch:
        raise ConfigError("transfer_set", f"the teacher cache holds {views} views per sample "
                          "but the batches name none; train on the transfer set's loader")
    if bool((batch["view"] >= views).any()):
        raise ConfigError("transfer_set", f"a batch's views are not among the cache's "
                          f"{views} per sample; the cache was built for another transfer set")
    return batch["index"] * views + batch["view"]


class EnsembleTeacher:
    """Several teachers (each online or cached); logits stacked as (K, B, C) in recipe order,
    on an accelerator when any of them produced its logits on one (else the CPU)."""

    def __init__(self, sources: Sequence[Teacher]) -> None:
        self.sources = list(sources)

    @property
    def forwards(self) -> int:  # type: ignore[override]
        return sum(source.forwards for source in self.sources)

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        if layers:
            raise ConfigError("method", "multi-teacher methods read teacher logits only")
        logits = [source(batch, ())[0] for source in self.sources]
        device = next((t.device for t in logits if t.device.type != "cpu"), logits[0].device)
        return torch.stack([t.to(device) for t in logits]), {}
