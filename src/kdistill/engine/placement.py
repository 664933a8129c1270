"""Where training runs: the device the settings name, the student and method moved there, the
optimiser's state following them, and teacher outputs brought to the student.

The rule (docs/hardware.md): a recipe's `train.device` (`TrainSettings`, default `auto`) is
resolved by `kdistill.devices.resolve`; a `LoopSettings` without a `device` (the Python API's
default) means the student's current device, so `train()` never moves a model its caller did
not ask to move. The teacher is never moved here: it runs where its parameters are (the
pipeline places it on `teacher.device`), and its outputs come to the student's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import devices
from kdistill.config import TrainSettings
from kdistill.teachers import TopK


def where(cfg: object, field: str) -> str:
    """The name a settings error carries: the recipe's `train.<field>` or `cfg.<field>`."""
    return f"train.{field}" if isinstance(cfg, TrainSettings) else f"cfg.{field}"


def device_of(cfg: Any, student: nn.Module) -> torch.device:
    """The training device `cfg` names (None: where the student's parameters are)."""
    name = getattr(cfg, "device", None)
    if name is None:
        return devices.model_device(student)
    return devices.resolve(name, where=where(cfg, "device"))


def resolve(cfg: Any, student: nn.Module) -> torch.device:
    """`cfg`'s device, checked with its precision: a `ConfigError` naming the field when they
    do not fit this machine (no GPU; fp16 on the CPU)."""
    device = device_of(cfg, student)
    devices.check_precision(getattr(cfg, "precision", "fp32"), device,
                            where=where(cfg, "precision"))
    return device


def place(student: nn.Module, method: nn.Module | None, cfg: Any = None) -> torch.device:
    """Resolve `cfg`'s device and precision (`resolve`) and move `student` and `method`
    (adapters, buffers such as memory banks, a data-free generator) there; returns the device.

    `train()` calls this itself and moves an optimiser's existing state along, so calling it
    first is optional; doing so before `method.setup` and the optimizer are built keeps every
    tensor on one device from the start (adapters probed and created there)."""
    device = resolve(cfg, student)
    student.to(device)
    if method is not None:
        method.to(device)
    return device


def move_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """An optimiser's state tensors onto their parameters' devices (state made before the
    model moved). Adam's `step` counter stays where it is: torch keeps it on the CPU."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step" and value.device != param.device:
                state[key] = value.to(param.device)


def to_device(value: Any, device: torch.device) -> Any:
    """Teacher outputs (a tensor, a `TopK`, a dict of features) on `device`; CPU rows go
    through pinned memory without blocking, like batches (`devices.to`)."""
    if isinstance(value, TopK):
        return TopK(*(to_device(v, device) for v in value))
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if not isinstance(value, Tensor) or value.device == device:
        return value
    if device.type == "cuda" and value.device.type == "cpu":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)  # a blocking copy: safe towards the CPU
