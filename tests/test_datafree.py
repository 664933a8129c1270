"""Data-free distillation (DAFL arXiv:1904.01186, DFAD arXiv:1912.11006, DeepInversion's BN
prior arXiv:1912.08795): losses by hand, one step, no real image used, resume, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdistill.build import build_optimizer
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger
from kdistill.losses import (
    activation_loss,
    bn_statistics_loss,
    class_balance_loss,
    l1_discrepancy,
    one_hot_loss,
)
from kdistill.methods import build_method
from kdistill.methods.datafree import DAFL, DFAD, DAFLConfig, DFADConfig
from kdistill.models.generator import Generator, save_sample_grid
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher, freeze_teacher

P = Progress(0, 0, 10, 10)


# --- losses by hand ------------------------------------------------------------------------


def test_one_hot_loss_by_hand() -> None:
    # logits [ln 3, 0]: softmax [0.75, 0.25], argmax 0 -> CE = −ln 0.75
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # second row: a tie, argmax 0, CE = ln 2
    assert float(one_hot_loss(logits)) == pytest.approx((-math.log(0.75) + math.log(2)) / 2)
    assert float(one_hot_loss(torch.tensor([[50.0, 0.0, 0.0]]))) == pytest.approx(0, abs=1e-12)


def test_activation_loss_by_hand() -> None:
    f = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert float(activation_loss(f)) == pytest.approx(-1.5)  # −(1 + 2 + 0 + 3) / 4


def test_class_balance_minimal_at_uniform_and_maximal_at_one_class() -> None:
    c = 4
    # Two confident samples on classes 0 and 1: p̄ = [½, ½, 0, 0] -> Σ p̄ ln p̄ = −ln 2.
    two = torch.tensor([[60.0, 0, 0, 0], [0, 60.0, 0, 0]])
    assert float(class_balance_loss(two)) == pytest.approx(-math.log(2), abs=1e-6)
    uniform = 60.0 * torch.eye(c)  # one confident sample per class: p̄ uniform
    one_class = torch.tensor([[60.0, 0, 0, 0]] * c)  # all on class 0: p̄ one-hot
    assert float(class_balance_loss(uniform)) == pytest.approx(-math.log(c), abs=1e-6)
    assert float(class_balance_loss(one_class)) == pytest.approx(0.0, abs=1e-6)
    # The uniform mean is the minimum: random batches never go below −ln C.
    torch.manual_seed(0)
    for _ in range(50):
        assert float(class_balance_loss(3 * torch.randn(8, c))) >= -math.log(c) - 1e-6
    # and the gradient at a uniform mean vanishes along the directions that keep Σ p̄ = 1.
    logits = torch.zeros(3, c, requires_grad=True)
    class_balance_loss(logits).backward()
    assert logits.grad is not None and logits.grad.abs().max() < 1e-7
    # A zero-probability class adds 0, not NaN (0·log 0 = 0).
    assert math.isfinite(float(class_balance_loss(torch.tensor([[1e4, 0.0]]))))


def test_bn_statistics_loss_by_hand() -> None:
    # channel 0: values [1, 3] -> mean 2, biased var 1; channel 1: [0, 0] -> mean 0, var 0
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    rm, rv = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    assert float(bn_statistics_loss(x, rm, rv)) == pytest.approx(0.0)
    # means off by (1, 1) -> ‖·‖ = √2; variances off by (0, 2) -> 2
    expected = math.sqrt(2) + 2
    assert float(bn_statistics_loss(x, rm + 1, rv + torch.tensor([0.0, 2.0]))) == pytest.approx(
        expected)
    # Spatial maps pool over batch and positions: (B, C, H, W) == the same values as (B·H·W, C).
    maps = torch.randn(3, 2, 4, 5)
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 2)
    torch.testing.assert_close(bn_statistics_loss(maps, rm, rv), bn_statistics_loss(flat, rm, rv))
    with pytest.raises(ValueError, match="running"):
        bn_statistics_loss(x, torch.zeros(3), torch.zeros(3))


def test_l1_discrepancy_by_hand() -> None:
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert float(l1_discrepancy(s, t)) == pytest.approx(1.5)
    assert float(l1_discrepancy(t, t)) == 0.0


# --- the generator -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 7, 9), (8, 8), (40,)])
def test_generator_output_shape(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    g = Generator(shape, latent_dim=5, width=8)
    assert g.sample(4).shape == (4, *shape)


# --- the methods on tiny nets --------------------------------------------------------------


def _net(seed: int, widths: tuple[int, int] = (4, 8), bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    a, b = widths
    # BN after a ReLU, where the generator can move the mean (right after the first conv,
    # on the generator's standardised output, the mean would be the conv's bias, fixed).
    norm: list[nn.Module] = [nn.BatchNorm2d(b)] if bn else []
    return nn.Sequential(nn.Conv2d(1, a, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(a, b, 3, padding=1), *norm, nn.ReLU(), nn.Flatten(),
                         nn.Linear(b * 64, 10))


def _bn_teacher() -> nn.Module:
    """A BN teacher whose running statistics are those of another generator's samples, so
    they are reachable (a generator's output is standardised, so arbitrary ones may not be)."""
    teacher = _net(1, bn=True)
    teacher[3].momentum = None  # cumulative average over the batches below
    torch.manual_seed(9)
    target = Generator((1, 8, 8), latent_dim=4, width=8)
    with torch.no_grad():
        for _ in range(10):
            teacher(target.sample(64))
    return freeze_teacher(teacher)


def _dafl(**kw: object) -> DAFL:
    method = build_method(DAFLConfig(**{"generator_width": 8, "latent_dim": 4, **kw}))
    assert isinstance(method, DAFL)
    return method


def _batch(n: int = 8, fill: float = float("nan")) -> dict[str, Tensor]:
    return {"index": torch.arange(n), "input": torch.full((n, 1, 8, 8), fill),
            "label": torch.zeros(n, dtype=torch.long)}


def _train(method: nn.Module, student: nn.Module, teacher: nn.Module, steps: int,
           ckpt: Path | None = None, *, batch_size: int = 8,
           student_lr: float | None = None) -> MetricsLogger:
    """Train through the engine on a loader of NaN images: any real pixel reaching the
    student (or the teacher) would make the loss NaN and the engine raise. Constant LR, so a
    resumed run with a larger max_steps follows the same schedule. `student_lr` 0 keeps the
    student fixed (plain SGD)."""
    x = torch.full((32, 1, 8, 8), float("nan"))
    loader = BatchLoader(x, torch.randint(0, 10, (32,)), batch_size=batch_size, seed=0)
    params = [*student.parameters(), *method.optimizer_parameters()]
    opt = (build_optimizer(params, TrainConfig().optimizer) if student_lr is None
           else torch.optim.SGD(params, lr=student_lr))
    logger = MetricsLogger()
    train(student, OnlineTeacher(teacher), method, loader, opt,  # type: ignore[arg-type]
          TrainConfig(epochs=100, max_steps=steps, log_every=1, lr_schedule=1.0), logger=logger,
          checkpoint_dir=ckpt)
    return logger


def _generator_steps(ckpt: Path) -> float:
    """Adam's step count of the generator, from the engine's latest checkpoint."""
    latest = ckpt / (ckpt / "latest").read_text().strip()
    trainer = torch.load(latest / "trainer.pt", weights_only=True)
    return float(trainer["auxiliary"]["state"][0]["step"])


@pytest.mark.parametrize("name", ["dafl", "dfad"])
def test_one_step_trains_student_and_generator_from_nan_data(name: str) -> None:
    student, teacher = _net(0, (3, 6)), freeze_teacher(_net(1))
    cfg = {"generator_width": 8, "latent_dim": 4, "generator_every": 1}
    method = build_method((DAFLConfig if name == "dafl" else DFADConfig)(**cfg))
    method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    gen = method.synth.generator  # type: ignore[union-attr]
    # The generator is the method's (checkpointed) but not the student optimizer's.
    assert method.optimizer_parameters() == []
    gen_ids = {id(p) for p in gen.parameters()}
    assert gen_ids <= {id(p) for p in method.parameters()}
    assert any(k.startswith("synth.generator.") for k in method.state_dict())
    s_before = [p.detach().clone() for p in student.parameters()]
    g_before = [p.detach().clone() for p in gen.parameters()]
    logger = _train(method, student, teacher, steps=1)
    assert all(math.isfinite(r["loss"]) for r in logger.records)
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, gen.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    keys = {k for r in logger.records for k in r}
    assert {"gen/one_hot", "gen/balance", "gen/activation"} <= keys if name == "dafl" else (
        "gen/discrepancy" in keys)


def test_prepare_batch_ignores_real_inputs_and_labels_with_teacher_argmax() -> None:
    student, teacher = _net(0, (3, 6)), freeze_teacher(_net(1))
    made = []
    for fill in (float("nan"), 5.0):  # other real pixels, same seed: the same batch
        method = _dafl()
        torch.manual_seed(0)
        method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
        made.append(method.prepare_batch(_batch(fill=fill), student, P))
    a, b = made
    assert torch.isfinite(a["input"]).all() and a["input"].shape == (8, 1, 8, 8)
    torch.testing.assert_close(a["input"], b["input"])
    assert torch.equal(a["index"], torch.arange(8))
    with torch.no_grad():
        assert torch.equal(a["label"], teacher(a["input"]).argmax(dim=1))


def test_generator_steps_and_every(tmp_path: Path) -> None:
    student, teacher = _net(0, (3, 6)), freeze_teacher(_net(1))
    method = _dafl(generator_steps=2, generator_every=3)
    method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    _train(method, student, teacher, steps=4, ckpt=tmp_path)
    assert _generator_steps(tmp_path) == 4.0  # trained at steps 0 and 3: 2 updates each


def test_bn_prior_needs_bn_layers_and_lowers_with_training() -> None:
    student = _net(0, (3, 6))
    with pytest.raises(ConfigError, match=r"method\.bn_weight"):
        _dafl(bn_weight=1.0).setup(student, freeze_teacher(_net(1)), torch.zeros(2, 1, 8, 8))
    teacher = _bn_teacher()
    method = _dafl(bn_weight=1.0, one_hot_weight=0, balance_weight=0, activation_weight=0,
                   generator_lr=0.05)
    method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    torch.manual_seed(0)
    logger = _train(method, student, teacher, steps=30, batch_size=32)
    losses = [r["gen/bn"] for r in logger.records if "gen/bn" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert all(len(m._forward_pre_hooks) == 0 for m in teacher.modules())


def test_replay_keeps_the_most_disagreeing_samples_and_mixes_them_in() -> None:
    student, teacher = _net(0, (3, 6)), freeze_teacher(_net(1))
    method = _dafl(replay_size=4, replay_fraction=0.5)
    method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    from kdistill.methods.base import Outputs

    x = torch.randn(6, 1, 8, 8)
    t = torch.zeros(6, 10)
    t[:, 0] = 10.0
    s = torch.zeros(6, 10)
    s[:, 0] = torch.tensor([10.0, -5, 0, 9, -9, 5])  # disagreement ranks: 4, 1, 2, 5, 0, 3
    batch = {"index": torch.arange(6), "input": x, "label": torch.zeros(6, dtype=torch.long),
             "replay_slot": torch.full((6,), -1)}
    method.synth.remember(Outputs(s, t), batch)
    kept = {int(i) for i in (method.synth.replay_x[:, 0, 0, 0][:, None]
                             == x[:, 0, 0, 0][None]).nonzero()[:, 1]}
    assert kept == {4, 1, 2, 5}
    torch.manual_seed(0)
    mixed = method.prepare_batch(_batch(8), student, P)
    slots = mixed["replay_slot"]
    assert (slots[:4] == -1).all() and (slots[4:] >= 0).all()
    assert torch.equal(mixed["input"][4:], method.synth.replay_x[slots[4:]])


def test_resume_keeps_generator_optimizer_and_replay(tmp_path: Path) -> None:
    def run(ckpt: Path | None, steps: int, seed_net: int = 0) -> tuple[DAFL, nn.Module]:
        student, teacher = _net(seed_net, (3, 6)), freeze_teacher(_net(1))
        method = _dafl(replay_size=8)
        torch.manual_seed(5)  # the generator's initial weights
        method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
        _train(method, student, teacher, steps, ckpt)
        return method, student

    straight, s_straight = run(None, 8)
    run(tmp_path, 4)  # 4 steps, checkpointed
    assert _generator_steps(tmp_path) == 4.0  # the generator's Adam state is checkpointed
    resumed, s_resumed = run(tmp_path, 8)  # a fresh process picks up at step 4
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, msg=k)
    for a, b in zip(s_straight.parameters(), s_resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert _generator_steps(tmp_path) == 8.0


def test_setup_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="synthesises its data from a teacher"):
        _dafl().setup(_net(0), None, torch.zeros(2, 1, 8, 8))
    teacher = freeze_teacher(nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten()))
    method = _dafl()
    method.setup(_net(0), teacher, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"method\.feature_layer"):
        method.auxiliary().loss_terms(_batch(), _net(0), P)
    named = _dafl(feature_layer="nope")
    named.setup(_net(0), freeze_teacher(_net(1)), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match=r"method\.feature_layer"):
        named.auxiliary().loss_terms(_batch(), _net(0), P)


