"""The engine: resume bit-for-bit, accumulation = one big batch, cache use, NaN stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.build import build_optimizer
from kdistill.cache import CacheKey, build_cache
from kdistill.checkpoint import latest_checkpoint
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.errors import TrainingError
from kdistill.logger import MetricsLogger, read_metrics
from kdistill.methods import Method, build_method
from kdistill.methods.base import Auxiliary
from kdistill.methods.ce import CEConfig
from kdistill.methods.kd import KDConfig
from kdistill.teachers import CachedTeacher, OnlineTeacher


def data(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def mlp(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def fit(cfg: TrainConfig, *, student: nn.Module, teacher=None, method=None, ckpt=None,
        logger=None, batch_size: int = 16) -> nn.Module:
    x, y = data()
    method = method or build_method(KDConfig(temperature=3.0, alpha=0.7))
    loader = BatchLoader(x, y, batch_size=batch_size, seed=1)
    opt = build_optimizer([*student.parameters(), *method.parameters()], cfg.optimizer)
    train(student, teacher or OnlineTeacher(mlp(9)), method, loader, opt, cfg, seed=5,
          checkpoint_dir=ckpt, logger=logger)
    return student


class CrashAt(MetricsLogger):
    """Simulates a crash: raises when a record for `step` is logged."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log(self, record: dict) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt("simulated crash")
        super().log(record)


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, log_every=1, checkpoint_every_steps=5,
                      optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
                      lr_schedule={"kind": "cosine", "start": 1.0, "end": 0.1})
    straight = fit(cfg, student=mlp(0, dropout=0.3))
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, student=mlp(0, dropout=0.3), ckpt=tmp_path, logger=CrashAt(6))
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    resumed = fit(cfg, student=mlp(123, dropout=0.3), ckpt=tmp_path)  # other init: overwritten
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_gradient_accumulation_equals_one_big_batch() -> None:
    # 4 micro-batches of 3, 3, 3, 1 samples must give the gradient of one batch of 10.
    x, y = data(10)
    results = []
    for batch_size, accum in ((10, 1), (3, 4)):
        student = mlp(0)
        method = build_method(CEConfig())
        cfg = TrainConfig(epochs=1, grad_accum=accum, optimizer={"name": "sgd", "lr": 0.5,
                                                                  "momentum": 0.0})
        opt = build_optimizer(student.parameters(), cfg.optimizer)
        logger = MetricsLogger()
        train(student, None, method, BatchLoader(x, y, batch_size=batch_size, seed=3), opt, cfg,
              logger=logger)
        results.append((student, logger.records[0]["loss"]))
    (big, big_loss), (acc, acc_loss) = results
    assert acc_loss == pytest.approx(big_loss, rel=1e-6)
    for a, b in zip(big.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cached_teacher_gives_the_same_training_without_teacher_forwards(tmp_path: Path) -> None:
    x, _ = data()
    teacher_net = mlp(9)
    online = OnlineTeacher(teacher_net)
    cache = build_cache(tmp_path / "cache", teacher_net, x, CacheKey("t", "d"), batch_size=64)
    cached = CachedTeacher(cache)
    cfg = TrainConfig(epochs=1)
    a = fit(cfg, student=mlp(0), teacher=online)
    b = fit(cfg, student=mlp(0), teacher=cached)
    assert online.forwards == 13 and cached.forwards == 0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_stays_in_eval() -> None:
    teacher_net = mlp(9, dropout=0.5)
    fit(TrainConfig(epochs=1), student=mlp(0), teacher=OnlineTeacher(teacher_net))
    assert not teacher_net.training
    assert all(p.grad is None and not p.requires_grad for p in teacher_net.parameters())


class NaNAfter(Method):
    """A method whose loss turns NaN at a given step (what a diverging run looks like)."""

    config_type = CEConfig
    uses_teacher = False

    def __init__(self, step: int) -> None:
        super().__init__(CEConfig())
        self.step = step

    def loss_terms(self, out, batch, progress):
        ce = nn.functional.cross_entropy(out.student_logits, batch["label"])
        return {"ce": ce * (float("nan") if progress.step >= self.step else 1.0)}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, checkpoint_every_steps=2)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5.*term 'ce'"):
        fit(cfg, student=mlp(0), method=NaNAfter(5), ckpt=tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_non_finite_gradient_with_a_finite_loss_stops_before_the_step(tmp_path: Path) -> None:
    # A gradient hook turns one weight's gradient into NaN from step 5 on: the loss stays
    # finite, so only the gradient check can catch it, before the optimiser steps on it.
    cfg = TrainConfig(epochs=1, checkpoint_every_steps=2)
    student = mlp(0)
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] > 5 else grad

    student[0].weight.register_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite gradient at step 5.*loss terms finite"):
        fit(cfg, student=student, method=NaNAfter(10**6), ckpt=tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert torch.isfinite(student[0].weight).all()  # the poisoned step was not taken


def test_every_term_and_schedule_value_is_logged(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, log_every=2)
    logger = MetricsLogger(tmp_path / "metrics.jsonl")
    fit(cfg, student=mlp(0), logger=logger)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 13]
    for key in ("loss", "loss/kd", "loss/ce", "temperature", "alpha", "lr", "samples_per_s"):
        assert key in records[0]
    assert records[0]["loss"] == pytest.approx(records[0]["loss/kd"] + records[0]["loss/ce"])


