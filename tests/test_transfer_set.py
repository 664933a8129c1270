"""The distillation stage's transfer set (`transfer_set:`, kdistill.data.transfer): K augmented
views per training sample, deterministic per (seed, sample, view), taught consistently by a
cached or an online teacher, made of training inputs only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kdistill.build import build_train_loader
from kdistill.cache import CacheKey, TeacherCache, build_cache
from kdistill.config import RunConfig, TrainSettings, TransferSetConfig
from kdistill.data.transfer import (
    TransferLoader,
    TransferViews,
    ViewRows,
    beta_symmetric,
    uniform,
)
from kdistill.errors import ConfigError
from kdistill.losses import hard_cross_entropy, mixed_cross_entropy
from kdistill.pipeline import teaching
from kdistill.pipeline.order import run
from kdistill.teachers import CachedTeacher, OnlineTeacher
from kdistill.types import DataSplits

from .conftest import TINY_RECIPE

N, K = 40, 3


def _images(n: int = N, low: float = 0.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 1, 8, 8, generator=g)


def _cfg(**kw: object) -> TransferSetConfig:
    base = {"views": K, "jitter": 2, "flip": True, "mix": "mixup", "mix_alpha": 0.4}
    if kw.get("mix") == "none":  # without a mix, mix_alpha is refused
        del base["mix_alpha"]
    return TransferSetConfig(**{**base, **kw})


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 10)).eval()


def _splits(x: torch.Tensor, y: torch.Tensor) -> DataSplits:
    val, test = torch.full((10, 1, 8, 8), 50.0), torch.full((10, 1, 8, 8), -50.0)
    return DataSplits(name="t", train_x=x, train_y=y, val_x=val, val_y=y[:10], test_x=test,
                      test_y=y[:10], num_classes=10, input_shape=(1, 8, 8), fingerprint="f")


@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix"])
def test_a_view_depends_only_on_seed_sample_and_view(mix: str) -> None:
    x, y = _images(), torch.arange(N) % 10
    views = TransferViews(x, y, _cfg(mix=mix))
    i = torch.tensor([5, 17, 3, 5, 30])
    k = torch.tensor([0, 2, 1, 2, 0])
    whole = views.batch(i, k)
    for row in range(len(i)):  # alone in its batch, or among others: the same view, bit for bit
        alone = views.batch(i[row:row + 1], k[row:row + 1])
        for key, value in alone.items():
            assert torch.equal(value[0], whole[key][row]), (mix, key, row)
    assert not torch.equal(whole["input"][0], whole["input"][3])  # views 0 and 2 of sample 5
    again = TransferViews(x, y, _cfg(mix=mix)).batch(i, k)
    assert all(torch.equal(again[key], whole[key]) for key in whole)
    other_seed = TransferViews(x, y, _cfg(mix=mix, seed=1)).batch(i, k)
    assert not torch.equal(other_seed["input"], whole["input"])


def test_each_epoch_shows_every_sample_once_and_cycles_through_its_views() -> None:
    x, y = _images(), torch.arange(N) % 10
    loader = TransferLoader(TransferViews(x, y, _cfg()), batch_size=7, seed=3)
    seen: dict[int, list[int]] = {}
    for epoch in range(K):
        batches = list(loader.epoch(epoch))
        index = torch.cat([b["index"] for b in batches])
        assert sorted(index.tolist()) == list(range(N))
        for b in batches:
            for i, k in zip(b["index"].tolist(), b["view"].tolist(), strict=True):
                seen.setdefault(i, []).append(k)
    assert all(sorted(ks) == list(range(K)) for ks in seen.values())  # K epochs: each view once
    first = [b["view"] for b in loader.epoch(0)]
    assert len(set(torch.cat(first).tolist())) > 1  # per-sample offsets: not all on view 0
    resumed = next(iter(loader.epoch(1, start=2)))
    assert torch.equal(resumed["input"], list(loader.epoch(1))[2]["input"])


def test_fresh_views_use_the_epoch_as_view_number() -> None:
    x, y = _images(), torch.arange(N) % 10
    loader = TransferLoader(TransferViews(x, y, _cfg(views=None, teaching="online")),
                            batch_size=8)
    assert all(bool((b["view"] == 5).all()) for b in loader.epoch(5))


def test_mixup_and_cutmix_views_carry_their_mix_of_labels() -> None:
    x = torch.cat([torch.ones(N // 2, 1, 8, 8), torch.zeros(N // 2, 1, 8, 8)])
    y = torch.cat([torch.ones(N // 2), torch.zeros(N // 2)]).long()
    i, k = torch.arange(N).repeat(K), torch.arange(K).repeat_interleave(N)
    for mix in ("mixup", "cutmix"):
        views = TransferViews(x, y, _cfg(mix=mix, jitter=0, flip=False, mix_alpha=1.0))
        b = views.batch(i, k)
        own, partner = x[i].mean((1, 2, 3)), b["label_b"].float()  # image value = its label
        expect = b["mix"] * own + (1 - b["mix"]) * partner
        assert torch.allclose(b["input"].mean((1, 2, 3)), expect, atol=1e-6), mix
        assert bool(((b["mix"] >= 0) & (b["mix"] <= 1)).all())
        # λ ~ Beta(1, 1) for mixup; CutMix's boxes clipped at the border keep more of the own
        assert 0.4 < float(b["mix"].mean()) < (0.6 if mix == "mixup" else 0.85), mix
        assert float(b["mix"].min()) < 0.5
    some = TransferViews(x, y, _cfg(mix="mixup", mix_prob=0.25, jitter=0, flip=False))
    b = some.batch(i, k)
    whole = b["mix"] == 1
    assert 0.6 < float(whole.float().mean()) < 0.9  # about 3 in 4 views left unmixed
    assert torch.equal(b["input"][whole], x[i][whole])


def test_symmetric_beta_draws_have_the_beta_moments() -> None:
    alpha, tries = 0.4, torch.arange(64)
    s = torch.arange(20_000)[:, None]
    lam = beta_symmetric(alpha, uniform(7, s, 2 * tries), uniform(7, s, 2 * tries + 1))
    var = 1 / (4 * (2 * alpha + 1))  # Beta(α, α): mean 1/2, variance 1/(4(2α + 1))
    assert abs(float(lam.mean()) - 0.5) < 0.01
    assert abs(float(lam.var()) - var) < 0.01
    u = uniform(3, torch.arange(100_000))
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


def test_mixed_cross_entropy_is_ce_against_the_mixed_one_hot_target() -> None:
    logits = torch.randn(6, 5, requires_grad=True)
    a, b = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 0, 4, 2, 3])
    lam = torch.tensor([1.0, 0.3, 0.5, 0.0, 0.9, 0.25])
    target = lam[:, None] * nn.functional.one_hot(a, 5) + (1 - lam[:, None]) * (
        nn.functional.one_hot(b, 5))
    ref = nn.functional.cross_entropy(logits, target)
    got = mixed_cross_entropy(logits, a, b, lam)
    assert torch.allclose(got, ref, atol=1e-6)
    ones = torch.ones(6)
    assert torch.allclose(mixed_cross_entropy(logits, a, b, ones), hard_cross_entropy(logits, a))
    # With label smoothing: the same mixture of the two smoothed cross-entropies.
    own = hard_cross_entropy(logits, a, label_smoothing=0.1, reduction="none")
    other = hard_cross_entropy(logits, b, label_smoothing=0.1, reduction="none")
    assert torch.allclose(mixed_cross_entropy(logits, a, b, lam, label_smoothing=0.1),
                          (lam * own + (1 - lam) * other).mean(), atol=1e-6)


def test_the_cached_views_equal_the_teacher_on_those_views(tmp_path: Path) -> None:
    """Build the cache over the N·K views, then read it through the students' loader: the
    rows are the teacher's outputs on the very views of each batch, and the online teacher on
    those batches gives the same values."""
    x, y = _images(), torch.arange(N) % 10
    teacher = _teacher()
    views = TransferViews(x, y, _cfg(mix="cutmix"))
    rows = ViewRows(views)
    assert len(rows) == N * K
    key = CacheKey(teacher="t", data="d")
    build_cache(tmp_path / "c", teacher, rows, key, batch_size=16, views=K)
    cache = TeacherCache(tmp_path / "c")
    assert (cache.views, cache.num_samples) == (K, N * K)
    cached, online = CachedTeacher(cache), OnlineTeacher(_teacher())
    loader = TransferLoader(views, batch_size=9, seed=1)
    for epoch in range(K + 1):
        for batch in loader.epoch(epoch):
            from_cache, _ = cached(batch, ())
            with torch.no_grad():
                direct = teacher(batch["input"])
            live, _ = online(batch, ())
            assert torch.allclose(from_cache, direct, atol=1e-5)
            assert torch.allclose(live, from_cache, atol=1e-5)
    with pytest.raises(ConfigError, match="views per sample"):
        cached({"index": torch.tensor([0]), "input": x[:1], "label": y[:1]}, ())


def test_a_transfer_set_never_holds_validation_or_test_inputs() -> None:
    """Training inputs lie in [0, 1], validation at 50, test at −50: no view (own input,
    partner, padding) of the loader or of the cache's rows leaves [0, 1]."""
    x, y = _images(), torch.arange(N) % 10
    splits = _splits(x, y)
    for mix in ("mixup", "cutmix"):
        ts = _cfg(mix=mix)
        cfg = RunConfig(data={"name": "digits"}, transfer_set=ts)
        rows, views, data = teaching.cache_inputs(cfg, splits)
        assert views == K and data.startswith("f/views-")
        everything = rows[torch.arange(len(rows))]
        loader = build_train_loader(splits, TrainSettings(batch_size=16), seed=0,
                                    where="train", transfer_set=ts)
        epochs = torch.cat([b["input"] for e in range(4) for b in loader.epoch(e)])
        for inputs in (everything, epochs):
            assert float(inputs.min()) >= 0.0 and float(inputs.max()) <= 1.0, mix


