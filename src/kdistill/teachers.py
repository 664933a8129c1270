"""Where teacher outputs come from during distillation: the live model, or the cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from kdistill.cache import TeacherCache
from kdistill.capture import capture
from kdistill.errors import ConfigError
from kdistill.methods.base import Batch


class Teacher(Protocol):
    """`teacher(batch, layers) -> (logits, features)`; never carries gradients."""

    forwards: int  # how many batches went through a teacher network (0 for a pure cache read)

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
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
    """Reads teacher logits stored by `build_cache`, by the batch's sample indices."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.forwards = 0

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [name for name in layers if name not in self.cache.fields()]
        if missing:
            raise ConfigError(
                "cache", f"teacher features {missing} are not in the cache; disable the cache"
            )
        feats = {name: self.cache.read(name, batch["index"]) for name in layers}
        return self.cache.read("logits", batch["index"]), feats


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
