"""The teacher cache exported to Parquet shards: `datasets` opens them and gets back the cached
values, indices and dtypes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from kdistill.cache import CacheKey, TeacherCache, build_cache
from kdistill.cache_export import MANIFEST, export_parquet
from kdistill.errors import ConfigError

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

N, T, V, K = 7, 5, 300, 4  # V > 256: indices stored as uint16


class _TinyLM(nn.Module):
    """ids (N, T) -> logits (N, T, V), plus a named layer whose output can be cached too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 6)
        self.head = nn.Linear(6, V)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids)) * 4  # * 4: peaked, so the missing mass varies


def _cache(tmp_path: Path, dtype: str, *, topk: int | None = K,
           layers: tuple[str, ...] = ()) -> tuple[TeacherCache, Tensor]:
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    key = CacheKey(teacher="t", data="d", dtype=dtype, layers=layers, topk=topk)
    return build_cache(tmp_path / f"cache-{dtype}", _TinyLM(), ids, key, batch_size=3), ids


def _load(out: Path) -> object:
    return datasets.load_dataset("parquet", data_dir=str(out), split="train")


def _leaf(feature: object) -> tuple[str, list[int]]:
    """(dtype, shape) of a column of nested fixed-size lists, as `datasets` types it."""
    shape = []
    while hasattr(feature, "feature"):
        shape.append(feature.length)
        feature = feature.feature
    return feature.dtype, shape


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_export_round_trips_values_indices_and_dtypes(tmp_path: Path, dtype: str) -> None:
    cache, ids = _cache(tmp_path, dtype)
    labels = ids.clone()
    labels[:, 0] = -100
    out = export_parquet(cache.directory, tmp_path / "export", rows_per_shard=3, inputs=ids,
                         labels=labels)
    shards = sorted(p.name for p in out.glob("*.parquet"))
    assert shards == [f"train-0000{i}-of-00003.parquet" for i in range(3)]  # 3 + 3 + 1 rows

    ds = _load(out)
    assert len(ds) == N
    assert ds.column_names == ["index", "input_ids", "labels", "topk_logprobs", "topk_indices"]
    # The stored types (numpy formatting would widen float16 to float32 on the way out).
    stored = {"float16": "float16", "bfloat16": "float32", "float32": "float32"}
    assert _leaf(ds.features["topk_logprobs"]) == (stored[dtype], [T, K])
    assert _leaf(ds.features["topk_indices"]) == ("uint16", [T, K])
    assert _leaf(ds.features["input_ids"]) == ("int32", [T])
    assert _leaf(ds.features["index"]) == ("int64", [])
    rows = ds.with_format("numpy")[:]
    every = torch.arange(N)
    np.testing.assert_array_equal(rows["index"], np.arange(N))
    np.testing.assert_array_equal(rows["input_ids"], ids.numpy())
    np.testing.assert_array_equal(rows["labels"], labels.numpy())
    # Values bit for bit: float16 stays float16, bfloat16 is widened to float32 (exact).
    values = rows["topk_logprobs"]
    assert values.shape == (N, T, K)
    np.testing.assert_array_equal(values, cache.read("topk_logprobs", every).numpy())
    indices = rows["topk_indices"]
    assert indices.shape == (N, T, K)
    np.testing.assert_array_equal(indices, cache.read("topk_indices", every).numpy())
    # The values are the teacher's true log-probabilities: the implied missing mass is in
    # (0, 1) and is what the teacher puts outside its top-k (checked on the dense softmax).
    with torch.no_grad():
        probs = torch.softmax(_TinyLM()(ids), dim=-1)
    top_mass = probs.topk(K, dim=-1).values.sum(-1).numpy()
    missing = 1 - np.exp(values.astype(np.float64)).sum(-1)
    assert ((missing > 0) & (missing < 1)).all()
    np.testing.assert_allclose(missing, 1 - top_mass, atol=5e-3)
    if dtype == "bfloat16":  # widened, not rounded again: every value is a bfloat16
        as_bf16 = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(as_bf16, values)


def test_export_describes_itself_and_keeps_dense_caches_and_layers(tmp_path: Path) -> None:
    cache, _ = _cache(tmp_path, "float16", topk=None, layers=("embed",))
    out = export_parquet(cache.directory, tmp_path / "export", rows_per_shard=100)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["cache"] == cache.manifest
    assert manifest["columns"]["logits"] == {"dtype": "float16", "cached_dtype": "float16",
                                             "shape": [T, V]}
    [shard] = manifest["shards"]
    assert shard["rows"] == N and shard["file"] == "train-00000-of-00001.parquet"
    # The same description travels inside every shard, for readers that get one file alone.
    schema_meta = pq.read_schema(out / shard["file"]).metadata[b"kdistill"]
    assert json.loads(schema_meta)["columns"] == manifest["columns"]
    ds = _load(out)
    assert _leaf(ds.features["logits"]) == ("float16", [T, V])
    assert _leaf(ds.features["embed"]) == ("float16", [T, 6])
    rows, every = ds.with_format("numpy")[:], torch.arange(N)
    np.testing.assert_array_equal(rows["logits"], cache.read("logits", every).numpy())
    np.testing.assert_array_equal(rows["embed"], cache.read("embed", every).numpy())


def test_export_refuses_bad_input(tmp_path: Path) -> None:
    cache, ids = _cache(tmp_path, "float16")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_parquet(cache.directory, taken)
    assert (taken / "mine.txt").read_text() == "a user's file"
    with pytest.raises(ConfigError, match="N = 7"):
        export_parquet(cache.directory, tmp_path / "a", inputs=ids[:3])
    with pytest.raises(ConfigError, match="rows_per_shard"):
        export_parquet(cache.directory, tmp_path / "b", rows_per_shard=0)
    with pytest.raises(ConfigError, match="manifest"):
        export_parquet(tmp_path / "no-cache", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
