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
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
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
