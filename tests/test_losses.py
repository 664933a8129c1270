"""Property and golden-value tests for kdistill.losses (logits family and reduction)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdistill.losses import hard_cross_entropy, kd_kl, reduce_loss, soft_cross_entropy

LN3 = math.log(3.0)


def _rand(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _entropy(logits: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.softmax(logits.double() / t, dim=-1)
    return -(p * p.log()).sum(-1)


# ---------------------------------------------------------------------------- golden values


def test_kd_kl_golden_two_classes_t1() -> None:
    # teacher [ln 3, 0] -> p = [3/4, 1/4]; student [0, 0] -> q = [1/2, 1/2]
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.75 ln 1.5 + 0.25 ln 0.5
    #    = 0.75 * 0.405465 - 0.25 * 0.693147 = 0.304099 - 0.173287 = 0.130812
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])
    assert_close(kd_kl(s, t), torch.tensor(0.130812), atol=1e-6, rtol=0)


def test_kd_kl_golden_two_classes_t2() -> None:
    # T = 2, teacher [2 ln 3, 0] -> teacher / T = [ln 3, 0] -> p = [3/4, 1/4]; q = [1/2, 1/2]
    # unscaled KL = 0.130812 (as above); x T^2 = 4 * 0.130812 = 0.523248
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[2 * LN3, 0.0]])
    assert_close(kd_kl(s, t, temperature=2.0), torch.tensor(0.523248), atol=1e-5, rtol=0)
    assert_close(
        kd_kl(s, t, temperature=2.0, scale_by_t2=False), torch.tensor(0.130812), atol=1e-6, rtol=0
    )
    # T = 2, teacher [ln 3, 0] -> p = [√3, 1] / (√3 + 1) = [0.633975, 0.366025]
    # KL = 0.633975 ln 1.267949 + 0.366025 ln 0.732051 = 0.150513 - 0.114174 = 0.036339
    # x T^2 = 0.145356
    t = torch.tensor([[LN3, 0.0]])
    assert_close(kd_kl(s, t, temperature=2.0), torch.tensor(0.145356), atol=1e-5, rtol=0)


def test_kd_kl_golden_three_classes() -> None:
    # teacher [ln 4, ln 2, ln 2] -> p = [4, 2, 2] / 8 = [1/2, 1/4, 1/4]; student 0s -> q = 1/3
    # KL = 0.5 ln(1.5) + 2 * 0.25 ln(0.75) = 0.5 ln(1.5 * 0.75) = 0.5 ln 1.125
    #    = 0.5 * 0.117783 = 0.058892
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(4.0), math.log(2.0), math.log(2.0)]])
    assert_close(kd_kl(s, t), torch.tensor(0.058892), atol=1e-6, rtol=0)


def test_soft_cross_entropy_golden() -> None:
    # p = [3/4, 1/4], q = [1/2, 1/2]: CE = -(0.75 ln 0.5 + 0.25 ln 0.5) = ln 2 = 0.693147
    # H(p) = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335; CE - H = 0.130812
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])
    assert_close(soft_cross_entropy(s, t), torch.tensor(0.693147), atol=1e-6, rtol=0)


def test_hard_cross_entropy_golden() -> None:
    # logits [ln 3, 0] -> q = [3/4, 1/4]; label 0: -ln 0.75 = 0.287682
    # smoothing 0.1: 0.9 * 0.287682 + 0.1 * (0.287682 + 1.386294) / 2 = 0.258914 + 0.083699
    #              = 0.342613
    x, y = torch.tensor([[LN3, 0.0]]), torch.tensor([0])
    assert_close(hard_cross_entropy(x, y), torch.tensor(0.287682), atol=1e-6, rtol=0)
    assert_close(
        hard_cross_entropy(x, y, label_smoothing=0.1), torch.tensor(0.342613), atol=1e-6, rtol=0
    )


def test_kd_kl_token_level_golden_with_mask() -> None:
    # (B, T, V) = (2, 2, 2); the mean runs over the 3 valid tokens, not over B or B*T.
    # token (0,0): student [0, 0], teacher [ln 3, 0]       -> 0.130812
    # token (0,1): student == teacher                      -> 0
    # token (1,0): student [ln 3, 0], teacher [0, 0]: KL([1/2, 1/2] ‖ [3/4, 1/4])
    #              = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3) = 0.143841
    # token (1,1): masked (holds inf)                      -> ignored
    # mean = (0.130812 + 0 + 0.143841) / 3 = 0.274653 / 3 = 0.091551
    s = torch.tensor([[[0.0, 0.0], [1.0, 2.0]], [[LN3, 0.0], [math.inf, 0.0]]])
    t = torch.tensor([[[LN3, 0.0], [1.0, 2.0]], [[0.0, 0.0], [-math.inf, 5.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    assert_close(kd_kl(s, t, mask=mask), torch.tensor(0.091551), atol=1e-6, rtol=0)
    assert_close(kd_kl(s, t, mask=mask, reduction="sum"), torch.tensor(0.274653), atol=1e-6, rtol=0)
    per_token = kd_kl(s, t, mask=mask, reduction="none")
    expected = torch.tensor([[0.130812, 0.0], [0.143841, 0.0]])
    assert_close(per_token, expected, atol=1e-6, rtol=0)
    # a normalizer (e.g. 4 valid tokens over the accumulation window) replaces the count
    value = kd_kl(s, t, mask=mask, normalizer=4)
    assert_close(value, torch.tensor(0.274653 / 4), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_kl_zero_when_equal(temperature: float) -> None:
    x = _rand(4, 7, 11)
    assert_close(kd_kl(x, x.clone(), temperature=temperature), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", [kd_kl, soft_cross_entropy])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 8.0])
def test_non_negative(loss, temperature: float) -> None:
    per_item = loss(
        _rand(64, 10, seed=1), _rand(64, 10, seed=2), temperature=temperature, reduction="none"
    )
    assert per_item.shape == (64,)
    assert (per_item >= -1e-6).all()


def test_hard_cross_entropy_non_negative() -> None:
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    assert (hard_cross_entropy(_rand(64, 10), y, label_smoothing=0.2, reduction="none") >= 0).all()


@pytest.mark.parametrize("loss", [kd_kl, soft_cross_entropy])
@pytest.mark.parametrize("temperature", [0.5, 3.0, torch.tensor(4.0)])
def test_t2_scaling(loss, temperature) -> None:
    s, t = _rand(8, 5, seed=3), _rand(8, 5, seed=4)
    unscaled = loss(s, t, temperature=temperature, scale_by_t2=False)
    assert_close(loss(s, t, temperature=temperature), unscaled * float(temperature) ** 2)


def test_temperature_softening() -> None:
    s, t = _rand(16, 10, seed=5), _rand(16, 10, seed=6)
    values = [kd_kl(s, t, temperature=T, scale_by_t2=False).item() for T in (1, 10, 100, 1000)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] < 1e-5


def test_soft_ce_minus_kl_is_teacher_entropy_with_same_gradient() -> None:
    T = 2.5
    s = _rand(6, 4, 9, seed=7).requires_grad_()
    t = _rand(6, 4, 9, seed=8)
    ce = soft_cross_entropy(s, t, temperature=T, reduction="none")
    kl = kd_kl(s, t, temperature=T, reduction="none")
    assert_close(ce - kl, (T * T * _entropy(t, T)).float(), atol=1e-5, rtol=1e-5)
    (g_ce,) = torch.autograd.grad(ce.mean(), s)
    (g_kl,) = torch.autograd.grad(kl.mean(), s)
    assert_close(g_ce, g_kl)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hard_cross_entropy_matches_torch(label_smoothing: float, reduction: str) -> None:
    x = _rand(3, 5, 7, seed=9).requires_grad_()
    y = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    y[0, 1] = y[2, 4] = -100
    ours = hard_cross_entropy(x, y, label_smoothing=label_smoothing, reduction=reduction)
    ref = F.cross_entropy(
        x.reshape(-1, 7), y.reshape(-1), label_smoothing=label_smoothing, reduction=reduction
    )
    assert_close(ours, ref.reshape(ours.shape))
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert_close(g_ours, g_ref)


def test_hard_cross_entropy_custom_ignore_index_and_mask() -> None:
    x, y = _rand(6, 4, seed=10), torch.tensor([0, 3, 7, 1, 7, 2])
    mask = torch.tensor([True, False, True, True, True, True])
    ours = hard_cross_entropy(x, y, ignore_index=7, mask=mask)
    keep = torch.tensor([0, 3, 5])  # not masked and not ignored
    assert_close(ours, F.cross_entropy(x[keep], y[keep]))


def _masked_case(loss, fill: float):
    """Loss value and student gradient with masked rows holding `fill`."""
    s, t = _rand(3, 4, 6, seed=11), _rand(3, 4, 6, seed=12)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) > 0.4
    s[~mask], t[~mask] = fill, -fill
    s.requires_grad_()
    if loss is hard_cross_entropy:
        y = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(4))
        value = loss(s, y, mask=mask, label_smoothing=0.1)
    else:
        value = loss(s, t, mask=mask, temperature=2.0)
    (grad,) = torch.autograd.grad(value, s)
    return value, grad, mask


@pytest.mark.parametrize("loss", [kd_kl, soft_cross_entropy, hard_cross_entropy])
def test_masked_positions_ignored(loss) -> None:
    v0, g0, mask = _masked_case(loss, 0.5)
    for fill in (123.0, math.inf, math.nan):
        v, g, _ = _masked_case(loss, fill)
        assert torch.isfinite(v) and torch.isfinite(g).all()
        assert_close(v, v0)
        assert_close(g, g0)
        assert (g[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_on_extreme_logits(dtype: torch.dtype) -> None:
    # teacher puts all mass on class 0, student all on class 1: KL = 2 · 1e4 (T = 1), huge but
    # finite; bf16 rounds 1e4 to 9984, hence the expected value from the stored logit
    t = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype)
    s = t.flip(-1).clone().requires_grad_()
    y = torch.tensor([0, 1])
    for value in (
        kd_kl(s, t),
        soft_cross_entropy(s, t, temperature=4.0),
        hard_cross_entropy(s, y, label_smoothing=0.1),
    ):
        assert value.dtype == torch.float32
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(g).all()
    assert_close(kd_kl(s, t), torch.tensor(2 * float(t[0, 0])), rtol=1e-6, atol=0)


def test_neg_inf_classes_in_both_models_are_ignored() -> None:
    # e.g. padded vocabulary entries set to -inf in both models: 0 · log 0 = 0, no NaN
    s = torch.tensor([[0.0, 0.0, -math.inf]], requires_grad=True)
    t = torch.tensor([[LN3, 0.0, -math.inf]])
    for loss, expected in ((kd_kl, 0.130812), (soft_cross_entropy, 0.693147)):
        value = loss(s, t)
        (g,) = torch.autograd.grad(value, s)
        assert_close(value, torch.tensor(expected), atol=1e-6, rtol=0)
        assert torch.isfinite(g).all()


def test_gradcheck_float64() -> None:
    s = _rand(3, 5, seed=13).double().requires_grad_()
    t = _rand(3, 5, seed=14).double()
    temp = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert kd_kl(s, t).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, T: kd_kl(a, t, temperature=T), (s, temp))
    assert torch.autograd.gradcheck(lambda a: soft_cross_entropy(a, t, temperature=0.7), (s,))


# ------------------------------------------------------------------------------ reductions


def test_reduce_loss_modes() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.nan, math.inf]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert_close(reduce_loss(x, mask=mask), torch.tensor(7.0 / 3))
    assert_close(reduce_loss(x, mask=mask, reduction="sum"), torch.tensor(7.0))
    none = reduce_loss(x, mask=mask, reduction="none")
    assert_close(none, torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]))
    (g,) = torch.autograd.grad(reduce_loss(x, mask=mask), x)
    assert_close(g, mask.float() / 3)
    y = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert_close(reduce_loss(y), torch.tensor(3.0))
    assert reduce_loss(y, reduction="none") is y


@pytest.mark.parametrize("normalizer", [8, 2.5, torch.tensor(8.0)])
def test_normalizer_divides_the_sum(normalizer) -> None:
    x, mask = _rand(4, 5, seed=15), _rand(4, 5, seed=16) > 0
    expected = reduce_loss(x, mask=mask, reduction="sum") / float(normalizer)
    assert_close(reduce_loss(x, mask=mask, normalizer=normalizer), expected)
    # the normalizer only affects "mean"
    assert_close(
        reduce_loss(x, mask=mask, reduction="sum", normalizer=normalizer),
        reduce_loss(x, mask=mask, reduction="sum"),
    )


def test_normalizer_over_micro_batches_equals_global_token_mean() -> None:
    s, t = _rand(4, 6, 9, seed=17), _rand(4, 6, 9, seed=18)
    mask = _rand(4, 6, seed=19) > -0.5
    full = kd_kl(s, t, mask=mask, temperature=2.0)
    n = mask.sum()
    parts = sum(
        kd_kl(s[i : i + 2], t[i : i + 2], mask=mask[i : i + 2], temperature=2.0, normalizer=n)
        for i in (0, 2)
    )
    assert_close(parts, full)


@pytest.mark.parametrize("normalizer", [None, 0, torch.tensor(0.0)])
def test_all_masked_gives_zero_not_nan(normalizer) -> None:
    s = _rand(2, 3, 4, seed=20).requires_grad_()
    t, mask = _rand(2, 3, 4, seed=21), torch.zeros(2, 3, dtype=torch.bool)
    y = torch.full((2, 3), -100)
    for value in (
        kd_kl(s, t, mask=mask, normalizer=normalizer),
        soft_cross_entropy(s, t, mask=mask, normalizer=normalizer),
        hard_cross_entropy(s, y, normalizer=normalizer),
    ):
        (g,) = torch.autograd.grad(value, s)
        assert value.item() == 0.0
        assert (g == 0).all()


# ---------------------------------------------------------------------------------- errors


_X, _L = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
_BAD_CALLS = {
    "temperature 0": (lambda: kd_kl(_X, _X, temperature=0.0), "temperature must be"),
    "temperature < 0": (lambda: soft_cross_entropy(_X, _X, temperature=-1.0), "temperature"),
    "temperature inf": (lambda: kd_kl(_X, _X, temperature=math.inf), "temperature must be"),
    "temperature nan": (lambda: kd_kl(_X, _X, temperature=math.nan), "temperature must be"),
    "temperature tensor 0": (lambda: kd_kl(_X, _X, temperature=torch.tensor(0.0)), "> 0"),
    "temperature vector": (lambda: kd_kl(_X, _X, temperature=torch.ones(2)), "a scalar"),
    "reduction": (lambda: reduce_loss(_X, reduction="avg"), r"'mean', 'sum', 'none'.*'avg'"),
    "kd reduction": (lambda: kd_kl(_X, _X, reduction="batchmean"), "reduction must be one of"),
    "ce reduction": (lambda: soft_cross_entropy(_X, _X, reduction="x"), "reduction must be"),
    "hard reduction": (lambda: hard_cross_entropy(_X, _L, reduction="x"), "reduction must be"),
    "kd shapes": (lambda: kd_kl(_X, torch.zeros(2, 4)), r"\(2, 3\).*\(2, 4\)"),
    "ce shapes": (lambda: soft_cross_entropy(torch.zeros(4, 3), _X), r"\(4, 3\).*\(2, 3\)"),
    "labels shape": (lambda: hard_cross_entropy(_X, torch.zeros(3).long()), r"labels shape \(3,\)"),
    "mask shape": (lambda: kd_kl(_X, _X, mask=torch.ones(3, dtype=torch.bool)), "mask shape"),
    "reduce mask shape": (lambda: reduce_loss(_X, mask=torch.ones(2).bool()), "mask shape"),
    "mask dtype": (lambda: reduce_loss(_X, mask=torch.ones(2, 3)), "bool"),
    "label_smoothing": (lambda: hard_cross_entropy(_X, _L, label_smoothing=1.0), "smoothing"),
    "float labels": (lambda: hard_cross_entropy(_X, torch.zeros(2)), "integer"),
    "normalizer": (lambda: reduce_loss(_X, normalizer=-1.0), "normalizer must be"),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_bad_arguments_raise_value_error(case: str) -> None:
    call, message = _BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_hard_ce_inf_in_ignored_rows_gives_zero_gradient_there() -> None:
    # Guards the fast path: it must not be taken when some positions are ignored.
    logits = torch.randn(3, 4)
    logits[1] = float("inf")
    logits.requires_grad_(True)
    labels = torch.tensor([0, -100, 2])
    loss = hard_cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss)
    assert torch.equal(grad[1], torch.zeros(4))
    clean = torch.nn.functional.cross_entropy(logits[[0, 2]].detach(), labels[[0, 2]])
    torch.testing.assert_close(loss.detach(), clean)
