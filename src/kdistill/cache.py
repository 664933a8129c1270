"""The teacher-output store: one pass of the teacher, memory-mapped, keyed by sample index.

Layout of a cache directory:

    manifest.json       {"version", "format", "key": {"teacher", "data", "dtype", "layers",
                         "topk"}, "num_samples", "views", "fields"}; a top-k cache adds "topk",
                        "vocab"
    logits.npy          (N, *P, V) dense teacher logits            (format "dense")
    topk_logprobs.npy   (N, *P, k) the teacher's k largest log-probabilities at T = 1,
                        sorted descending                          (format "topk")
    topk_indices.npy    (N, *P, k) their vocabulary indices        (format "topk")
    feature-K.npy       (N, ...) the output of the K-th cached teacher layer, field = layer name

Rows: one per training sample, or, over a transfer set of K augmented views per sample
(`kdistill.data.transfer`), one per view: row i·K + k holds view k of sample i ("views": K,
num_samples = N·K); `CachedTeacher` reads row `index · K + view`.

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

Integrity: each field's entry in the manifest carries the sha256 of its file, computed when
the cache is built (after the data is flushed to disk) and checked once when the cache is
opened (about 0.8 GiB/s on one core), so a flipped byte, a truncated file or an array zeroed by
a crash is detected and the cache rebuilt, never read. The manifest itself is type-checked (a
field's file must be a plain name inside the cache directory). Non-finite teacher outputs (NaN,
+inf; -inf is a masked logit, probability 0) are refused while the cache is built, naming the
first bad training sample.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.cache_key import REBUILD, CacheKey, _parse_key
from kdistill.capture import capture
from kdistill.devices import model_device
from kdistill.errors import ConfigError, KDistillError, TrainingError
from kdistill.io import file_digest, fsync_file, read_json, refuse_symlink
from kdistill.losses.topk import sparse_targets

# 2: cached teacher layers are part of the key; 3: top-k format, bfloat16; 4: a sha256 per
# field file (older caches have none: they are rebuilt, not read unchecked); 5: "views", rows
# per sample (K augmented views of a transfer set)
FORMAT_VERSION = 5

# Value dtype name -> numpy dtype on disk. bfloat16 bits are kept as uint16 (numpy has no bf16).
_VALUE_STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(np.uint16)}

# Every dtype a manifest may name: the value dtypes and the index dtypes of `index_dtype`.
_MANIFEST_DTYPES = (*_VALUE_STORAGE, "uint8", "uint16", "int32", "int64")


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
    with np.errstate(over="ignore"):  # beyond float16: inf, refused by `_check_finite`
        return value.float().numpy().astype(dtype, copy=False)


def _from_disk(rows: np.ndarray, dtype: str) -> Tensor:
    """Rows read from disk as a torch tensor: values widened to float32, indices to int64."""
    if dtype == "bfloat16":
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
    if np.issubdtype(rows.dtype, np.integer):
        return torch.from_numpy(rows.astype(np.int64, copy=False))
    return torch.from_numpy(rows).float()


class TeacherCache:
    """Read side of a complete cache directory; with `verify` (the default) every field file
    is checked against its checksum once, here."""

    def __init__(self, directory: Path, *, verify: bool = True) -> None:
        self.directory = Path(directory)
        refuse_symlink(self.directory, "the teacher cache directory")
        self.manifest = read_json(self.directory / "manifest.json", what="the cache manifest",
                                  hint=REBUILD)
        try:
            _check_manifest(self.manifest)
        except ValueError as exc:
            raise ConfigError(str(self.directory / "manifest.json"),
                              f"not a kdistill cache manifest ({exc}); {REBUILD}") from None
        self._arrays: dict[str, np.ndarray] = {}
        for name, spec in self.manifest["fields"].items():
            path = self.directory / spec["file"]
            try:
                refuse_symlink(path, "a cache file")
                if verify and file_digest(path) != spec["sha256"]:
                    raise ValueError("its content does not match the checksum written with it "
                                     "(a crash before it reached the disk, or an edit)")
                # Read-only mapping: pages load on demand as rows are read, and `read` copies
                # the rows out, so the file is never modified. np.load refuses pickled object
                # arrays (allow_pickle defaults to False): a cache file never runs code.
                arr = np.load(path, mmap_mode="r")
                if list(arr.shape) != spec["shape"] or arr.dtype != _disk_dtype(spec["dtype"]):
                    raise ValueError("does not match its manifest")
            except (OSError, ValueError, EOFError) as exc:
                raise ConfigError(str(path), f"damaged teacher cache file ({exc}); "
                                  f"{REBUILD}") from None
            self._arrays[name] = arr

    @classmethod
    def open_valid(cls, directory: Path, key: CacheKey) -> tuple[TeacherCache | None, str]:
        """(the verified cache, "") when a complete cache with this exact key is there, else
        (None, why not: "no cache", "stale: ..." or "damaged: ..."), for the caller to say
        before it rebuilds. Each file is hashed once (`is_valid` + a new TeacherCache twice)."""
        directory = Path(directory)
        if not (directory / "manifest.json").exists():
            return None, "no cache"
        try:
            manifest = read_json(directory / "manifest.json", what="the cache manifest")
            if manifest.get("version") != FORMAT_VERSION:
                return None, (f"stale: written by another kdistill (format "
                              f"{manifest.get('version')!r}, now {FORMAT_VERSION})")
            # Parsed, not compared as dicts: a field added later reads as its default, so
            # caches written before it stay valid.
            if _parse_key(manifest.get("key"), directory) != key:
                return None, "stale: the teacher, data, dtype, layers or k changed"
            return cls(directory), ""
        except KDistillError as exc:
            return None, f"damaged: {exc}"

    @property
    def key(self) -> CacheKey:
        return _parse_key(self.manifest["key"], self.directory)

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

    @property
    def views(self) -> int:
        """Rows per training sample: K views of a transfer set, else 1."""
        return int(self.manifest.get("views", 1))

    def fields(self) -> list[str]:
        return list(self._arrays)

    def read(self, name: str, index: Tensor) -> Tensor:
        """Rows `index` (B,) of field `name`: values as float32 (stored fp16/bf16 widened),
        indices as int64."""
        rows = self._arrays[name][index.cpu().numpy()]  # fancy indexing copies the rows
        return _from_disk(rows, self.manifest["fields"][name]["dtype"])

    @staticmethod
    def is_valid(directory: Path, key: CacheKey) -> bool:
        """True when a complete, intact cache with this exact key is there."""
        return TeacherCache.open_valid(directory, key)[0] is not None


def _check_manifest(manifest: dict[str, Any]) -> None:
    """ValueError naming the first entry of a manifest that is not what build_cache writes."""
    fields = manifest.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise ValueError("'fields' should be a non-empty object")
    if not isinstance(manifest.get("key"), dict):
        raise ValueError("'key' should be an object")
    n = manifest.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError("'num_samples' should be a count")
    views = manifest.get("views", 1)
    if not isinstance(views, int) or isinstance(views, bool) or views < 1 or n % views:
        raise ValueError("'views' should be a count of rows per sample dividing num_samples")
    if manifest.get("format", "dense") not in ("dense", "topk"):
        raise ValueError("'format' should be dense or topk")
    if manifest.get("format") == "topk" and not isinstance(manifest.get("topk"), int):
        raise ValueError("'topk' should be an integer")
    for name, spec in fields.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("file"), str)
                and isinstance(spec.get("dtype"), str) and isinstance(spec.get("sha256"), str)
                and isinstance(spec.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                        for d in spec["shape"])):
            raise ValueError(f"field {name!r} should have a file, dtype, shape and sha256")
        file = spec["file"]
        if Path(file).name != file or file in (".", "..") or "\\" in file:
            raise ValueError(f"field {name!r}: {file!r} is not a file name in the cache")
        if spec["dtype"] not in _MANIFEST_DTYPES:
            raise ValueError(f"field {name!r}: unknown dtype {spec['dtype']!r}")
        if spec["shape"][:1] != [n]:
            raise ValueError(f"field {name!r} does not hold num_samples = {n} rows")


def _first_bad_row(value: Tensor | np.ndarray) -> int | None:
    """Index of the first row holding NaN or +inf (-inf is a masked logit: probability 0)."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            return None  # indices, or bfloat16 bits (checked before conversion)
        value = torch.from_numpy(value)
    if not value.is_floating_point():
        return None
    bad = (torch.isnan(value) | torch.isposinf(value)).flatten(1).any(1) if len(value) else None
    return int(bad.nonzero()[0, 0]) if bad is not None and bool(bad.any()) else None