def test_dfad_generator_ascends_the_discrepancy() -> None:
    student, teacher = _net(0, (3, 6)), freeze_teacher(_net(1))
    method = build_method(DFADConfig(generator_width=8, latent_dim=4, generator_every=1,
                                     generator_lr=0.05))
    assert isinstance(method, DFAD)
    method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    before = [p.detach().clone() for p in student.parameters()]
    torch.manual_seed(0)
    logger = _train(method, student, teacher, steps=20, batch_size=32, student_lr=0.0)
    gaps = [-r["gen/discrepancy"] for r in logger.records if "gen/discrepancy" in r]
    assert len(gaps) == 20
    assert sum(gaps[-4:]) > sum(gaps[:4])  # the student is fixed: the gap only grows
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_the_generator_is_not_in_the_students_optimizer() -> None:
    student, teacher = _net(0, (3, 6)), freeze_teacher(_net(1))
    method = _dafl()
    method.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    loader = BatchLoader(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long),
                         batch_size=8)
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1)
    with pytest.raises(ConfigError, match=r"optimizer: .*auxiliary network 'gen'"):
        train(student, OnlineTeacher(teacher), method, loader, opt, TrainConfig(epochs=1))


def test_sample_grid_writes_a_png(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = Generator((1, 8, 8), latent_dim=4, width=8)
    path = save_sample_grid(gen, _net(1), tmp_path / "grid.png", per_class=3, draws=40)
    assert path.read_bytes()[:4] == b"\x89PNG"
