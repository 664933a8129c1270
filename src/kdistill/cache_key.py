"""A teacher cache's key: what its outputs depend on (the teacher's weights, the data, the
storage), so that a cache built for anything else is found stale and rebuilt."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.errors import ConfigError

REBUILD = "delete it and run again to rebuild it"


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over the class name, every parameter/buffer (name, shape, dtype, bytes) and, for a
    model whose outputs depend on more than its weights, its `fingerprint_extra()` string
    (e.g. the projected teacher's pair of vocabularies and its number of candidates)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    extra = getattr(model, "fingerprint_extra", None)
    if callable(extra):
        h.update(str(extra()).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a 0-dim buffer (BatchNorm's num_batches_tracked) has no byte view
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # fingerprint_model(teacher)
    data: str  # DataSplits.fingerprint of the inputs the cache covers
    dtype: str = "float32"  # storage dtype of the values: float32, float16 or bfloat16
    layers: tuple[str, ...] = ()  # teacher layers whose outputs are stored beside the logits
    topk: int | None = None  # None: dense logits; k: the top-k log-probabilities and indices
    tail_samples: int = 0  # of the k: draws from the tail (`kdistill.losses.sparse_targets`)
    tail_sampling: str = "independent"  # or "systematic"

    def as_dict(self) -> dict[str, Any]:
        key = {"teacher": self.teacher, "data": self.data, "dtype": self.dtype,
               "layers": list(self.layers), "topk": self.topk,
               "tail_samples": self.tail_samples}
        if self.tail_sampling != "independent":  # only then: older manifests stay valid
            key["tail_sampling"] = self.tail_sampling
        return key


def _parse_key(key: Any, directory: Path) -> CacheKey:
    """A manifest's key; fields added later (topk, tail_samples, ...) read as their defaults."""
    try:
        return CacheKey(teacher=key["teacher"], data=key["data"],
                        dtype=key.get("dtype", "float32"),
                        layers=tuple(key.get("layers", ())), topk=key.get("topk"),
                        tail_samples=key.get("tail_samples", 0),
                        tail_sampling=key.get("tail_sampling", "independent"))
    except (KeyError, TypeError, AttributeError):
        raise ConfigError(str(directory / "manifest.json"),
                          f"not a kdistill cache key: {key!r}; {REBUILD}") from None
