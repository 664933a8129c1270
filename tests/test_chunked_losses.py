"""The chunked and lm_head-fused token losses equal the naive `token_distill_loss`.

Value and gradients, on odd shapes (B=3, T=7, V=13: N=21 tokens, chunk sizes that do not divide
it), with ignored tokens and a fully ignored row, every kind, T != 1, CE mixing, a global
normalizer, low-precision inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kdistill.losses import (
    chunked_token_distill_loss,
    fused_linear_token_distill_loss,
    token_distill_loss,
    token_normalizer,
)

B, T, V, H, HT = 3, 7, 13, 5, 6
KINDS = ("forward_kl", "reverse_kl", "jsd", "tv")


def _rand(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _labels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.3] = -100
    y[1] = -100  # an all-ignored row
    return y


def _grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# ------------------------------------------------------------------------------ logits path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 64])
def test_chunked_logits_equal_naive(kind: str, chunk_size: int) -> None:
    s = _rand(B, T, V, seed=1).requires_grad_()
    t, y = _rand(B, T, V, seed=2), _labels()
    kw = {"alpha": 0.3, "kind": kind, "beta": 0.4, "temperature": 2.0}
    ref = token_distill_loss(s, t, y, **kw)
    out = chunked_token_distill_loss(s, t, y, chunk_size=chunk_size, **kw)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b)
    assert not out.kd.requires_grad and not out.ce.requires_grad
    assert_close(_grads(out.loss, s), _grads(ref.loss, s))


def test_chunked_logits_masked_rows_with_inf_and_extra_mask() -> None:
    s, t, y = _rand(B, T, V, seed=3), _rand(B, T, V, seed=4), _labels(1)
    mask = _rand(B, T, seed=5) > -0.7
    s[y == -100] = math.inf
    t[~mask] = math.nan
    s.requires_grad_()
    ref = token_distill_loss(s, t, y, mask=mask, kind="jsd")
    out = chunked_token_distill_loss(s, t, y, mask=mask, kind="jsd", chunk_size=4)
    assert torch.isfinite(out.loss)
    assert_close(out.loss, ref.loss)
    (g,) = _grads(out.loss, s)
    assert_close(g, _grads(ref.loss, s)[0])
    assert torch.isfinite(g).all() and (g[(y == -100) | ~mask] == 0).all()


def test_chunked_scales_by_incoming_gradient_and_backward_runs_once() -> None:
    s = _rand(B, T, V, seed=6).requires_grad_()
    t, y = _rand(B, T, V, seed=7), _labels(2)
    ref = token_distill_loss(s, t, y, kind="reverse_kl")
    out = chunked_token_distill_loss(s, t, y, kind="reverse_kl", chunk_size=8)
    assert_close(_grads(3.0 * out.loss, s), _grads(3.0 * ref.loss, s))
    again = chunked_token_distill_loss(s, t, y, chunk_size=8).loss
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        again.backward()


def test_chunked_without_grad_gives_the_value() -> None:
    s, t, y = _rand(B, T, V, seed=8), _rand(B, T, V, seed=9), _labels(3)
    with torch.no_grad():
        out = chunked_token_distill_loss(s, t, y, kind="tv", chunk_size=6)
    assert_close(out.loss, token_distill_loss(s, t, y, kind="tv").loss)


# ------------------------------------------------------------------------------- fused path


def _fused_inputs(dtype: torch.dtype = torch.float32, bias: bool = True):
    s_h = _rand(B, T, H, seed=10).to(dtype).requires_grad_()
    s_w = _rand(V, H, seed=11, scale=0.7).to(dtype).requires_grad_()
    s_b = _rand(V, seed=12).to(dtype).requires_grad_() if bias else None
    t_h, t_w = _rand(B, T, HT, seed=13).to(dtype), _rand(V, HT, seed=14, scale=0.7).to(dtype)
    t_b = _rand(V, seed=15).to(dtype) if bias else None
    return s_h, s_w, s_b, t_h, t_w, t_b


def _naive_fused(s_h, s_w, s_b, t_h, t_w, t_b, y, **kw):
    return token_distill_loss(F.linear(s_h, s_w, s_b), F.linear(t_h, t_w, t_b), y, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("chunk_size", "bias"), [(1, True), (5, False), (8, True), (64, True)])
def test_fused_equals_naive(kind: str, chunk_size: int, bias: bool) -> None:
    s_h, s_w, s_b, t_h, t_w, t_b = _fused_inputs(bias=bias)
    y = _labels(4)
    kw = {"alpha": 0.6, "kind": kind, "beta": 0.7, "temperature": 1.5}
    ref = _naive_fused(s_h, s_w, s_b, t_h, t_w, t_b, y, **kw)
    out = fused_linear_token_distill_loss(
        s_h, s_w, t_h, t_w, y, student_bias=s_b, teacher_bias=t_b, chunk_size=chunk_size, **kw
    )
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b)
    params = [p for p in (s_h, s_w, s_b) if p is not None]
    for a, b in zip(_grads(out.loss, *params), _grads(ref.loss, *params), strict=True):
        assert_close(a, b)


def test_fused_bf16_inputs_fp32_math() -> None:
    s_h, s_w, s_b, t_h, t_w, t_b = _fused_inputs(torch.bfloat16)
    y = _labels(5)
    ref = _naive_fused(s_h, s_w, s_b, t_h, t_w, t_b, y, kind="jsd")
    out = fused_linear_token_distill_loss(
        s_h, s_w, t_h, t_w, y, student_bias=s_b, teacher_bias=t_b, kind="jsd", chunk_size=4
    )
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss)
    got, want = _grads(out.loss, s_h, s_w, s_b), _grads(ref.loss, s_h, s_w, s_b)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16
        # the fused weight gradient is summed over chunks in fp32, naive's in one bf16 GEMM
        assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_fused_only_the_weight_trainable_and_frozen_hidden() -> None:
    s_h, s_w, _, t_h, t_w, _ = _fused_inputs(bias=False)
    s_h = s_h.detach()
    y = _labels(6)
    out = fused_linear_token_distill_loss(s_h, s_w, t_h, t_w, y, chunk_size=6)
    ref = _naive_fused(s_h, s_w, None, t_h, t_w, None, y)
    assert_close(_grads(out.loss, s_w), _grads(ref.loss, s_w))


# ------------------------------------------------------------ normalisation and accumulation


@pytest.mark.parametrize("variant", ["chunked", "fused"])
def test_micro_batches_with_global_normalizer_equal_full_batch(variant: str) -> None:
    s_h, s_w, _, t_h, t_w, _ = _fused_inputs(bias=False)
    y = _labels(7)
    kw = {"alpha": 0.5, "kind": "jsd", "temperature": 2.0}
    ref = _naive_fused(s_h, s_w, None, t_h, t_w, None, y, **kw)
    ref_g = _grads(ref.loss, s_h, s_w)
    micro = [slice(0, 2), slice(2, 3)]  # the second micro-batch holds 7 of the 21 tokens
    n = token_normalizer([y[m] for m in micro])
    total = torch.zeros(())
    for m in micro:
        if variant == "fused":
            part = fused_linear_token_distill_loss(
                s_h[m], s_w, t_h[m], t_w, y[m], normalizer=n, chunk_size=4, **kw
            ).loss
        else:
            s_logits, t_logits = F.linear(s_h[m], s_w), F.linear(t_h[m], t_w)
            part = chunked_token_distill_loss(
                s_logits, t_logits, y[m], normalizer=n, chunk_size=4, **kw
            ).loss
        part.backward()
        total = total + part.detach()
    assert_close(total, ref.loss.detach())
    assert_close(s_h.grad, ref_g[0])
    assert_close(s_w.grad, ref_g[1])


@pytest.mark.parametrize("normalizer", [None, 0, torch.tensor(0.0)])
def test_all_ignored_gives_zero_not_nan(normalizer) -> None:
    s_h, s_w, s_b, t_h, t_w, t_b = _fused_inputs()
    y = torch.full((B, T), -100)
    out = fused_linear_token_distill_loss(
        s_h, s_w, t_h, t_w, y, student_bias=s_b, teacher_bias=t_b, normalizer=normalizer
    )
    assert out.loss.item() == 0.0
    assert all((g == 0).all() for g in _grads(out.loss, s_h, s_w, s_b))


# ---------------------------------------------------------------------------------- errors


def _bad_calls():
    s_h, s_w, _, t_h, t_w, _ = _fused_inputs(bias=False)
    s, y = _rand(B, T, V, seed=16), _labels()
    return {
        "teacher grad": (lambda: chunked_token_distill_loss(s, s.requires_grad_(), y), "teacher"),
        "chunk 0": (lambda: chunked_token_distill_loss(s, s, y, chunk_size=0), "chunk_size"),
        "shapes": (lambda: chunked_token_distill_loss(s, s[..., :4], y), "same shape"),
        "weight": (lambda: fused_linear_token_distill_loss(s_h, t_w, t_h, t_w, y), r"\(V, 5\)"),
        "vocab": (lambda: fused_linear_token_distill_loss(s_h, s_w, t_h, t_w[:4], y), "vocab"),
        "tokens": (lambda: fused_linear_token_distill_loss(s_h, s_w, t_h[:1], t_w, y), "leading"),
        "temp grad": (lambda: chunked_token_distill_loss(
            s, s, y, temperature=torch.tensor(2.0, requires_grad=True)), "not require grad"),
        "kind": (lambda: chunked_token_distill_loss(s, s, y, kind="kl"), "kind"),
        "labels": (lambda: chunked_token_distill_loss(s, s, y[:, :3]), "labels shape"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_value_error(case: str) -> None:
    call, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        call()
