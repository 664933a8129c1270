"""Top-k caches whose last slots hold draws from the teacher's tail (`cache.tail_samples`,
independent or systematic draws): an unbiased estimate of the teacher, keyed apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.cache import CacheKey, TeacherCache, build_cache
from kdistill.errors import ConfigError
from tests.test_topk_cache import T, V, _dense_topk, _ids, _llama


@pytest.mark.parametrize("systematic", [False, True])
def test_tail_samples_store_an_unbiased_estimate_of_the_teacher(systematic: bool) -> None:
    from kdistill.losses.topk import NO_MASS, sparse_targets

    logprobs = torch.log_softmax(2 * torch.randn(3, 4, 50, generator=torch.Generator()
                                                 .manual_seed(0)), dim=-1)
    head = logprobs.topk(6, dim=-1)
    total, rounds = torch.zeros(3, 4, 50), 3000
    for seed in range(rounds):
        values, indices = sparse_targets(logprobs, 10, 4, seed=seed, systematic=systematic)
        assert (values.diff(dim=-1) <= 0).all()  # sorted, as the cache layout says
        assert (indices.sort(-1).values.diff(dim=-1) != 0).all()  # distinct tokens
        assert torch.isin(head.indices, indices).all()  # the head is kept exactly
        torch.testing.assert_close(values.exp().sum(-1), torch.ones(3, 4))  # no missing mass
        total.scatter_add_(-1, indices, values.exp())
    # Every token's mean stored mass is its probability (std of one mean here < 0.002).
    assert (total / rounds - logprobs.exp()).abs().max() < 0.01
    plain = sparse_targets(logprobs, 10)
    assert torch.equal(plain[0], logprobs.topk(10, dim=-1).values)
    # A tail that rounds to zero: finite, zero-mass slots outside the head.
    peaked = torch.log_softmax(torch.tensor([[0.0, -200, -200, -200, -200]]), dim=-1)
    values, indices = sparse_targets(peaked, 3, 2, systematic=systematic)
    assert values.tolist() == [[0.0, NO_MASS, NO_MASS]] and 0 not in indices[0, 1:].tolist()


def test_systematic_tail_draws_stay_near_their_expectation() -> None:
    """Systematic draws give each tail token ⌊m·q⌋ or ⌈m·q⌉ of the m draws (q its share of
    the tail), so their estimate of the teacher has a lower squared error than independent
    draws of the same number."""
    from kdistill.losses.topk import sparse_targets

    logprobs = torch.log_softmax(2 * torch.randn(64, 200, generator=torch.Generator()
                                                 .manual_seed(1)), dim=-1)
    p, m, k = logprobs.exp(), 16, 24
    head = logprobs.topk(k - m, dim=-1).indices
    tail = p.scatter(-1, head, 0.0)
    share = tail / tail.sum(-1, keepdim=True)
    errors = {}
    for systematic in (False, True):
        squared = 0.0
        for seed in range(50):
            values, indices = sparse_targets(logprobs, k, m, seed=seed, systematic=systematic)
            stored = torch.zeros_like(p).scatter(-1, indices, values.exp())
            if systematic:  # counts from the stored mass: r·c/m
                counts = (stored.scatter(-1, head, 0.0) / tail.sum(-1, keepdim=True) * m)
                low, high = (m * share).floor(), (m * share).ceil()
                assert ((counts.round() >= low) & (counts.round() <= high)).all()
            squared += float(((stored - p) ** 2).sum())
        errors[systematic] = squared
    assert errors[True] < 0.8 * errors[False], errors  # measured: 0.69


def test_a_tail_sampled_cache_is_keyed_apart_and_configured_within_k(tmp_path: Path) -> None:
    from kdistill.config import load_config

    teacher, ids = _llama(1), _ids(5)
    key = CacheKey("t", "d", topk=8, tail_samples=3)
    cache = build_cache(tmp_path / "c", teacher, ids, key, batch_size=2)
    assert cache.key == key and not TeacherCache.is_valid(tmp_path / "c", CacheKey("t", "d",
                                                                                 topk=8))
    assert not TeacherCache.is_valid(tmp_path / "c", CacheKey("t", "d", topk=8, tail_samples=3,
                                                              tail_sampling="systematic"))
    values = cache.read("topk_logprobs", torch.arange(5))
    torch.testing.assert_close(values.exp().sum(-1), torch.ones(5, T))
    exact, head = _dense_topk(teacher, ids, 5)
    stored = torch.full((5, T, V), float("nan")).scatter(
        -1, cache.read("topk_indices", torch.arange(5)), values)
    torch.testing.assert_close(stored.gather(-1, head), exact)  # the head is stored exactly
    for bad, match in ((["cache.tail_samples=2"], "needs cache.topk above it"),
                       (["cache.topk=4", "cache.tail_samples=4"], "needs cache.topk above it"),
                       (["cache.topk=4", "cache.tail_sampling=systematic"],
                        "set tail_samples")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["data.name=stdlib_docs", "data.tokenizer=smollm2",
                               "method.name=token_kd", "teacher.model.arch=hf_causal_lm",
                               "student.model.arch=llama", *bad])


def test_older_cache_keys_read_as_independent_draws() -> None:
    key = CacheKey("t", "d", topk=8, tail_samples=3)
    assert "tail_sampling" not in key.as_dict()  # manifests written before it stay valid
    assert CacheKey("t", "d", topk=8, tail_samples=3,
                    tail_sampling="systematic").as_dict()["tail_sampling"] == "systematic"


def test_a_cache_written_before_the_tail_fields_stays_valid(tmp_path: Path) -> None:
    import json

    teacher, ids = _llama(1), _ids(3)
    key = CacheKey("t", "d", topk=8)
    build_cache(tmp_path / "c", teacher, ids, key, batch_size=2)
    manifest = tmp_path / "c" / "manifest.json"
    tree = json.loads(manifest.read_text())
    del tree["key"]["tail_samples"]  # as written before tail samples existed
    manifest.write_text(json.dumps(tree))
    cache, why = TeacherCache.open_valid(tmp_path / "c", key)
    assert cache is not None and why == "" and cache.key == key
    cache, why = TeacherCache.open_valid(tmp_path / "c", CacheKey("t", "d", topk=8,
                                                                  tail_samples=3))
    assert cache is None and why.startswith("stale")
