"""The teacher-output store: one pass of the teacher, memory-mapped, keyed by sample index.

Layout of a cache directory:

    manifest.json   {"version", "format", "key": {"teacher", "data"}, "num_samples", "fields"}
    logits.npy      (N, C) dense teacher logits (numpy .npy, opened with mmap)

`fields` maps a name to {"file", "dtype", "shape"}, so the same format later holds top-k
values/indices (`format: "topk"`) or named features beside the logits. The key holds a hash of
the teacher's weights and the data fingerprint; a mismatch means the cache is stale and is
rebuilt. A cache is written into a temporary directory and renamed into place when complete,
so a crash mid-build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.errors import KDistillError

FORMAT_VERSION = 1


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

    def as_dict(self) -> dict[str, str]:
        return {"teacher": self.teacher, "data": self.data, "dtype": self.dtype}


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
        return CacheKey(**self.manifest["key"])

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
def build_cache(
    directory: Path,
    teacher: nn.Module,
    inputs: Tensor,
    key: CacheKey,
    *,
    batch_size: int = 1000,
) -> TeacherCache:
    """Run `teacher` once over `inputs` (N, ...) in order and store its logits at row = index,
    in `key.dtype`."""
    dtype = key.dtype
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = teacher.training
    teacher.eval()
    try:
        first = teacher(inputs[:1])
        n, num_classes = len(inputs), first.shape[-1]
        out = np.lib.format.open_memmap(
            tmp / "logits.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, num_classes)
        )
        for start in range(0, n, batch_size):
            logits = teacher(inputs[start : start + batch_size]).float()
            out[start : start + len(logits)] = logits.numpy().astype(dtype, copy=False)
        out.flush()
        del out
        manifest = {
            "version": FORMAT_VERSION,
            "format": "dense",
            "key": key.as_dict(),
            "num_samples": n,
            "fields": {"logits": {"file": "logits.npy", "dtype": dtype, "shape": [n, num_classes]}},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, directory)
    finally:
        teacher.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache(directory)
