"""Property, golden-value and naive-reference tests for kdistill.losses.features."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdistill.losses.features import (
    attention_map,
    attention_transfer,
    hint_mse,
    pkt,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)

SQRT2 = math.sqrt(2.0)


def _rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# (loss, student shape, teacher shape): shapes every loss accepts, odd sizes, widths may differ.
CASES = [
    pytest.param(hint_mse, (2, 3, 5), (2, 3, 5), id="hint_mse"),
    pytest.param(attention_transfer, (3, 4, 5, 7), (3, 6, 5, 7), id="attention_transfer"),
    pytest.param(rkd_distance, (5, 7), (5, 11), id="rkd_distance"),
    pytest.param(rkd_angle, (5, 7), (5, 3, 2), id="rkd_angle"),
    pytest.param(similarity_preserving, (5, 3, 3), (5, 13), id="similarity_preserving"),
    pytest.param(pkt, (5, 7), (5, 11), id="pkt"),
]
ALL_LOSSES = [c.values[0] for c in CASES]
RELATIONAL = [rkd_distance, rkd_angle, similarity_preserving, pkt]


# ---------------------------------------------------------------------------- golden values


def test_hint_mse_golden() -> None:
    # sample 0: ((1-1)^2 + (2-0)^2) / 2 = 4 / 2 = 2; sample 1: ((3-0)^2 + (4-4)^2) / 2 = 4.5
    # mean = (2 + 4.5) / 2 = 3.25; sum = 6.5
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert_close(hint_mse(s, t, reduction="none"), torch.tensor([2.0, 4.5]))
    assert_close(hint_mse(s, t), torch.tensor(3.25))
    assert_close(hint_mse(s, t, reduction="sum"), torch.tensor(6.5))
    assert_close(hint_mse(s, t), F.mse_loss(s, t))


def test_attention_map_and_transfer_golden() -> None:
    # student (1, 2, 1, 2): channel 0 = [√2, 2], channel 1 = [2, -2]
    # p = 2: channel mean of squares = [(2 + 4) / 2, (4 + 4) / 2] = [3, 4]; ‖·‖ = 5 -> [0.6, 0.8]
    s = torch.tensor([[[[SQRT2, 2.0]], [[2.0, -2.0]]]])
    assert_close(attention_map(s), torch.tensor([[0.6, 0.8]]))
    # p = 1: channel mean of |a| = [(√2 + 2) / 2, 2] = [1.707107, 2];
    #   norm = √(2.914214 + 4) = 2.629489 -> [1.707107, 2] / 2.629489 = [0.649216, 0.760604]
    assert_close(attention_map(s, p=1), torch.tensor([[0.649216, 0.760604]]), atol=1e-6, rtol=0)
    # teacher (1, 1, 1, 2) = [3, 0] -> map [1, 0]; ‖[0.6 - 1, 0.8 - 0]‖² = 0.16 + 0.64 = 0.8
    t = torch.tensor([[[[3.0, 0.0]]]])
    assert_close(attention_transfer(s, t), torch.tensor(0.8))


def test_rkd_distance_golden() -> None:
    # 1-D embeddings. student 0, 1, 3: distances d01 = 1, d02 = 3, d12 = 2, mean over the
    # 6 ordered pairs = 12 / 6 = 2 -> normalised 0.5, 1.5, 1.0.
    # teacher 0, 2, 4: distances 2, 4, 2, mean 8/3 -> normalised 0.75, 1.5, 0.75.
    # differences -0.25, 0, 0.25 -> Huber 0.5 x² = 0.03125, 0, 0.03125 (each pair twice)
    # sum = 2 * 0.0625 = 0.125; mean = 0.125 / 6 = 0.0208333
    s = torch.tensor([[0.0], [1.0], [3.0]])
    t = torch.tensor([[0.0], [2.0], [4.0]])
    assert_close(rkd_distance(s, t, reduction="sum"), torch.tensor(0.125))
    assert_close(rkd_distance(s, t), torch.tensor(0.125 / 6))
    # linear part of the Huber: student 0, 1, 10: d = 1, 10, 9, mean 20/3 -> 0.15, 1.5, 1.35;
    # teacher 0, 9, 10: d = 9, 10, 1 -> 1.35, 1.5, 0.15; differences ∓1.2, 0 -> |x| - 0.5 = 0.7
    # sum = 2 * (0.7 + 0 + 0.7) = 2.8; mean = 2.8 / 6 = 0.466667
    s = torch.tensor([[0.0], [1.0], [10.0]])
    t = torch.tensor([[0.0], [9.0], [10.0]])
    assert_close(rkd_distance(s, t), torch.tensor(2.8 / 6))
    per_pair = rkd_distance(s, t, reduction="none")
    assert_close(per_pair, torch.tensor([[0.0, 0.7, 0.0], [0.7, 0.0, 0.7], [0.0, 0.7, 0.0]]))


def test_rkd_angle_golden() -> None:
    # student: right triangle (0,0), (1,0), (0,1): cos at vertex 0 = 0, at vertices 1, 2 = √2/2
    # teacher: collinear (0,0), (1,0), (2,0): cos at vertex 0 = 1, vertex 1 = -1, vertex 2 = 1
    # Huber: vertex 0: |0 - 1| = 1 -> 0.5; vertex 1: √2/2 + 1 = 1.707107 -> 1.207107;
    #        vertex 2: 1 - √2/2 = 0.292893 -> 0.5 * 0.292893² = 0.042893
    # per ordering 0.5 + 1.207107 + 0.042893 = 1.75; 6 ordered triplets (2 per vertex):
    # sum = 3.5, mean = 3.5 / 6 = 0.583333
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    assert_close(rkd_angle(s, t, reduction="sum"), torch.tensor(3.5))
    assert_close(rkd_angle(s, t), torch.tensor(3.5 / 6))
    per_triplet = rkd_angle(s, t, reduction="none")
    assert per_triplet.shape == (3, 3, 3)
    assert_close(per_triplet[1, 0, 2], torch.tensor(0.5))  # angle at vertex 0
    assert_close(per_triplet[0, 1, 2], torch.tensor(1.5 + SQRT2 / 2 - 1))  # vertex 1
    assert per_triplet[0, 0, 1] == 0 and per_triplet[2, 1, 2] == 0  # repeated indices


def test_similarity_preserving_golden() -> None:
    # student I₂: G = I -> rows [1, 0], [0, 1]; teacher rows (1, 0), (1, 0): G = all ones
    # -> rows [1/√2, 1/√2]. Row 0 difference [1 - 0.707107, -0.707107]: squares
    # 0.085786 + 0.5 = 0.585786 (row 1 the same). Per sample = 0.585786 / 2 = 0.292893;
    # ‖ΔG‖_F² / B² = 1.171573 / 4 = 0.292893 = 1 - √2/2
    s = torch.eye(2)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    value = 1 - SQRT2 / 2
    assert_close(similarity_preserving(s, t, reduction="none"), torch.tensor([value, value]))
    assert_close(similarity_preserving(s, t), torch.tensor(value))


def test_pkt_golden() -> None:
    # student e1, e1, e2: cos01 = 1, cos02 = cos12 = 0 -> K01 = 1, K02 = K12 = 0.5
    #   p_s(.|0) = [1, .5] / 1.5 = [2/3, 1/3] over (1, 2); p_s(.|1) = [2/3, 1/3] over (0, 2);
    #   p_s(.|2) = [.5, .5] over (0, 1)
    # teacher e1, e2, -e1: cos01 = 0, cos02 = -1, cos12 = 0 -> K01 = .5, K02 = 0, K12 = .5
    #   p_t(.|0) = [1, 0]; p_t(.|1) = [.5, .5]; p_t(.|2) = [0, 1]
    # KL rows: ln(1 / (2/3)) = ln 1.5 = 0.405465; .5 ln(.5 / (2/3)) + .5 ln(.5 / (1/3))
    #   = .5 ln 1.125 = 0.058892; ln(1 / .5) = ln 2 = 0.693147
    # mean = (0.405465 + 0.058892 + 0.693147) / 3 = 0.385835 (eps = 1e-7 shifts it by ~2e-6)
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    rows = torch.tensor([math.log(1.5), 0.5 * math.log(1.125), math.log(2.0)])
    assert_close(pkt(s, t, reduction="none"), rows, atol=1e-5, rtol=0)
    assert_close(pkt(s, t), rows.mean(), atol=1e-5, rtol=0)
    assert_close(pkt(s, t, eps=1e-12), rows.mean(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize(("loss", "s_shape", "t_shape"), CASES)
def test_zero_when_student_equals_teacher(loss, s_shape, t_shape) -> None:
    x = _rand(*s_shape, seed=1)
    for reduction in ("mean", "sum"):
        assert_close(loss(x, x.clone(), reduction=reduction), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("loss", "s_shape", "t_shape"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_negative_and_shapes(loss, s_shape, t_shape, seed) -> None:
    s, t = _rand(*s_shape, seed=seed, scale=3.0), _rand(*t_shape, seed=seed + 10)
    value = loss(s, t)
    assert value.shape == () and value.dtype == torch.float32
    assert torch.isfinite(value) and value > 0
    per_item = loss(s, t, reduction="none")
    assert bool((per_item >= 0).all())
    assert_close(loss(s, t, reduction="sum"), per_item.sum())
    b = s_shape[0]
    expected = {rkd_distance: (b, b), rkd_angle: (b, b, b)}.get(loss, (b,))
    assert per_item.shape == expected


@pytest.mark.parametrize(("loss", "s_shape", "t_shape"), CASES)
def test_gradient_reaches_student_only_when_teacher_detached(loss, s_shape, t_shape) -> None:
    s = _rand(*s_shape, seed=3).requires_grad_()
    t = _rand(*t_shape, seed=4).requires_grad_()
    loss(s, t.detach()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    # nothing is detached inside: an undetached teacher receives a gradient too
    loss(s, t).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize(("loss", "s_shape", "t_shape"), CASES)
@pytest.mark.parametrize("b", [2, 3])
def test_small_batches(loss, s_shape, t_shape, b) -> None:
    s = _rand(b, *s_shape[1:], seed=5).requires_grad_()
    t = _rand(b, *t_shape[1:], seed=6)
    value = loss(s, t)
    value.backward()
    assert torch.isfinite(value) and value >= 0 and torch.isfinite(s.grad).all()


def test_degenerate_batches_give_zero() -> None:
    # RKD angle needs 3 distinct samples; PKT with 2 samples has one neighbour per row (p = 1)
    s, t = _rand(2, 4, seed=7), _rand(2, 5, seed=8)
    assert rkd_angle(s, t) == 0 and pkt(s, t) == 0
    assert rkd_distance(s[:1], t[:1]) == 0 and pkt(s[:1], t[:1]) == 0


@pytest.mark.parametrize(("loss", "s_shape", "t_shape"), CASES)
def test_finite_on_zero_vectors(loss, s_shape, t_shape) -> None:
    for s, t in [
        (torch.zeros(s_shape), _rand(*t_shape, seed=9)),
        (_rand(*s_shape, seed=9), torch.zeros(t_shape)),
        (torch.zeros(s_shape), torch.zeros(t_shape)),
    ]:
        s.requires_grad_()
        value = loss(s, t)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_compute_dtype(dtype: torch.dtype) -> None:
    s, t = _rand(4, 3, 2, 3, seed=11), _rand(4, 5, 2, 3, seed=12)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for loss in [*RELATIONAL, attention_transfer]:
        ref = loss(s.double(), t.double())
        value = loss(s.to(dtype), t.to(dtype))
        assert value.dtype == expected_dtype
        tol = 1e-12 if dtype == torch.float64 else 0.05
        assert_close(value.double(), ref, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- invariances


def test_rkd_distance_invariant_to_scale() -> None:
    s, t = _rand(6, 5, seed=13), _rand(6, 9, seed=14)
    ref = rkd_distance(s, t)
    assert ref > 0
    for c in (0.01, 3.0, 250.0):
        assert_close(rkd_distance(c * s, t), ref, rtol=1e-4, atol=1e-6)
        assert_close(rkd_distance(s, c * t), ref, rtol=1e-4, atol=1e-6)


def test_rkd_distance_float32_accurate_under_large_offset() -> None:
    # distances ignore translation; a shared offset of 1000 must not cost float32 accuracy
    s, t = _rand(8, 64, seed=27), _rand(8, 32, seed=28)
    ref = rkd_distance(s.double(), t.double())
    assert_close(rkd_distance(s + 1000.0, t - 1000.0).double(), ref, rtol=1e-4, atol=1e-6)


def test_rkd_angle_invariant_to_scale_and_translation() -> None:
    s, t = _rand(6, 5, seed=15), _rand(6, 9, seed=16)
    ref = rkd_angle(s, t)
    assert ref > 0
    shift_s, shift_t = _rand(1, 5, seed=17, scale=4.0), _rand(1, 9, seed=18, scale=4.0)
    for c in (0.1, 7.0):
        assert_close(rkd_angle(c * s + shift_s, t), ref, rtol=1e-4, atol=1e-6)
        assert_close(rkd_angle(s, c * t + shift_t), ref, rtol=1e-4, atol=1e-6)


def test_attention_transfer_invariant_to_positive_scaling() -> None:
    s, t = _rand(3, 4, 5, 6, seed=19), _rand(3, 8, 5, 6, seed=20)
    for p in (1, 2, 4):
        ref = attention_transfer(s, t, p=p)
        assert ref > 0
        for c in (0.05, 20.0):
            assert_close(attention_transfer(c * s, t, p=p), ref, rtol=1e-4, atol=1e-6)
            assert_close(attention_transfer(s, c * t, p=p), ref, rtol=1e-4, atol=1e-6)
    # the sign of an activation does not matter either (|a|^p)
    assert_close(attention_transfer(-s, t), attention_transfer(s, t))


def test_similarity_preserving_across_widths() -> None:
    s = _rand(5, 3, 4, 4, seed=21)
    # different widths work, and a wider teacher holding the same features twice (G doubles,
    # the row normalisation cancels the factor) matches exactly
    wide = torch.cat([s.flatten(1), s.flatten(1)], dim=1)
    assert_close(similarity_preserving(s, wide), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(similarity_preserving(s, 5.0 * s.flatten(1)), torch.tensor(0.0), atol=1e-6, rtol=0)
    other = _rand(5, 17, seed=22)
    assert similarity_preserving(s, other) > 0


def test_pkt_invariant_to_scale() -> None:
    s, t = _rand(6, 5, seed=23), _rand(6, 9, seed=24)
    ref = pkt(s, t)
    assert ref > 0
    assert_close(pkt(4.0 * s, 0.5 * t), ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- naive references


def _huber(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * x if abs(float(x.detach())) < 1 else x.abs() - 0.5


def _naive_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.flatten(1), t.flatten(1)
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
    d_s = {(i, j): torch.linalg.vector_norm(s[i] - s[j]) for i, j in pairs}
    d_t = {(i, j): torch.linalg.vector_norm(t[i] - t[j]) for i, j in pairs}
    mu_s, mu_t = sum(d_s.values()) / len(pairs), sum(d_t.values()) / len(pairs)
    return sum(_huber(d_s[p] / mu_s - d_t[p] / mu_t) for p in pairs) / len(pairs)


def _naive_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.flatten(1), t.flatten(1)

    def cos(e: torch.Tensor, i: int, j: int, k: int) -> torch.Tensor:
        u, v = e[i] - e[j], e[k] - e[j]
        return (u @ v) / (torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v))

    triplets = list(itertools.permutations(range(len(s)), 3))
    return sum(_huber(cos(s, *tr) - cos(t, *tr)) for tr in triplets) / len(triplets)


def _naive_sp(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.flatten(1), t.flatten(1)
    b, total = len(s), 0.0
    for i in range(b):
        g_s = torch.stack([s[i] @ s[j] for j in range(b)])
        g_t = torch.stack([t[i] @ t[j] for j in range(b)])
        diff = g_s / torch.linalg.vector_norm(g_s) - g_t / torch.linalg.vector_norm(g_t)
        total = total + (diff**2).sum()
    return total / b**2


def _naive_pkt(s: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    s, t = s.flatten(1), t.flatten(1)
    b, total = len(s), 0.0
    for i in range(b):
        others = [j for j in range(b) if j != i]
        k_s = torch.stack([(F.cosine_similarity(s[i], s[j], dim=0) + 1) / 2 + eps for j in others])
        k_t = torch.stack([(F.cosine_similarity(t[i], t[j], dim=0) + 1) / 2 + eps for j in others])
        p_s, p_t = k_s / k_s.sum(), k_t / k_t.sum()
        total = total + (p_t * (p_t / p_s).log()).sum()
    return total / b


NAIVE = [
    pytest.param(rkd_distance, _naive_rkd_distance, id="rkd_distance"),
    pytest.param(rkd_angle, _naive_rkd_angle, id="rkd_angle"),
    pytest.param(similarity_preserving, _naive_sp, id="similarity_preserving"),
    pytest.param(pkt, lambda s, t: _naive_pkt(s, t, 1e-7), id="pkt"),
]


@pytest.mark.parametrize(("loss", "naive"), NAIVE)
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_naive_reference(loss, naive, seed) -> None:
    s = _rand(5, 3, 2, seed=seed, scale=2.0).double().requires_grad_()
    t = _rand(5, 7, seed=seed + 100).double().requires_grad_()
    ours, ref = loss(s, t), naive(s, t)
    assert_close(ours, ref, atol=1e-10, rtol=1e-9)
    g_ours = torch.autograd.grad(ours, (s, t))
    g_ref = torch.autograd.grad(ref, (s, t))
    for a, b in zip(g_ours, g_ref, strict=True):
        assert_close(a, b, atol=1e-9, rtol=1e-7)
    # the float32 path agrees with the float64 reference
    assert_close(
        loss(s.detach().float(), t.detach().float()).double(), ref.detach(), rtol=1e-4, atol=1e-6
    )


def test_attention_transfer_matches_definition() -> None:
    s, t = _rand(3, 4, 5, 6, seed=25), _rand(3, 2, 5, 6, seed=26)
    per_sample = []
    for i in range(3):
        q_s = s[i].pow(2).sum(0).flatten()
        q_t = t[i].pow(2).sum(0).flatten()
        per_sample.append(((q_s / q_s.norm() - q_t / q_t.norm()) ** 2).sum())
    assert_close(attention_transfer(s, t, reduction="none"), torch.stack(per_sample))
    q = attention_map(s.flatten(2))  # (B, C, L) gives the same map as (B, C, H, W)
    assert_close(q, attention_map(s))
    assert_close(q.norm(dim=1), torch.ones(3))


# ---------------------------------------------------------------------------- errors


def test_hint_mse_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 5, 4\)"):
        hint_mse(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))


def test_attention_transfer_spatial_mismatch() -> None:
    with pytest.raises(ValueError, match="equal spatial size"):
        attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="spatial"):
        attention_map(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="p must be"):
        attention_map(torch.zeros(2, 3, 4), p=0.5)


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_batch_size_mismatch(loss) -> None:
    with pytest.raises(ValueError, match="same batch size"):
        loss(torch.zeros(3, 2, 4, 4), torch.zeros(4, 2, 4, 4))


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_bad_arguments(loss) -> None:
    s, t = torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4)
    with pytest.raises(ValueError, match="reduction"):
        loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="floating-point"):
        loss(s.long(), t.long())
    if loss in RELATIONAL:
        with pytest.raises(ValueError, match="at least 2 axes"):
            loss(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("eps", [0.0, -1e-7, math.inf])
def test_pkt_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        pkt(torch.zeros(3, 2), torch.zeros(3, 2), eps=eps)
