"""Memory-bounded token distillation: the same loss as `token_distill_loss`, chunk by chunk.

With a 49,152-token vocabulary and 8 × 512 tokens, one float32 (N, V) tensor is 805 MB, and the
naive loss keeps several of them alive for the backward pass (log-probabilities of both models,
probabilities, products). Two variants bound that:

- `chunked_token_distill_loss` takes the logits, flattened to (N, V), and walks over the tokens
  `chunk_size` at a time. Intermediates exist for one chunk only; what remains is the inputs and
  one (N, V) gradient buffer.
- `fused_linear_token_distill_loss` takes the final hidden states and the `lm_head` weights of
  both models and projects one chunk at a time, so no (N, V) tensor ever exists: peak memory is
  O(chunk_size × V) plus the gradients of the hidden states (N, H) and of the weight (V, H).

Both are a `torch.autograd.Function` that computes each chunk's gradient during the forward
pass (autograd on the chunk, with the very functions of `kdistill.losses.tokens`, so the math
is the same by construction), keeps only the gradient w.r.t. the inputs, and scales it by the
incoming gradient in `backward` (the approach of Liger-Kernel's chunked losses and torchtune's
chunked CE). Tests check value and gradients against the naive loss on odd shapes.

Conventions are those of `kdistill.losses.tokens`: labels aligned with the logits, a token counts
where `labels != ignore_index` (and `mask`), both terms are divided by the number of valid
tokens, or by `normalizer` (the global count, see `token_normalizer`); fp32 math whatever the
input dtype. The teacher is a constant here: its inputs must not require grad. `backward` may run
only once per forward (its buffer is scaled in place to save an (N, V) copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses.logits import _check_temperature, hard_cross_entropy
from kdistill.losses.tokens import (
    TokenKDKind,
    TokenLoss,
    check_alpha,
    check_kind_and_beta,
    token_kd,
    token_valid_mask,
)

__all__ = ["chunked_token_distill_loss", "fused_linear_token_distill_loss"]


@dataclass(frozen=True)
class _Spec:
    """The hyper-parameters of one call, as plain Python values (no per-chunk host syncs)."""

    kind: TokenKDKind
    beta: float
    temperature: float
    alpha: float
    ignore_index: int
    scale_by_t2: bool
    chunk_size: int


def _spec(
    kind: TokenKDKind, beta: float, temperature: float | Tensor, alpha: float | Tensor,
    ignore_index: int, scale_by_t2: bool, chunk_size: int,
) -> _Spec:
    check_kind_and_beta(kind, beta)
    _check_temperature(temperature)
    check_alpha(alpha)
    for name, value in (("temperature", temperature), ("alpha", alpha)):
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"{name} must not require grad in the chunked losses")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    return _Spec(kind, float(beta), float(temperature), float(alpha), ignore_index,
                 scale_by_t2, chunk_size)


def _flat_valid(
    labels: Tensor, mask: Tensor | None, leading: torch.Size, ignore_index: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Flattened (N,) labels, user mask (or None) and valid-token mask."""
    valid = token_valid_mask(labels, mask, leading, ignore_index)
    assert valid is not None
    flat_mask = None if mask is None else mask.reshape(-1)
    return labels.reshape(-1), flat_mask, valid.reshape(-1)


def _denominator(valid: Tensor, normalizer: float | Tensor | None, dtype: torch.dtype) -> Tensor:
    """What `reduce_loss` divides by: the valid count (at least 1), or `normalizer`."""
    if normalizer is None:
        return valid.sum().clamp(min=1).to(dtype)
    if isinstance(normalizer, Tensor):
        return normalizer.detach().to(device=valid.device, dtype=dtype).clamp(
            min=torch.finfo(dtype).tiny)
    if not (math.isfinite(normalizer) and normalizer >= 0):
        raise ValueError(f"normalizer must be a finite number >= 0; got {normalizer!r}")
    # a zero normalizer means an all-masked window (sum 0): 0 / tiny = 0, as in reduce_loss
    return torch.tensor(max(float(normalizer), torch.finfo(dtype).tiny), dtype=dtype,
                        device=valid.device)


