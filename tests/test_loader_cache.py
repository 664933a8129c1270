"""Batching (deterministic, resumable, indexed), jitter, and the teacher-output store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.cache import CacheKey, TeacherCache, build_cache, fingerprint_model
from kdistill.data.loader import BatchLoader, jitter


def test_batches_are_a_function_of_seed_and_epoch_and_resume_mid_epoch() -> None:
    x = torch.arange(50).float()[:, None]
    y = torch.arange(50)
    loader = BatchLoader(x, y, batch_size=8, seed=3)
    assert len(loader) == 7
    epoch0 = list(loader.epoch(0))
    assert torch.equal(torch.sort(torch.cat([b["index"] for b in epoch0])).values, y)
    assert all(torch.equal(b["input"][:, 0].long(), b["index"]) for b in epoch0)
    assert all(torch.equal(b["label"], b["index"]) for b in epoch0)
    again = list(BatchLoader(x, y, batch_size=8, seed=3).epoch(0))
    assert all(torch.equal(a["index"], b["index"]) for a, b in zip(epoch0, again, strict=True))
    resumed = list(loader.epoch(0, start=4))
    assert all(torch.equal(a["index"], b["index"])
               for a, b in zip(epoch0[4:], resumed, strict=True))
    assert not torch.equal(epoch0[0]["index"], next(loader.epoch(1))["index"])


def test_jitter_shifts_each_image_within_bounds_and_reproducibly() -> None:
    img = torch.zeros(4, 1, 9, 9)
    img[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    gen = torch.Generator().manual_seed(0)
    out = jitter(2)(img, gen)
    assert out.shape == img.shape and float(out.sum()) == 4.0  # nothing lost within 2 px
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    again = jitter(2)(img, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="image batches"):
        jitter(1)(torch.zeros(4, 40), gen)


def test_cache_round_trip_fp16_and_staleness(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4)
    x = torch.randn(37, 6)
    key = CacheKey(teacher=fingerprint_model(teacher), data="d1")
    cache = build_cache(tmp_path / "c", teacher, x, key, batch_size=10)
    idx = torch.tensor([36, 0, 5])
    torch.testing.assert_close(cache.read("logits", idx), teacher(x[idx]).detach())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["fields"]["logits"]["shape"] == [37, 4] and manifest["format"] == "dense"
    assert TeacherCache.is_valid(tmp_path / "c", key)
    assert not TeacherCache.is_valid(tmp_path / "c", CacheKey(key.teacher, "other-data"))
    with torch.no_grad():
        teacher.weight.add_(0.01)
    assert fingerprint_model(teacher) != key.teacher  # a changed teacher makes it stale
    half_key = CacheKey(key.teacher, key.data, dtype="float16")
    assert not TeacherCache.is_valid(tmp_path / "c", half_key)  # another dtype is another cache
    half = build_cache(tmp_path / "h", teacher, x, half_key)
    assert half.read("logits", idx).dtype == torch.float32
    torch.testing.assert_close(half.read("logits", idx), teacher(x[idx]).detach(),
                               rtol=1e-3, atol=1e-3)
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary directory left behind
    logits = tmp_path / "c" / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-40])  # truncated on disk: not valid, rebuilt
    assert not TeacherCache.is_valid(tmp_path / "c", key)


def test_interrupted_cache_build_leaves_no_valid_cache(tmp_path: Path) -> None:
    class Boom(nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("killed")
            return x[:, :3]

    key = CacheKey("t", "d")
    with pytest.raises(RuntimeError):
        build_cache(tmp_path / "c", Boom(), torch.randn(50, 5), key, batch_size=10)
    assert not TeacherCache.is_valid(tmp_path / "c", key)
    assert not list(tmp_path.iterdir())


def test_cache_stores_teacher_layers_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # Dropout would make training-mode features random: the cache must hold eval outputs.
    teacher = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                            nn.Linear(3 * 4 * 4, 5)).train()
    x = torch.randn(23, 1, 6, 6)
    key = CacheKey(fingerprint_model(teacher), "d", dtype="float16", layers=("0", "2"))
    cache = build_cache(tmp_path / "c", teacher, x, key, batch_size=7)
    assert teacher.training  # mode restored
    assert set(cache.fields()) == {"logits", "0", "2"} and cache.key == key
    idx = torch.tensor([22, 3])
    teacher.eval()
    with torch.no_grad():
        conv = teacher[0](x[idx])
        torch.testing.assert_close(cache.read("0", idx), conv, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(cache.read("2", idx), conv.relu(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(cache.read("logits", idx), teacher(x[idx]), rtol=1e-3,
                                   atol=1e-3)
    assert TeacherCache.is_valid(tmp_path / "c", key)
    # Other layers are another cache.
    assert not TeacherCache.is_valid(tmp_path / "c", CacheKey(key.teacher, "d", "float16",
                                                               layers=("0",)))
