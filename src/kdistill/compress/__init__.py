"""Compression after distillation: pruning, int8 quantization, ONNX/safetensors export, and
`run_chain`, which runs a recipe's `compress:` stages and evaluates each one."""

from kdistill.compress.chain import run_chain
from kdistill.compress.config import (
    CompressStage,
    DistillStage,
    ExportStage,
    PruneStage,
    QuantizeStage,
    parse_stages,
)
from kdistill.compress.export import ExportError, OnnxModel, export_onnx
from kdistill.compress.finetune import chain_table

__all__ = [
    "CompressStage",
    "DistillStage",
    "ExportError",
    "ExportStage",
    "OnnxModel",
    "PruneStage",
    "QuantizeStage",
    "chain_table",
    "export_onnx",
    "parse_stages",
    "run_chain",
]
