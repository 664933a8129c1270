"""Export: ONNX (checked with onnx.checker, run in onnxruntime and compared with PyTorch) and
safetensors; `OnnxModel` runs an exported file like a module so it is measured as it ships.

How each model kind reaches ONNX in torch 2.13:
- fp32: `torch.onnx.export(dynamo=True)`, the torch.export-based exporter (the supported one).
- static / QAT int8 (FX graph modules): the torch.export exporter cannot trace quantized ops,
  so the legacy TorchScript exporter (`dynamo=False`), which maps them to ONNX QLinear/QDQ ops.
- dynamic int8: no ONNX mapping exists for torch's dynamic quantized Linear, so the fp32 model
  is exported and quantized by onnxruntime's own dynamic quantizer (MatMulInteger), the
  equivalent int8 scheme; the check then compares two int8 implementations, hence rtol 0.05.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

from kdistill.compress.quantize import int8_tensors
from kdistill.errors import KDistillError, MissingDependencyError

EXPORT_INSTALL = "pip install -e '.[export]'  (onnx, onnxruntime, onnxscript)"
FP32_RTOL, INT8_RTOL = 1e-4, 0.05


class ExportError(KDistillError):
    """An exported model that fails its check (exit code 1): the message says by how much."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError("compress.export", module, EXPORT_INSTALL) from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress and deprecation notes on every call (and a warning per
    missing torchvision op); a chain's log should show the result, not those."""
    # onnxruntime's quantizer advises pre-processing through the root logger.
    loggers = [logging.getLogger("torch.onnx"), logging.getLogger()]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: nn.Module, example: Tensor, path: Path, *, quantized: str | None = None,
                float_model: nn.Module | None = None, opset: int | None = None,
                class_names: Sequence[str] = ()) -> Path:
    """Write `model` to `path` as ONNX with a dynamic batch axis (input `input`, output
    `logits`). `quantized`: None, "static", "qat" or "dynamic" (see the module doc; dynamic
    needs `float_model`, the fp32 model it was quantized from). `class_names` (the name of
    each logit) go into the model's metadata as JSON under `class_names`."""
    _require("onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    if opset is not None:
        names["opset_version"] = opset  # type: ignore[assignment]
    source = float_model if quantized == "dynamic" else model
    if source is None:
        raise ValueError("dynamic int8 export needs float_model, the model it was quantized from")
    source.eval()
    # Dynamic int8: the fp32 graph goes to a side file that onnxruntime then quantizes.
    target = path.with_name(path.stem + ".fp32.onnx") if quantized == "dynamic" else path
    # One self-contained file unless protobuf's 2 GB limit forces weights into a side file.
    weight_bytes = sum(t.numel() * t.element_size() for t in source.state_dict().values()
                       if isinstance(t, Tensor))
    with _quiet_exporter(), torch.no_grad():
        if quantized in ("static", "qat"):
            torch.onnx.export(source, (example,), str(target), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              **names)
        else:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(source, (example,), str(target), dynamo=True,
                              dynamic_shapes=({0: batch},),
                              external_data=weight_bytes > 1_500_000_000, **names)
    if quantized == "dynamic":
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization import quantize_dynamic as ort_dynamic

        with _quiet_exporter():
            ort_dynamic(str(target), str(path), weight_type=QuantType.QInt8)
        target.unlink()
        target.with_name(target.name + ".data").unlink(missing_ok=True)
    if class_names:
        _stamp_onnx(path, class_names)
    return path


def _stamp_onnx(path: Path, class_names: Sequence[str]) -> None:
    """Record the class names in the ONNX file's metadata (weights stored beside it stay)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    entry = graph.metadata_props.add()
    entry.key, entry.value = "class_names", json.dumps(list(class_names))
    onnx.save(graph, str(path))


class OnnxModel(nn.Module):
    """An ONNX file in onnxruntime, called like the PyTorch model it came from: (B, ...) float
    tensor in, (B, C) float32 logits out. One intra-op and one inter-op thread by default, the
    measuring convention of this project (2-vCPU machines)."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        super().__init__()
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: x})[0]))


def compare_outputs(onnx_model: OnnxModel, model: nn.Module, x: Tensor, *,
                    rtol: float) -> dict[str, float]:
    """Max |onnx − torch| relative to max |torch| on `x`, and argmax agreement; raises
    ExportError when the relative difference exceeds `rtol`."""
    model.eval()
    with torch.no_grad():
        ref = model(x).float()
    got = onnx_model(x)
    if got.shape != ref.shape:
        raise ExportError(f"{onnx_model.path}: ONNX output shape {tuple(got.shape)} differs "
                          f"from PyTorch's {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    scale = max(float(ref.abs().max()), 1e-12)
    agreement = float((got.argmax(1) == ref.argmax(1)).float().mean())
    if not diff / scale <= rtol:  # also catches NaN
        raise ExportError(f"{onnx_model.path}: onnxruntime output differs from PyTorch by "
                          f"{diff:.3g} (max |logit| {scale:.3g}, relative {diff / scale:.3g} > "
                          f"rtol {rtol:g}; argmax agreement {agreement:.4f}); the export is "
                          f"not faithful, so it is not used")
    return {"onnx_max_abs_diff": diff, "onnx_rel_diff": diff / scale,
            "onnx_agreement": agreement}


def check_onnx(path: Path, model: nn.Module, x: Tensor, *, rtol: float,
               threads: int = 1) -> tuple[OnnxModel, dict[str, float]]:
    """onnx.checker on the file, then onnxruntime vs PyTorch on `x` (see compare_outputs)."""
    onnx = _require("onnx")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"{path}: not a valid ONNX model: {first}") from None
    runner = OnnxModel(path, threads=threads)
    return runner, compare_outputs(runner, model, x, rtol=rtol)


def save_safetensors(model: nn.Module, path: Path, *, quantized: bool,
                     class_names: Sequence[str] = ()) -> Path:
    """fp32: the state dict as it is (shared tensors handled); int8: integer values with their
    scales and zero points (`quantize.int8_tensors`), what an int8 checkpoint really weighs.
    `class_names` go into the file's metadata as JSON under `class_names`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"class_names": json.dumps(list(class_names))} if class_names else None
    if quantized:
        save_file(int8_tensors(model), str(path), metadata=metadata)
    else:
        save_model(model, str(path), metadata=metadata)
    return path