def _check_finite(name: str, value: Tensor, rows: np.ndarray | None, start: int, dtype: str,
                  what: str) -> None:
    """TrainingError naming the teacher, the output and the first non-finite training sample."""
    row = _first_bad_row(value)
    if row is not None:
        raise TrainingError(
            f"{what}: its output {name!r} is NaN or infinite for training sample {start + row}; "
            "the teacher is broken (check its weights, or teacher/metrics.jsonl if kdistill "
            "trained it); nothing was cached")
    row = None if rows is None else _first_bad_row(rows)
    if row is not None:  # finite in float32, infinite once stored in float16
        raise TrainingError(
            f"{what}: its output {name!r} for training sample {start + row} is beyond the range "
            f"of {dtype} (max 65504); set cache.dtype: bfloat16 or float32")


@torch.no_grad()
def build_cache(
    directory: Path,
    teacher: nn.Module,
    inputs: Tensor,
    key: CacheKey,
    *,
    batch_size: int = 1000,
    max_batch_mb: float = 256.0,
    what: str = "teacher",
    views: int = 1,
) -> TeacherCache:
    """Run `teacher` once over `inputs` (N, ...) in order (eval mode) and store, at row = index,
    its logits (N, *P, V) or, when `key.topk` = k, the top-k of its log-softmax at T = 1
    (N, *P, k) with their indices, and the outputs of `key.layers`; values in `key.dtype`.

    At most `batch_size` samples go through the teacher at once, fewer when their fp32
    outputs (twice that for top-k, which adds a log-softmax copy) would pass `max_batch_mb`
    MiB: a causal LM's (batch, T, V) logits grow fast (8 x 512 x 49,152 x 4 B = 805 MB), and
    the full (N, *P, V) logits are never held in memory.

    A NaN or +inf output is a TrainingError naming `what` (the teacher's role in messages) and
    the first bad sample; nothing is cached. Each file's sha256 goes into the manifest.
    `views`: the rows per training sample `inputs` holds (a transfer set's `ViewRows`, row
    i·K + k), recorded for the reader.
    """
    _check_value_dtype(key.dtype)
    directory = Path(directory)
    refuse_symlink(directory, "the teacher cache directory")
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    refuse_symlink(tmp, "a temporary cache directory")
    shutil.rmtree(tmp, ignore_errors=True)
    was_training = teacher.training
    teacher.eval()
    device = model_device(teacher)  # the teacher's device; rows are written from the CPU
    try:
        tmp.mkdir(parents=True)
        n, layers, k = len(inputs), key.layers, key.topk
        with capture(teacher, layers, where="method.teacher_layers") as feats:
            probe = teacher(inputs[:1].to(device))
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
            # Top-k adds a log-softmax copy of the logits (tail samples two more: the tail's
            # probabilities and the draw counts): budget that many times their size.
            copies = 1 if k is None else 4 if key.tail_samples else 2
            per_sample = probe[0].numel() * 4 * copies
            step = max(1, min(batch_size, int(max_batch_mb * 2**20) // max(per_sample, 1)))
            for start in range(0, n, step):
                logits = teacher(inputs[start : start + step].to(device))
                values = {"logits": logits}
                if k is not None:
                    # log-softmax over the full vocabulary first, so the stored values are
                    # the teacher's true log-probabilities (the missing mass is 1 − Σ exp).
                    top = sparse_targets(torch.log_softmax(logits.float(), dim=-1), k,
                                         key.tail_samples, seed=start,
                                         systematic=key.tail_sampling == "systematic")
                    _check_finite("logits", logits, None, start, key.dtype, what)
                    values = {"topk_logprobs": top[0], "topk_indices": top[1]}
                values.update({m: feats[m] for m in layers})
                for name, value in values.items():
                    rows = _to_disk(value, layout[name][1])
                    _check_finite(name, value, rows, start, layout[name][1], what)
                    arrays[name][start : start + len(rows)] = rows
        for arr in arrays.values():
            arr.flush()
        del arrays
        for file, _, _ in layout.values():  # on disk before the checksum and the rename
            fsync_file(tmp / file)
        manifest: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "format": "dense" if k is None else "topk",
            "key": key.as_dict(),
            "num_samples": n,
            "views": views,
            **({} if k is None else {"topk": k, "vocab": vocab}),
            "fields": {name: {"file": file, "dtype": dt, "shape": [n, *shape],
                              "sha256": file_digest(tmp / file)}
                       for name, (file, dt, shape) in layout.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        fsync_file(tmp / "manifest.json")
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
    return TeacherCache(directory, verify=False)  # just hashed: the manifest holds the sums
