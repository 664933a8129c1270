"""What every source of the user's files shares: the split, duplicates, labels, fingerprints.

Splits (`FileSplits`): `path` is the training file (or folder); `val_path` and `test_path` give
the other splits as files of their own. A split without its file is a seeded fraction (or a
count) of the training file's rows (`val_size`, `test_size`), stratified by class for
classification: test first, then validation, the rest is training, as for the built-in sets.
The test split is only ever scored, never used to pick anything.

Duplicates (`duplicate_notes`): rows of the validation or test split that are exact copies of a
training row (same bytes, same text) are counted and reported as a note on the splits (the run
echoes it); they are kept, since deleting a user's rows silently would be worse than a test
score that says it may be optimistic.

Labels (`LabelMap`): integer labels are class ids as they are; string labels are mapped to ids
in sorted order (the map is saved as `labels.json` in the run directory and carried as
`DataSplits.class_names`). A column of digit strings (every CSV column is text) counts as
integers. Mixed kinds, negative ids and labels the training split never had are one-line errors
naming the row.

Fingerprints (`file_digest`): the sha256 of every file's bytes (a folder: its sorted relative
paths and their files' bytes), so a changed file changes the data's fingerprint and the run
redoes the teacher stage and its cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from kdistill.data.datasets import stratified_order
from kdistill.data.source import Source
from kdistill.errors import ConfigError
from kdistill.io import atomic_write_text

SplitSeed = Annotated[int, Field(ge=-(2**63), lt=2**63, description="seeds the split")]
Size = Annotated[float, Field(gt=0)]
DEFAULT_HOLDOUT = 0.1
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
_INT = re.compile(r"[+-]?\d+")


class FileSplits(Source):
    """The fields of a source that reads the user's files: where they are and how to split."""

    path: str = Field(description="the training file or folder (relative to where kdistill "
                                  "runs); the only one when val/test are fractions of it")
    val_path: str | None = Field(None, description="a validation file of its own")
    test_path: str | None = Field(None, description="a test file of its own")
    val_size: Size | None = Field(
        None, description=f"without val_path: a fraction (< 1) or a count of the training "
                          f"file's rows held out for validation (default {DEFAULT_HOLDOUT})")
    test_size: Size | None = Field(
        None, description=f"without test_path: a fraction (< 1) or a count of the training "
                          f"file's rows held out for testing (default {DEFAULT_HOLDOUT})")
    split_seed: SplitSeed = 0

    @field_validator("val_size", "test_size")
    @classmethod
    def _not_both(cls, v: float | None, info: ValidationInfo) -> float | None:
        split = str(info.field_name).removesuffix("_size")
        if v is not None and info.data.get(f"{split}_path") is not None:
            raise ValueError(f"the {SPLIT_NAMES[split]} split is {split}_path's file; "
                             f"give {split}_path or {split}_size, not both")
        if v is not None and v >= 1 and not float(v).is_integer():
            raise ValueError("a count must be a whole number")
        return v

    def given(self, split: str) -> str | None:
        """The file of `split` ("train", "val", "test"), None when it comes from `path`."""
        return self.path if split == "train" else getattr(self, f"{split}_path")

    def holdout(self, split: str) -> float:
        value = getattr(self, f"{split}_size")
        return DEFAULT_HOLDOUT if value is None else value


def path_field(split: str) -> str:
    """The recipe field naming the file of `split`: path, val_path or test_path."""
    return "path" if split == "train" else f"{split}_path"