def test_clip_grad_norm_bounds_the_update() -> None:
    # One SGD step without momentum moves the weights by lr * grad; clipped, |grad| <= 1e-3.
    x, y = data(16)
    student = mlp(0)
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    cfg = TrainConfig(epochs=1, clip_grad_norm=1e-3, lr_schedule=1.0,
                      optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0})
    opt = build_optimizer(student.parameters(), cfg.optimizer)
    train(student, None, build_method(CEConfig()), BatchLoader(x, y, batch_size=16), opt, cfg)
    after = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_trains_with_fp32_loss_math() -> None:
    cfg = TrainConfig(epochs=1, precision="bf16", log_every=1)
    logger = MetricsLogger()
    student = fit(cfg, student=mlp(0), logger=logger)
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights fp32
    losses = [r["loss"] for r in logger.records]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_second_save_at_the_same_step_keeps_a_loadable_checkpoint(tmp_path: Path) -> None:
    from kdistill.checkpoint import save_checkpoint

    net = mlp(0)
    method = build_method(CEConfig())
    for _ in range(2):
        save_checkpoint(tmp_path, student=net, method=method, trainer_state={},
                        state={"step": 13})
    assert latest_checkpoint(tmp_path).name == "step-00000013.1"
    assert (tmp_path / "step-00000013").is_dir()  # the previous one is kept until the next
    (tmp_path / "latest").unlink()  # a lost pointer falls back to the newest complete one
    assert latest_checkpoint(tmp_path).name == "step-00000013.1"


def test_a_fresh_start_replaces_the_metrics_of_a_crashed_attempt(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, log_every=2)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, student=mlp(0), ckpt=tmp_path / "ck", logger=CrashAtFile(tmp_path, 6))
    fit(cfg, student=mlp(0), ckpt=tmp_path / "ck", logger=MetricsLogger(tmp_path / "m.jsonl"))
    steps = [r["step"] for r in read_metrics(tmp_path / "m.jsonl")]
    assert steps == [2, 4, 6, 8, 10, 12, 13]


class CrashAtFile(MetricsLogger):
    def __init__(self, directory: Path, step: int) -> None:
        super().__init__(directory / "m.jsonl")
        self.step = step

    def log(self, record: dict) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt("simulated crash")
        super().log(record)


