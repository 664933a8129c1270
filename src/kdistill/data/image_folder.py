"""The user's images (`data.name: image_folder`): one subfolder per class, decoded on demand.

Layout: `path/<class>/<image>` (PNG, JPEG, BMP or WebP, read with Pillow); class ids follow
the sorted folder names (saved as `labels.json` in the run directory). `val_path` and
`test_path` may hold folders of their own with the same layout (a subset of the classes), or
validation and test are seeded, stratified fractions of `path` (`kdistill.data.splitting`).

Every file is read once when the data loads (`_scan`, in `num_workers` processes): its bytes
hashed (the fingerprint, and exact duplicates across splits), the image decoded (an unreadable
or truncated file stops the load with its name, or is skipped and counted with `skip_bad`),
converted to `channels` (grey or RGB: by default those of the first training image; images of
another mode are converted and counted in a note) and resized to `image_size` (bilinear; with
no `image_size`, an image of another size than the first is an error naming both). The
per-channel mean and std of the training split are computed in the same pass (or given as
`mean` / `std`) and saved as `normalization.json` in the run directory.

The splits' inputs are then `ImageFiles`: the file list, decoded on indexing into normalised
float32 batches (N, C, H, W), so a folder larger than memory works; `BatchLoader` decodes
training batches in `num_workers` worker processes (`kdistill.data.loader`), and the teacher
cache stays keyed by sample index. `random_crop` / `random_flip` augment training batches,
seeded by (seed, epoch, batch) like the built-in jitter.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import DataLoader

from kdistill.data.loader import crop_flip
from kdistill.data.source import LoadContext
from kdistill.data.splitting import (
    SPLITS,
    FileSplits,
    duplicate_notes,
    existing,
    fingerprint,
    path_field,
    save_labels,
    split_rows,
)
from kdistill.errors import ConfigError
from kdistill.io import atomic_write_text
from kdistill.types import DataSplits

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
GREY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes read as grey
SCAN_CHUNK = 256  # files per scan task


@dataclass(frozen=True)
class Look:
    """What every image becomes: Pillow mode ("L" or "RGB") and (height, width)."""

    mode: str
    size: tuple[int, int]
    resize: bool  # False: a different size is an error, not resized
    reference: str = ""  # the image the mode and size were taken from (for messages)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


class SizeMismatch(Exception):
    pass


def _pixels(source: Any, look: Look) -> tuple[np.ndarray, str]:
    """(H, W, C) uint8 pixels of an image file (a path or a byte stream), and its own mode."""
    from PIL import Image

    with Image.open(source) as im:
        im.load()  # decodes everything: a truncated file fails here, not later
        mode = im.mode
        out = im if im.mode == look.mode else im.convert(look.mode)
        if (out.height, out.width) != look.size:
            if not look.resize:
                raise SizeMismatch(f"{out.height}x{out.width}")
            out = out.resize((look.size[1], look.size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(out, dtype=np.uint8)
    return (array[:, :, None] if array.ndim == 2 else array), mode


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _scan(files: Sequence[str], look: Look) -> list[tuple[Any, ...]]:
    """Per file: (digest, own mode, channel sums, channel sums of squares) or (None, reason)."""
    out: list[tuple[Any, ...]] = []
    for path in files:
        try:
            data = Path(path).read_bytes()
            pixels, mode = _pixels(io.BytesIO(data), look)
        except SizeMismatch as exc:
            out.append((None, f"size:{exc}"))
            continue
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            out.append((None, _reason(exc)))
            continue
        values = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
        out.append((hashlib.sha256(data).digest(), mode, values.sum(0), (values ** 2).sum(0)))
    return out


class _ScanTasks(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str], look: Look) -> None:
        self.files, self.look = files, look

    def __len__(self) -> int:
        return math.ceil(len(self.files) / SCAN_CHUNK)

    def __getitem__(self, k: int) -> list[tuple[Any, ...]]:
        return _scan(self.files[k * SCAN_CHUNK:(k + 1) * SCAN_CHUNK], self.look)


def scan(files: Sequence[str], look: Look, workers: int) -> list[tuple[Any, ...]]:
    """`_scan` over every file, in `workers` processes (0: this one), in order."""
    if workers == 0 or len(files) <= SCAN_CHUNK:
        return _scan(files, look)
    loader = DataLoader(_ScanTasks(files, look), batch_size=None, num_workers=workers,
                        collate_fn=_as_is)
    return [result for chunk in loader for result in chunk]


def _as_is(chunk: Any) -> Any:
    return chunk


class ImageFiles:
    """A split of an image folder, decoded on indexing: `x[i]` (C, H, W), `x[a:b]` and
    `x[index_tensor]` (B, C, H, W), float32, normalised; `len(x)`, `x.shape`."""

    dtype = torch.float32

    def __init__(self, files: Sequence[str], look: Look, mean: Sequence[float],
                 std: Sequence[float], num_workers: int) -> None:
        self.files, self.look, self.num_workers = list(files), look, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        c = look.channels
        self._shift = torch.tensor([255.0 * m for m in mean]).view(1, c, 1, 1)
        self._scale = torch.tensor([255.0 * s for s in std]).view(1, c, 1, 1)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), self.look.channels, *self.look.size))

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, shape {tuple(self.shape)})"

    def subset(self, index: Sequence[int]) -> ImageFiles:
        return ImageFiles([self.files[i] for i in index], self.look, self.mean, self.std,
                          self.num_workers)

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, Tensor) and key.dim() == 0:
            key = int(key)
        if isinstance(key, int | np.integer):
            return self.decode([range(len(self))[int(key)]])[0]
        if isinstance(key, slice):
            return self.decode(range(len(self))[key])
        if isinstance(key, Tensor) and key.dtype == torch.bool:
            key = key.nonzero().flatten()
        index = key.tolist() if isinstance(key, Tensor | np.ndarray) else list(key)
        return self.decode([range(len(self))[int(i)] for i in index])

    def decode(self, index: Sequence[int]) -> Tensor:
        h, w = self.look.size
        out = np.empty((len(index), h, w, self.look.channels), dtype=np.uint8)
        for row, i in enumerate(index):
            try:
                out[row] = _pixels(self.files[i], self.look)[0]
            except Exception as exc:
                raise ConfigError(self.files[i], f"cannot read the image any more "
                                                 f"({_reason(exc)}); did it change during "
                                                 "the run?") from None
        x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().float()
        return x.sub_(self._shift).div_(self._scale)


# --- the source ----------------------------------------------------------------------------


def _listing(root: Path, field: str, classes: Sequence[str] | None
             ) -> tuple[list[str], list[str], list[int]]:
    """(class names, files, class ids) of a folder with one subfolder per class, sorted; the
    class ids index `classes` when given (a validation or test folder) or the folder's own."""
    if not root.is_dir():
        raise ConfigError(field, f"{root}: expected a folder with one subfolder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(field, f"{root}: no class folders; put each class's images in a "
                                 "subfolder named after the class")
    names = [f.name for f in folders]
    known = list(classes) if classes is not None else names
    files: list[str] = []
    ids: list[int] = []
    for folder in folders:
        if folder.name not in known:
            raise ConfigError(str(folder), f"class '{folder.name}' is not one of the training "
                                           f"folder's ({', '.join(known)})")
        images = sorted(str(p) for p in folder.rglob("*")
                        if p.suffix.lower() in SUFFIXES and p.is_file())
        if not images:
            raise ConfigError(str(folder), f"holds no images ({', '.join(SUFFIXES)})")
        files += images
        ids += [known.index(folder.name)] * len(images)
    return names, files, ids


