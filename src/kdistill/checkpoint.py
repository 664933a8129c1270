"""Atomic checkpoints: everything needed to resume bit-for-bit, never a half-written file.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding
`student.safetensors`, `method.safetensors` (adapters; may be empty), `trainer.pt`
(optimizer, LR scheduler, RNG state; read back with `weights_only=True`) and `state.json`.
It is written under a temporary name and renamed when complete; the file `latest` is then
replaced atomically, and only after that are older checkpoints removed (the newest and the
one before it are kept).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from kdistill.errors import KDistillError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_atomic(model: nn.Module, path: Path) -> None:
    """safetensors file written to a temp name, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        _missing, _unexpected = load_model(model, str(path), strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise KDistillError(f"{path}: cannot load weights ({str(exc).splitlines()[0]})") from None


def save_checkpoint(
    ckpt_dir: Path,
    *,
    student: nn.Module,
    method: nn.Module,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint under a fresh name, point `latest` at it, then prune old ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(ckpt_dir)
    final = ckpt_dir / f"step-{state['step']:08d}"
    n = 0
    while final.exists():  # a second save at the same step never replaces the first in place
        n += 1
        final = ckpt_dir / f"step-{state['step']:08d}.{n}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(student, str(tmp / "student.safetensors"))
        save_model(method, str(tmp / "method.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise KDistillError(
                f"{final}: checkpoint write failed ({exc.strerror or exc}); "
                "the previous checkpoint is intact"
            ) from None
        raise
    atomic_write_text(ckpt_dir / "latest", final.name)
    for old in ckpt_dir.glob("step-*"):
        if old not in (final, previous) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(ckpt_dir: Path) -> list[Path]:
    # Only fully written checkpoints carry the plain name (they are renamed into place).
    done = [p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: p.stat().st_mtime_ns)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if that pointer is lost."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        path = ckpt_dir / pointer.read_text().strip()
        if (path / "state.json").is_file():
            return path
    complete = _complete(ckpt_dir) if ckpt_dir.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(
    path: Path, *, student: nn.Module, method: nn.Module
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `student` and `method`; return (trainer_state, state)."""
    load_weights(student, path / "student.safetensors")
    load_weights(method, path / "method.safetensors")
    try:
        trainer_state = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
        state = json.loads((path / "state.json").read_text())
    except Exception as exc:
        raise KDistillError(f"{path}: unreadable checkpoint ({exc})") from None
    return trainer_state, state
