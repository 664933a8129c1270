"""Reading the user's tables: CSV, TSV, JSON Lines, Parquet and saved Hugging Face datasets.

`read_table(path, required, optional)` returns the named columns as lists, whatever the
format, and says where row i came from (`Table.locate(i)`: `file:line` for text formats, `file
row i` otherwise), so every bad value is one line naming the file, the line and the column.

- CSV / TSV (`.csv`, `.tsv`, `.tab`): a header line, then one row per record (quoted fields may
  span lines). Decoded as UTF-8 (a byte-order mark is allowed); a row with more or fewer
  fields than the header is an error, not a guess.
- JSON Lines (`.jsonl`, `.ndjson`): one object per line; blank lines are skipped.
- Parquet (`.parquet`, `.pq`): read with pyarrow, memory-mapped.
- A folder written by `datasets.Dataset.save_to_disk`: opened with `datasets.load_from_disk`
  (memory-mapped Arrow, offline: `HF_DATASETS_OFFLINE=1`); a saved `DatasetDict` gives its
  `train`, `validation` (or `val`) and `test` splits (`read_dataset_splits`).

CSV, TSV and JSON Lines are read with the standard library rather than `datasets.load_dataset`,
which would write a cache outside the run directory and reports bad rows without their line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from kdistill.data.splitting import SPLIT_NAMES, SPLITS, FileSplits, existing, split_rows
from kdistill.errors import ConfigError, MissingDependencyError

TEXT_FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
JSONL = (".jsonl", ".ndjson")
PARQUET = (".parquet", ".pq")
SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"),
                 "test": ("test",)}


@dataclass(frozen=True)
class Table:
    """Columns of one file as lists (row i of every column is record i)."""

    path: Path
    columns: dict[str, list[Any]]
    n_rows: int
    lines: list[int] | None = field(default=None, repr=False)  # line where row i starts

    def __len__(self) -> int:
        return self.n_rows

    def locate(self, i: int) -> str:
        """Where row i is, for an error message: `file:line` or `file row i`."""
        if self.lines is not None and i < len(self.lines):
            return f"{self.path}:{self.lines[i]}"
        return f"{self.path} row {i}"

    def texts(self, column: str) -> list[str]:
        """The column's values, each checked to be a string (an empty one is allowed)."""
        values = self.columns[column]
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise ConfigError(self.locate(i), f"column '{column}' is {v!r}; expected text")
        return values


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (
        "dataset_info.json", "state.json", "dataset_dict.json"))


