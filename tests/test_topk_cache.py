"""Top-k teacher cache: storage, key, reading, the top-k KD loss against dense references, and
token_kd trained end to end on a top-k cache."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from kdistill.build import build_optimizer
from kdistill.cache import CacheKey, TeacherCache, build_cache, index_dtype
from kdistill.cache_key import fingerprint_model
from kdistill.cache_size import bytes_per_token, cache_bytes
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.io import file_digest
from kdistill.logger import MetricsLogger
from kdistill.losses import densify_topk, kd_kl, shift_labels, token_kd, topk_kd
from kdistill.methods import Outputs, build_method
from kdistill.methods.token_kd import TokenKDConfig
from kdistill.models import build_model
from kdistill.schedules import Progress
from kdistill.teachers import CachedTeacher, TopK

T, V = 6, 37


def _llama(seed: int, vocab: int = V) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("llama", input_shape=(T,), num_classes=vocab,
                       args={"hidden": 8, "layers": 1, "heads": 2}).eval()


def _ids(n: int, vocab: int = V) -> Tensor:
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(5))


def _dense_topk(teacher: nn.Module, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        top = torch.log_softmax(teacher(ids).float(), dim=-1).topk(k, dim=-1)
    return top.values, top.indices


# --- the cache -------------------------------------------------------------------------


def test_topk_cache_stores_the_teachers_top_k_log_probabilities(tmp_path: Path) -> None:
    teacher, ids = _llama(1), _ids(11)
    key = CacheKey(fingerprint_model(teacher), "d", topk=5)
    cache = build_cache(tmp_path / "c", teacher, ids, key, batch_size=4)
    idx = torch.tensor([10, 0, 4, 4])
    values, indices = _dense_topk(teacher, ids[idx], 5)
    got_v, got_i = cache.read("topk_logprobs", idx), cache.read("topk_indices", idx)
    assert got_v.dtype == torch.float32 and got_i.dtype == torch.int64
    torch.testing.assert_close(got_v, values)
    assert torch.equal(got_i, indices)
    assert (got_v.diff(dim=-1) <= 0).all() and (got_v.exp().sum(-1) < 1).all()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format"] == "topk" and manifest["topk"] == 5 and manifest["vocab"] == V
    indices = manifest["fields"]["topk_indices"]
    assert indices == {"file": "topk_indices.npy", "dtype": "uint8", "shape": [11, T, 5],
                       "sha256": file_digest(tmp_path / "c" / "topk_indices.npy")}
    assert manifest["fields"]["topk_logprobs"]["dtype"] == "float32"
    assert not (tmp_path / "c" / "logits.npy").exists() and cache.topk == 5
    assert bytes_per_token(manifest) == 5 * 4 + 5 * 1
    on_disk = sum(np.load(f, mmap_mode="r").nbytes for f in (tmp_path / "c").glob("*.npy"))
    assert cache_bytes(11, (T, V), {}, "float32", topk=5) == on_disk == 11 * T * 25


def test_a_padded_teacher_table_is_cut_to_the_tokenizer_vocabulary(tmp_path: Path) -> None:
    # The teacher's table has 37 rows, the data's tokenizer 30 tokens: the cache must never
    # name tokens 30..36 (a student with 30 outputs cannot score them), and its log-probs
    # are over the 30 real tokens.
    # The causal-LM wrapper built for 30-token data cuts the padded rows' logits.
    from kdistill.models.hf import CausalLM

    padded, ids = _llama(1), _ids(9, vocab=30)
    teacher = CausalLM(padded.model, vocab=30).eval()
    key = CacheKey(fingerprint_model(teacher), "d", topk=30)
    cache = build_cache(tmp_path / "c", teacher, ids, key)
    idx = torch.arange(9)
    assert int(cache.read("topk_indices", idx).max()) < 30
    with torch.no_grad():
        expected = torch.log_softmax(padded(ids)[..., :30], dim=-1).topk(30, dim=-1).values
    torch.testing.assert_close(cache.read("topk_logprobs", idx), expected)


def test_indices_use_the_smallest_integer_type_that_fits(tmp_path: Path) -> None:
    assert [index_dtype(v) for v in (2, 256, 257, 65536, 65537)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.int32]
    teacher, ids = _llama(1, vocab=300), _ids(9, vocab=300)
    calls: list[int] = []
    teacher.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    # (T, V) fp32 logits plus their log-softmax: 6 * 300 * 8 B = 14,400 B a sample.
    cache = build_cache(tmp_path / "c", teacher, ids, CacheKey("t", "d", topk=20), batch_size=4,
                        max_batch_mb=30_000 / 2**20)
    assert calls == [1, 2, 2, 2, 2, 1]  # the probe, then batches capped by memory, not 4
    assert np.load(tmp_path / "c" / "topk_indices.npy", mmap_mode="r").dtype == np.uint16
    got = cache.read("topk_indices", torch.arange(9))
    assert (got >= 256).any()  # ids past uint8 survive the round trip
    assert torch.equal(got, _dense_topk(teacher, ids, 20)[1])


@pytest.mark.parametrize(("dtype", "disk", "tol"), [("float16", np.float16, 2**-10),
                                                     ("bfloat16", np.uint16, 2**-7)])
def test_half_and_bfloat16_values_round_trip(tmp_path: Path, dtype: str, disk: type,
                                             tol: float) -> None:
    teacher, ids = _llama(1), _ids(7)
    cache = build_cache(tmp_path / "k", teacher, ids, CacheKey("t", "d", dtype, topk=8))
    assert np.load(tmp_path / "k" / "topk_logprobs.npy", mmap_mode="r").dtype == disk
    assert cache.manifest["fields"]["topk_logprobs"]["dtype"] == dtype
    values, _ = _dense_topk(teacher, ids, 8)
    got = cache.read("topk_logprobs", torch.arange(7))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, values, rtol=tol, atol=1e-6)
    assert bytes_per_token(cache.manifest) == 8 * 2 + 8 * 1
    # A dense cache stores its logits in the same dtype.
    dense = build_cache(tmp_path / "d", teacher, ids, CacheKey("t", "d", dtype))
    with torch.no_grad():
        torch.testing.assert_close(dense.read("logits", torch.arange(7)), teacher(ids),
                                   rtol=tol, atol=1e-6)
    assert bytes_per_token(dense.manifest) == V * 2


def test_key_keeps_dense_and_topk_caches_and_each_k_apart(tmp_path: Path) -> None:
    teacher, ids = _llama(1), _ids(5)
    dense_key, topk_key = CacheKey("t", "d"), CacheKey("t", "d", topk=8)
    build_cache(tmp_path / "dense", teacher, ids, dense_key)
    cache = build_cache(tmp_path / "topk", teacher, ids, topk_key)
    assert cache.key == topk_key and TeacherCache.is_valid(tmp_path / "topk", topk_key)
    assert not TeacherCache.is_valid(tmp_path / "topk", dense_key)
    assert not TeacherCache.is_valid(tmp_path / "dense", topk_key)
    assert not TeacherCache.is_valid(tmp_path / "topk", CacheKey("t", "d", topk=32))
    assert not TeacherCache.is_valid(tmp_path / "topk", CacheKey("t", "d", "float16", topk=8))
    # A manifest written before the top-k format (no "topk" in its key) reads as dense.
    path = tmp_path / "dense" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["key"]["topk"]
    path.write_text(json.dumps(manifest))
    assert TeacherCache(tmp_path / "dense").key == dense_key
    with pytest.raises(ConfigError, match=r"cache\.topk"):
        build_cache(tmp_path / "big", teacher, ids, CacheKey("t", "d", topk=V + 1))
    with pytest.raises(ConfigError, match=r"cache\.dtype"):
        build_cache(tmp_path / "i8", teacher, ids, CacheKey("t", "d", "int8", topk=8))


def test_cached_teacher_returns_topk_beside_teacher_layers(tmp_path: Path) -> None:
    teacher, ids = _llama(1), _ids(6)
    key = CacheKey("t", "d", "bfloat16", layers=("model.model.norm",), topk=4)
    cached = CachedTeacher(build_cache(tmp_path / "c", teacher, ids, key, batch_size=4))
    batch = {"index": torch.tensor([5, 1]), "input": ids[[5, 1]], "label": ids[[5, 1]]}
    out, feats = cached(batch, ("model.model.norm",))
    assert isinstance(out, TopK) and cached.forwards == 0
    assert out.logprobs.shape == out.indices.shape == (2, T, 4)
    assert out.logprobs.dtype == torch.float32 and out.indices.dtype == torch.int64
    assert feats["model.model.norm"].shape == (2, T, 8)
    assert cache_bytes(6, (T, V), {"model.model.norm": (T, 8)}, "bfloat16", topk=4) == sum(
        np.load(f, mmap_mode="r").nbytes for f in (tmp_path / "c").glob("*.npy"))
    assert cache_bytes(6, 10, {}, "float16") == 6 * 10 * 2  # (N, C) classifiers, as before


# --- the loss against dense references ---------------------------------------------------


def _problem(k: int, vocab: int = 13) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, vocab, generator=gen, dtype=torch.float64)
    teacher = 2 * torch.randn(3, 5, vocab, generator=gen, dtype=torch.float64)
    lp, idx = teacher.log_softmax(-1).topk(k, dim=-1)
    return student, teacher, lp, idx


def _value_and_grad(fn, student: Tensor) -> tuple[Tensor, Tensor]:
    s = student.clone().requires_grad_()
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def _dense_teacher(lp: Tensor, idx: Tensor, vocab: int, missing: str) -> Tensor:
    """The dense log-prob vector each mode stands for: −inf, or log(r / (V − k)), off top-k."""
    r = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)
    fill = torch.log(r / (vocab - lp.shape[-1])) if missing == "uniform" else -math.inf
    return torch.full((*lp.shape[:-1], vocab), 0.0, dtype=lp.dtype).add(fill).scatter(
        -1, idx, lp)


@pytest.mark.parametrize("missing", ["renormalize", "uniform"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
def test_topk_loss_equals_kd_kl_on_the_dense_teacher_it_stands_for(
    missing: str, temperature: float
) -> None:
    for k in (4, 13):  # k = V: no missing mass, both modes are kd_kl on the teacher itself
        student, teacher, lp, idx = _problem(k)
        dense = teacher if k == 13 else _dense_teacher(lp, idx, 13, missing)
        got = _value_and_grad(partial(topk_kd, teacher_logprobs=lp, teacher_indices=idx,
                                      missing=missing, temperature=temperature), student)
        want = _value_and_grad(partial(kd_kl, teacher_logits=dense, temperature=temperature),
                               student)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got[0] > 0


@pytest.mark.parametrize(("kind", "missing"), [("reverse_kl", "uniform"), ("jsd", "uniform"),
                                               ("jsd", "renormalize"), ("tv", "uniform"),
                                               ("tv", "renormalize")])
def test_densified_kinds_equal_token_kd_on_the_dense_teacher(kind: str, missing: str) -> None:
    for k in (4, 13):  # k = V: the teacher itself, nothing missing
        student, teacher, lp, idx = _problem(k)
        dense = teacher if k == 13 else _dense_teacher(lp, idx, 13, missing)
        got = _value_and_grad(partial(topk_kd, teacher_logprobs=lp, teacher_indices=idx,
                                      kind=kind, beta=0.3, missing=missing,
                                      temperature=1.7), student)
        want = _value_and_grad(partial(token_kd, teacher_logits=dense, kind=kind, beta=0.3,
                                       temperature=1.7), student)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got[0] > 0


def test_densify_topk_and_the_tail_floor_keep_reverse_kl_finite() -> None:
    student, _, lp, idx = _problem(4)
    for missing in ("renormalize", "uniform"):
        p = densify_topk(lp, idx, 13, missing).softmax(-1)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 5, dtype=p.dtype))
        assert torch.equal(p.gt(0).sum(-1), torch.full((3, 5), 4 if missing == "renormalize"
                                                       else 13))
    # fp16-rounded values whose mass reaches 1: no tail left; reverse KL stays finite (floor).
    over = lp - lp.logsumexp(-1, keepdim=True) + 1e-3
    assert torch.isinf(densify_topk(over, idx, 13, "uniform")).any()
    rkl = topk_kd(student, over, idx, kind="reverse_kl", missing="uniform")
    assert torch.isfinite(rkl) and rkl > 0


def test_modes_differ_only_by_the_tail_and_are_zero_at_their_own_teacher() -> None:
    student, _, lp, idx = _problem(4)
    ren, uni = (topk_kd(student, lp, idx, missing=m) for m in ("renormalize", "uniform"))
    assert ren > 0 and uni > 0 and not torch.isclose(ren, uni)
    for missing in ("renormalize", "uniform"):  # a student equal to the dense teacher
        dense = _dense_teacher(lp, idx, 13, missing).clamp(min=-1e4)  # finite logits
        assert float(topk_kd(dense, lp, idx, missing=missing)) == pytest.approx(0.0, abs=1e-9)
    # Rounded values whose mass reaches 1 leave nothing to spread: uniform = renormalize.
    over = lp - lp.logsumexp(-1, keepdim=True) + 1e-3
    torch.testing.assert_close(topk_kd(student, over, idx, missing="uniform"),
                               topk_kd(student, over, idx, missing="renormalize"))


@pytest.mark.parametrize("missing", ["renormalize", "uniform"])
def test_masked_and_ignored_tokens_contribute_nothing(missing: str) -> None:
    student, _, lp, idx = _problem(4)
    labels = torch.zeros(3, 5, dtype=torch.long)
    labels[0, 3:] = -100
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 0] = False
    valid = (labels != -100) & mask
    poisoned = student.clone()
    poisoned[~valid] = torch.tensor(float("nan"), dtype=student.dtype)
    poisoned[0, 4, 0] = math.inf
    got = _value_and_grad(lambda s: topk_kd(s, lp, idx, missing=missing, labels=labels,
                                            mask=mask), poisoned)
    assert torch.isfinite(got[0]) and (got[1][~valid] == 0).all()
    want = topk_kd(student[valid], lp[valid], idx[valid], missing=missing)
    torch.testing.assert_close(got[0], want)
    per_token = topk_kd(poisoned, lp, idx, missing=missing, labels=labels, mask=mask,
                        reduction="none")
    assert per_token.shape == (3, 5) and (per_token[~valid] == 0).all()
    total = topk_kd(student, lp, idx, missing=missing, mask=valid, reduction="sum")
    torch.testing.assert_close(topk_kd(student, lp, idx, missing=missing, mask=valid,
                                       normalizer=4.0), total / 4)


def test_bfloat16_inputs_are_computed_in_float32_and_bad_calls_raise() -> None:
    student, _, lp, idx = _problem(4)
    s16, lp16 = student.to(torch.bfloat16), lp.to(torch.bfloat16)
    got = topk_kd(s16, lp16, idx.to(torch.uint8), missing="uniform")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, topk_kd(s16.float(), lp16.float(), idx, missing="uniform"))
    with pytest.raises(ValueError, match="supports kind"):
        topk_kd(student, lp, idx, kind="hellinger")
    with pytest.raises(ValueError, match="reverse KL against a renormalised top-k"):
        topk_kd(student, lp, idx, kind="reverse_kl")
    with pytest.raises(ValueError, match="missing must be"):
        topk_kd(student, lp, idx, missing="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leading shape"):
        topk_kd(student[:, :4], lp, idx)
    with pytest.raises(ValueError, match="integer"):
        topk_kd(student, lp, idx.double())


# --- the method and the engine -------------------------------------------------------------


def test_token_kd_scores_next_tokens_against_the_topk_teacher() -> None:
    student, _, lp, idx = _problem(4, vocab=11)
    ids = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    ids[1, 3:] = -100
    batch = {"index": torch.arange(3), "input": ids, "label": ids}
    out = Outputs(student.float(), None, teacher_topk=(lp.float(), idx))
    progress = Progress(0, 0, 1, 1)
    for chunk in (None, 2):  # chunk_size is for dense teachers: the top-k path ignores it
        method = build_method(TokenKDConfig(alpha=0.25, temperature=2.0, chunk_size=chunk,
                                            topk_missing="uniform"))
        terms = method.loss_terms(out, batch, progress)
        kd = topk_kd(student.float(), lp.float(), idx, missing="uniform", temperature=2.0,
                     labels=shift_labels(ids))
        torch.testing.assert_close(terms["kd"], 0.25 * kd)
        dense = method.loss_terms(Outputs(student.float(), student.float()), batch, progress)
        torch.testing.assert_close(terms["ce"], dense["ce"])  # the CE part is unchanged
    with pytest.raises(ConfigError, match=r"method\.topk_missing.*uniform"):
        build_method(TokenKDConfig(kind="reverse_kl")).loss_terms(out, batch, progress)
    jsd = build_method(TokenKDConfig(kind="jsd", beta=0.3)).loss_terms(out, batch, progress)
    want = topk_kd(student.float(), lp.float(), idx, kind="jsd", beta=0.3,
                   labels=shift_labels(ids))
    torch.testing.assert_close(jsd["kd"], 0.5 * want)


def _train_on(cache: TeacherCache, ids: Tensor, missing: str = "renormalize",
              ) -> tuple[nn.Module, CachedTeacher, list[float]]:
    student, teacher = _llama(0), CachedTeacher(cache)
    cfg = TrainConfig(epochs=2, batch_size=4, log_every=1,
                      optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0}, lr_schedule=1.0)
    logger = MetricsLogger()
    method = build_method(TokenKDConfig(alpha=0.7, topk_missing=missing))
    opt = build_optimizer(student.parameters(), cfg.optimizer)
    train(student, teacher, method, BatchLoader(ids, ids, batch_size=4, seed=0), opt, cfg,
          logger=logger)
    return student, teacher, [r["loss/kd"] for r in logger.records if "loss/kd" in r]


def test_token_kd_trains_on_a_topk_cache_and_k_equal_v_matches_the_dense_cache(
    tmp_path: Path,
) -> None:
    teacher, ids = _llama(1), _ids(8)
    topk = build_cache(tmp_path / "k8", teacher, ids, CacheKey("t", "d", topk=8))
    before = [p.detach().clone() for p in _llama(0).parameters()]
    student, cached, kd = _train_on(topk, ids, "uniform")
    assert cached.forwards == 0 and len(kd) == 4 and all(math.isfinite(v) for v in kd)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    full = build_cache(tmp_path / "k37", teacher, ids, CacheKey("t", "d", topk=V))
    dense = build_cache(tmp_path / "dense", teacher, ids, CacheKey("t", "d"))
    a, _, kd_a = _train_on(full, ids)
    b, _, kd_b = _train_on(dense, ids)
    assert kd_a == pytest.approx(kd_b, rel=1e-4, abs=1e-7)  # fp32 sums in another order
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
