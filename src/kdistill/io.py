"""Writing files atomically: a crash or a full disk never leaves a torn file.

Every file kdistill writes into a run directory (checkpoints, stage markers, models, the
teacher cache's manifest, reports, a method's artefacts) goes through here: written under a
temporary name beside the target, then renamed over it. A failed write is one `TrainingError`
naming the file, the temporary file removed and the old file (if any) left as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file, save_model
from torch import Tensor, nn

from kdistill.errors import TrainingError


def write_failed(path: Path, exc: OSError, intact: str) -> TrainingError:
    """A failed write (disk full, permissions) as one line naming the file that was written."""
    return TrainingError(f"{path}: write failed ({exc.strerror or exc}); {intact}")


def _remove(path: Path) -> None:
    # Best effort: the temp file is the least of the user's problems when the disk is full.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then rename over `path`: a crash or a full disk never leaves a torn file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise write_failed(path, exc, "the file as it was before is unchanged") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_model_atomic(model: nn.Module, path: Path) -> None:
    """safetensors file written to a temp name, then renamed over `path`."""
    atomic_write(path, lambda tmp: save_model(model, str(tmp)))


def save_tensors_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    """A dict of tensors as a safetensors file, written to a temp name, then renamed."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                        str(tmp)))


