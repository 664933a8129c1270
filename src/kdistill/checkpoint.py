"""Atomic checkpoints: everything needed to resume bit-for-bit, never a half-written file.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding
`student.safetensors`, `method.safetensors` (adapters; may be empty), `trainer.pt`
(optimizer, LR scheduler, RNG state; read back with `weights_only=True`), `state.json` and
`checksums.json` (the sha256 of each of the other four). It is written under a temporary name,
each file flushed to disk, and renamed when complete; the file `latest` is then replaced
atomically, and only after that are older checkpoints removed (the newest and the one before it
are kept).

`latest` must name a checkpoint of this directory (`step-XXXXXXXX`, a real directory, no link);
a pointer that is damaged, undecodable or names anything else is ignored and the newest
complete checkpoint is used instead. A link anywhere in the checkpoint directory is refused.

A failed write (a full disk) is a `TrainingError` naming the file, and the previous checkpoint
is left as it was; a damaged file met on load (truncated, a flipped byte, zeroed by a crash:
its checksum does not match) is a `ConfigError` naming it and saying what to delete, so a
resume never crashes with a traceback and never silently starts over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from kdistill.errors import ConfigError, load_failure
from kdistill.io import (
    atomic_write_text,
    file_digest,
    fsync_file,
    read_json,
    refuse_symlink,
    write_failed,
)
from kdistill.weights import load_weights

# What the engine writes into a checkpoint (`engine.train`'s `checkpoint()`): checked on load so
# a hand-edited or foreign file is a one-line error, not a KeyError deep in the resume.
TRAINER_KEYS = ("optimizer", "scheduler", "rng")
TRAIN_STATE_COUNTERS = ("step", "epoch", "batch", "samples")  # engine.TrainState's integers
# engine.TrainState's name -> number maps: the logging window's loss sums, the auxiliary's terms.
TRAIN_STATE_SCALARS = ("log_sums", "aux_terms")
FILES = ("student.safetensors", "method.safetensors", "trainer.pt", "state.json")
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"step-(\d{8,})(?:\.(\d+))?")  # what save_checkpoint names a checkpoint


def save_checkpoint(
    ckpt_dir: Path,
    *,
    student: nn.Module,
    method: nn.Module,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint under a fresh name, point `latest` at it, then prune old ones."""
    refuse_symlink(ckpt_dir, "the checkpoint directory")
    previous = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    final = ckpt_dir / f"step-{state['step']:08d}"
    n = 0
    while final.exists() or final.is_symlink():  # a second save never replaces the first
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
            fsync_file(tmp / name)  # on disk before the rename publishes it
        target = final / CHECKSUMS
        digests = {name: file_digest(tmp / name) for name in writes}
        (tmp / CHECKSUMS).write_text(json.dumps(digests, indent=2))
        fsync_file(tmp / CHECKSUMS)
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
        if old not in (final, previous) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return final


def _order(path: Path) -> tuple[int, int]:
    match = _NAME.fullmatch(path.name)
    assert match is not None
    return int(match.group(1)), int(match.group(2) or 0)


def _usable(path: Path) -> bool:
    """A checkpoint save_checkpoint wrote: its own name, a real directory, a state file."""
    return (_NAME.fullmatch(path.name) is not None and not path.is_symlink() and path.is_dir()
            and (path / "state.json").is_file())


def _complete(ckpt_dir: Path) -> list[Path]:
    # Only fully written checkpoints carry the plain name (they are renamed into place).
    return sorted((p for p in ckpt_dir.glob("step-*") if _usable(p)), key=_order)


