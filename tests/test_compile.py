"""`train.compile`: the student's forward and the method's loss through torch.compile give the
eager losses and weights. The fast test compiles with the `aot_eager` backend (dynamo's graph
capture and AOT autograd, no C++ compiler); the slow one with inductor, the real backend."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn

from kdistill import BatchLoader, LoopSettings, MetricsLogger, OnlineTeacher, build_method, train
from kdistill.engine import step
from kdistill.methods.fitnet import FitNetConfig
from kdistill.methods.kd import KDConfig


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def _net(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 3))


def _fit(compiled: bool, method_name: str = "kd") -> tuple[list[float], list[torch.Tensor]]:
    x, y = _data()
    student, teacher = _net(0), _net(9, width=24)
    if method_name == "kd":
        method = build_method(KDConfig(temperature=3.0, alpha=0.7))
    else:  # a feature method: the captured student layer and an adapter, both compiled
        method = build_method(FitNetConfig(student_layer="1", teacher_layer="1"))
        method.setup(student, teacher, x[:2])
    opt = torch.optim.Adam([*student.parameters(), *method.optimizer_parameters()], lr=0.01)
    logger = MetricsLogger()
    # 120 samples in batches of 32: the last batch (24) changes the shapes mid-epoch.
    cfg = LoopSettings(epochs=2, log_every=1, compile=compiled,
                       lr_schedule={"kind": "cosine", "start": 1.0, "end": 0.1})
    train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=32, seed=1),
          opt, cfg, seed=4, logger=logger)
    return [r["loss"] for r in logger.records], [p.detach().clone() for p in student.parameters()]


def _check_equal(backend: str, method_name: str, tolerance: float) -> None:
    eager = _fit(False, method_name)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _fit(True, method_name)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2, f"{backend}: nothing was compiled"  # the student and the loss at least
    assert compiled[0] == pytest.approx(eager[0], rel=tolerance, abs=tolerance)
    for a, b in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("method_name", ["kd", "fitnet"])
def test_compiled_steps_equal_eager_steps(method_name: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step, "COMPILE_BACKEND", "aot_eager")
    _check_equal("aot_eager", method_name, 1e-6)


@pytest.mark.slow
def test_inductor_compiled_steps_equal_eager_steps() -> None:
    # Inductor fuses the loss into C++ kernels (a different summation order): close, not equal.
    _check_equal("inductor", "kd", 1e-5)


def test_a_scheduled_temperature_does_not_recompile_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A schedule's value is a Python float read inside the loss: compiling the loss would
    # specialise a graph per step (then fall back to eager). Its loss stays eager; the
    # student's forward is compiled once per batch shape.
    monkeypatch.setattr(step, "COMPILE_BACKEND", "aot_eager")
    x, y = _data()
    student, teacher = _net(0), _net(9, width=24)
    method = build_method(KDConfig(temperature={"kind": "linear", "start": 8, "end": 2}))
    assert step.scheduled(method) and not step.scheduled(build_method(KDConfig()))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=32, seed=1),
          torch.optim.Adam(student.parameters(), lr=0.01),
          LoopSettings(epochs=3, compile=True), seed=4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # 12 steps, 2 shapes
