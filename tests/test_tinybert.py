"""TinyBERT's layer-wise objective: the masked hidden-state loss and the `tinybert` method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.capture import capture
from kdistill.errors import ConfigError
from kdistill.losses.features import hidden_mse
from kdistill.methods import build_method
from kdistill.methods.base import Outputs
from kdistill.methods.tinybert import TinyBERTConfig
from kdistill.models import build_model
from kdistill.schedules import Progress
from tests.test_text_classification import _tiny_bert

ATTN = "bert.encoder.layer.{}.attention.self"
PAIRS = {"hidden_pairs": [["tokens.0", "tokens.0"], ["tokens.1", "tokens.2"]],
         "attention_pairs": [[ATTN.format(0), ATTN.format(1)]], "output_index": 1}


def _progress(epoch: int = 0) -> Progress:
    return Progress(step=epoch * 10, epoch=epoch, total_steps=100, steps_per_epoch=10)


# --- hidden_mse ------------------------------------------------------------------------------

def test_hidden_mse_is_mse_without_mask_and_a_mean_over_real_tokens_with_one() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    assert torch.allclose(hidden_mse(s, t), F.mse_loss(s, t))
    assert hidden_mse(t, t) == 0
    mask = torch.rand(3, 7) > 0.4
    per_token = (s - t).pow(2).mean(dim=1)  # naive: channel mean per (sample, token)
    assert torch.allclose(hidden_mse(s, t, mask=mask), per_token[mask].mean())
    assert torch.allclose(hidden_mse(s, t, mask=mask, reduction="sum"), per_token[mask].sum())


def test_hidden_mse_ignores_padded_positions_in_value_and_gradient() -> None:
    torch.manual_seed(1)
    s = torch.randn(2, 4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    loss = hidden_mse(s, t, mask=mask)
    poisoned = s.detach().clone()
    poisoned[:, :, 4:] = float("inf")  # whatever sits at a padded token never leaks
    assert torch.allclose(hidden_mse(poisoned, t, mask=mask), loss)
    loss.backward()
    assert torch.all(s.grad[:, :, 4:] == 0) and torch.any(s.grad[:, :, :4] != 0)
    with pytest.raises(ValueError, match="same shape"):
        hidden_mse(s, t[:, :3])


# --- the method on tiny BERT encoders -----------------------------------------------------------

@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    path = _tiny_bert(tmp_path_factory.mktemp("bert"), layers=2, vocab=100)
    teacher = build_model("hf_encoder_classifier", input_shape=(16,), num_classes=3,
                          args={"path": path}).eval()
    torch.manual_seed(0)
    student = build_model("hf_encoder_student", input_shape=(16,), num_classes=3,
                          args={"init_from": path, "layers": 1, "random_init": True}).eval()
    return student, teacher


def _terms(method, student: nn.Module, teacher: nn.Module, ids: torch.Tensor,
           epoch: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    method.setup(student, teacher, ids)
    with torch.no_grad(), capture(teacher, method.teacher_layers) as t_feats:
        t_logits = teacher(ids)
        t_feats = dict(t_feats)
    with capture(student, method.student_layers) as s_feats:
        s_logits = student(ids)
        s_feats = dict(s_feats)
    out = Outputs(student_logits=s_logits, teacher_logits=t_logits, student_feats=s_feats,
                  teacher_feats=t_feats)
    batch = {"index": torch.arange(len(ids)), "input": ids, "label": torch.tensor([0, 1])}
    return method.loss_terms(out, batch, _progress(epoch))


def _ids(length: int) -> torch.Tensor:
    ids = torch.zeros(2, length, dtype=torch.long)  # pad id 0
    ids[0, :9] = torch.arange(1, 10)
    ids[1, :5] = torch.tensor([7, 3, 9, 4, 2])
    return ids


def test_terms_are_the_losses_of_each_pair_with_a_trained_map_per_pair(nets) -> None:  # type: ignore[no-untyped-def]
    student, teacher = nets
    method = build_method(TinyBERTConfig(**PAIRS, alpha=0.5, temperature=2.0))
    terms = _terms(method, student, teacher, _ids(12))
    assert set(terms) == {"hidden", "attn", "kd", "ce"}
    assert all(torch.isfinite(v) and v > 0 for k, v in terms.items())
    assert len(method.adapters) == 2  # one W_h per hidden pair, trained with the student
    assert all(isinstance(a.conv, nn.Conv1d) for a in method.adapters)
    assert {n for n, _ in method.named_parameters()} >= {"adapters.0.conv.weight"}


def test_padding_never_changes_the_layer_terms(nets) -> None:  # type: ignore[no-untyped-def]
    """The encoders mask padded keys, so real tokens' states are the same at any padded
    length; the layer terms then agree only because padded positions are left out."""
    student, teacher = nets
    masked = build_method(TinyBERTConfig(**PAIRS))
    torch.manual_seed(0)
    short = _terms(masked, student, teacher, _ids(10))
    torch.manual_seed(0)
    masked_long = build_method(TinyBERTConfig(**PAIRS))
    long = _terms(masked_long, student, teacher, _ids(16))
    for key in ("hidden", "attn"):
        assert torch.allclose(short[key], long[key], atol=1e-5), key
    torch.manual_seed(0)
    unmasked = _terms(build_method(TinyBERTConfig(**PAIRS, mask_padding=False)), student,
                      teacher, _ids(16))
    assert not torch.allclose(unmasked["hidden"], long["hidden"], atol=1e-4)


def test_two_steps_intermediate_layers_then_the_prediction_layer(nets) -> None:  # type: ignore[no-untyped-def]
    student, teacher = nets
    method = build_method(TinyBERTConfig(**PAIRS, intermediate_epochs=2))
    assert set(_terms(method, student, teacher, _ids(12), epoch=1)) == {"hidden", "attn"}
    assert set(_terms(method, student, teacher, _ids(12), epoch=2)) == {"kd", "ce"}


def test_bad_pairs_name_the_field(nets) -> None:  # type: ignore[no-untyped-def]
    student, teacher = nets
    with pytest.raises(ValueError, match="hidden_pairs"):
        TinyBERTConfig()
    method = build_method(TinyBERTConfig(hidden_pairs=[["tokens.1", "bert.pooler_free"]]))
    with pytest.raises(ConfigError, match=r"method\.hidden_pairs"):
        method.setup(student, teacher, _ids(12))
    # A module whose output is not (hidden, tokens) per sample: the classifier head.
    method = build_method(TinyBERTConfig(hidden_pairs=[["head", "head"]]))
    with pytest.raises(ConfigError, match="channels-first token states"):
        method.setup(student, teacher, _ids(12))

