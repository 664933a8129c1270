"""Where the students' teacher outputs come from: the teacher cache, or the live network; and
the tools a method's `prepare_data` uses (its own files in the run, the task's decoding).

The cache holds one pass of the teacher over the training set (logits or their top k, and
the teacher layers the method reads), keyed by the teacher's weights, the data's fingerprint,
the storage dtype, the layers and k; rank 0 builds it, every rank reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from kdistill import distributed
from kdistill.build import check_views
from kdistill.cache import CacheKey, TeacherCache, build_cache
from kdistill.cache_key import fingerprint_model
from kdistill.cache_size import cache_bytes, feature_shapes
from kdistill.config import RunConfig
from kdistill.data.transfer import (
    ViewRows,
    cache_rows,
    make_views,
    num_transfer_inputs,
    views_key,
)
from kdistill.errors import ConfigError
from kdistill.io import save_tensors_atomic
from kdistill.methods import Method
from kdistill.tasks import Task, task_of
from kdistill.teachers import CachedTeacher, OnlineTeacher, Teacher
from kdistill.types import DataSplits, Echo


def _online_reason(cfg: RunConfig, method: Method, splits: DataSplits,
                   model: nn.Module) -> str | None:
    """Why the teacher must run online (a sentence for the log), or None to cache it."""
    if not cfg.cache.enabled:
        return "cache disabled"
    ts = cfg.transfer_set
    if ts is not None and ts.teaching == "online":
        return "transfer_set.teaching: online; the teacher labels each view as it is made"
    if ts is None and (cfg.train.augment != "none" or splits.augment is not None):
        return "augmented inputs: the teacher sees each view the student sees"
    if method.on_policy:
        return "on-policy: the teacher scores the student's samples"
    layers = tuple(method.teacher_layers)
    rows = len(splits.train_x) if ts is None else cache_rows(num_transfer_inputs(splits), ts)
    size = cache_bytes(rows, task_of(splits).output_shape(model, splits),
                       feature_shapes(model, splits.train_x, layers), cfg.cache.dtype,
                       topk=cfg.cache.topk)
    if size > cfg.cache.max_mb * 2**20:
        what = "teacher outputs" + (" and the layers the method reads" if layers else "")
        return (f"the {what} would make a {size / 2**20:.0f} MB cache, over "
                f"cache.max_mb={cfg.cache.max_mb:g}")
    return None


def teacher_outputs(cfg: RunConfig, method: Method, splits: DataSplits, model: nn.Module,
                    cache_dir: Path, echo: Echo, weights_print: str, *,
                    role: str = "teacher") -> Teacher | None:
    """The cache (outputs, and the teacher layers `method` reads) when inputs are deterministic,
    caching is on and it fits `cache.max_mb`; else the live network; None when the method
    reads no teacher."""
    if not method.uses_teacher:
        return None  # self-distillation: the teacher network is only evaluated beside it
    why = _online_reason(cfg, method, splits, model)
    if why is not None:
        echo(f"cache: teacher runs online ({why})")
        return OnlineTeacher(model)
    layers = tuple(method.teacher_layers)
    inputs, views, data = cache_inputs(cfg, splits)
    key = CacheKey(teacher=weights_print, data=data,
                   dtype=cfg.cache.dtype, layers=layers, topk=cfg.cache.topk,
                   tail_samples=cfg.cache.tail_samples, tail_sampling=cfg.cache.tail_sampling)

    opened: list[TeacherCache] = []  # rank 0's verified (or just built) cache

    def ensure_cache() -> None:  # rank 0 writes the cache; the others then open it
        cache, why = TeacherCache.open_valid(cache_dir, key)  # checksums verified once
        if cache is not None:
            echo("cache: valid teacher cache found")
            opened.append(cache)
            return
        if why != "no cache":  # "stale: <what changed>" or "damaged: <what is wrong>"
            kind, _, detail = why.partition(": ")
            echo(f"cache: {kind} teacher cache ({detail}); rebuilding")
        what = (task_of(splits).output_name if cfg.cache.topk is None
                else f"top-{cfg.cache.topk} log-probabilities")
        what += f" and {', '.join(layers)}" if layers else ""
        echo(f"cache: running the teacher once over {len(inputs):,} training "
             f"{'samples' if views == 1 else 'views'} ({what})")
        start = time.perf_counter()
        built = build_cache(cache_dir, model, inputs, key, batch_size=cfg.cache.batch_size,
                            what=role, views=views)
        size = sum((cache_dir / spec["file"]).stat().st_size
                   for spec in built.manifest["fields"].values())
        echo(f"cache: {size / 2**20:.1f} MB, built in {time.perf_counter() - start:.1f} s")
        summary = getattr(model, "summary", None)  # a projected teacher: how often it held
        if callable(summary):
            echo(f"cache: {summary()}")
        opened.append(built)

    distributed.on_main(ensure_cache)
    # The other ranks open what rank 0 has just verified or written: hashed once per run.
    return CachedTeacher(opened[0] if opened else TeacherCache(cache_dir, verify=False))


def cache_inputs(cfg: RunConfig, splits: DataSplits) -> tuple[Any, int, str]:
    """What the cache covers: (its inputs in row order, rows per sample, the key's data part):
    the training inputs, or the transfer set's N·K views (row i·K + k), keyed by the data and
    the views' recipe."""
    ts = cfg.transfer_set
    if ts is None:
        return splits.train_x, 1, splits.fingerprint
    check_views(splits, ts)
    rows = ViewRows(make_views(splits, ts, unlabelled=True))  # the teacher labels every input
    return rows, rows.k, views_key(splits, ts)


@dataclass
class RunDataTools:
    """`kdistill.methods.base.DataTools` for one run: the method's files live in `directory`
    (written by rank 0, atomically), decoding is the data's task's."""

    directory: Path
    task: Task
    echo: Echo

    def fingerprint(self, model: nn.Module) -> str:
        return fingerprint_model(model)

    def cached_tensors(self, name: str, make: Callable[[], dict[str, Tensor]]
                       ) -> dict[str, Tensor]:
        if "/" in name or name.startswith("."):
            raise ConfigError("method", f"a method's file name must be plain, got {name!r}")
        path = self.directory / f"{name}.safetensors"
        if path.is_file():
            return load_file(str(path))
        tensors = make()
        save_tensors_atomic(tensors, path)  # a killed run never leaves a torn file
        return tensors

    def decode(self, model: nn.Module, inputs: Tensor, *, beam: int, length_penalty: float,
               batch_size: int) -> Tensor:
        return self.task.decode(model, inputs, beam=beam, length_penalty=length_penalty,
                                batch_size=batch_size)

    def with_decoded_targets(self, splits: DataSplits, ids: Tensor, key: str) -> DataSplits:
        return self.task.with_decoded_targets(splits, ids, key)
