"""The method contract, over every entry of METHODS (DESIGN.md), and kd's loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill.build import build_optimizer
from kdistill.capture import capture
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.methods import METHODS, Outputs, build_method
from kdistill.methods.kd import KDConfig
from kdistill.metrics import MetricsLogger
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name: str) -> None:
    method = build_method(METHODS[name].config_type())
    student, teacher_net = _net(0), _net(1)
    before = [p.detach().clone() for p in student.parameters()]
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    loader = BatchLoader(x, y, batch_size=16, seed=0)
    opt = build_optimizer([*student.parameters(), *method.parameters()],
                          TrainConfig().optimizer)
    logger = MetricsLogger()
    teacher = OnlineTeacher(teacher_net) if method.uses_teacher else None
    train(student, teacher, method, loader, opt, TrainConfig(epochs=1, log_every=1),
          logger=logger)
    assert all(math.isfinite(r["loss"]) for r in logger.records)
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is not None for p in method.parameters())  # every adapter trained
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert _hooks(student) == 0 and _hooks(teacher_net) == 0
    assert METHODS[name].paper


def test_kd_terms_by_hand() -> None:
    # student [0, 0], teacher [ln 3, 0], T = 2, alpha = 0.75, label 0:
    # p_T = softmax([ln3/2, 0]) = [√3, 1]/(√3+1); q_T = [0.5, 0.5]
    # KL = Σ p log(p/q); kd term = alpha · T² · KL; ce term = (1 − alpha) · ln 2
    method = build_method(KDConfig(temperature=2.0, alpha=0.75))
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    terms = method.loss_terms(Outputs(s, t), {"label": torch.tensor([0])},
                              Progress(0, 0, 10, 10))
    assert float(terms["kd"]) == pytest.approx(0.75 * 4 * kl, rel=1e-6)
    assert float(terms["ce"]) == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_kd_schedules_follow_progress() -> None:
    method = build_method(KDConfig(temperature={"kind": "linear", "start": 8, "end": 2},
                                   alpha={"kind": "step", "values": [0.7, 0.3],
                                          "milestones": [0.5]}))
    assert method.scalars(Progress(0, 0, 11, 11)) == {"temperature": 8.0, "alpha": 0.7}
    assert method.scalars(Progress(10, 0, 11, 11)) == {"temperature": 2.0, "alpha": 0.3}


def test_soft_ce_variant_has_the_same_student_gradient() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    grads = []
    for soft_loss in ("kl", "soft_ce"):
        method = build_method(KDConfig(temperature=3.0, alpha=1.0, soft_loss=soft_loss))
        terms = method.loss_terms(Outputs(s, t), {"label": torch.zeros(4, dtype=torch.long)},
                                  Progress(0, 0, 1, 1))
        grads.append(torch.autograd.grad(terms["kd"], s)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_capture_by_name_removes_hooks_and_suggests_names() -> None:
    from kdistill.errors import ConfigError

    net = _net(0)
    with capture(net, ["2"]) as feats:
        net(torch.randn(3, 1, 8, 8))
        assert feats["2"].shape == (3, 32)
    assert _hooks(net) == 0
    lstm = nn.LSTM(4, 5, batch_first=True)
    with capture(lstm, [""]) as feats:  # "" is the root; tuple outputs give the first tensor
        lstm(torch.randn(2, 3, 4))
        assert feats[""].shape == (2, 3, 5)
    with pytest.raises(ConfigError, match="no module named 'fc1'"), capture(net, ["fc1"]):
        pass
    assert _hooks(net) == 0
