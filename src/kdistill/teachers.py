"""Where teacher outputs come from during distillation: the live model, or the cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from kdistill.cache import TeacherCache
from kdistill.capture import capture
from kdistill.errors import ConfigError
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
    """Runs the teacher network on every batch (needed when inputs are augmented)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = freeze_teacher(model)
        self.forwards = 0

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        self.model.eval()  # re-applied each call: a caller's .train() must never reach it
        with torch.no_grad(), capture(self.model, layers, where="method.teacher_layers") as feats:
            logits = self.model(batch["input"])
            self.forwards += 1
            return logits, dict(feats)


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
        index = batch["index"]
        feats = {name: self.cache.read(name, index) for name in layers}
        if self.cache.topk is not None:
            topk = TopK(self.cache.read("topk_logprobs", index),
                        self.cache.read("topk_indices", index))
            return topk, feats
        return self.cache.read("logits", index), feats


class EnsembleTeacher:
    """Several teachers (each online or cached); logits stacked as (K, B, C) in recipe order."""

    def __init__(self, sources: Sequence[Teacher]) -> None:
        self.sources = list(sources)

    @property
    def forwards(self) -> int:  # type: ignore[override]
        return sum(source.forwards for source in self.sources)

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        if layers:
            raise ConfigError("method", "multi-teacher methods read teacher logits only")
        return torch.stack([source(batch, ())[0] for source in self.sources]), {}