def existing(path: str, field: str) -> Path:
    """`path` as a Path, or a one-line error naming the recipe field and the file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(field, f"{path}: no such file or folder")
    return p


def _count(size: float, n: int, field: str) -> int:
    return max(1, round(size * n)) if size < 1 else int(size)


def split_rows(cfg: FileSplits, n: int, *, have: set[str] | frozenset[str] = frozenset(),
               labels: Tensor | None = None, where: str, what: str = "rows"
               ) -> dict[str, Tensor]:
    """Indices into the training file's `n` rows of each split that comes from it: always
    "train", and "val" / "test" unless `have` (the splits read from files of their own) holds
    them. Seeded by `split_seed`; stratified when `labels` (N,) are given, so every split
    holds each class in proportion."""
    held = [s for s in ("test", "val") if s not in have]  # test first, as the built-ins do
    counts = {s: _count(cfg.holdout(s), n, f"{where}.{s}_size") for s in held}
    if sum(counts.values()) >= n:
        field = f"{where}.{held[-1]}_size" if held else f"{where}.path"
        raise ConfigError(field, f"{' + '.join(f'{SPLIT_NAMES[s]} ({counts[s]})' for s in held)}"
                                 f" leave no training {what} of the {n} in {cfg.path}")
    if labels is not None:
        order = stratified_order(labels, seed=int(cfg.split_seed))
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.split_seed)))
    parts, start = {}, 0
    for split in held:
        parts[split] = order[start:start + counts[split]]
        start += counts[split]
    parts["train"] = order[start:]
    return parts


def duplicate_notes(keys: dict[str, Sequence[Hashable]], what: str) -> tuple[str, ...]:
    """A note counting validation rows equal to a training row and test rows equal to a
    training or validation row (exact copies), or () when there is none."""
    seen = set(keys["train"])
    n_val = sum(k in seen for k in keys["val"])
    seen.update(keys["val"])
    n_test = sum(k in seen for k in keys["test"])
    if not n_val and not n_test:
        return ()
    return (f"data: {n_val} validation and {n_test} test {what} are exact copies of earlier "
            f"splits' {what} (kept; scores on them may be optimistic)",)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes; of a folder, of its sorted relative paths and files' bytes."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(kind: str, params: dict[str, Any], digests: Sequence[str],
                *tensors: Tensor) -> str:
    """sha256 of the source's kind, its parameters, its files' digests and tensors' bytes."""
    h = hashlib.sha256(f"{kind}|{sorted(params.items())}|{list(digests)}".encode())
    for t in tensors:
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


# --- labels --------------------------------------------------------------------------------


def _kind(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "int"
    return "str" if isinstance(value, str) and value != "" else None


@dataclass(frozen=True)
class LabelMap:
    """Class names in id order; `by_name` maps string labels to ids (None: integer labels)."""

    names: tuple[str, ...]
    by_name: dict[str, int] | None

    @staticmethod
    def from_training(values: Sequence[object], locate: Callable[[int], str],
                      column: str) -> LabelMap:
        """The classes of the training labels, with one-line errors for bad values."""
        if not values:
            raise ConfigError(locate(0), "holds no rows")
        first = _kind(values[0])
        for i, v in enumerate(values):
            kind = _kind(v)
            if kind is None:
                raise ConfigError(locate(i), f"{column} {v!r} is not a class: expected a "
                                             "class name or an integer id")
            if kind != first:
                raise ConfigError(locate(i), f"{column} {v!r} is a {_what(kind)} but the first "
                                             f"row's is a {_what(first)}: use one kind")
        if first == "str" and not all(_INT.fullmatch(str(v)) for v in values):
            names = tuple(sorted({str(v) for v in values}))
            return LabelMap(names, {name: k for k, name in enumerate(names)})
        ids = [int(v) for v in values]  # type: ignore[call-overload]
        low = min(range(len(ids)), key=ids.__getitem__)
        if ids[low] < 0:
            raise ConfigError(locate(low), f"{column} {ids[low]} is out of range: class ids "
                                           "start at 0")
        return LabelMap(tuple(str(k) for k in range(max(ids) + 1)), None)

    def encode(self, values: Sequence[object], locate: Callable[[int], str],
               column: str) -> Tensor:
        """Class ids (N,) int64 of labels of any split; unknown or out-of-range ones refused."""
        ids = []
        for i, v in enumerate(values):
            kind = _kind(v)
            if self.by_name is not None and kind is not None and str(v) in self.by_name:
                ids.append(self.by_name[str(v)])
                continue
            if self.by_name is None and kind is not None and _INT.fullmatch(str(v).removesuffix(
                    ".0")) and 0 <= int(float(v)) < len(self.names):  # type: ignore[arg-type]
                ids.append(int(float(v)))  # type: ignore[arg-type]
                continue
            known = (f"0..{len(self.names) - 1}" if self.by_name is None
                     else ", ".join(self.names[:8]) + (" ..." if len(self.names) > 8 else ""))
            raise ConfigError(locate(i), f"{column} {v!r} is not one of the training split's "
                                         f"classes ({known})")
        return torch.tensor(ids, dtype=torch.int64)

    def notes(self, train_ids: Tensor) -> tuple[str, ...]:
        counts = torch.bincount(train_ids, minlength=len(self.names))
        empty = [self.names[k] for k in range(len(self.names)) if counts[k] == 0]
        if not empty:
            return ()
        return (f"data: class id(s) {', '.join(empty[:5])} have no training rows (ids run "
                f"0..{len(self.names) - 1}); is the first class id 1 instead of 0?",)


def _what(kind: str | None) -> str:
    return {"int": "number", "str": "text"}.get(kind or "", "missing value")


def save_labels(run_dir: Path | None, names: Sequence[str]) -> None:
    """`labels.json` ({"classes": [name of id 0, ...]}) in the run directory, if there is one."""
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / "labels.json",
                          json.dumps({"classes": list(names)}, indent=2, ensure_ascii=False))
