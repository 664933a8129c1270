"""Batching (deterministic, resumable, indexed), jitter, and the teacher-output store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.cache import FORMAT_VERSION, CacheKey, TeacherCache, build_cache
from kdistill.cache_key import fingerprint_model
from kdistill.data.loader import BatchLoader, jitter
from kdistill.errors import ConfigError, TrainingError


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


def _small_cache(tmp_path: Path) -> tuple[Path, CacheKey]:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4)
    key = CacheKey(teacher=fingerprint_model(teacher), data="d1", layers=())
    build_cache(tmp_path / "c", teacher, torch.randn(300, 6), key, batch_size=64)
    return tmp_path / "c", key


@pytest.mark.parametrize("damage", ["flip", "zero", "truncate"])
def test_a_damaged_cache_file_is_detected_by_its_checksum(tmp_path: Path, damage: str) -> None:
    directory, key = _small_cache(tmp_path)
    assert TeacherCache.open_valid(directory, key)[1] == ""
    logits = directory / "logits.npy"
    data = bytearray(logits.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of one logit
    elif damage == "zero":  # a crash without fsync: the right size, every value zero
        header = len(data) - 300 * 4 * 4
        data[header:] = bytes(len(data) - header)
    else:
        data = data[:-16]
    logits.write_bytes(bytes(data))
    cache, why = TeacherCache.open_valid(directory, key)
    assert cache is None and why.startswith("damaged:") and "logits.npy" in why
    assert not TeacherCache.is_valid(directory, key)
    with pytest.raises(ConfigError, match=r"logits.npy: damaged teacher cache file .*rebuild"):
        TeacherCache(directory)


def test_an_old_format_cache_is_stale_not_misread(tmp_path: Path) -> None:
    directory, key = _small_cache(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["version"] = 3  # written before checksums: rebuilt rather than read unchecked
    for spec in manifest["fields"].values():
        del spec["sha256"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    cache, why = TeacherCache.open_valid(directory, key)
    assert cache is None
    assert f"stale: written by another kdistill (format 3, now {FORMAT_VERSION})" in why
    assert TeacherCache.open_valid(tmp_path / "none", key) == (None, "no cache")


@pytest.mark.parametrize(("manifest", "text"), [
    ("[]", "should be an object, got an array"),
    ("null", "should be an object, got null"),
    ("\xff", "is not UTF-8 text"),
    ('{"fields": {"logits": {"file": "../../x.npy", "dtype": "float32", "shape": [300, 4], '
     '"sha256": "0"}}, "key": {}, "num_samples": 300}', "is not a file name in the cache"),
    ('{"fields": {"logits": {"file": "logits.npy", "dtype": "object", "shape": [300, 4], '
     '"sha256": "0"}}, "key": {}, "num_samples": 300}', "unknown dtype 'object'"),
    ('{"fields": {"logits": {"file": "logits.npy", "dtype": "float32", "shape": "big", '
     '"sha256": "0"}}, "key": {}, "num_samples": 300}', "should have a file, dtype, shape"),
    ('{"fields": {"logits": {"file": "logits.npy", "dtype": "float32", "shape": [300, 4], '
     '"sha256": "0"}}, "key": {}, "num_samples": true}', "'num_samples' should be a count"),
    ('{"fields": {}, "key": {}, "num_samples": 3}', "'fields' should be a non-empty object"),
], ids=["array", "null", "undecodable", "outside", "object-dtype", "shape", "count", "empty"])
def test_a_manifest_of_the_wrong_types_is_one_error(tmp_path: Path, manifest: str,
                                                    text: str) -> None:
    directory, key = _small_cache(tmp_path)
    (directory / "manifest.json").write_text(manifest, encoding="latin-1")
    with pytest.raises(ConfigError) as info:
        TeacherCache(directory)
    assert "manifest.json" in info.value.where and text in info.value.message
    assert "delete it and run again" in info.value.message
    assert TeacherCache.open_valid(directory, key)[0] is None


class _Broken(nn.Module):
    """A teacher whose output for sample `bad` is NaN (or +inf, or a value beyond float16)."""

    def __init__(self, bad: int, value: float) -> None:
        super().__init__()
        self.bad, self.value, self.seen = bad, value, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :3].clone()
        if len(x) > 1:  # not the one-sample probe
            rows = torch.arange(self.seen, self.seen + len(x))
            out[rows == self.bad, 1] = self.value
            self.seen += len(x)
        return out


@pytest.mark.parametrize(("value", "dtype", "text"), [
    (float("nan"), "float32", "is NaN or infinite for training sample 37"),
    (float("inf"), "bfloat16", "is NaN or infinite for training sample 37"),
    (1e6, "float16", "for training sample 37 is beyond the range of float16"),
])
def test_non_finite_teacher_outputs_are_refused_naming_the_sample(
    tmp_path: Path, value: float, dtype: str, text: str
) -> None:
    key = CacheKey("t", "d", dtype=dtype)
    with pytest.raises(TrainingError) as info:
        build_cache(tmp_path / "c", _Broken(37, value), torch.randn(50, 5), key, batch_size=16,
                    what="teacher-2")
    assert str(info.value).startswith("teacher-2: its output 'logits'") and text in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing cached, no temporary directory left
    # -inf is a masked logit (probability 0): stored as it is.
    cache = build_cache(tmp_path / "m", _Broken(3, float("-inf")), torch.randn(8, 5), key)
    assert cache.read("logits", torch.tensor([3]))[0, 1] == float("-inf")


def test_a_linked_cache_directory_is_refused(tmp_path: Path) -> None:
    directory, key = _small_cache(tmp_path)
    (tmp_path / "link").symlink_to(directory)
    with pytest.raises(ConfigError, match="the teacher cache directory is a symbolic link"):
        TeacherCache(tmp_path / "link")
    with pytest.raises(ConfigError, match="symbolic link"):
        build_cache(tmp_path / "link", nn.Linear(6, 4), torch.randn(5, 6), key)
    assert TeacherCache.open_valid(directory, key)[1] == ""  # the real one was left alone