def test_max_steps_mid_epoch_still_evaluates_the_final_model() -> None:
    calls = []
    x, y = data()
    student, method = mlp(0), build_method(CEConfig())
    cfg = TrainConfig(epochs=3, max_steps=5)
    opt = build_optimizer(student.parameters(), cfg.optimizer)
    state = train(student, None, method, BatchLoader(x, y, batch_size=16), opt, cfg,
                  evaluate=lambda: calls.append(1) or {"accuracy": 0.5})
    assert state.step == 5 and calls == [1]


def test_resumed_run_logs_the_same_losses(tmp_path: Path) -> None:
    # grad_accum 3, logs every 4 steps, checkpoints every 3: the crash at the step-8 log comes
    # after a checkpoint at step 6 whose logging window (steps 6..) is still open.
    cfg = TrainConfig(epochs=2, grad_accum=3, log_every=4, checkpoint_every_steps=3)
    straight = MetricsLogger(tmp_path / "straight.jsonl")
    fit(cfg, student=mlp(0), logger=straight)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, student=mlp(0), ckpt=tmp_path / "ck", logger=CrashAtFile(tmp_path, 8))
    fit(cfg, student=mlp(0), ckpt=tmp_path / "ck", logger=MetricsLogger(tmp_path / "m.jsonl"))

    def losses(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(path)]

    assert [r["step"] for r in losses(tmp_path / "m.jsonl")] == [4, 5, 8, 10]
    assert losses(tmp_path / "m.jsonl") == losses(tmp_path / "straight.jsonl")


def test_resume_after_an_epoch_end_evaluation_logs_it_once(tmp_path: Path) -> None:
    # 13 steps per epoch and checkpoint_every_steps=13: the step-13 checkpoint is the
    # epoch-end one, taken after epoch 1's evaluation; a crash right after that evaluation
    # resumes without logging it twice or losing it.
    x, y = data()
    cfg = TrainConfig(epochs=2, checkpoint_every_steps=13, log_every=100, eval_every_epochs=1)

    def go(logger: MetricsLogger) -> None:
        student, method = mlp(0), build_method(CEConfig())
        opt = build_optimizer(student.parameters(), cfg.optimizer)
        train(student, None, method, BatchLoader(x, y, batch_size=16), opt, cfg, logger=logger,
              evaluate=lambda: {"accuracy": 0.5}, checkpoint_dir=tmp_path / "ck")

    class CrashAfterVal(MetricsLogger):
        def log(self, record: dict) -> None:
            super().log(record)
            if record["split"] == "val":
                raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        go(CrashAfterVal(tmp_path / "m.jsonl"))
    go(MetricsLogger(tmp_path / "m.jsonl"))
    val = [r["step"] for r in read_metrics(tmp_path / "m.jsonl") if r["split"] == "val"]
    assert val == [13, 26]


class ToyAux(Method):
    """CE, plus an auxiliary network: 4 inputs `z` pulled towards where the student outputs 1
    (a stand-in for a data-free generator, whose loss also runs the student)."""

    config_type = CEConfig
    uses_teacher = False

    def __init__(self, *, adam: bool = False, steps: int = 1, every: int = 1,
                 nan_at: int | None = None) -> None:
        super().__init__(CEConfig())
        self.z = nn.Parameter(torch.randn(4, 12, generator=torch.Generator().manual_seed(0)))
        self.adam, self.steps, self.every, self.nan_at = adam, steps, every, nan_at
        self.calls = 0

    def auxiliary(self) -> Auxiliary:
        def optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return (torch.optim.Adam(params, lr=0.05) if self.adam
                    else torch.optim.SGD(params, lr=1.0))

        return Auxiliary("toy", [self.z], optimizer, self.fit, steps=self.steps,
                         every=self.every)

    def fit(self, batch, student, progress):  # type: ignore[no-untyped-def]
        self.calls += 1
        loss = (student(self.z) - 1).pow(2).mean()
        return {"fit": loss * (float("nan") if progress.step == self.nan_at else 1.0)}

    def loss_terms(self, out, batch, progress):  # type: ignore[no-untyped-def]
        return {"ce": nn.functional.cross_entropy(out.student_logits, batch["label"])}


