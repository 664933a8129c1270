"""Metric sinks: every logged scalar goes to `metrics.jsonl`, one JSON object per line, and,
when asked (`logging.tensorboard: true`), to TensorBoard event files as well.

`metrics.jsonl` is opened with O_NOFOLLOW: a symbolic link planted under its name is refused,
never written through (it could point anywhere). Reading it back keeps only JSON objects, so a
torn last line (a killed run) or a hand-edited one is skipped, never a traceback.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from kdistill.errors import MissingDependencyError, TrainingError
from kdistill.io import atomic_write_text, make_dirs, refuse_symlink

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)

TENSORBOARD_INSTALL = "pip install -e '.[tensorboard]'"


def require_tensorboard(where: str = "logging.tensorboard") -> Any:
    """torch's `SummaryWriter` class; a MissingDependencyError naming `where` without the
    `tensorboard` package (torch ships the writer but not the event-file protocol it needs)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingDependencyError(where, "tensorboard", TENSORBOARD_INSTALL) from None
    return SummaryWriter


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values as TensorBoard tags `<split>/<key>` (`train/loss/kd`,
    `val/accuracy`); `step` is the x axis, not a value, and booleans are not numbers here."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, numbers.Real)
            and not isinstance(value, bool)}


class MetricsLogger:
    """Appends records to a JSONL file (and keeps them in memory for the report).

    Args:
        path: the JSONL file; None keeps the records in memory only.
        tensorboard_dir: also write every numeric value to TensorBoard event files there, at
            the record's `step`. The package is checked here, so a missing one fails before
            training; the writer itself opens at the first record (see `log`).
    """

    def __init__(self, path: Path | None = None, *, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.tensorboard_dir = tensorboard_dir
        self._writer_type = require_tensorboard() if tensorboard_dir is not None else None
        self._writer: Any = None
        if path is not None:
            make_dirs(path.parent)
            refuse_symlink(path, "the metrics file")

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.records.append(clean)
        if self.path is not None:
            self._append(json.dumps(clean) + "\n")
        if self._writer_type is not None:
            self._tensorboard(record)

    def _append(self, line: str) -> None:
        assert self.path is not None
        try:
            fd = os.open(self.path, _APPEND, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link planted since __init__
                refuse_symlink(self.path, "the metrics file")
            raise TrainingError(f"{self.path}: write failed ({exc.strerror or exc})") from None
        try:
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:  # a full disk: one line naming the file
            raise TrainingError(f"{self.path}: write failed ({exc.strerror or exc})") from None

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= `step` (a resumed run logs the rest again) and
        drop any torn or foreign line; rewritten atomically, never through a link."""
        if self.path is None or not self.path.exists():
            return
        refuse_symlink(self.path, "the metrics file")
        kept = [json.dumps(r) for r in read_metrics(self.path)
                if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", len(self.records)))
        if self._writer is None:
            # A resumed run logs again from just after its checkpoint: purge_step hides the
            # events an interrupted attempt wrote from this step on, as the engine drops them
            # from metrics.jsonl, so a curve never shows the same steps twice.
            self._writer = self._writer_type(log_dir=str(self.tensorboard_dir), purge_step=step)
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        # Flushed per record (the engine logs every `log_every` steps, not every step): a
        # killed run keeps its curves, and nobody has to remember to close the logger.
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file, in order; lines that are not one (a torn
    last line, undecodable bytes, an array) are skipped. No file: no records."""
    if not path.is_file():
        return []
    records = []
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