def _pointed(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, if it names one of this directory's (else None)."""
    pointer = ckpt_dir / "latest"
    if pointer.is_symlink() or not pointer.is_file():
        return None
    try:
        with open(pointer, "rb") as f:
            name = f.read(256).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    path = ckpt_dir / name
    return path if _NAME.fullmatch(name) and _usable(path) else None


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if that pointer is lost,
    damaged or names something else; None when there is none. A link is refused."""
    ckpt_dir = Path(ckpt_dir)
    refuse_symlink(ckpt_dir, "the checkpoint directory")
    if not ckpt_dir.exists():
        return None
    if not ckpt_dir.is_dir():
        raise ConfigError(str(ckpt_dir), "is a file, not a checkpoint directory; delete it")
    named = _pointed(ckpt_dir)
    if named is not None:
        return named
    complete = _complete(ckpt_dir)
    return complete[-1] if complete else None


def verify_checkpoint(path: Path, hint: str = "") -> None:
    """ConfigError naming the first file of checkpoint `path` that is missing, a link, or
    whose content no longer matches the checksum written with it."""
    sums = read_json(path / CHECKSUMS, what="the checkpoint's checksums", hint=hint)
    for name in FILES:
        file = path / name
        refuse_symlink(file, "a checkpoint file")
        expected = sums.get(name)
        if not isinstance(expected, str):
            raise ConfigError(str(path / CHECKSUMS), f"no checksum for {name}; {hint}")
        if not file.is_file():
            raise ConfigError(str(file), f"checkpoint file missing; {hint}")
        if file_digest(file) != expected:
            raise ConfigError(str(file), "damaged checkpoint file: its content does not match "
                              "the checksum written with it (a crash before it reached the "
                              f"disk, or an edit); {hint}")


def _check_state(trainer_state: Any, state: Any) -> None:
    """ValueError unless both are what engine.train's checkpoint() writes."""
    if not isinstance(trainer_state, dict) or not set(TRAINER_KEYS) <= set(trainer_state):
        raise ValueError(f"expected a dict with keys {', '.join(TRAINER_KEYS)}")
    if not (isinstance(trainer_state["optimizer"], dict)
            and isinstance(trainer_state["scheduler"], dict)
            and isinstance(trainer_state["rng"], Tensor)
            and trainer_state["rng"].dtype == torch.uint8):
        raise ValueError("expected an optimizer and a scheduler state (dicts) and an RNG state "
                         "(a uint8 tensor)")
    train_state = state.get("train_state") if isinstance(state, dict) else None
    if not (isinstance(state, dict) and _count(state.get("step"))
            and isinstance(train_state, dict)
            and set(train_state) <= {*TRAIN_STATE_COUNTERS, *TRAIN_STATE_SCALARS}
            and all(_count(train_state.get(k, 0)) for k in TRAIN_STATE_COUNTERS)
            and all(_scalars(train_state.get(k, {})) for k in TRAIN_STATE_SCALARS)):
        raise ValueError("expected an object with an integer 'step' and a 'train_state' of "
                         f"counters ({', '.join(TRAIN_STATE_COUNTERS)}) and name -> number "
                         f"maps ({', '.join(TRAIN_STATE_SCALARS)})")


def _scalars(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in value.items())


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_checkpoint(
    path: Path, *, student: nn.Module, method: nn.Module
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into `student` and `method`; return (trainer_state, state).

    Every file is checked against its checksum first; a truncated, zeroed or tampered file is
    a ConfigError naming it; `trainer.pt` is read with `weights_only=True`, so a file carrying
    pickled code is refused, never run."""
    hint = (f"delete {path} to resume from the checkpoint before it, or {path.parent} to "
            "restart this stage")
    verify_checkpoint(path, hint)
    load_weights(student, path / "student.safetensors", hint=hint)
    load_weights(method, path / "method.safetensors", hint=hint)
    current = path / "trainer.pt"
    try:
        trainer_state = torch.load(current, weights_only=True, map_location="cpu")
        _check_state(trainer_state, {"step": 0, "train_state": {}})
        current = path / "state.json"
        state = json.loads(current.read_text(encoding="utf-8"))
        _check_state(trainer_state, state)
    except Exception as exc:
        reason, _ = load_failure(exc)
        raise ConfigError(str(current), f"unreadable checkpoint file ({reason}); {hint}") from None
    return trainer_state, state
