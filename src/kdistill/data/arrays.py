"""The user's arrays (`data.name: arrays`): classification from tensors saved in files.

Inputs and labels come from one file holding both (`.npz`, `.safetensors`, or a `.pt` file of
tensors only, read with `torch.load(weights_only=True)`, never unpickling objects), named by
`x_key` and `y_key`, or from two `.npy` files (`path` for the inputs, `labels_path` for the
labels). Inputs may have any shape (N, ...) and a numeric dtype; they become float32 as they
are (`normalize: true` standardises them with the training split's mean and std, saved as
`normalization.json` in the run directory). Labels are one per row: integer class ids (0 ..
K-1; `num_classes` fixes K when some class is absent) or, in `.npy` / `.npz`, strings (mapped
to ids in sorted order). Validation and test come from files of their own or from seeded,
stratified fractions of the training file (`kdistill.data.splitting`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from kdistill.data.source import LoadContext
from kdistill.data.splitting import (
    SPLITS,
    FileSplits,
    LabelMap,
    duplicate_notes,
    existing,
    file_digest,
    fingerprint,
    save_labels,
    split_rows,
)
from kdistill.errors import ConfigError, load_failure
from kdistill.io import atomic_write_text
from kdistill.types import DataSplits

SUFFIXES = (".npz", ".npy", ".safetensors", ".pt", ".pth")
_INPUTS_OF = {"labels_path": "path", "val_labels_path": "val_path",
              "test_labels_path": "test_path"}


def _read(path: Path, key: str | None) -> np.ndarray:
    """One array of a file: `key` of an .npz / .safetensors / .pt file, or a whole .npy."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                keys = list(arrays.keys())
                return arrays[key] if key in keys else _no_key(path, key, keys)
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
            return arrays[key] if key in arrays else _no_key(path, key, list(arrays))
        if suffix in (".pt", ".pth"):
            return _read_pt(path, key)
    except ConfigError:
        raise
    except Exception as exc:  # numpy, safetensors and torch each raise their own kinds
        message = load_failure(exc)[0] if suffix in (".pt", ".pth") else str(exc)
        raise ConfigError(str(path), f"cannot read the arrays: {message}") from None
    raise ConfigError(str(path), f"unknown array format; expected one of {', '.join(SUFFIXES)}")


def _read_pt(path: Path, key: str | None) -> np.ndarray:
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ConfigError(str(path), "expected a dict of tensors (torch.save({'x': ..., "
                                     "'y': ...}))")
    if key not in loaded:
        _no_key(path, key, list(loaded))
    return loaded[key].numpy()


def _no_key(path: Path, key: str | None, keys: list[str]) -> np.ndarray:
    raise ConfigError(str(path), f"has no array '{key}' (arrays: {', '.join(keys) or 'none'})")


def _inputs(array: np.ndarray, path: Path) -> Tensor:
    if array.ndim < 1 or len(array) == 0:
        raise ConfigError(str(path), f"inputs of shape {array.shape}: expected (rows, ...) with "
                                     "at least one row")
    if array.dtype.kind not in "biuf":
        raise ConfigError(str(path), f"inputs of dtype {array.dtype}: expected numbers")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _label_values(array: np.ndarray, path: Path, rows: int) -> list[Any] | np.ndarray:
    if array.ndim != 1:
        raise ConfigError(str(path), f"labels of shape {array.shape}: expected one per row "
                                     f"({rows},)")
    if len(array) != rows:
        raise ConfigError(str(path), f"{len(array)} labels for {rows} input rows")
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        bad = np.flatnonzero(array != np.round(array))
        if len(bad):
            raise ConfigError(f"{path} row {bad[0]}", f"label {array[bad[0]]} is not a class id")
        return array.astype(np.int64)
    if array.dtype.kind == "U":
        return array.tolist()
    raise ConfigError(str(path), f"labels of dtype {array.dtype}: expected integer ids or "
                                 "strings")