def _chunk(
    s: Tensor, t: Tensor, y: Tensor, m: Tensor | None, valid: Tensor, spec: _Spec, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(KD sum, CE sum, d(α·KD + (1 − α)·CE)/d s) over one chunk of student logits `s`."""
    with torch.enable_grad():
        s = s.detach().requires_grad_(need_grad)
        # a term with weight 0 is still reported, but kept out of the backward pass
        s_kd = s if spec.alpha != 0.0 else s.detach()
        s_ce = s if spec.alpha != 1.0 else s.detach()
        kd = token_kd(
            s_kd, t, kind=spec.kind, beta=spec.beta, temperature=spec.temperature, mask=valid,
            reduction="sum", scale_by_t2=spec.scale_by_t2,
        )
        ce = hard_cross_entropy(s_ce, y, ignore_index=spec.ignore_index, mask=m, reduction="sum")
        grad = None
        if need_grad:
            (grad,) = torch.autograd.grad(spec.alpha * kd + (1.0 - spec.alpha) * ce, s)
    return kd.detach(), ce.detach(), grad


def _finish(ctx: Any, kd: Tensor, ce: Tensor, denom: Tensor, alpha: float) -> tuple[Tensor, ...]:
    kd, ce = kd / denom, ce / denom
    loss = alpha * kd + (1.0 - alpha) * ce
    ctx.mark_non_differentiable(kd, ce)
    return loss, kd, ce


def _scale(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    # The engine usually backpropagates 1: skip the pass over an (N, V) or (V, H) buffer then.
    if grad is None or bool(grad_output == 1):
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


class _ChunkedLogits(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: Tensor, teacher: Tensor, labels: Tensor, mask: Tensor | None,
        valid: Tensor, denom: Tensor, spec: _Spec,
    ) -> tuple[Tensor, ...]:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None
        kd = ce = denom.new_zeros(())
        for a in range(0, student.shape[0], spec.chunk_size):
            sl = slice(a, a + spec.chunk_size)
            kd_c, ce_c, g = _chunk(
                student[sl], teacher[sl], labels[sl], None if mask is None else mask[sl],
                valid[sl], spec, need_grad,
            )
            kd, ce = kd + kd_c, ce + ce_c
            if grad is not None and g is not None:
                grad[sl] = g / denom  # cast to the logits' dtype, as autograd would
        ctx.grad = grad
        return _finish(ctx, kd, ce, denom, spec.alpha)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grad is None and ctx.needs_input_grad[0]:
            raise RuntimeError("chunked token loss: backward can run only once per forward")
        grad, ctx.grad = _scale(ctx.grad, grad_loss), None
        return grad, None, None, None, None, None, None


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, s_h: Tensor, s_w: Tensor, s_b: Tensor | None, t_h: Tensor, t_w: Tensor,
        t_b: Tensor | None, labels: Tensor, mask: Tensor | None, valid: Tensor, denom: Tensor,
        spec: _Spec,
    ) -> tuple[Tensor, ...]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        acc = denom.dtype  # weight/bias gradients are summed over chunks in fp32 (fp64)
        grad_h = torch.empty_like(s_h) if need_h else None
        grad_w = torch.zeros(s_w.shape, dtype=acc, device=s_w.device) if need_w else None
        grad_b = torch.zeros(s_w.shape[0], dtype=acc, device=s_w.device) if need_b else None
        kd = ce = denom.new_zeros(())
        for a in range(0, s_h.shape[0], spec.chunk_size):
            sl = slice(a, a + spec.chunk_size)
            h = s_h[sl]
            # the projection runs in the inputs' dtype, as the model's lm_head would
            s_logits = F.linear(h, s_w, s_b)
            t_logits = F.linear(t_h[sl], t_w, t_b)
            kd_c, ce_c, g = _chunk(
                s_logits, t_logits, labels[sl], None if mask is None else mask[sl], valid[sl],
                spec, need_grad,
            )
            kd, ce = kd + kd_c, ce + ce_c
            if g is None:
                continue
            g32 = g / denom
            g = g32.to(s_logits.dtype)  # the gradient autograd would hand to the logits
            if grad_h is not None:
                grad_h[sl] = g @ s_w
            if grad_w is not None:
                if g.dtype == acc and h.dtype == acc:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).to(acc)
            if grad_b is not None:
                grad_b += g.to(acc).sum(dim=0)
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(s_w.dtype),
            None if grad_b is None or s_b is None else grad_b.to(s_b.dtype),
        )
        return _finish(ctx, kd, ce, denom, spec.alpha)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused token loss: backward can run only once per forward")
        grads, ctx.grads = ctx.grads, None
        g_h, g_w, g_b = (_scale(g, grad_loss) for g in grads)
        return g_h, g_w, g_b, None, None, None, None, None, None, None, None


def _check_teacher(*tensors: Tensor | None) -> None:
    if any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            "the teacher's inputs must not require grad in the chunked losses (the teacher is "
            "a constant): run it under torch.no_grad() or detach its outputs"
        )


def chunked_token_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float | Tensor = 0.5,
    kind: TokenKDKind = "forward_kl",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    normalizer: float | Tensor | None = None,
    chunk_size: int = 256,
) -> TokenLoss:
    """`token_distill_loss` over logits, `chunk_size` tokens at a time (same value and grads).

    Args:
        student_logits: shape (..., V), e.g. (B, T, V); treated as N = prod(...) tokens.
        teacher_logits: same shape; must not require grad.
        labels: integer targets aligned with the logits, shape (...); `ignore_index` = skip.
        alpha: weight of the KD term, in [0, 1] (a float or a scalar tensor without grad);
            CE gets 1 − alpha. For a schedule pass `value_at(schedule, progress)`.
        kind, beta, temperature, scale_by_t2: as in `token_kd` (T² on the KD term only).
        ignore_index: the label value that marks a position to skip.
        mask: optional bool, shape (...); True where the token counts.
        normalizer: denominator of both means (e.g. `token_normalizer(...)`).
        chunk_size: tokens per chunk; intermediates are O(chunk_size × V).

    Returns:
        TokenLoss(loss, kd, ce): `loss` carries the gradient w.r.t. `student_logits`;
        `kd` and `ce` are detached per-token means, for logging.
    """
    spec = _spec(kind, beta, temperature, alpha, ignore_index, scale_by_t2, chunk_size)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 1:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape (..., V); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    _check_teacher(teacher_logits)
    y, m, valid = _flat_valid(labels, mask, student_logits.shape[:-1], ignore_index)
    v = student_logits.shape[-1]
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) \
        else torch.float32
    loss, kd, ce = _ChunkedLogits.apply(
        student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), y, m, valid,
        _denominator(valid, normalizer, dtype), spec,
    )
    return TokenLoss(loss, kd, ce)


def fused_linear_token_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    alpha: float | Tensor = 0.5,
    kind: TokenKDKind = "forward_kl",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    scale_by_t2: bool = True,
    normalizer: float | Tensor | None = None,
    chunk_size: int = 256,
) -> TokenLoss:
    """`token_distill_loss` on `lm_head` outputs, never materialising the (N, V) logits.

    Equal in value and gradients to
    `token_distill_loss(F.linear(student_hidden, student_weight, student_bias),
    F.linear(teacher_hidden, teacher_weight, teacher_bias), labels, ...)`.

    Args:
        student_hidden: final hidden states, shape (..., H), e.g. (B, T, H).
        student_weight: the student's lm_head weight, shape (V, H) (tied embeddings work).
        teacher_hidden: shape (..., H_t), same leading shape; must not require grad.
        teacher_weight: shape (V, H_t); must not require grad.
        labels: integer targets aligned with the hidden states, shape (...).
        student_bias, teacher_bias: optional lm_head biases, shape (V,).
        alpha, kind, beta, temperature, ignore_index, mask, scale_by_t2, normalizer:
            as in `chunked_token_distill_loss`.
        chunk_size: tokens per chunk; peak memory is about 8 float32 (chunk_size, V) buffers
            plus the (V, H) weight gradient (accumulated in fp32): at V = 49,152 and the
            default 256 tokens, 0.5 GB in all (benchmarks/bench_llm_loss.py).

    Returns:
        TokenLoss(loss, kd, ce): `loss` carries the gradients w.r.t. `student_hidden`,
        `student_weight` and `student_bias`; `kd` and `ce` are detached, for logging.
    """
    spec = _spec(kind, beta, temperature, alpha, ignore_index, scale_by_t2, chunk_size)
    leading = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must share the leading (token) shape"
        )
    for name, h, w in (("student", student_hidden, student_weight),
                       ("teacher", teacher_hidden, teacher_weight)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{name}_weight must have shape (V, {h.shape[-1]}); got {tuple(w.shape)}"
            )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
            f"{teacher_weight.shape[0]}"
        )
    _check_teacher(teacher_hidden, teacher_weight, teacher_bias)
    y, m, valid = _flat_valid(labels, mask, leading, ignore_index)
    dtype = torch.float64 if torch.float64 in (student_hidden.dtype, student_weight.dtype,
                                               teacher_hidden.dtype) else torch.float32
    loss, kd, ce = _FusedLinear.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias,
        y, m, valid, _denominator(valid, normalizer, dtype), spec,
    )
    return TokenLoss(loss, kd, ce)
