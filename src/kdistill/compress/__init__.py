"""Compression after distillation: pruning, int8 quantization, ONNX/safetensors export, and
`run_chain`, which runs a recipe's `compress:` stages and evaluates each one.

Names are imported lazily: `kdistill.config` imports `kdistill.config.compress` for the
recipe's `compress:` field, and the chain (engine, quantization, onnx) must not load then.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "run_chain": "chain",
    "CompressStage": "config", "DistillStage": "config", "ExportStage": "config",
    "PruneStage": "config", "QuantizeStage": "config", "parse_stages": "config",
    "ExportError": "export", "OnnxModel": "export", "export_onnx": "export",
    "chain_table": "finetune",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kdistill.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kdistill.compress.{_WHERE[name]}"), name)