def _fit_aux(method: ToyAux, cfg: TrainConfig, *, student: nn.Module | None = None,
             ckpt: Path | None = None, logger: MetricsLogger | None = None) -> nn.Module:
    x, y = data()
    student = student or mlp(0)
    opt = build_optimizer([*student.parameters(), *method.optimizer_parameters()],
                          cfg.optimizer)
    train(student, None, method, BatchLoader(x, y, batch_size=16, seed=1), opt, cfg, seed=5,
          checkpoint_dir=ckpt, logger=logger)
    return student


def test_auxiliary_steps_are_clipped_scheduled_and_never_reach_the_student() -> None:
    # SGD at lr 1 on z: one update moves z by lr · schedule · clipped gradient = 0.5 · 1e-3.
    method = ToyAux()
    assert method.optimizer_parameters() == []  # z is stepped by the engine alone
    student = mlp(0)
    backward_passes = []
    student[0].weight.register_hook(lambda g: backward_passes.append(1))
    z0 = method.z.detach().clone()
    cfg = TrainConfig(epochs=1, max_steps=1, clip_grad_norm=1e-3, lr_schedule=0.5)
    _fit_aux(method, cfg, student=student)
    assert float((method.z.detach() - z0).norm()) == pytest.approx(5e-4, rel=1e-4)
    # One gradient reached the student: its own loss's. The auxiliary loss ran the student
    # too, but its gradient was taken w.r.t. z only.
    assert method.calls == 1 and len(backward_passes) == 1
    assert method.z.grad is None


