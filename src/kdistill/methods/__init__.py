"""Distillation methods. Adding one: a file here, one line in METHODS, one recipe."""

from __future__ import annotations

from kdistill.methods.base import Batch, Method, MethodConfig, Outputs
from kdistill.methods.ce import CE
from kdistill.methods.kd import KD

METHODS: dict[str, type[Method]] = {
    "ce": CE,
    "kd": KD,
}

__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "Outputs", "build_method"]


def build_method(cfg: MethodConfig) -> Method:
    """Instantiate the method named by `cfg.name` with its typed config."""
    return METHODS[cfg.name](cfg)
