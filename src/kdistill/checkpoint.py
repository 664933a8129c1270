"""Atomic checkpoints: everything needed to resume bit-for-bit, never a half-written file.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding
`student.safetensors`, `method.safetensors` (adapters; may be empty), `trainer.pt`
(optimizer, LR scheduler, RNG state; read back with `weights_only=True`) and `state.json`.
It is written under a temporary name and renamed when complete; the file `latest` is then
replaced atomically, and only after that are older checkpoints removed (the newest and the
one before it are kept).

A failed write (a full disk) is a `TrainingError` naming the file, and the previous checkpoint
is left as it was; a damaged file met on load is a `ConfigError` naming it and saying what to
delete, so a resume never crashes with a traceback and never silently starts over.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from kdistill.errors import ConfigError, load_failure
from kdistill.io import atomic_write_text, write_failed
from kdistill.weights import load_weights

# What the engine writes into a checkpoint (`engine.train`'s `checkpoint()`): checked on load so
# a hand-edited or foreign file is a one-line error, not a KeyError deep in the resume.
TRAINER_KEYS = ("optimizer", "scheduler", "rng")


def save_checkpoint(
    ckpt_dir: Path,
    *,
    student: nn.Module,
    method: nn.Module,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint under a fresh name, point `latest` at it, then prune old ones."""
    previous = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    final = ckpt_dir / f"step-{state['step']:08d}"
    n = 0
    while final.exists():  # a second save at the same step never replaces the first in place
        n += 1
        final = ckpt_dir / f"step-{state['step']:08d}.{n}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    writes: dict[str, Callable[[Path], object]] = {
        "student.safetensors": lambda f: save_model(student, str(f)),
        "method.safetensors": lambda f: save_model(method, str(f)),
        "trainer.pt": lambda f: torch.save(trainer_state, f),
        "state.json": lambda f: f.write_text(json.dumps(state, indent=2)),
    }
    target = final
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, write in writes.items():
            target = final / name  # errors name the file as it would have been called
            write(tmp / name)
        target = final
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            kept = (f"the previous checkpoint {previous} is intact" if previous
                    else "there was no earlier checkpoint")
            raise write_failed(target, exc, f"checkpoint not written; {kept}") from None
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
    """Load weights into `student` and `method`; return (trainer_state, state).

    A truncated or tampered file is a ConfigError naming it; `trainer.pt` is read with
    `weights_only=True`, so a file carrying pickled code is refused, never run."""
    hint = (f"delete {path} to resume from the checkpoint before it, or {path.parent} to "
            "restart this stage")
    load_weights(student, path / "student.safetensors", hint=hint)
    load_weights(method, path / "method.safetensors", hint=hint)
    current = path / "trainer.pt"
    try:
        trainer_state = torch.load(current, weights_only=True, map_location="cpu")
        if not isinstance(trainer_state, dict) or not set(TRAINER_KEYS) <= set(trainer_state):
            raise ValueError(f"expected a dict with keys {', '.join(TRAINER_KEYS)}")
        current = path / "state.json"
        state = json.loads(current.read_text())
        if not (isinstance(state, dict) and isinstance(state.get("step"), int)
                and isinstance(state.get("train_state"), dict)):
            raise ValueError("expected an object with an integer 'step' and a 'train_state'")
    except Exception as exc:
        reason, _ = load_failure(exc)
        raise ConfigError(str(current), f"unreadable checkpoint file ({reason}); {hint}") from None
    return trainer_state, state
