"""Tests for kdistill.losses.logit_variants: DKD and DIST against hand values and references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kdistill.losses.logit_variants import _pearson_distance, dist_loss, dkd
from kdistill.losses.logits import kd_kl

LN = math.log


def _rand(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _labels(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _softmax(row: list[float], t: float) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / t) for x in row]
    return [x / sum(e) for x in e]


def _naive_dkd(s, t, y, alpha: float, beta: float, temp: float) -> list[float]:
    """Per sample, with the binary and the non-target distributions built explicitly."""
    out = []
    for srow, trow, label in zip(s.double().tolist(), t.double().tolist(), y.tolist(), strict=True):
        q, p = _softmax(srow, temp), _softmax(trow, temp)
        tckd = _kl([p[label], 1 - p[label]], [q[label], 1 - q[label]])
        p_rest = [v / (1 - p[label]) for j, v in enumerate(p) if j != label]
        q_rest = [v / (1 - q[label]) for j, v in enumerate(q) if j != label]
        out.append((alpha * tckd + beta * _kl(p_rest, q_rest)) * temp**2)
    return out


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy)


def _naive_dist(s, t, beta: float, gamma: float, temp: float) -> float:
    q = [_softmax(r, temp) for r in s.double().tolist()]
    p = [_softmax(r, temp) for r in t.double().tolist()]
    inter = sum(1 - _pearson(a, b) for a, b in zip(q, p, strict=True)) / len(q)
    cols = range(len(q[0]))
    intra = sum(1 - _pearson([r[c] for r in q], [r[c] for r in p]) for c in cols) / len(cols)
    return temp**2 * (beta * inter + gamma * intra)


# ---------------------------------------------------------------------------- golden values


def test_dkd_golden_three_classes() -> None:
    # label 0; teacher [ln 4, ln 3, 0] -> p = [4, 3, 1] / 8; student 0s -> q = [1/3, 1/3, 1/3]
    # TCKD = KL([1/2, 1/2] ‖ [1/3, 2/3]) = 0.5 ln 1.5 + 0.5 ln 0.75 = 0.5 ln 1.125 = 0.058892
    # NCKD = KL([3/4, 1/4] ‖ [1/2, 1/2]) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812
    # DKD (alpha 1, beta 8, T 1) = 0.058892 + 8 * 0.130812 = 1.105388
    # KD = 0.5 ln 1.5 + 0.375 ln 1.125 + 0.125 ln 0.375 = 0.202733 + 0.044169 - 0.122604
    #    = 0.124298 = TCKD + (1 - 1/2) * NCKD = 0.058892 + 0.065406
    s, t, y = torch.zeros(1, 3), torch.tensor([[LN(4), LN(3), 0.0]]), torch.tensor([0])
    assert_close(dkd(s, t, y, temperature=1.0), torch.tensor(1.105388), atol=1e-5, rtol=0)
    tckd = dkd(s, t, y, alpha=1.0, beta=0.0, temperature=1.0)
    nckd = dkd(s, t, y, alpha=0.0, beta=1.0, temperature=1.0)
    assert_close(tckd, torch.tensor(0.058892), atol=1e-6, rtol=0)
    assert_close(nckd, torch.tensor(0.130812), atol=1e-6, rtol=0)
    assert_close(kd_kl(s, t), torch.tensor(0.124298), atol=1e-6, rtol=0)
    # T = 2 with the teacher logits doubled: same distributions, x T^2 = 4 * 1.105388 = 4.421552
    assert_close(dkd(s, 2 * t, y, temperature=2.0), torch.tensor(4.421552), atol=2e-5, rtol=0)


def test_dist_golden_two_classes_three_samples() -> None:
    # teacher p(class 0) = [0.2, 0.4, 0.6], student q(class 0) = [0.4, 0.2, 0.4]
    # inter, C = 2: centred rows are ±[1, -1], so r = +1 if both sides of 1/2 agree, else -1:
    #   samples 1, 2 agree (1 - r = 0), sample 3 (0.6 vs 0.4) does not (1 - r = 2) -> 2/3
    # intra, class 0: centred teacher [-0.2, 0, 0.2], student [1/15, -2/15, 1/15]; dot = 0,
    #   r = 0; class 1 = 1 - class 0 negates both, r = 0 -> intra = 1
    # loss = 1 * 2/3 + 1 * 1 = 1.666667; "none" = [0 + 1, 0 + 1, 2 + 1]
    t = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]]).log()
    s = torch.tensor([[0.4, 0.6], [0.2, 0.8], [0.4, 0.6]]).log()
    assert_close(dist_loss(s, t), torch.tensor(5 / 3), atol=1e-5, rtol=0)
    assert_close(
        dist_loss(s, t, reduction="none"), torch.tensor([1.0, 1.0, 3.0]), atol=1e-5, rtol=0
    )
    assert_close(dist_loss(s, t, reduction="sum"), torch.tensor(5.0), atol=1e-5, rtol=0)


def test_dist_golden_inter_three_classes() -> None:
    # teacher p = [1/2, 1/4, 1/4] -> centred ∝ [2, -1, -1]; student q = [1/4, 1/2, 1/4] ->
    # centred ∝ [-1, 2, -1]; r = (-2 - 2 + 1) / (√6 · √6) = -1/2, 1 - r = 1.5
    # gamma = 0 leaves beta · inter; T = 2 with doubled logits: x T^2 = 6
    t, s = torch.tensor([[LN(2), 0.0, 0.0]]), torch.tensor([[0.0, LN(2), 0.0]])
    assert_close(dist_loss(s, t, gamma=0.0), torch.tensor(1.5), atol=1e-5, rtol=0)
    assert_close(
        dist_loss(2 * s, 2 * t, gamma=0.0, temperature=2.0), torch.tensor(6.0), atol=2e-5, rtol=0
    )


# --------------------------------------------------------------- references and identities


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_naive_reference(temperature: float) -> None:
    s, t, y = _rand(7, 13, seed=1), _rand(7, 13, seed=2), _labels(7, 13, seed=3)
    ref = torch.tensor(_naive_dkd(s, t, y, 1.5, 0.7, temperature))
    got = dkd(s, t, y, alpha=1.5, beta=0.7, temperature=temperature, reduction="none")
    assert_close(got, ref.float(), atol=1e-5, rtol=1e-4)
    assert_close(
        dkd(s, t, y, alpha=1.5, beta=0.7, temperature=temperature),
        ref.mean().float(),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dkd_decomposes_classical_kd(temperature: float) -> None:
    # KD = TCKD + (1 - p_target) · NCKD, all without T^2 (DKD's T^2 divided back out)
    s, t, y = _rand(7, 13, seed=4), _rand(7, 13, seed=5), _labels(7, 13, seed=6)
    t2 = temperature**2
    tckd = dkd(s, t, y, alpha=1.0, beta=0.0, temperature=temperature, reduction="none") / t2
    nckd = dkd(s, t, y, alpha=0.0, beta=1.0, temperature=temperature, reduction="none") / t2
    p_target = torch.softmax(t / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)
    kd = kd_kl(s, t, temperature=temperature, scale_by_t2=False, reduction="none")
    assert_close(tckd + (1 - p_target) * nckd, kd, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_matches_naive_reference(temperature: float) -> None:
    s, t = _rand(7, 13, seed=7), _rand(7, 13, seed=8)
    ref = _naive_dist(s, t, 0.6, 1.7, temperature)
    got = dist_loss(s, t, beta=0.6, gamma=1.7, temperature=temperature)
    assert_close(got, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-4)


def test_pearson_distance_is_one_minus_r_and_affine_invariant() -> None:
    x, y = _rand(5, 11, seed=9).softmax(-1), _rand(5, 11, seed=10).softmax(-1)
    d = _pearson_distance(x, y, dim=1)
    ref = [
        1 - _pearson(a, b) for a, b in zip(x.double().tolist(), y.double().tolist(), strict=True)
    ]
    assert_close(d, torch.tensor(ref, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    assert_close(_pearson_distance(3.0 * x + 0.25, y, dim=1), d, atol=1e-6, rtol=1e-5)
    assert_close(_pearson_distance(x, 0.1 * y - 7.0, dim=1), d, atol=1e-6, rtol=1e-5)
    assert_close(_pearson_distance(-2.0 * x, y, dim=1), 2 - d, atol=1e-6, rtol=1e-5)
    # constant vectors: both constant -> 0, one constant -> 1/2
    c = torch.full((1, 4), 0.25)
    assert _pearson_distance(c, c.clone(), dim=1).item() == 0.0
    assert_close(_pearson_distance(c, x[:1, :4], dim=1), torch.tensor([0.5]))


# ------------------------------------------------------------------------------ properties


def _both(s: torch.Tensor, t: torch.Tensor, temperature: float, **kw) -> list[torch.Tensor]:
    y = _labels(s.shape[0], s.shape[1], seed=11)
    return [
        dkd(s, t, y, temperature=temperature, **kw),
        dist_loss(s, t, temperature=temperature, **kw),
    ]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_zero_when_equal(temperature: float) -> None:
    s = _rand(7, 13, seed=12)
    for value in _both(s, s.clone(), temperature, reduction="none"):
        assert torch.equal(value, torch.zeros(7))
    one = _rand(1, 5, seed=13)  # a batch of one: DIST's intra columns are constant
    assert all(v.item() == 0.0 for v in _both(one, one.clone(), temperature))


def test_non_negative() -> None:
    for seed in range(10):
        s, t = _rand(6, 9, seed=seed, scale=5.0), _rand(6, 9, seed=seed + 100, scale=5.0)
        for value in _both(s, t, 2.0, reduction="none"):
            assert (value >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_on_extreme_logits(dtype: torch.dtype) -> None:
    sign = torch.where(_rand(5, 6, seed=14) > 0, 1.0, -1.0)
    t = (1e4 * sign).to(dtype)
    for s in (t.flip(0), -t, t.clone()):
        s = s.clone().requires_grad_()
        for value in _both(s, t, 1.0) + _both(s, t, 4.0):
            (g,) = torch.autograd.grad(value, s)
            assert value.dtype == torch.float32
            assert torch.isfinite(value) and value >= 0 and torch.isfinite(g).all()


def test_gradient_only_into_student() -> None:
    s, t = _rand(7, 13, seed=15).requires_grad_(), _rand(7, 13, seed=16)
    for value in _both(s, t, 2.0):
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert t.grad is None
    # nothing detached inside: a teacher that requires grad receives one
    t.requires_grad_()
    y = _labels(7, 13)
    for value in (dkd(s, t, y), dist_loss(s, t)):
        (g_t,) = torch.autograd.grad(value, t)
        assert g_t.abs().sum() > 0


def test_gradcheck_float64() -> None:
    s, t = _rand(4, 5, seed=17).double().requires_grad_(), _rand(4, 5, seed=18).double()
    y = _labels(4, 5, seed=19)
    assert torch.autograd.gradcheck(lambda a: dkd(a, t, y, temperature=1.5), (s,))
    assert torch.autograd.gradcheck(lambda a: dist_loss(a, t, temperature=1.5), (s,))


def test_tensor_temperature() -> None:
    s, t, y = _rand(3, 4, seed=20), _rand(3, 4, seed=21), _labels(3, 4)
    temp = torch.tensor(2.0)
    assert_close(dkd(s, t, y, temperature=temp), dkd(s, t, y, temperature=2.0))
    assert_close(dist_loss(s, t, temperature=temp), dist_loss(s, t, temperature=2.0))


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"beta": math.nan}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"reduction": "avg"}, "reduction"),
        ({"labels": torch.tensor([0.0, 1.0])}, "integer"),
        ({"labels": torch.tensor([0, 1, 2])}, "shape"),
        ({"labels": torch.tensor([0, 3])}, r"\[0, 3\)"),
        ({"labels": torch.tensor([-1, 0])}, r"\[0, 3\)"),
        ({"teacher_logits": torch.zeros(2, 4)}, "same shape"),
        ({"student_logits": torch.zeros(2, 1), "teacher_logits": torch.zeros(2, 1)}, "2 classes"),
        ({"student_logits": torch.zeros(3), "teacher_logits": torch.zeros(3)}, r"\(N, C\)"),
    ],
)
def test_dkd_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {
        "student_logits": torch.zeros(2, 3),
        "teacher_logits": torch.zeros(2, 3),
        "labels": torch.tensor([0, 2]),
    }
    args.update(kwargs)
    tensors = [args.pop(k) for k in ("student_logits", "teacher_logits", "labels")]
    with pytest.raises(ValueError, match=match):
        dkd(*tensors, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": -0.5}, "beta"),
        ({"gamma": math.inf}, "gamma"),
        ({"temperature": -1.0}, "temperature"),
        ({"reduction": "batchmean"}, "reduction"),
        ({"teacher_logits": torch.zeros(3, 3)}, "same shape"),
        (
            {"student_logits": torch.zeros(2, 3, 4), "teacher_logits": torch.zeros(2, 3, 4)},
            r"\(N, C\)",
        ),
        ({"student_logits": torch.zeros(2, 3, dtype=torch.long)}, "floating"),
    ],
)
def test_dist_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"student_logits": torch.zeros(2, 3), "teacher_logits": torch.zeros(2, 3)}
    args.update(kwargs)
    tensors = [args.pop(k) for k in ("student_logits", "teacher_logits")]
    with pytest.raises(ValueError, match=match):
        dist_loss(*tensors, **args)
