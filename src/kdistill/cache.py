"""The teacher-output store: one pass of the teacher, memory-mapped, keyed by sample index.

Layout of a cache directory:

    manifest.json       {"version", "format", "key": {"teacher", "data", "dtype", "layers",
                         "topk"}, "num_samples", "fields"}; a top-k cache adds "topk", "vocab"
    logits.npy          (N, *P, V) dense teacher logits            (format "dense")
    topk_logprobs.npy   (N, *P, k) the teacher's k largest log-probabilities at T = 1,
                        sorted descending                          (format "topk")
    topk_indices.npy    (N, *P, k) their vocabulary indices        (format "topk")
    feature-K.npy       (N, ...) the output of the K-th cached teacher layer, field = layer name

P is the per-sample position shape: () for classification (N, C), (T,) for causal LMs. Files
are numpy .npy, opened with mmap, so rows load on demand. `fields` maps a name to {"file",
"dtype", "shape"}. Values (logits, log-probs, layer outputs) are stored in `key.dtype`:
"float32", "float16" or "bfloat16"; numpy has no bfloat16, so its bits are stored as uint16
and the manifest says "bfloat16". Indices use the smallest integer type that holds V − 1
(`index_dtype`: uint8 up to V = 256, uint16 up to 65,536, then int32). Reading widens values
to float32 and indices to int64.

A top-k cache stores what a sparse teacher target needs (about k·(value + index bytes) per
token instead of V·value bytes); how the missing mass 1 − Σ_k p is treated is decided by the
loss (`kdistill.losses.topk`), not stored. The key holds a hash of the teacher's weights, the
data fingerprint, the storage dtype, the cached layer names and k (None for dense); a mismatch
means the cache is stale and is rebuilt. A cache is written into a temporary directory and
renamed into place when complete, so a crash mid-build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.capture import capture
from kdistill.errors import ConfigError, KDistillError, TrainingError

FORMAT_VERSION = 3  # 2: cached teacher layers are part of the key; 3: top-k format, bfloat16

# Value dtype name -> numpy dtype on disk. bfloat16 bits are kept as uint16 (numpy has no bf16).
_VALUE_STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(np.uint16)}


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over the class name and every parameter/buffer (name, shape, dtype, bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # fingerprint_model(teacher)
    data: str  # DataSplits.fingerprint of the inputs the cache covers
    dtype: str = "float32"  # storage dtype of the values: float32, float16 or bfloat16
    layers: tuple[str, ...] = ()  # teacher layers whose outputs are stored beside the logits
    topk: int | None = None  # None: dense logits; k: the top-k log-probabilities and indices

    def as_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "data": self.data, "dtype": self.dtype,
                "layers": list(self.layers), "topk": self.topk}


def index_dtype(vocab: int) -> np.dtype:
    """The smallest integer type that holds every index 0 .. vocab − 1 (int32 rather than
    uint32 past 65,536: torch's support for unsigned 32-bit tensors is partial)."""
    for candidate in (np.uint8, np.uint16, np.int32):
        if vocab - 1 <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    return np.dtype(np.int64)


def _disk_dtype(name: str) -> np.dtype:
    """The numpy dtype a field named `name` in the manifest has on disk."""
    return _VALUE_STORAGE.get(name) or np.dtype(name)


def _itemsize(name: str) -> int:
    return _disk_dtype(name).itemsize


def _check_value_dtype(dtype: str) -> None:
    if dtype not in _VALUE_STORAGE:
        raise ConfigError("cache.dtype", f"must be one of {', '.join(_VALUE_STORAGE)}; "
                          f"got {dtype!r}")


def _to_disk(value: Tensor, dtype: str) -> np.ndarray:
    """`value` as the array stored for manifest dtype `dtype` (bf16: its bits as uint16)."""
    value = value.detach().cpu()
    if dtype == "bfloat16":
        return value.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return value.numpy().astype(dtype, copy=False)
    return value.float().numpy().astype(dtype, copy=False)


def _from_disk(rows: np.ndarray, dtype: str) -> Tensor:
    """Rows read from disk as a torch tensor: values widened to float32, indices to int64."""
    if dtype == "bfloat16":
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
    if np.issubdtype(rows.dtype, np.integer):
        return torch.from_numpy(rows.astype(np.int64, copy=False))
    return torch.from_numpy(rows).float()


class TeacherCache:
    """Read side of a complete cache directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KDistillError(f"{manifest_path}: unreadable cache manifest ({exc})") from None
        self._arrays: dict[str, np.ndarray] = {}
        try:
            for name, spec in self.manifest["fields"].items():
                # Read-only mapping: pages load on demand as rows are read, and `read` copies
                # the rows out, so the file is never modified. np.load refuses pickled object
                # arrays (allow_pickle defaults to False): a cache file never runs code.
                arr = np.load(self.directory / spec["file"], mmap_mode="r")
                if list(arr.shape) != spec["shape"] or arr.dtype != _disk_dtype(spec["dtype"]):
                    raise ValueError("does not match its manifest")
                self._arrays[name] = arr
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KDistillError(f"{self.directory}: unreadable teacher cache ({exc}); delete "
                                "it and run again to rebuild it") from None

    @property
    def key(self) -> CacheKey:
        key = dict(self.manifest["key"])  # manifests before version 3 have no "topk": dense
        return CacheKey(**{**key, "layers": tuple(key.get("layers", ())),
                           "topk": key.get("topk")})

    @property
    def format(self) -> str:
        """"dense" (field `logits`) or "topk" (fields `topk_logprobs`, `topk_indices`)."""
        return str(self.manifest.get("format", "dense"))

    @property
    def topk(self) -> int | None:
        """k of a top-k cache; None for a dense one."""
        return int(self.manifest["topk"]) if self.format == "topk" else None

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def fields(self) -> list[str]:
        return list(self._arrays)

    def read(self, name: str, index: Tensor) -> Tensor:
        """Rows `index` (B,) of field `name`: values as float32 (stored fp16/bf16 widened),
        indices as int64."""
        rows = self._arrays[name][index.cpu().numpy()]  # fancy indexing copies the rows
        return _from_disk(rows, self.manifest["fields"][name]["dtype"])

    @staticmethod
    def is_valid(directory: Path, key: CacheKey) -> bool:
        """True when a complete, readable cache with this exact key is there."""
        try:
            manifest = json.loads((Path(directory) / "manifest.json").read_text())
            if manifest.get("version") != FORMAT_VERSION or manifest.get("key") != key.as_dict():
                return False
            TeacherCache(Path(directory))  # every field file present, with its manifest shape
        except (OSError, ValueError, KeyError, KDistillError):  # truncated or missing files
            return False
        return True


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
            teacher(example[:1])
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


@torch.no_grad()
def build_cache(
    directory: Path,
    teacher: nn.Module,
    inputs: Tensor,
    key: CacheKey,
    *,
    batch_size: int = 1000,
    max_batch_mb: float = 256.0,
) -> TeacherCache:
    """Run `teacher` once over `inputs` (N, ...) in order (eval mode) and store, at row = index,
    its logits (N, *P, V) or, when `key.topk` = k, the top-k of its log-softmax at T = 1
    (N, *P, k) with their indices, and the outputs of `key.layers`; values in `key.dtype`.

    At most `batch_size` samples go through the teacher at once, fewer when their fp32
    outputs (twice that for top-k, which adds a log-softmax copy) would pass `max_batch_mb`
    MiB: a causal LM's (batch, T, V) logits grow fast (8 x 512 x 49,152 x 4 B = 805 MB), and
    the full (N, *P, V) logits are never held in memory.
    """
    _check_value_dtype(key.dtype)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = teacher.training
    teacher.eval()
    try:
        n, layers, k = len(inputs), key.layers, key.topk
        with capture(teacher, layers, where="method.teacher_layers") as feats:
            probe = teacher(inputs[:1])
            *positions, vocab = probe.shape[1:]
            # name -> (file, manifest dtype, per-sample shape)
            layout: dict[str, tuple[str, str, tuple[int, ...]]] = {}
            if k is None:
                layout["logits"] = ("logits.npy", key.dtype, tuple(probe.shape[1:]))
            else:
                if not 1 <= k <= vocab:
                    raise ConfigError("cache.topk", f"must be in 1 .. {vocab} (the teacher's "
                                      f"vocabulary); got {k}")
                layout["topk_logprobs"] = ("topk_logprobs.npy", key.dtype, (*positions, k))
                layout["topk_indices"] = ("topk_indices.npy", str(index_dtype(vocab)),
                                          (*positions, k))
            for i, name in enumerate(layers):
                layout[name] = (f"feature-{i}.npy", key.dtype, tuple(feats[name].shape[1:]))
            arrays = {name: np.lib.format.open_memmap(tmp / file, mode="w+",
                                                      dtype=_disk_dtype(dt), shape=(n, *shape))
                      for name, (file, dt, shape) in layout.items()}
            # Top-k adds a log-softmax copy of the logits: budget twice their size.
            per_sample = probe[0].numel() * 4 * (1 if k is None else 2)
            step = max(1, min(batch_size, int(max_batch_mb * 2**20) // max(per_sample, 1)))
            for start in range(0, n, step):
                logits = teacher(inputs[start : start + step])
                if k is None:
                    values = {"logits": logits}
                else:
                    # log-softmax over the full vocabulary first, so the stored values are
                    # the teacher's true log-probabilities (the missing mass is 1 − Σ exp).
                    top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
                    values = {"topk_logprobs": top.values, "topk_indices": top.indices}
                values.update({m: feats[m] for m in layers})
                for name, value in values.items():
                    rows = _to_disk(value, layout[name][1])
                    arrays[name][start : start + len(rows)] = rows
        for arr in arrays.values():
            arr.flush()
        del arrays
        manifest: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "format": "dense" if k is None else "topk",
            "key": key.as_dict(),
            "num_samples": n,
            **({} if k is None else {"topk": k, "vocab": vocab}),
            "fields": {name: {"file": file, "dtype": dt, "shape": [n, *shape]}
                       for name, (file, dt, shape) in layout.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, directory)
    except OSError as exc:  # a full disk: one line naming the cache, not a numpy traceback
        raise TrainingError(f"{directory}: writing the teacher cache failed "
                            f"({exc.strerror or exc}); free space, or set cache.enabled: "
                            "false to run the teacher online") from None
    finally:
        teacher.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache(directory)