def _first_look(files: Sequence[str], channels: int | None, size: tuple[int, int] | None
                ) -> Look:
    """The target mode and size: given, or those of the first image that opens."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as im:
                mode, own = im.mode, (im.height, im.width)
        except Exception:
            continue  # the scan reports it
        c = channels or (1 if mode in GREY else 3)
        return Look("L" if c == 1 else "RGB", size or own, resize=size is not None,
                    reference=path)
    raise ConfigError(str(Path(files[0]).parent.parent), "no image in it can be opened")


class ImageFolder(FileSplits):
    """Images in one subfolder per class (PNG, JPEG, BMP, WebP), decoded on demand in worker
    processes; normalised with the training split's statistics (or `mean` / `std`)."""

    name: Literal["image_folder"]
    image_size: Annotated[int, Field(ge=1)] | tuple[Annotated[int, Field(ge=1)],
                                                    Annotated[int, Field(ge=1)]] | None = Field(
        None, description="resize every image to this size (one number: square; [height, "
                          "width]); null: all images must have the first one's size")
    channels: Literal[1, 3] | None = Field(
        None, description="1 (grey) or 3 (RGB); other images are converted; null: those of "
                          "the first training image")
    mean: list[float] | None = Field(None, description="per-channel mean of pixels in [0, 1]; "
                                                       "null: the training split's")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="per-channel std of pixels in [0, 1]; null: the training split's")
    random_crop: Annotated[int, Field(ge=0)] = Field(
        0, description="augment: pad training images by this many pixels, crop back at random")
    random_flip: bool = Field(False, description="augment: mirror training images at random")
    num_workers: Annotated[int, Field(ge=0)] = Field(
        2, description="processes decoding images (0: the training process itself)")
    skip_bad: bool = Field(False, description="skip (and count) unreadable images instead of "
                                              "stopping")

    @field_validator("std")
    @classmethod
    def _both_or_neither(cls, v: list[float] | None, info: Any) -> list[float] | None:
        mean = info.data.get("mean")
        if (v is None) != (mean is None) or (v is not None and len(v) != len(mean)):
            raise ValueError("give mean and std together, one value per channel")
        return v

    def _size(self) -> tuple[int, int] | None:
        if self.image_size is None:
            return None
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        roots = {s: existing(str(self.given(s)), f"{where}.{path_field(s)}")
                 for s in SPLITS if self.given(s) is not None}
        classes, files, ids = _listing(roots["train"], f"{where}.path", None)
        listed = {"train": (files, ids)}
        for split in ("val", "test"):
            if split in roots:
                _, f, i = _listing(roots[split], f"{where}.{path_field(split)}", classes)
                listed[split] = (f, i)
        look = _first_look(files, self.channels, self._size())
        if self.mean is not None and len(self.mean) != look.channels:
            raise ConfigError(f"{where}.mean", f"{len(self.mean)} value(s) for "
                                               f"{look.channels}-channel images")
        results, notes = {}, []
        for split, (f, i) in listed.items():
            results[split], kept, skipped = self._checked(f, look, where)
            listed[split] = ([f[k] for k in kept], [i[k] for k in kept])
            results[split] = [results[split][k] for k in kept]
            notes += skipped
        return self._splits(ctx, classes, listed, results, look, tuple(notes))

    def _checked(self, files: list[str], look: Look, where: str
                 ) -> tuple[list[tuple[Any, ...]], list[int], list[str]]:
        """Scan results, the indices of the readable files, and a note on skipped ones."""
        results = scan(files, look, self.num_workers)
        bad = [k for k, r in enumerate(results) if r[0] is None]
        for k in bad:
            reason = results[k][1]
            if reason.startswith("size:"):
                raise ConfigError(f"{where}.image_size", f"{files[k]} is {reason[5:]} but "
                                  f"{look.reference} is {look.size[0]}x{look.size[1]}; set "
                                  "image_size to resize every image")
            if not self.skip_bad:
                raise ConfigError(files[k], f"cannot read the image ({reason}); fix or remove "
                                            "it, or set data.skip_bad: true to skip such files")
        kept = [k for k in range(len(files)) if results[k][0] is not None]
        if not kept:
            raise ConfigError(str(Path(files[0]).parent.parent), "holds no readable image")
        note = [f"data: skipped {len(bad)} unreadable image(s) (first: {files[bad[0]]}: "
                f"{results[bad[0]][1]})"] if bad else []
        return results, kept, note

    def _splits(self, ctx: LoadContext, classes: list[str],
                listed: dict[str, tuple[list[str], list[int]]],
                results: dict[str, list[tuple[Any, ...]]], look: Look,
                notes: tuple[str, ...]) -> DataSplits:
        files, ids = listed["train"]
        labels = torch.tensor(ids, dtype=torch.int64)
        parts = split_rows(self, len(files), have=set(listed), labels=labels, where=ctx.where,
                           what="images")
        chosen: dict[str, tuple[list[str], Tensor, list[tuple[Any, ...]]]] = {}
        for split in SPLITS:
            if split in listed and split != "train":
                f, i = listed[split]
                chosen[split] = (f, torch.tensor(i, dtype=torch.int64), results[split])
            else:
                idx = parts[split].tolist()
                chosen[split] = ([files[k] for k in idx], labels[idx],
                                 [results["train"][k] for k in idx])
        mean, std = self._statistics(chosen["train"][2], look, ctx)
        x = {s: ImageFiles(chosen[s][0], look, mean, std, self.num_workers) for s in SPLITS}
        every = [r for s in SPLITS for r in chosen[s][2]]
        converted = sum((r[1] in GREY) != (look.mode == "L") for r in every)
        if converted:
            notes += (f"data: {converted} image(s) converted to "
                      f"{'grey' if look.mode == 'L' else 'RGB'} (channels: {look.channels})",)
        notes += duplicate_notes({s: [r[0] for r in chosen[s][2]] for s in SPLITS}, "images")
        save_labels(ctx.run_dir, classes)
        roots = {s: Path(str(self.given(s))) for s in SPLITS if s in listed}
        digests = []
        for split in SPLITS:
            h = hashlib.sha256()
            for path, result in zip(chosen[split][0], chosen[split][2], strict=True):
                root = roots[split if split in roots else "train"]
                h.update(str(Path(path).relative_to(root)).encode() + b"\0" + result[0])
            digests.append(h.hexdigest())
        params = {"look": [look.mode, look.size, look.resize], "classes": classes,
                  "mean": list(mean), "std": list(std), "skip_bad": self.skip_bad,
                  "split": [self.split_seed, sorted(listed),
                            *(self.holdout(s) for s in ("val", "test") if s not in listed)]}
        augment = None
        if self.random_crop or self.random_flip:
            fill = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)])
            augment = crop_flip(self.random_crop, self.random_flip, fill)
        return DataSplits(
            # The inputs are ImageFiles, not tensors (`kdistill.data.loader.LazyInputs`).
            name=roots["train"].name, train_x=x["train"], train_y=chosen["train"][1],
            val_x=x["val"], val_y=chosen["val"][1], test_x=x["test"],
            test_y=chosen["test"][1], num_classes=len(classes),
            input_shape=(look.channels, *look.size), class_names=tuple(classes),
            fingerprint=fingerprint("image_folder", params, digests, chosen["train"][1]),
            notes=notes, augment=augment)

    def _statistics(self, train: list[tuple[Any, ...]], look: Look, ctx: LoadContext
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The recipe's mean / std, or the training split's per channel (saved in the run
        directory as normalization.json)."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        count = len(train) * look.size[0] * look.size[1]
        sums = np.sum([r[2] for r in train], axis=0)
        squares = np.sum([r[3] for r in train], axis=0)
        mean = sums / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)  # a constant channel: leave its scale
        stats = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        if ctx.run_dir is not None:
            atomic_write_text(Path(ctx.run_dir) / "normalization.json", json.dumps(
                {"mean": stats[0], "std": stats[1], "channels": look.channels,
                 "image_size": list(look.size)}, indent=2))
        return stats
