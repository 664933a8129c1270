"""Deep-supervision self-distillation (BYOT): exits, their KD from the final head, feature hints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.capture import capture
from kdistill.methods import Outputs, build_method
from kdistill.methods.self_distill import SelfDistillConfig
from kdistill.schedules import Progress


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def test_loss_terms_by_hand_with_feature_hint() -> None:
    student, x = _mlp(), torch.randn(7, 6)
    y = torch.randint(0, 3, (7,))
    cfg = SelfDistillConfig(layers=["1"], hint_layer="3", temperature=2.0, alpha=0.3,
                            hint_weight=0.5)
    method = build_method(cfg)
    method.setup(student, None, x[:2], num_samples=7)
    with capture(student, method.student_layers) as feats:
        logits = student(x)
    terms = method.loss_terms(Outputs(logits, None, dict(feats)), {"label": y},
                              Progress(0, 0, 1, 1))
    head, adapter = method.heads["0"], method.hint_adapters["0"]
    exit_logits = head(feats["1"])
    t = 2.0
    kl = F.kl_div(F.log_softmax(exit_logits / t, -1), F.softmax(logits.detach() / t, -1),
                  reduction="batchmean") * t * t
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, y))
    torch.testing.assert_close(terms["exit_ce"], 0.7 * F.cross_entropy(exit_logits, y))
    torch.testing.assert_close(terms["exit_kd"], 0.3 * kl)
    hint = F.mse_loss(adapter(feats["1"]), feats["3"].detach())
    torch.testing.assert_close(terms["exit_hint"], 0.5 * hint)
    assert adapter.weight.shape == (5, 8)  # exit width 8 -> final feature width 5
    terms["exit_hint"].backward()
    # The hint teaches the exit, never the final features it imitates.
    assert student[2].weight.grad is None or not student[2].weight.grad.any()
    assert student[0].weight.grad is not None and student[0].weight.grad.any()


def test_no_hint_term_without_hint_layer() -> None:
    student, x = _mlp(), torch.randn(4, 6)
    method = build_method(SelfDistillConfig(layers=["1"]))
    method.setup(student, None, x[:2], num_samples=4)
    assert len(method.hint_adapters) == 0
    with capture(student, method.student_layers) as feats:
        logits = student(x)
    terms = method.loss_terms(Outputs(logits, None, dict(feats)),
                              {"label": torch.zeros(4, dtype=torch.long)}, Progress(0, 0, 1, 1))
    assert set(terms) == {"ce", "exit_ce", "exit_kd"}


def test_unknown_hint_layer_is_named() -> None:
    from kdistill.errors import ConfigError

    method = build_method(SelfDistillConfig(layers=["1"], hint_layer="9"))
    with pytest.raises(ConfigError, match="no module named '9'"):
        method.setup(_mlp(), None, torch.randn(2, 6), num_samples=2)