def _utf8(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise ConfigError(str(path), "is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}", f"is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                                            "save the file as UTF-8") from None


def _missing(path: Path, have: Sequence[str], column: str) -> ConfigError:
    return ConfigError(str(path), f"has no column '{column}' (columns: {', '.join(have)})")


def _read_delimited(path: Path, delimiter: str, required: Sequence[str],
                    optional: Sequence[str]) -> Table:
    reader = csv.reader(io.StringIO(_utf8(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise ConfigError(f"{path}:1", f"cannot read the header: {exc}") from None
    for column in required:
        if column not in header:
            raise _missing(path, header, column)
    wanted = [c for c in (*required, *optional) if c in header]
    position = {c: header.index(c) for c in wanted}
    columns: dict[str, list[Any]] = {c: [] for c in wanted}
    lines: list[int] = []
    start = reader.line_num + 1
    try:
        for row in reader:
            if row:  # csv gives [] for a blank line
                if len(row) != len(header):
                    raise ConfigError(f"{path}:{start}", f"has {len(row)} field(s) where the "
                                                         f"header has {len(header)}")
                for c, k in position.items():
                    columns[c].append(row[k])
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ConfigError(f"{path}:{start}", f"is not valid CSV: {exc}") from None
    return Table(path, columns, len(lines), lines)


def _read_jsonl(path: Path, required: Sequence[str], optional: Sequence[str]) -> Table:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}", f"is not a JSON line ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}", "expected a JSON object per line")
        for c in required:
            if c not in record:
                raise ConfigError(f"{path}:{number}", f"has no field '{c}'")
        records.append(record)
        lines.append(number)
    # An optional field is a column when any row has it (None in the rows without it).
    present = [c for c in optional if any(c in r for r in records)]
    columns = {c: [r.get(c) for r in records] for c in (*required, *present)}
    return Table(path, columns, len(records), lines)


def _read_parquet(path: Path, required: Sequence[str], optional: Sequence[str]) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(str(path), "pyarrow (Parquet files)",
                                     "pip install 'kdistill[data]'") from None
    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise ConfigError(str(path), f"is not a readable Parquet file: {exc}") from None
    return _from_arrow(path, table.column_names, table.column, table.num_rows, required,
                       optional)


def _from_arrow(path: Path, names: Sequence[str], column: Any, n_rows: int,
                required: Sequence[str], optional: Sequence[str]) -> Table:
    for c in required:
        if c not in names:
            raise _missing(path, names, c)
    columns = {c: list(column(c).to_pylist()) for c in (*required, *optional) if c in names}
    return Table(path, columns, n_rows)


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach the hub from a data path
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("data.path", "the datasets package (saved Hugging Face "
                                     "datasets)", "pip install 'kdistill[data]'") from None
    return datasets


def read_dataset_splits(path: Path, required: Sequence[str],
                        optional: Sequence[str] = ()) -> dict[str, Table]:
    """The tables of a saved Hugging Face dataset: {"train": ...} for a `Dataset`, and the
    train / val / test splits it has for a `DatasetDict`."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged folder raises FileNotFoundError, ValueError, ...
        raise ConfigError(str(path), f"is not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        tables = {}
        for split, aliases in SPLIT_ALIASES.items():
            name = next((a for a in aliases if a in loaded), None)
            if name is not None:
                d = loaded[name]
                tables[split] = _from_arrow(path / name, d.column_names, d.data.column,
                                            d.num_rows, required, optional)
        if "train" not in tables:
            raise ConfigError(str(path), f"holds no 'train' split (splits: "
                                         f"{', '.join(loaded)})")
        return tables
    return {"train": _from_arrow(path, loaded.column_names, loaded.data.column,
                                 loaded.num_rows, required, optional)}


def read_table(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> Table:
    """The `required` columns (and those of `optional` present) of a table file."""
    suffix = path.suffix.lower()
    if is_hf_dataset(path):
        tables = read_dataset_splits(path, required, optional)
        if len(tables) > 1:
            raise ConfigError(str(path), "is a dataset with splits; give it as data.path alone")
        table = tables["train"]
    elif suffix in TEXT_FORMATS:
        table = _read_delimited(path, TEXT_FORMATS[suffix], required, optional)
    elif suffix in JSONL:
        table = _read_jsonl(path, required, optional)
    elif suffix in PARQUET:
        table = _read_parquet(path, required, optional)
    elif path.is_dir():
        raise ConfigError(str(path), "is a folder but not a dataset saved with save_to_disk")
    else:
        raise ConfigError(str(path), "unknown table format; expected .csv, .tsv, .jsonl, "
                                     ".parquet or a folder saved by datasets' save_to_disk")
    if len(table) == 0:
        raise ConfigError(str(path), "holds no rows")
    return table


def read_split_tables(cfg: FileSplits, required: Sequence[str], optional: Sequence[str] = (),
                      *, where: str) -> dict[str, Table]:
    """The tables of the splits given as files: always "train" (`path`), and "val" / "test"
    from `val_path` / `test_path`, or from a saved `DatasetDict`'s own splits."""
    train_path = existing(cfg.path, f"{where}.path")
    if is_hf_dataset(train_path):
        tables = read_dataset_splits(train_path, required, optional)
    else:
        tables = {"train": read_table(train_path, required, optional)}
    for split in ("val", "test"):
        own = cfg.given(split)
        if own is not None and split in tables:
            raise ConfigError(f"{where}.{split}_path", f"{cfg.path} already holds a "
                                                       f"{SPLIT_NAMES[split]} split")
        if split in tables and getattr(cfg, f"{split}_size") is not None:
            raise ConfigError(f"{where}.{split}_size", f"{cfg.path} already holds a "
                                                       f"{SPLIT_NAMES[split]} split")
        if own is not None:
            tables[split] = read_table(existing(own, f"{where}.{split}_path"), required,
                                       optional)
    return tables


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split: all of a table of its own, or some rows of the training file."""

    table: Table
    index: list[int]

    def __len__(self) -> int:
        return len(self.index)

    def column(self, name: str) -> list[Any]:
        values = self.table.columns[name]
        return [values[i] for i in self.index]

    def locate(self, k: int) -> str:
        return self.table.locate(self.index[k])


def assign_rows(cfg: FileSplits, tables: dict[str, Table], *, where: str,
                labels: Tensor | None = None, what: str = "rows") -> dict[str, SplitRows]:
    """Each split's rows: its own table when it has one, else a seeded (stratified by the
    training file's `labels`, when given) share of the training file (`split_rows`)."""
    train = tables["train"]
    parts = split_rows(cfg, len(train), have=set(tables), labels=labels, where=where, what=what)
    return {split: SplitRows(tables[split], list(range(len(tables[split]))))
            if split in tables and split != "train" else SplitRows(train, parts[split].tolist())
            for split in SPLITS}


def check_present(table: Table, column: str) -> None:
    """Refuse a missing value (None, or an empty CSV field) in `column`."""
    for i, v in enumerate(table.columns[column]):
        if v is None or v == "":
            raise ConfigError(table.locate(i), f"column '{column}' is empty")