def test_recipe_checks() -> None:
    with pytest.raises(ValueError, match="teaching: online"):
        TransferSetConfig(views=None, jitter=1)
    with pytest.raises(ValueError, match="no augmentation"):
        TransferSetConfig(views=4)
    with pytest.raises(ValueError, match="mix_alpha: used only with mix"):
        TransferSetConfig(jitter=1, mix_alpha=0.4)  # would be ignored without a mix
    assert TransferSetConfig(jitter=1, mix="cutmix", mix_alpha=0.4).mix_alpha == 0.4
    ts = {"views": 2, "mix": "mixup"}
    with pytest.raises(ValueError, match="method 'dkd' reads plain labels"):
        RunConfig(data={"name": "digits"}, method={"name": "dkd"}, transfer_set=ts)
    with pytest.raises(ValueError, match=r"train\.augment"):
        RunConfig(data={"name": "digits"}, train={"augment": "jitter"}, transfer_set=ts)
    with pytest.raises(ValueError, match="transfer_set"):
        RunConfig(data={"name": "fortunes", "tokenizer": "smollm2"},
                  method={"name": "token_kd"}, transfer_set=ts)
    splits = _splits(torch.rand(N, 8), torch.arange(N) % 10)
    splits = DataSplits(**{**splits.__dict__, "input_shape": (8,)})
    with pytest.raises(ConfigError, match="need images"):
        build_train_loader(splits, TrainSettings(), seed=0, where="train",
                           transfer_set=TransferSetConfig(views=2, jitter=1))
    build_train_loader(splits, TrainSettings(), seed=0, where="train",  # mixup: any input
                       transfer_set=TransferSetConfig(views=2, mix="mixup"))
    tokens = DataSplits(**{**splits.__dict__, "train_x": torch.zeros(N, 8, dtype=torch.long)})
    with pytest.raises(ConfigError, match="token ids"):
        build_train_loader(tokens, TrainSettings(), seed=0, where="train",
                           transfer_set=TransferSetConfig(views=2, mix="mixup"))


