"""The teacher-output store: one pass of the teacher, memory-mapped, keyed by sample index.

Layout of a cache directory:

    manifest.json   {"version", "format", "key": {"teacher", "data", "dtype", "layers"},
                     "num_samples", "fields"}
    logits.npy      (N, C) dense teacher logits (numpy .npy, opened with mmap)
    feature-K.npy   (N, ...) the output of the K-th cached teacher layer, field = layer name

`fields` maps a name to {"file", "dtype", "shape"}, so the same format later holds top-k
values/indices (`format: "topk"`) beside the logits. The key holds a hash of the teacher's
weights, the data fingerprint, the storage dtype and the cached layer names; a mismatch means
the cache is stale and is rebuilt. A cache is written into a temporary directory and renamed
into place when complete, so a crash mid-build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.capture import capture
from kdistill.errors import KDistillError

FORMAT_VERSION = 2  # 2: cached teacher layers are part of the key


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
    dtype: str = "float32"  # storage dtype of the values
    layers: tuple[str, ...] = ()  # teacher layers whose outputs are stored beside the logits

    def as_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "data": self.data, "dtype": self.dtype,
                "layers": list(self.layers)}


class TeacherCache:
    """Read side of a complete cache directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KDistillError(f"{manifest_path}: unreadable cache manifest ({exc})") from None
        self._arrays: dict[str, Tensor] = {}
        for name, spec in self.manifest["fields"].items():
            # Copy-on-write mapping: writable as torch requires, yet the file is never modified.
            arr = np.load(self.directory / spec["file"], mmap_mode="c")
            if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
                raise KDistillError(f"{self.directory / spec['file']}: does not match its manifest")
            # No copy: pages load on demand as rows are read.
            self._arrays[name] = torch.from_numpy(arr)

    @property
    def key(self) -> CacheKey:
        key = dict(self.manifest["key"])
        return CacheKey(**{**key, "layers": tuple(key.get("layers", ()))})

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def fields(self) -> list[str]:
        return list(self._arrays)

    def read(self, name: str, index: Tensor) -> Tensor:
        """Rows `index` (B,) of field `name`, as float32 (stored fp16 is widened)."""
        rows = self._arrays[name][index]
        return rows.float() if rows.is_floating_point() else rows

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


def cache_bytes(num_samples: int, num_classes: int, shapes: dict[str, tuple[int, ...]],
                dtype: str) -> int:
    """Bytes a cache of logits plus these layer outputs takes on disk."""
    per_sample = num_classes + sum(int(np.prod(s)) for s in shapes.values())
    return num_samples * per_sample * np.dtype(dtype).itemsize


@torch.no_grad()
def build_cache(
    directory: Path,
    teacher: nn.Module,
    inputs: Tensor,
    key: CacheKey,
    *,
    batch_size: int = 1000,
) -> TeacherCache:
    """Run `teacher` once over `inputs` (N, ...) in order (eval mode) and store its logits, and
    the outputs of `key.layers`, at row = index, in `key.dtype`."""
    dtype = np.dtype(key.dtype)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = teacher.training
    teacher.eval()
    try:
        n, layers = len(inputs), key.layers
        with capture(teacher, layers, where="method.teacher_layers") as feats:
            shapes = {"logits": tuple(teacher(inputs[:1]).shape[1:]),
                      **{name: tuple(feats[name].shape[1:]) for name in layers}}
            files = {"logits": "logits.npy",
                     **{name: f"feature-{k}.npy" for k, name in enumerate(layers)}}
            arrays = {name: np.lib.format.open_memmap(tmp / files[name], mode="w+", dtype=dtype,
                                                      shape=(n, *shapes[name]))
                      for name in files}
            for start in range(0, n, batch_size):
                logits = teacher(inputs[start : start + batch_size])
                for name, value in (("logits", logits), *((m, feats[m]) for m in layers)):
                    rows = value.float().numpy().astype(dtype, copy=False)
                    arrays[name][start : start + len(rows)] = rows
        for arr in arrays.values():
            arr.flush()
        del arrays
        manifest = {
            "version": FORMAT_VERSION,
            "format": "dense",
            "key": key.as_dict(),
            "num_samples": n,
            "fields": {name: {"file": files[name], "dtype": str(dtype),
                              "shape": [n, *shapes[name]]} for name in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, directory)
    finally:
        teacher.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache(directory)
