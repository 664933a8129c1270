"""Attention-matrix distillation: the loss vs a naive loop, the tiny transformer, the method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from kdistill.build import build_optimizer
from kdistill.capture import capture
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger
from kdistill.losses.attention import attention_probs_loss
from kdistill.methods import Outputs, build_method
from kdistill.methods.attention_maps import AttentionDistillConfig
from kdistill.models import build_model
from kdistill.models.transformer import TinyTransformer
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher


def _probs(b: int, h: int, lq: int, lk: int, seed: int, mask: Tensor | None = None) -> Tensor:
    """Random attention probabilities; with a key mask, padded keys get exactly 0 mass."""
    scores = torch.randn(b, h, lq, lk, generator=torch.Generator().manual_seed(seed)) * 2
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    return scores.softmax(dim=-1)


def _reference(s: Tensor, t: Tensor, kind: str, heads: str, mask: Tensor | None) -> Tensor:
    """The loss written as loops over (batch, head, query, key), in float64."""
    s, t = s.double(), t.double()
    if heads == "mean":
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    b, h, lq, lk = s.shape
    rows = []
    for i in range(b):
        keys = [k for k in range(lk) if mask is None or mask[i, k]]
        for j in range(h):
            for q in range(lq):
                if mask is not None and not mask[i, q]:
                    continue
                if kind == "kl":
                    terms = [t[i, j, q, k] * (t[i, j, q, k].log() - s[i, j, q, k].log())
                             for k in keys if t[i, j, q, k] > 0]
                    rows.append(sum(terms))
                else:
                    rows.append(sum((s[i, j, q, k] - t[i, j, q, k]) ** 2 for k in keys)
                                / len(keys))
    return sum(rows) / len(rows)


MASK = torch.tensor([[True] * 5, [True, True, True, False, False]])


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize(("heads", "h_t"), [("mean", 4), ("match", 3)])
@pytest.mark.parametrize("mask", [None, MASK], ids=["nomask", "mask"])
def test_loss_and_gradient_equal_the_naive_loop(kind, heads, h_t, mask) -> None:
    s = _probs(2, 3, 5, 5, seed=0, mask=mask).requires_grad_(True)
    t = _probs(2, h_t, 5, 5, seed=1, mask=mask)
    got = attention_probs_loss(s, t, kind=kind, heads=heads, mask=mask)
    ref = _reference(s, t, kind, heads, mask)
    assert got.dtype == torch.float32
    assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    (g_got,) = torch.autograd.grad(got, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)


def test_loss_properties() -> None:
    s, t = _probs(2, 2, 5, 5, seed=0), _probs(2, 2, 5, 5, seed=1)
    for kind in ("kl", "mse"):
        assert float(attention_probs_loss(t, t, kind=kind, heads="match")) == pytest.approx(
            0.0, abs=1e-6)
        assert float(attention_probs_loss(s, t, kind=kind, heads="match")) > 0
    # MSE without a mask is F.mse_loss; the per-row "none" output has shape (B, H', Lq).
    assert_close(attention_probs_loss(s, t, kind="mse", heads="match"),
                 nn.functional.mse_loss(s, t))
    assert attention_probs_loss(s, t, heads="match", reduction="none").shape == (2, 2, 5)
    assert attention_probs_loss(s, t, heads="mean", reduction="none").shape == (2, 1, 5)
    # A student that gives a key exactly 0 mass costs a large finite value, not inf.
    zero = torch.zeros_like(s)
    zero[..., 0] = 1.0
    assert math.isfinite(float(attention_probs_loss(zero, t, kind="kl")))
    # Whatever sits at padded queries and keys is ignored.
    garbage = torch.where(MASK[:, None, :, None] & MASK[:, None, None, :], s, torch.rand_like(s))
    for kind in ("kl", "mse"):
        assert_close(attention_probs_loss(garbage, t, kind=kind, mask=MASK),
                     attention_probs_loss(s, t, kind=kind, mask=MASK))


def test_loss_errors_are_clear() -> None:
    s, t = _probs(2, 2, 5, 5, seed=0), _probs(2, 4, 5, 5, seed=1)
    with pytest.raises(ValueError, match="equal head counts; got student 2 and teacher 4"):
        attention_probs_loss(s, t, heads="match")
    with pytest.raises(ValueError, match=r"same batch size and \(Lq, Lk\)"):
        attention_probs_loss(s, _probs(2, 2, 6, 6, seed=1))
    with pytest.raises(ValueError, match=r"shape \(B, H, Lq, Lk\); got shape \(2, 5, 5\)"):
        attention_probs_loss(s[:, 0], t[:, 0])
    with pytest.raises(ValueError, match="bool tensor of shape"):
        attention_probs_loss(s, t, mask=MASK.long())


@pytest.mark.parametrize(("input_shape", "batch_shape", "tokens"), [
    ((40,), (3, 40), 11), ((1, 40), (3, 1, 40), 11), ((1, 40), (3, 40), 11),
    ((1, 28, 28), (3, 1, 28, 28), 50)])
def test_tiny_transformer_shapes_and_hooked_probs(input_shape, batch_shape, tokens) -> None:
    model = build_model("transformer", input_shape=input_shape, num_classes=10,
                        args={"dim": 16, "heads": 2, "depth": 2, "patch": 4})
    with capture(model, ["blocks.0.attn.probs", "blocks.1.attn.probs"]) as feats:
        logits = model(torch.randn(*batch_shape))
    assert logits.shape == (3, 10)
    for a in feats.values():
        assert a.shape == (3, 2, tokens, tokens)
        assert_close(a.sum(dim=-1), torch.ones(3, 2, tokens))
    with pytest.raises(ConfigError, match=r"args\.heads: dim 16 is not divisible by heads 3"):
        build_model("transformer", input_shape=(40,), num_classes=10,
                    args={"dim": 16, "heads": 3})


def _pair(heads: str, pairs: list[list[str]] | None = None, **kw):
    torch.manual_seed(0)
    teacher = TinyTransformer((40,), 10, dim=32, heads=4, depth=2)
    student = TinyTransformer((40,), 10, dim=16, heads=2, depth=2)
    pairs = pairs or [["blocks.0.attn.probs", "blocks.0.attn.probs"],
                      ["blocks.1.attn.probs", "blocks.1.attn.probs"]]
    return student, teacher, build_method(AttentionDistillConfig(pairs=pairs, heads=heads, **kw))


def test_method_trains_a_transformer_student_through_the_engine() -> None:
    student, teacher, method = _pair("mean")
    x, y = torch.randn(48, 40), torch.randint(0, 10, (48,))
    method.setup(student, teacher, x[:2], num_samples=len(x))
    before = [p.detach().clone() for p in student.parameters()]
    opt = build_optimizer([*student.parameters(), *method.parameters()], TrainConfig().optimizer)
    logger = MetricsLogger()
    train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=16, seed=0),
          opt, TrainConfig(epochs=1, log_every=1), logger=logger)
    assert len(logger.records) == 3
    assert all(math.isfinite(r["loss"]) and r["loss/attn"] > 0 for r in logger.records)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())


def test_method_terms_are_the_weighted_losses() -> None:
    from kdistill.losses import hard_cross_entropy, kd_kl

    _, _, method = _pair("match", [["a", "b"]], kind="mse", weight=3.0, alpha=0.5,
                         temperature=2.0)
    s_att, t_att = _probs(4, 2, 5, 5, seed=0), _probs(4, 2, 5, 5, seed=1)
    s_log, t_log, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    out = Outputs(s_log, t_log, {"a": s_att}, {"b": t_att})
    terms = method.loss_terms(out, {"label": y}, Progress(0, 0, 10, 10))
    assert_close(terms["attn"], 3.0 * attention_probs_loss(s_att, t_att, kind="mse",
                                                           heads="match"))
    assert_close(terms["kd"], 0.5 * kd_kl(s_log, t_log, temperature=2.0))
    assert_close(terms["ce"], 0.5 * hard_cross_entropy(s_log, y))


def test_method_errors_name_the_field() -> None:
    x = torch.randn(2, 40)
    student, teacher, method = _pair("match")  # 2 student heads vs 4 teacher heads
    with pytest.raises(ConfigError, match=r"method\.heads: 'match' .* 2 heads .* 4; use heads"):
        method.setup(student, teacher, x)
    student, teacher, method = _pair("mean", [["blocks.0", "blocks.1.attn.probs"]])
    with pytest.raises(ConfigError, match=r"method.pairs: student module 'blocks.0' gives shape "
                                          r"\(2, 11, 16\), not attention probabilities"):
        method.setup(student, teacher, x)
    torch.manual_seed(0)
    image = TinyTransformer((1, 8, 8), 10, dim=16, heads=2)  # `embed` gives (B, 16, 2, 2)
    method = build_method(AttentionDistillConfig(pairs=[["embed", "blocks.0.attn.probs"]]))
    with pytest.raises(ConfigError, match="not probability distributions"):
        method.setup(image, TinyTransformer((1, 8, 8), 10, dim=16, heads=2), torch.randn(2, 64))


class _HFLikeAttention(nn.Module):
    """Returns (attn_output, attn_weights) like a Hugging Face eager attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyTransformer((40,), 10, dim=16, heads=2, depth=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with capture(self.inner, ["blocks.0.attn.probs"]) as feats:
            logits = self.inner(x)
        return logits, feats["blocks.0.attn.probs"]


def test_output_index_reads_the_probabilities_from_a_tuple_output() -> None:
    wrapper = nn.Sequential(_HFLikeAttention())
    method = build_method(AttentionDistillConfig(pairs=[["0", "0"]], output_index=1))
    assert method.student_layers == ("0[1]",)
    method.setup(wrapper, wrapper, torch.randn(2, 40))
    plain = build_method(AttentionDistillConfig(pairs=[["0", "0"]]))  # reads the 2-D logits
    with pytest.raises(ConfigError, match=r"shape \(2, 10\).* set method\.output_index"):
        plain.setup(wrapper, wrapper, torch.randn(2, 40))
    with capture(wrapper, method.student_layers) as feats:
        _, probs = wrapper[0](torch.randn(3, 40))
    assert_close(feats["0[1]"], probs)


def test_output_index_on_a_hugging_face_bert() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100,
                                     attn_implementation="eager", output_attentions=True)
    bert = transformers.BertModel(config).eval()
    method = build_method(AttentionDistillConfig(
        pairs=[["encoder.layer.0.attention.self"] * 2], output_index=1))
    ids = torch.randint(0, 100, (3, 7))
    method.setup(bert, bert, ids)  # the probe accepts element 1 as probabilities
    with torch.no_grad(), capture(bert, method.student_layers) as feats:
        expected = bert(input_ids=ids, output_attentions=True).attentions[0]
    (key,) = method.student_layers
    assert feats[key].shape == (3, 2, 7, 7)
    assert_close(feats[key], expected)
