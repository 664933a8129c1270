"""A teacher cache as Parquet shards that `datasets`, pandas, polars or DuckDB can open.

`export_parquet(cache_dir, out_dir)` writes one row per cached sample (a training block of a
causal LM, an image of a classifier), in sample order, into shards of `rows_per_shard` rows:

    out_dir/train-00000-of-00003.parquet, ...   the rows (Hugging Face's shard naming)
    out_dir/kdistill_cache.json                 the cache's manifest, the export's columns,
                                                and each shard's rows and sha256

Columns (all fixed-size lists, so every row of a column has one shape):

    index           int64      the sample's row in the cache = its row in the training split
    input_ids       (T,)       the token ids of the sample (only when `inputs` is given;
                               the cache itself stores teacher outputs, not inputs)
    labels          (T,)       the labels, -100 at positions that are not trained on
                               (only when `labels` is given)
    topk_logprobs   (*P, k)    the teacher's k largest log-probabilities at T = 1, sorted
                               descending; float16/float32 as cached (bfloat16: float32)
    topk_indices    (*P, k)    their vocabulary ids, in the cache's index dtype (uint16 for
                               SmolLM2's 49,152 tokens)
    logits          (*P, V)    a dense cache's logits instead of the two above
    <layer name>    (...)      each cached teacher layer's output, by its module name

For a causal LM, position t of a row is the teacher's distribution over token t + 1, computed
from tokens 0 .. t. The mass outside the top-k, 1 − Σ exp(topk_logprobs), is not stored: it
is implied by the values, which are true log-probabilities over the whole vocabulary (the
log-softmax was taken before the top-k), and a reader chooses what to do with it (kdistill
renormalises over the k tokens, or spreads it uniformly over the other V − k; docs/llm.md).

Values are the cache's bytes, not recomputed: float16 stays float16 (Arrow `halffloat`), and
bfloat16, which Arrow does not have, is widened to float32, which holds every bfloat16 value
exactly (`kdistill_cache.json` and the Parquet schema metadata record the cached dtype).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.cache import TeacherCache
from kdistill.errors import ConfigError, MissingDependencyError
from kdistill.io import file_digest, fsync_file, refuse_symlink

EXPORT_VERSION = 1
MANIFEST = "kdistill_cache.json"
SPLIT = "train"  # a cache covers the training split; `datasets` names the split from the files

# Manifest dtype -> the numpy dtype written to Parquet (bfloat16 widened exactly to float32).
_EXPORTED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32,
             "uint8": np.uint8, "uint16": np.uint16, "int32": np.int32, "int64": np.int64}


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # the submodule, which writes the shards
    except ImportError:
        raise MissingDependencyError("cache export", "pyarrow",
                                     "pip install -e '.[data]'") from None
    return pyarrow


def _fixed_lists(pa: Any, values: np.ndarray) -> Any:
    """(rows, *shape) -> an Arrow array of nested fixed-size lists, one row per sample."""
    array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def _rows(pa: Any, cache: TeacherCache, columns: dict[str, Tensor | None], start: int,
          stop: int) -> Any:
    """The Arrow table of samples start .. stop − 1."""
    index = torch.arange(start, stop)
    arrays = {"index": pa.array(index.numpy())}
    for name, tensor in columns.items():
        if tensor is not None:
            arrays[name] = _fixed_lists(pa, tensor[start:stop].cpu().numpy().astype(np.int32))
    for name, spec in cache.manifest["fields"].items():
        values = cache.read(name, index).numpy()  # widened to float32 / int64: exact
        arrays[name] = _fixed_lists(pa, values.astype(_EXPORTED[spec["dtype"]]))
    return pa.table(arrays)


def _check_columns(columns: dict[str, Tensor | None], n: int, fields: list[str]) -> None:
    for name, tensor in columns.items():
        if tensor is None:
            continue
        if tensor.dtype not in (torch.int32, torch.int64) or tensor.dim() < 2 or len(tensor) != n:
            raise ConfigError(name, f"expected integer token ids (N, T) with N = {n}, the "
                              f"cache's samples; got {tuple(tensor.shape)} {tensor.dtype}")
        if name in fields:
            raise ConfigError(name, "the cache already has a field of that name")


def export_parquet(cache_dir: str | Path, out_dir: str | Path, *, rows_per_shard: int = 1024,
                   inputs: Tensor | None = None, labels: Tensor | None = None) -> Path:
    """Write the teacher cache in `cache_dir` as Parquet shards into the new `out_dir`.

    Args:
        cache_dir: a complete kdistill cache (its manifest and files; checksums verified).
        out_dir: where the shards go; must not exist, or be an empty directory. Written into
            a temporary directory first and renamed into place when complete.
        rows_per_shard: samples per Parquet file (each file is also one row group).
        inputs: optional (N, T) token ids of the cached training split (`DataSplits.train_x`),
            stored as column `input_ids` so the shards are usable without kdistill.
        labels: optional (N, T) labels (`DataSplits.train_y`), column `labels`.

    Returns:
        `out_dir`. `datasets.load_dataset("parquet", data_dir=out_dir, split="train")` opens
        it; `kdistill_cache.json` describes it.
    """
    pa = _pyarrow()
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ConfigError("rows_per_shard", f"must be a positive integer; got {rows_per_shard!r}")
    cache = TeacherCache(Path(cache_dir))
    out = Path(out_dir)
    refuse_symlink(out, "the export directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(str(out), "exists and is not an empty directory; export into a new one")
    n = cache.num_samples
    columns = {"input_ids": inputs, "labels": labels}
    _check_columns(columns, n, cache.fields())
    shards = max(1, math.ceil(n / rows_per_shard))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metadata = _metadata(cache, columns, rows_per_shard)
        files = []
        for s in range(shards):
            start, stop = s * rows_per_shard, min(n, (s + 1) * rows_per_shard)
            table = _rows(pa, cache, columns, start, stop)
            table = table.replace_schema_metadata({"kdistill": json.dumps(metadata)})
            name = f"{SPLIT}-{s:05d}-of-{shards:05d}.parquet"
            pa.parquet.write_table(table, tmp / name, row_group_size=rows_per_shard)
            fsync_file(tmp / name)
            files.append({"file": name, "rows": stop - start, "sha256": file_digest(tmp / name)})
        (tmp / MANIFEST).write_text(json.dumps({**metadata, "shards": files}, indent=2))
        fsync_file(tmp / MANIFEST)
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _metadata(cache: TeacherCache, columns: dict[str, Tensor | None],
              rows_per_shard: int) -> dict[str, Any]:
    """What a reader needs besides the columns: the cache's manifest and each column's dtypes."""
    described = {"index": {"dtype": "int64", "shape": [], "meaning": "row in the training split"}}
    for name, tensor in columns.items():
        if tensor is not None:
            described[name] = {"dtype": "int32", "shape": list(tensor.shape[1:])}
    for name, spec in cache.manifest["fields"].items():
        described[name] = {"dtype": np.dtype(_EXPORTED[spec["dtype"]]).name,
                           "cached_dtype": spec["dtype"], "shape": spec["shape"][1:]}
    return {"export_version": EXPORT_VERSION, "split": SPLIT, "rows_per_shard": rows_per_shard,
            "cache": cache.manifest, "columns": described}
