"""Device and precision choices (kdistill.devices); the CPU parts run everywhere."""

from __future__ import annotations

import pytest
import torch

from kdistill import devices
from kdistill.config import load_config
from kdistill.errors import ConfigError


def test_resolve_names() -> None:
    assert devices.resolve("cpu") == torch.device("cpu")
    auto = devices.resolve("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "mps"
                         if torch.backends.mps.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"train.device: expected auto, cpu, cuda"):
        devices.resolve("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message without a GPU")
def test_cuda_without_a_gpu_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"teacher.device: cuda:1: no CUDA GPU is visible"):
        devices.resolve("cuda:1", where="teacher.device")


def test_precision_rules() -> None:
    cpu = torch.device("cpu")
    devices.check_precision("bf16", cpu, where="train.precision")
    with pytest.raises(ConfigError, match=r"train.precision: fp16 autocast runs on a GPU"):
        devices.check_precision("fp16", cpu, where="train.precision")
    assert devices.grad_scaler(cpu, "bf16") is None and devices.grad_scaler(cpu, "fp32") is None
    layer = torch.nn.Linear(4, 4)
    with devices.autocast(cpu, "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with devices.autocast(cpu, "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_batches_and_models_move() -> None:
    cpu = torch.device("cpu")
    batch = {"input": torch.ones(2), "index": torch.arange(2), "note": "x"}
    assert devices.to(batch, cpu) == batch
    model = torch.nn.Linear(2, 2)
    with devices.on(model, cpu) as m:
        assert devices.model_device(m) == cpu
    assert devices.ddp_backend(cpu) == "gloo"
    assert devices.ddp_backend(torch.device("cuda")) == "cpu:gloo,cuda:nccl"


def test_recipe_fields() -> None:
    cfg = load_config(None, ["train.device=cpu", "teacher.device=cpu", "train.precision=bf16"])
    assert (cfg.train.device, cfg.teacher.device, cfg.train.precision) == ("cpu", "cpu", "bf16")
    with pytest.raises(ConfigError, match=r"train.device: String should match pattern"):
        load_config(None, ["train.device=tpu"])


# -- the engine's placement and precision (kdistill.engine.placement, engine.precision) ---------


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 2))


def _fit(cfg, *, student=None, teacher=None, method=None, logger=None, ckpt=None,
         batch_size: int = 16):
    from kdistill import BatchLoader, build_method, train
    from kdistill.methods.kd import KDConfig

    x, y = _data()
    student = student if student is not None else _net(0)
    method = method or build_method(KDConfig(temperature=2.0, alpha=0.5))
    teacher = teacher if teacher is not None else _net(9)
    opt = torch.optim.SGD([*student.parameters(), *method.optimizer_parameters()], lr=0.1,
                          momentum=0.9)
    train(student, teacher, method, BatchLoader(x, y, batch_size=batch_size, seed=1), opt, cfg,
          seed=3, logger=logger, checkpoint_dir=ckpt)
    return student


def test_the_device_comes_from_the_settings_or_stays_the_students() -> None:
    from kdistill import LoopSettings, TrainSettings
    from kdistill.engine import placement

    student = _net(0)
    assert placement.device_of(LoopSettings(), student) == devices.model_device(student)
    assert placement.device_of(LoopSettings(device="cpu"), student) == torch.device("cpu")
    assert placement.device_of(TrainSettings(), student) == devices.resolve("auto")
    with pytest.raises(ConfigError, match=r"^cfg.device: expected auto, cpu"):
        placement.device_of(LoopSettings.model_construct(device="tpu"), student)