class Arrays(FileSplits):
    """Classification from arrays: .npz, .safetensors or tensor-only .pt files (`x_key`,
    `y_key`), or two .npy files (`path` for the inputs, `labels_path` for the labels)."""

    name: Literal["arrays"]
    x_key: str | None = Field(None, validate_default=True,
                              description="the inputs' name in the file (default 'x')")
    y_key: str | None = Field(None, validate_default=True,
                              description="the labels' name in the file (default 'y')")
    labels_path: str | None = Field(None, validate_default=True,
                                    description=".npy: the training labels' file")
    val_labels_path: str | None = Field(None, validate_default=True,
                                        description=".npy: the validation labels' file")
    test_labels_path: str | None = Field(None, validate_default=True,
                                         description=".npy: the test labels' file")
    num_classes: Annotated[int, Field(ge=2)] | None = Field(
        None, description="integer labels: the number of classes (default: largest id + 1)")
    normalize: bool = Field(False, description="standardise inputs with the training split's "
                                               "mean and std")

    @field_validator("x_key", "y_key")
    @classmethod
    def _keys_not_for_npy(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and str(info.data.get("path", "")).lower().endswith(".npy"):
            raise ValueError(".npy files hold one array each: the labels are labels_path")
        return v

    @field_validator("labels_path", "val_labels_path", "test_labels_path")
    @classmethod
    def _labels_for_npy(cls, v: str | None, info: ValidationInfo) -> str | None:
        inputs = info.data.get(_INPUTS_OF[str(info.field_name)])
        npy = str(inputs or "").lower().endswith(".npy")
        if npy and v is None:
            raise ValueError(f"{inputs} is a .npy file of inputs: give the labels' .npy file")
        if not npy and v is not None:
            raise ValueError("only for .npy inputs (other files hold the labels: y_key)")
        return v

    def _split_arrays(self, split: str, where: str) -> tuple[Tensor, Any, Path]:
        field = "path" if split == "train" else f"{split}_path"
        path = existing(str(self.given(split)), f"{where}.{field}")
        if path.suffix.lower() == ".npy":
            labels_field = "labels_path" if split == "train" else f"{split}_labels_path"
            labels_path = existing(getattr(self, labels_field), f"{where}.{labels_field}")
            x, y = _read(path, None), _read(labels_path, None)
        else:
            labels_path = path
            x, y = _read(path, self.x_key or "x"), _read(path, self.y_key or "y")
        inputs = _inputs(x, path)
        return inputs, _label_values(y, labels_path, len(inputs)), labels_path

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        files = {s: self._split_arrays(s, where) for s in SPLITS if self.given(s) is not None}
        shapes = {s: tuple(f[0].shape[1:]) for s, f in files.items()}
        if len(set(shapes.values())) > 1:
            raise ConfigError(f"{where}.{next(s for s in shapes if shapes[s] != shapes['train'])}"
                              f"_path", f"inputs of shape {shapes} differ between the files")
        train_x, train_values, train_file = files["train"]
        labels = self._label_map(train_values, train_file)
        x: dict[str, Tensor] = {}
        y: dict[str, Tensor] = {}
        for split, (inputs, values, labels_file) in files.items():
            x[split] = inputs
            y[split] = self._encode(labels, values, labels_file)
        parts = split_rows(self, len(train_x), have=set(files), labels=y["train"], where=where)
        for split, idx in parts.items():
            x[split], y[split] = train_x[idx], y["train"][idx]
        notes = labels.notes(y["train"]) + duplicate_notes(
            {s: [hashlib.blake2b(row.numpy().tobytes()).digest() for row in x[s]]
             for s in SPLITS}, "inputs")
        if self.normalize:
            mean, std = float(x["train"].mean()), float(x["train"].std())
            if ctx.run_dir is not None:
                atomic_write_text(Path(ctx.run_dir) / "normalization.json",
                                  json.dumps({"mean": mean, "std": std}, indent=2))
            x = {s: (v - mean) / (std or 1.0) for s, v in x.items()}
        save_labels(ctx.run_dir, labels.names)
        digests = [file_digest(Path(p)) for p in (
            self.path, self.labels_path, self.val_path, self.val_labels_path, self.test_path,
            self.test_labels_path) if p]
        params = self.model_dump(exclude={"path", "val_path", "test_path", "labels_path",
                                          "val_labels_path", "test_labels_path"})
        return DataSplits(
            name=Path(self.path).stem, train_x=x["train"], train_y=y["train"], val_x=x["val"],
            val_y=y["val"], test_x=x["test"], test_y=y["test"], num_classes=len(labels.names),
            input_shape=tuple(train_x.shape[1:]), class_names=labels.names, notes=notes,
            fingerprint=fingerprint("arrays", params, digests, x["train"], y["train"]))

    def _label_map(self, values: Any, path: Path) -> LabelMap:
        if isinstance(values, list):  # strings
            if self.num_classes is not None:  # the classes are the names found: refuse, not ignore
                raise ConfigError("data.num_classes", f"{path} holds string labels: the classes "
                                  "are the names in the training split; remove num_classes")
            return LabelMap.from_training(values, lambda i: f"{path} row {i}", "label")
        low = int(values.argmin())
        if values[low] < 0:
            raise ConfigError(f"{path} row {low}", f"label {values[low]} is out of range: class "
                                                   "ids start at 0")
        k = self.num_classes or int(values.max()) + 1
        return LabelMap(tuple(str(i) for i in range(k)), None)

    def _encode(self, labels: LabelMap, values: Any, path: Path) -> Tensor:
        if isinstance(values, list) or labels.by_name is not None:
            as_list = values if isinstance(values, list) else values.tolist()
            return labels.encode(as_list, lambda i: f"{path} row {i}", "label")
        bad = np.flatnonzero((values < 0) | (values >= len(labels.names)))
        if len(bad):
            raise ConfigError(f"{path} row {bad[0]}", f"label {values[bad[0]]} is out of range "
                                                      f"0..{len(labels.names) - 1}")
        return torch.from_numpy(values)
