"""Property and golden-value tests for the token-level LLM losses (kdistill.losses.tokens)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kdistill.losses import (
    forward_kl,
    generalized_jsd,
    hard_cross_entropy,
    kd_kl,
    reverse_kl,
    shift_labels,
    token_distill_loss,
    token_kd,
    token_normalizer,
    total_variation,
)
from kdistill.schedules import Linear, Progress, value_at

LN2, LN3 = math.log(2.0), math.log(3.0)
KINDS = ("forward_kl", "reverse_kl", "jsd", "tv")


def _rand(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _labels(b: int, t: int, v: int, seed: int = 0, p_ignore: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (b, t), generator=g)
    y[torch.rand(b, t, generator=g) < p_ignore] = -100
    return y


# ---------------------------------------------------------------------------- golden values


def test_golden_two_classes() -> None:
    # teacher [ln 3, 0] -> p = [3/4, 1/4]; student [0, 0] -> q = [1/2, 1/2]
    # forward KL(p ‖ q) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812 (as in test_losses)
    # reverse KL(q ‖ p) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3) = 0.143841
    # JSD(0.5): m = [0.625, 0.375]
    #   KL(p ‖ m) = 0.75 ln 1.2 + 0.25 ln(2/3) = 0.136741 - 0.101366 = 0.035375
    #   KL(q ‖ m) = 0.5 ln 0.8 + 0.5 ln(4/3) = 0.5 ln(16/15) = 0.032269
    #   JSD = 0.5 · 0.035375 + 0.5 · 0.032269 = 0.033822
    # TV = 0.5 (|0.75 - 0.5| + |0.25 - 0.5|) = 0.25
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])
    assert_close(forward_kl(s, t), torch.tensor(0.130812), atol=1e-6, rtol=0)
    assert_close(reverse_kl(s, t), torch.tensor(0.143841), atol=1e-6, rtol=0)
    assert_close(generalized_jsd(s, t), torch.tensor(0.033822), atol=1e-6, rtol=0)
    assert_close(total_variation(s, t), torch.tensor(0.25), atol=1e-6, rtol=0)


def test_forward_kl_is_exactly_kd_kl_on_tokens() -> None:
    s, t = _rand(3, 7, 13, seed=1), _rand(3, 7, 13, seed=2)
    y = _labels(3, 7, 13)
    for kwargs in ({}, {"temperature": 2.0}, {"scale_by_t2": False, "reduction": "none"}):
        ours = forward_kl(s, t, labels=y, **kwargs)
        assert torch.equal(ours, kd_kl(s, t, mask=y != -100, **kwargs))
    # JSD at β = 0 is forward KL itself, at β = 1 reverse KL itself
    assert torch.equal(generalized_jsd(s, t, beta=0.0, labels=y), forward_kl(s, t, labels=y))
    assert torch.equal(generalized_jsd(s, t, beta=1.0, labels=y), reverse_kl(s, t, labels=y))


# ------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_zero_when_equal_and_non_negative(kind: str, beta: float, temperature: float) -> None:
    x = _rand(4, 5, 11, seed=3)
    same = token_kd(x, x.clone(), kind=kind, beta=beta, temperature=temperature)
    assert_close(same, torch.tensor(0.0), atol=1e-6, rtol=0)
    per_token = token_kd(
        _rand(4, 5, 11, seed=4), x, kind=kind, beta=beta, temperature=temperature,
        reduction="none",
    )
    assert per_token.shape == (4, 5)
    assert (per_token >= -1e-6).all()


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.7])
def test_jsd_swap_symmetry(beta: float) -> None:
    # JSD(β)(teacher, student) = JSD(1 − β)(student, teacher); at β = 0.5 it is symmetric
    s, t = _rand(3, 4, 9, seed=5), _rand(3, 4, 9, seed=6)
    swapped = generalized_jsd(t, s, beta=1.0 - beta, reduction="none")
    assert_close(generalized_jsd(s, t, beta=beta, reduction="none"), swapped)


def test_jsd_bounded_by_log2_and_tv_by_one() -> None:
    # disjoint supports reach the bounds: JSD(0.5) = ln 2, TV = 1
    t = torch.tensor([[50.0, -50.0, -50.0]])
    s = torch.tensor([[-50.0, 50.0, -50.0]])
    assert_close(generalized_jsd(s, t), torch.tensor(LN2), atol=1e-6, rtol=0)
    assert_close(total_variation(s, t), torch.tensor(1.0), atol=1e-6, rtol=0)
    a, b = _rand(64, 17, seed=7, scale=8.0), _rand(64, 17, seed=8, scale=8.0)
    assert (generalized_jsd(a, b, reduction="none") <= LN2 + 1e-6).all()
    tv = total_variation(a, b, reduction="none")
    assert ((tv >= 0) & (tv <= 1 + 1e-6)).all()


def test_jsd_limits_are_scaled_forward_and_reverse_kl() -> None:
    # JSD(β) = β · KL(p ‖ q) + O(β²) and (1 − β) · KL(q ‖ p) + O((1 − β)²), so JSD / β tends
    # to forward KL and JSD / (1 − β) to reverse KL, with an error linear in β (resp. 1 − β).
    # float64, and moderate logits: the O(β²) constant is a χ² divergence, huge for peaked p/q.
    s = _rand(2, 3, 7, seed=9, scale=1.0).double()
    t = _rand(2, 3, 7, seed=10, scale=1.0).double()
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    eps = 1e-6
    assert_close(generalized_jsd(s, t, beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    assert_close(generalized_jsd(s, t, beta=1.0 - eps) / eps, rkl, rtol=1e-4, atol=0)
    gaps = [abs(generalized_jsd(s, t, beta=e) / e / fkl - 1) for e in (1e-3, 1e-4)]
    assert 5 < gaps[0] / gaps[1] < 20  # ~10x smaller for a 10x smaller β: linear convergence
    # and it is continuous towards the interior: no jump between β = 0.5 ± 1e-6
    a, b = generalized_jsd(s, t, beta=0.5 - eps), generalized_jsd(s, t, beta=0.5 + eps)
    assert_close(a, b, rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 3.0, torch.tensor(2.0)])
def test_t2_scaling(kind: str, temperature) -> None:
    s, t = _rand(2, 3, 8, seed=11), _rand(2, 3, 8, seed=12)
    unscaled = token_kd(s, t, kind=kind, temperature=temperature, scale_by_t2=False)
    scaled = token_kd(s, t, kind=kind, temperature=temperature)
    assert_close(scaled, unscaled * float(temperature) ** 2)


def _masked_case(kind: str, fill: float):
    s, t = _rand(3, 4, 6, seed=13), _rand(3, 4, 6, seed=14)
    y = _labels(3, 4, 6, seed=2, p_ignore=0.4)
    y[1] = -100  # a fully ignored row
    s[y == -100], t[y == -100] = fill, -fill
    s.requires_grad_()
    value = token_kd(s, t, kind=kind, labels=y, temperature=2.0, beta=0.3)
    (grad,) = torch.autograd.grad(value, s)
    return value, grad, y != -100


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_positions_have_no_effect(kind: str) -> None:
    v0, g0, valid = _masked_case(kind, 0.5)
    for fill in (123.0, math.inf, math.nan):
        v, g, _ = _masked_case(kind, fill)
        assert torch.isfinite(v) and torch.isfinite(g).all()
        assert_close(v, v0)
        assert_close(g, g0)
        assert (g[~valid] == 0).all()


def test_labels_and_mask_combine() -> None:
    s, t, y = _rand(2, 5, 7, seed=15), _rand(2, 5, 7, seed=16), _labels(2, 5, 7, seed=3)
    mask = _rand(2, 5, seed=17) > 0
    for kind in KINDS:
        ours = token_kd(s, t, kind=kind, labels=y, mask=mask)
        assert_close(ours, token_kd(s, t, kind=kind, mask=mask & (y != -100)))
    other = token_kd(s, t, labels=torch.where(y == -100, 99, y), ignore_index=99)
    assert_close(other, token_kd(s, t, labels=y))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_in_fp32_on_extreme_low_precision_logits(kind: str, dtype: torch.dtype) -> None:
    t = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]], dtype=dtype)
    s = t.flip(-1).clone().requires_grad_()
    value = token_kd(s, t, kind=kind)
    (g,) = torch.autograd.grad(value, s)
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(g).all()


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "tv"])
def test_gradcheck_float64(kind: str) -> None:
    s = _rand(2, 3, 5, seed=18).double().requires_grad_()
    t = _rand(2, 3, 5, seed=19).double()
    y = torch.tensor([[1, -100, 2], [0, 4, -100]])
    assert torch.autograd.gradcheck(
        lambda a: token_kd(a, t, kind=kind, beta=0.3, labels=y, temperature=1.5), (s,)
    )


# ------------------------------------------------------------ mixing with CE, normalisation


def test_token_distill_loss_mixes_kd_and_ce_on_the_same_tokens() -> None:
    s, t, y = _rand(3, 7, 13, seed=20), _rand(3, 7, 13, seed=21), _labels(3, 7, 13, seed=4)
    out = token_distill_loss(s, t, y, alpha=0.3, kind="jsd", beta=0.4, temperature=2.0)
    kd = generalized_jsd(s, t, beta=0.4, temperature=2.0, labels=y)
    ce = hard_cross_entropy(s, y)
    assert_close(out.kd, kd)
    assert_close(out.ce, ce)
    assert_close(out.loss, 0.3 * kd + 0.7 * ce)
    # alpha from a schedule (the method evaluates it; the loss takes the number)
    progress = Progress(step=5, epoch=0, total_steps=11, steps_per_epoch=11)
    alpha = value_at(Linear(kind="linear", start=1.0, end=0.0), progress)
    assert alpha == pytest.approx(0.5)
    assert_close(token_distill_loss(s, t, y, alpha=alpha).loss, 0.5 * (out.ce + forward_kl(
        s, t, labels=y)))
    only_kd = token_distill_loss(s, t, y, alpha=torch.tensor(1.0))
    assert_close(only_kd.loss, forward_kl(s, t, labels=y))


def test_shift_labels_aligns_next_token_targets() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, -100, -100]])
    expected = torch.tensor([[6, 7, 8, -100], [2, -100, -100, -100]])
    assert torch.equal(shift_labels(ids), expected)
    # equal to slicing the logits the usual way
    logits = _rand(2, 4, 9, seed=22)
    ids[ids == -100] = 3
    ours = hard_cross_entropy(logits, shift_labels(ids))
    ref = hard_cross_entropy(logits[:, :-1], ids[:, 1:])
    assert_close(ours, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_accumulation_with_global_normalizer_equals_full_batch(kind: str) -> None:
    s, t, y = _rand(4, 6, 9, seed=23), _rand(4, 6, 9, seed=24), _labels(4, 6, 9, seed=5)
    y[0] = -100  # micro-batches with very different token counts
    full_s = s.clone().requires_grad_()
    full = token_distill_loss(full_s, t, y, alpha=0.6, kind=kind, temperature=2.0).loss
    full.backward()
    micro = [slice(0, 1), slice(1, 4)]
    n = token_normalizer([y[m] for m in micro])
    assert n.item() == (y != -100).sum().item()
    acc_s = s.clone().requires_grad_()
    total = torch.zeros(())
    for m in micro:
        part = token_distill_loss(
            acc_s[m], t[m], y[m], alpha=0.6, kind=kind, temperature=2.0, normalizer=n
        ).loss
        part.backward()
        total = total + part.detach()
    assert_close(total, full.detach())
    assert_close(acc_s.grad, full_s.grad)


def test_token_normalizer_divides_the_global_count_by_world_size(monkeypatch) -> None:
    # two ranks with the same labels: global count 2n, DDP averages over 2 -> normalizer n
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda x, op=None: x.mul_(2))
    y = _labels(2, 5, 7, seed=6)
    n = (y != -100).sum().item()
    assert token_normalizer(y).item() == n
    assert token_normalizer(y, distributed=False).item() == n
    assert token_normalizer([y, y[:1]]).item() == n + (y[:1] != -100).sum().item()


def test_all_ignored_gives_zero_not_nan() -> None:
    s = _rand(2, 3, 4, seed=25).requires_grad_()
    t, y = _rand(2, 3, 4, seed=26), torch.full((2, 3), -100)
    for normalizer in (None, 0, token_normalizer(y)):
        for kind in KINDS:
            out = token_distill_loss(s, t, y, kind=kind, normalizer=normalizer)
            (g,) = torch.autograd.grad(out.loss, s)
            assert out.loss.item() == 0.0 and (g == 0).all()


# ---------------------------------------------------------------------------------- errors


_X, _Y = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
_BAD_CALLS = {
    "kind": (lambda: token_kd(_X, _X, kind="kl"), "kind must be one of"),
    "beta > 1": (lambda: generalized_jsd(_X, _X, beta=1.5), "beta must be in"),
    "beta nan": (lambda: generalized_jsd(_X, _X, beta=math.nan), "beta must be in"),
    "labels shape": (lambda: token_kd(_X, _X, labels=torch.zeros(2).long()), "labels shape"),
    "labels dtype": (lambda: token_kd(_X, _X, labels=_Y.float()), "integer"),
    "alpha": (lambda: token_distill_loss(_X, _X, _Y, alpha=1.5), "alpha must be in"),
    "shapes": (lambda: reverse_kl(_X, torch.zeros(2, 3, 5)), "same shape"),
    "temperature": (lambda: total_variation(_X, _X, temperature=0.0), "temperature"),
    "empty normalizer": (lambda: token_normalizer([]), "at least one"),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_bad_arguments_raise_value_error(case: str) -> None:
    call, message = _BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()
