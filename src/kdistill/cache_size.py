"""How large a teacher cache is: bytes on disk before it is built (the memory plan and the
cache budget), bytes per token of one that exists."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.cache import _itemsize, index_dtype
from kdistill.capture import capture
from kdistill.devices import model_device


def bytes_per_token(manifest: dict[str, Any]) -> float:
    """Bytes a cache stores per teacher-output position (a token for (N, T, V) outputs, a
    sample for (N, C)): all fields, layer outputs included, over N · prod(P)."""
    fields = manifest["fields"]
    main = fields["topk_logprobs" if manifest.get("format") == "topk" else "logits"]
    positions = math.prod(main["shape"][:-1])
    total = sum(math.prod(spec["shape"]) * _itemsize(spec["dtype"]) for spec in fields.values())
    return total / max(positions, 1)


@torch.no_grad()
def feature_shapes(teacher: nn.Module, example: Tensor, layers: tuple[str, ...]) -> dict[
    str, tuple[int, ...]
]:
    """Per-sample output shape of each layer in `layers` (one eval forward on `example[:1]`)."""
    was_training = teacher.training
    teacher.eval()
    try:
        with capture(teacher, layers, where="method.teacher_layers") as feats:
            teacher(example[:1].to(model_device(teacher)))
            return {name: tuple(feats[name].shape[1:]) for name in layers}
    finally:
        teacher.train(was_training)


def cache_bytes(num_samples: int, logits_shape: int | Sequence[int],
                shapes: dict[str, tuple[int, ...]], dtype: str, *,
                topk: int | None = None) -> int:
    """Bytes a cache of teacher outputs plus these layer outputs takes on disk.

    Args:
        num_samples: N.
        logits_shape: the teacher's per-sample output shape (*P, V): an int C for (N, C)
            classifiers, (T, V) for a causal LM.
        shapes: per-sample shape of each cached layer output (`feature_shapes`).
        dtype: value storage dtype ("float32", "float16", "bfloat16").
        topk: None for dense logits (prod(P)·V values per sample); k for a top-k cache
            (prod(P)·k values plus prod(P)·k indices of `index_dtype(V)` per sample).
    """
    *positions, vocab = (logits_shape,) if isinstance(logits_shape, int) else logits_shape
    tokens = math.prod(positions)
    values = tokens * (vocab if topk is None else topk) + sum(math.prod(s) for s in shapes.values())
    per_sample = values * _itemsize(dtype)
    if topk is not None:
        per_sample += tokens * topk * index_dtype(vocab).itemsize
    return num_samples * per_sample
