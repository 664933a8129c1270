"""Devices and precision, decided in one place.

A recipe names a device (`train.device: auto | cpu | cuda | cuda:N | mps`, and optionally
`teacher.device` for the frozen teacher) and a precision (`train.precision: fp32 | bf16 |
fp16`). `resolve` turns the name into a `torch.device` (under torchrun, `cuda` means this
rank's GPU, `cuda:LOCAL_RANK`); `autocast` and `grad_scaler` give the mixed-precision
context of that device: bf16 or fp16 for the networks' forward, loss math in fp32, and a
gradient scaler for fp16 (its small exponent range underflows gradients otherwise). `to` moves
a batch (pinned, non-blocking copies from the CPU to a GPU). The process group's backend
follows the device: nccl for CUDA tensors (gloo beside it for CPU ones), gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from kdistill.errors import ConfigError

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve(name: str, *, where: str = "train.device") -> torch.device:
    """The device a recipe names. `auto` takes CUDA when present, then MPS, else the CPU;
    under torchrun (`LOCAL_RANK` set) `auto` and `cuda` mean this rank's GPU."""
    if not re.match(DEVICE_PATTERN, name):
        raise ConfigError(where, f"expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    local = os.environ.get("LOCAL_RANK")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError(where, "mps (Apple GPU) is not available on this machine")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(where, f"{name}: no CUDA GPU is visible (torch {torch.__version__}, "
                                 f"CUDA build: {torch.version.cuda is not None}); use cpu")
    index = int(name.split(":")[1]) if ":" in name else int(local or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(where, f"cuda:{index}: only {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device, *, where: str) -> None:
    """fp16 autocast needs a GPU; bf16 runs everywhere (slowly on CPUs without AMX)."""
    if precision not in PRECISIONS:
        raise ConfigError(where, f"expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(where, "fp16 autocast runs on a GPU; on the CPU use bf16 or fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the networks' forward on `device`; fp32: no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (None otherwise: fp32 and bf16 need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def ddp_backend(device: torch.device) -> str:
    """The process group's backend for training on `device`: on CUDA, nccl for CUDA tensors
    and gloo for the few CPU ones (objects broadcast by `distributed.on_main`, counts); on the
    CPU, gloo."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


# Batch keys that stay on the host: sample ids address host-side stores (the teacher cache's
# memory map); reading them back from a GPU would stall it every micro-batch. A method that
# needs them on the device (CRD's memory banks) moves them itself.
HOST_KEYS = frozenset({"index"})


def to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (but `HOST_KEYS`): from the CPU to a GPU through pinned
    memory without waiting (the copy overlaps the previous step's work); other values as they
    are."""
    if device.type == "cpu":
        return dict(batch)
    gpu = device.type == "cuda"
    return {k: v if k in HOST_KEYS or not isinstance(v, Tensor) else
            v.pin_memory().to(device, non_blocking=True) if gpu and v.device.type == "cpu"
            else v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def on(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """`model` moved to `device` for the block, then back where it was (evaluating a model
    that lives on the CPU between stages)."""
    before = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(device)
    try:
        yield model
    finally:
        model.to(before)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
