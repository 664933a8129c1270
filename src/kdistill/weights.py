"""Reading weights files: the one `load_weights`, for a recipe's `weights:` and a stage's model.

A weights file never runs code: `.safetensors` is read with safetensors, `.pt` / `.pth` / `.bin`
with `torch.load(..., weights_only=True)`, which refuses pickled Python objects (and kdistill
never retries without it). Loading is strict: a missing, unexpected or reshaped tensor is one
`ConfigError` naming the file and summarising what does not fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError, load_failure

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _refused(path: Path, reason: str) -> str:
    return (f"refused {path}: it holds Python objects, not only tensors ({reason}); kdistill "
            "loads weights only and never runs code from a file: save a plain state dict "
            "(torch.save(model.state_dict(), ...)) or .safetensors")


def read_state_dict(path: Path, *, where: str, hint: str = "") -> dict[str, Tensor]:
    """name -> tensor from a weights file; `where` names the recipe field (or the file) in
    errors and `hint` (if any) says what to do about a damaged file."""
    suffix = path.suffix.lower()
    tail = f"; {hint}" if hint else ""
    if suffix not in SUFFIXES:
        raise ConfigError(
            where, f"unsupported weights file {str(path)!r}; expected .safetensors, .pt or .pth"
        )
    try:
        found = path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(where, f"cannot read {path}: {exc.strerror or exc}{tail}") from None
    if not found:
        what = "a directory, not a file" if path.is_dir() else "file not found"
        raise ConfigError(where, f"{what}: {path}{tail}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        reason, refused = load_failure(e)
        if refused:  # weights_only=True met a pickled object: say so, never retry without it
            raise ConfigError(where, _refused(path, reason)) from None
        raise ConfigError(where, f"cannot read {path} (truncated or not a weights file?): "
                                 f"{type(e).__name__}: {reason}{tail}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                              for k, v in state.items()):
        raise ConfigError(where, f"{path} does not hold a state dict (name -> tensor){tail}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    return state


def _summary(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _shared(model: nn.Module) -> dict[str, set[str]]:
    """name -> every state-dict name sharing its storage (tied weights): safetensors'
    `save_model` writes each shared tensor once, under one of its names."""
    groups: dict[tuple[int, int], set[str]] = {}
    for name, t in model.state_dict().items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset()),
                              set()).add(name)
    return {name: group for group in groups.values() for name in group}


def load_weights(model: nn.Module, path: str | os.PathLike[str], *, where: str | None = None,
                 hint: str = "") -> nn.Module:
    """Load a state dict file into `model` strictly, with a short summary on any mismatch.

    Args:
        where: the recipe field that named the file (`teacher.model.weights`); by default the
            file itself (a stage's own model).
        hint: what to do about a damaged or mismatched file (e.g. "delete it to redo the stage").
    """
    path = Path(path)
    where = str(path) if where is None else where
    state = read_state_dict(path, where=where, hint=hint)
    expected = model.state_dict()
    shared = _shared(model)
    missing = [k for k in expected if k not in state and not shared.get(k, set()) & set(state)]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_summary(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_summary(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with another shape: {_summary(wrong_shape)}")
    if problems:
        tail = f"; {hint}" if hint else ""
        what = "does not fit" if where == str(path) else f"{path} does not fit"
        raise ConfigError(where, f"{what} the model ({type(model).__name__}): "
                                 + "; ".join(problems) + tail)
    try:  # tied names absent from the file share storage with one that is there
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # e.g. a complex tensor for a real parameter
        tail = f"; {hint}" if hint else ""
        raise ConfigError(where, f"{path} does not fit the model ({type(model).__name__}): "
                          f"{exc}{tail}") from None
    return model
