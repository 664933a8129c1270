"""int8 quantization with PyTorch's own tooling, `torch.ao.quantization`.

torch 2.13 still ships and runs torch.ao.quantization on CPU (x86/fbgemm, onednn and qnnpack
int8 kernels) but marks it deprecated in favour of the separate torchao package. torchao is not a
dependency of kdistill (nothing else needs it, and the toolchain here is torch alone), so this
module uses torch.ao and silences exactly its deprecation messages, nothing else. Moving to
torchao's pt2e flow (prepare_pt2e / convert_pt2e) would replace the FX calls below.

- dynamic: Linear weights stored int8, activations quantized per batch at run time (Conv layers
  stay fp32: torch has no dynamic int8 convolution).
- static: FX graph mode; observers record activation ranges over calibration batches, then
  every supported layer runs int8 end to end (Linear and Conv, fused with their ReLU).
- qat: FX graph mode with fake quantization; the model is fine-tuned (by the chain, with the
  KD loss through the engine) while it sees int8 rounding, then converted like static.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError

# The messages torch.ao emits on every call in 2.13 (deprecation of the package and of
# quantized tensor dtypes, and an observer argument it passes itself).
_DEPRECATION_MESSAGES = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r"Please use quant_min and quant_max",
    r"must run observer before calling calculate_qparams",
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def _engine(backend: str) -> Iterator[None]:
    """Use `backend`'s int8 kernels while preparing/converting, then restore the engine."""
    supported = torch.backends.quantized.supported_engines
    if backend not in supported:
        raise ConfigError("compress.quantize.backend",
                          f"'{backend}' is not available in this torch build "
                          f"(available: {', '.join(e for e in supported if e != 'none')})")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` with int8 dynamic Linear layers (eval mode)."""
    with _quiet():
        from torch.ao.quantization import quantize_dynamic as _dynamic

        return _dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def _mapping(backend: str, *, qat: bool) -> Any:
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping

    return (get_default_qat_qconfig_mapping(backend) if qat
            else get_default_qconfig_mapping(backend))


def _traced(prepare: Any, model: nn.Module, mapping: Any, example: Tensor) -> nn.Module:
    try:
        return prepare(model, mapping, (example,))
    except Exception as exc:  # torch.fx cannot trace data-dependent control flow
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("compress.quantize", f"FX graph mode quantization could not trace "
                                               f"the model: {first}; use method dynamic") from None


@torch.no_grad()
def calibrate(prepared: nn.Module, x: Tensor, *, batch_size: int = 256) -> None:
    """Run calibration inputs through a prepared model so its observers see real ranges."""
    was_training = prepared.training
    prepared.eval()
    try:
        for i in range(0, len(x), batch_size):
            prepared(x[i : i + batch_size])
    finally:
        prepared.train(was_training)


def quantize_static(model: nn.Module, calibration: Tensor, *, backend: str = "x86",
                    batch_size: int = 256) -> nn.Module:
    """Post-training static int8: prepare (observers), calibrate on `calibration`, convert."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with _quiet(), _engine(backend):
        prepared = _traced(prepare_fx, copy.deepcopy(model).eval(), _mapping(backend, qat=False),
                           calibration[:2])
        calibrate(prepared, calibration, batch_size=batch_size)
        return convert_fx(prepared)


def prepare_qat(model: nn.Module, calibration: Tensor, *, backend: str = "x86",
                batch_size: int = 256) -> nn.Module:
    """A fake-quantized copy of `model` in train mode, ready to fine-tune; its observers are
    first run over `calibration` so the first steps already quantize with sensible ranges."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with _quiet(), _engine(backend):
        prepared = _traced(prepare_qat_fx, copy.deepcopy(model).train(),
                           _mapping(backend, qat=True), calibration[:2])
        calibrate(prepared, calibration, batch_size=batch_size)
    return prepared.train()


def convert_qat(prepared: nn.Module, *, backend: str = "x86") -> nn.Module:
    """The int8 model of a fine-tuned fake-quantized one (eval mode)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet(), _engine(backend):
        return convert_fx(copy.deepcopy(prepared).eval())


def int8_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The quantized model's state as plain tensors that safetensors can store: each int8
    tensor as `<key>.int8` (its integer values) with `<key>.scale` and `<key>.zero_point`
    (per tensor, or per output channel with `<key>.axis`), every float tensor as it is."""
    out: dict[str, Tensor] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, tuple | list):  # packed Linear params: (weight, bias)
            for i, item in enumerate(value):
                add(f"{key}.{i}", item)
        elif isinstance(value, Tensor) and value.is_quantized:
            out[f"{key}.int8"] = value.int_repr().contiguous()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                out[f"{key}.scale"] = value.q_per_channel_scales().float().contiguous()
                out[f"{key}.zero_point"] = value.q_per_channel_zero_points().contiguous()
                out[f"{key}.axis"] = torch.tensor(value.q_per_channel_axis())
            else:
                out[f"{key}.scale"] = torch.tensor(value.q_scale(), dtype=torch.float32)
                out[f"{key}.zero_point"] = torch.tensor(value.q_zero_point())
        elif isinstance(value, Tensor):
            out[key] = value.detach().contiguous().clone()
        # dtypes and other non-tensor entries describe the format; nothing to store

    with _quiet():
        for key, value in model.state_dict().items():
            add(key, value)
    return out