def test_auxiliary_cadence_logging_and_a_non_finite_auxiliary_loss(tmp_path: Path) -> None:
    method = ToyAux(steps=2, every=3)
    logger = MetricsLogger()
    _fit_aux(method, TrainConfig(epochs=1, max_steps=7, log_every=1), logger=logger)
    assert method.calls == 6  # steps 0, 3 and 6, two updates each
    assert all("toy/fit" in r for r in logger.records)
    with pytest.raises(TrainingError, match=r"non-finite loss in the auxiliary network 'toy' "
                                            r"at step 2.*term 'fit'"):
        _fit_aux(ToyAux(nan_at=2), TrainConfig(epochs=1, checkpoint_every_steps=1),
                 ckpt=tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_resume_with_an_auxiliary_optimizer_equals_the_straight_run(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, log_every=1, checkpoint_every_steps=5,
                      lr_schedule={"kind": "cosine", "start": 1.0, "end": 0.1})
    straight_method = ToyAux(adam=True, steps=2, every=2)
    straight = _fit_aux(straight_method, cfg)
    with pytest.raises(KeyboardInterrupt):
        _fit_aux(ToyAux(adam=True, steps=2, every=2), cfg, ckpt=tmp_path, logger=CrashAt(8))
    trainer = torch.load(latest_checkpoint(tmp_path) / "trainer.pt", weights_only=True)
    assert trainer["auxiliary"]["state"][0]["step"] == 6  # steps 0, 2, 4: 2 Adam updates each
    resumed_method = ToyAux(adam=True, steps=2, every=2)
    resumed = _fit_aux(resumed_method, cfg, student=mlp(123), ckpt=tmp_path)
    assert torch.equal(straight_method.z, resumed_method.z)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# -- fp16's gradient scaler, exercised on the CPU ----------------------------------------------
# fp16 autocast needs a GPU, but torch's GradScaler runs on the CPU: these tests give fp32 (or
# bf16) training a real, enabled scaler, so the scaler's code path (scale, unscale before the
# checks and clipping, skipped steps, its checkpointed state) runs here.


@pytest.fixture
def cpu_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdistill import devices

    monkeypatch.setattr(devices, "grad_scaler", lambda device, precision: torch.amp.GradScaler(
        "cpu", init_scale=2.0**10, growth_interval=3))


def _poison_from(student: nn.Module, first: int, last: int | None = None) -> None:
    """The gradient of student[0].weight is inf in backward passes first..last (0-based)."""
    calls = {"n": -1}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        hit = calls["n"] >= first and (last is None or calls["n"] <= last)
        return grad * float("inf") if hit else grad

    student[0].weight.register_hook(hook)


def _scaled_cfg(**kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    return TrainConfig(epochs=1, log_every=1, lr_schedule=1.0, clip_grad_norm=5.0,
                       optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, **kw)


def test_a_scaled_run_equals_the_unscaled_one(cpu_scaler: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Power-of-two scales: scaling, then unscaling before clipping, changes no bit.
    logger = MetricsLogger()
    scaled = fit(_scaled_cfg(), student=mlp(0), logger=logger)
    scales = [r["amp/scale"] for r in logger.records]
    assert scales[:4] == [2.0**10, 2.0**10, 2.0**11, 2.0**11]  # grows every 3 good steps
    from kdistill import devices

    monkeypatch.setattr(devices, "grad_scaler", lambda device, precision: None)
    plain = fit(_scaled_cfg(), student=mlp(0))
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_overflowing_step_is_skipped_by_the_scaler_and_logged(cpu_scaler: None) -> None:
    before = fit(_scaled_cfg(max_steps=2), student=mlp(0))
    student = mlp(0)
    _poison_from(student, 2, 2)  # the third step's gradient is inf: no TrainingError
    logger = MetricsLogger()
    after = fit(_scaled_cfg(max_steps=3), student=student, logger=logger)
    for a, b in zip(before.parameters(), after.parameters(), strict=True):
        assert torch.equal(a, b)  # the skipped step changed nothing
    skipped = [r["amp/skipped_steps"] for r in logger.records]
    assert skipped == [0, 0, 1]
    assert logger.records[2]["amp/scale"] == 2.0**9  # halved: the scaler's back-off


def test_overflowing_at_every_scale_stops_the_run(cpu_scaler: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from kdistill.engine import precision

    monkeypatch.setattr(precision, "MAX_SKIPS_IN_A_ROW", 3)
    student = mlp(0)
    _poison_from(student, 1)
    with pytest.raises(TrainingError, match=r"fp16: 3 steps in a row skipped .* up to step 3"):
        fit(_scaled_cfg(), student=student)


def test_resume_restores_the_scalers_state(cpu_scaler: None, tmp_path: Path) -> None:
    # A skip at step 2 and growth every 3 good steps: the scale at resume (step 5) is neither
    # the initial one nor reachable without the checkpointed state.
    def go(ckpt: Path | None, logger: MetricsLogger, poison: bool = True) -> nn.Module:
        student = mlp(0)
        if poison:  # the resumed run starts at step 5, after the poisoned step
            _poison_from(student, 2, 2)
        return fit(_scaled_cfg(checkpoint_every_steps=5), student=student, ckpt=ckpt,
                   logger=logger)

    straight = MetricsLogger(tmp_path / "straight.jsonl")
    a = go(None, straight)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "ck", CrashAtFile(tmp_path, 7))
    b = go(tmp_path / "ck", MetricsLogger(tmp_path / "m.jsonl"), poison=False)

    def scales(path: Path) -> list[tuple[int, float, float]]:
        return [(r["step"], r["amp/scale"], r["amp/skipped_steps"]) for r in read_metrics(path)]

    assert scales(tmp_path / "m.jsonl") == scales(tmp_path / "straight.jsonl")
    assert len({s for _, s, _ in scales(tmp_path / "m.jsonl")}) > 2
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_auxiliary_network_has_its_own_scaler(cpu_scaler: None) -> None:
    logger = MetricsLogger()
    _fit_aux(ToyAux(adam=True), TrainConfig(epochs=1, max_steps=4, log_every=1), logger=logger)
    assert all("toy/amp/scale" in r and "amp/scale" in r for r in logger.records)