def test_fp16_on_the_cpu_is_one_config_error_naming_the_field() -> None:
    from kdistill import LoopSettings, TrainSettings

    for cfg, field in ((LoopSettings(precision="fp16"), "cfg.precision"),
                       (TrainSettings(precision="fp16", device="cpu"), "train.precision")):
        with pytest.raises(ConfigError, match=rf"^{field}: fp16 autocast runs on a GPU"):
            _fit(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_a_cuda_recipe_without_a_gpu_is_one_config_error() -> None:
    from kdistill import TrainSettings

    with pytest.raises(ConfigError, match=r"^train.device: cuda: no CUDA GPU is visible"):
        _fit(TrainSettings(device="cuda", epochs=1))


def test_batches_and_teacher_outputs_are_moved_to_the_students_device(monkeypatch) -> None:
    # On a machine with only a CPU every device is the CPU, so the moves are observed: every
    # batch goes through devices.to and every teacher output through placement.to_device,
    # each towards the student's device.
    from kdistill import LoopSettings
    from kdistill.engine import loop, step

    moved: list[tuple[str, torch.device]] = []
    to_batch, to_output = loop.devices.to, step.to_device
    monkeypatch.setattr(loop.devices, "to", lambda b, d: moved.append(("batch", d))
                        or to_batch(b, d))
    monkeypatch.setattr(step, "to_device", lambda v, d: moved.append(("teacher", d))
                        or to_output(v, d))
    student = _fit(LoopSettings(), batch_size=16)
    target = devices.model_device(student)
    assert [k for k, _ in moved].count("batch") == 4  # 64 samples, batches of 16
    assert [k for k, _ in moved].count("teacher") == 8  # logits and features, per batch
    assert all(d == target for _, d in moved)


def test_teacher_outputs_keep_their_kind_on_the_device() -> None:
    from kdistill.engine.placement import to_device
    from kdistill.teachers import TopK

    cpu = torch.device("cpu")
    topk = TopK(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    out = to_device(topk, cpu)
    assert isinstance(out, TopK) and out.logprobs is topk.logprobs  # already there: no copy
    feats = {"a": torch.ones(2)}
    assert to_device(feats, cpu)["a"] is feats["a"]


def test_the_optimizer_state_follows_the_parameters() -> None:
    from kdistill.engine.placement import move_optimizer_state

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    # The model moves after its optimiser has state (meta: a device that exists without a GPU).
    torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to("meta")))
    move_optimizer_state(opt)
    assert opt.state[p]["exp_avg"].device == p.device == torch.device("meta")
    assert opt.state[p]["step"].device.type == "cpu"  # torch keeps Adam's counter on the CPU


def test_bf16_autocasts_the_networks_and_keeps_the_loss_in_fp32() -> None:
    from kdistill import LoopSettings, build_method
    from kdistill.methods.kd import KDConfig

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    method = build_method(KDConfig(temperature=2.0, alpha=0.5))
    loss_terms = method.loss_terms

    def spy(out, batch, progress):  # type: ignore[no-untyped-def]
        terms = loss_terms(out, batch, progress)
        seen.append((out.student_logits.dtype, terms["kd"].dtype))
        return terms

    method.loss_terms = spy  # type: ignore[method-assign]
    student = _fit(LoopSettings(precision="bf16"), method=method)
    assert seen and all(s == (torch.bfloat16, torch.float32) for s in seen)
    assert all(p.dtype == torch.float32 for p in student.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages without a GPU")
@pytest.mark.parametrize(("override", "field"), [
    ("teacher.device=cuda", "teacher.device"),
    ("teacher.train.device=cuda:0", "teacher.train.device"),
    ("teacher.train.precision=fp16", "teacher.train.precision"),
    ("train.precision=fp16", "train.precision")])
def test_every_device_and_precision_is_checked_before_anything_runs(
        override: str, field: str) -> None:
    from kdistill.build import check_devices

    with pytest.raises(ConfigError, match=rf"^{field}: "):
        check_devices(load_config(None, [override]))


def test_the_teacher_trains_where_it_will_sit() -> None:
    cfg = load_config(None, ["teacher.device=cpu"])
    assert cfg.teacher.train.device is None  # null: teacher.device, else train.device
    with pytest.raises(ConfigError, match=r"transfer.finetune.strategy"):
        load_config(None, ["data.name=general_text", "data.tokenizer=minilm", "baseline=false",
                           "method.name=embed_kd", "student.model.arch=hf_sentence_student",
                           "transfer.finetune.strategy=fsdp"])