def _recipe(tmp_path: Path, teaching_mode: str) -> RunConfig:
    tiny = yaml.safe_load(TINY_RECIPE)
    tiny["teacher"]["model"] = {"arch": "cnn", "args": {"channels": [4], "hidden": 16}}
    tiny.update(output_dir=str(tmp_path / "runs"), name=f"ts-{teaching_mode}",
                transfer_set={"views": 2, "jitter": 1, "mix": "cutmix",
                              "teaching": teaching_mode})
    return RunConfig.model_validate(tiny)


def test_a_run_teaches_both_students_on_the_views_cached_or_online(tmp_path: Path) -> None:
    results = {mode: run(_recipe(tmp_path, mode), echo=lambda _: None)
               for mode in ("cached", "online")}
    cached_dir = results["cached"].run_dir
    manifest = json.loads((cached_dir / "cache" / "teacher" / "manifest.json").read_text())
    assert manifest["views"] == 2 and manifest["num_samples"] == 2 * 1238
    assert results["cached"].teacher_forwards == 0
    assert results["online"].teacher_forwards > 0
    assert not (results["online"].run_dir / "cache" / "teacher").exists()
    # The same views, the same teacher outputs: the two distilled students agree.
    acc = {m: r.rows["student"][0]["accuracy"] for m, r in results.items()}
    assert abs(acc["cached"] - acc["online"]) < 0.02, acc
    assert results["cached"].rows["baseline"][0]["accuracy"] == pytest.approx(
        results["online"].rows["baseline"][0]["accuracy"])
