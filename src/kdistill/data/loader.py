"""Batching with sample indices, deterministic per (seed, epoch) and resumable.

For data sets that fit in memory (all the built-in ones) slicing tensors is several times
faster than `torch.utils.data.DataLoader` with per-sample `__getitem__` + collate, and the
batch order is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted run would. Every batch carries `index`, the sample ids that key the teacher cache.

Inputs that are decoded on demand (`LazyInputs`, e.g. an image folder's files) take the same
batches, decoded in `x.num_workers` worker processes by a `torch.utils.data.DataLoader` whose
sampler yields this loader's index lists; each batch's augmentation is seeded by (seed, epoch,
batch) in whichever worker runs it, so the batches are those of the in-memory path, bit for
bit, with any number of workers. The workers persist for the loader's life (no start-up cost
per epoch) and decode up to `PREFETCH` batches each ahead of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdistill.errors import KDistillError
from kdistill.types import Batch

Augment = Callable[[Tensor, torch.Generator], Tensor]
PREFETCH = 4  # batches each worker decodes ahead


@runtime_checkable
class LazyInputs(Protocol):
    """Inputs decoded on indexing (`x[i]`, `x[a:b]`, `x[index_tensor]` -> a float tensor), with
    `len(x)`, `x.shape` and the number of worker processes that decode training batches."""

    num_workers: int
    shape: torch.Size

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> Tensor: ...


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:  # a simple, stable mix of the keys (no Python hash randomisation)
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    """Yields `{"index", "input", "label"}` batches over tensors `x` (N, ...) and `y` (N,).

    Args:
        batch_size: samples per batch; the last batch is smaller unless `drop_last`.
        shuffle: a fresh permutation every epoch, drawn from (seed, epoch).
        augment: optional `f(x_batch, generator) -> x_batch`, seeded by (seed, epoch, batch),
            so augmentations are reproducible and survive a resume.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.drop_last = augment, drop_last
        lazy = isinstance(x, LazyInputs) and not isinstance(x, Tensor)
        self.num_workers = int(x.num_workers) if lazy else 0
        self._keys = _Keys()
        self._workers: DataLoader | None = None

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, beginning at batch number `start` (for resuming)."""
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, epoch))
        else:
            order = torch.arange(n)
        keys = [(epoch, b, order[b * self.batch_size : (b + 1) * self.batch_size])
                for b in range(start, len(self))]
        if self.num_workers == 0:
            for key in keys:
                yield self.batch(key)
            return
        if self._workers is None:
            self._workers = DataLoader(_Batches(self.x, self.y, self.augment, self.seed),
                                       sampler=self._keys, batch_size=None,
                                       num_workers=self.num_workers, collate_fn=_as_is,
                                       persistent_workers=True, prefetch_factor=PREFETCH)
        self._keys.keys = keys
        for batch in self._workers:
            if "error" in batch:  # a bad file found in a worker: its own one-line error
                raise batch["error"]
            yield batch

    def batch(self, key: tuple[int, int, Tensor]) -> Batch:
        return _batch(self.x, self.y, self.augment, self.seed, key)


def _batch(x: Tensor, y: Tensor, augment: Augment | None, seed: int,
           key: tuple[int, int, Tensor]) -> Batch:
    """Batch number `b` of `epoch`, samples `idx`: inputs gathered (or decoded) and augmented
    with the generator of (seed, epoch, b)."""
    epoch, b, idx = key
    inputs = x[idx]
    if augment is not None:
        inputs = augment(inputs, _generator(seed, epoch, b))
    return {"index": idx, "input": inputs, "label": y[idx]}


class _Keys:
    """The sampler of the worker pool: this epoch's (epoch, batch number, indices), set by
    `BatchLoader.epoch` before each pass."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, Tensor]] = []

    def __iter__(self) -> Iterator[tuple[int, int, Tensor]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class _Batches(Dataset):
    """What a worker runs: one whole batch per key. A kdistill error (an unreadable file) is
    sent back as data, so the main process raises it as it is (the DataLoader would turn it
    into a RuntimeError with a traceback in its text)."""

    def __init__(self, x: Tensor, y: Tensor, augment: Augment | None, seed: int) -> None:
        self.x, self.y, self.augment, self.seed = x, y, augment, seed

    def __getitem__(self, key: tuple[int, int, Tensor]) -> dict[str, Any]:
        try:
            return _batch(self.x, self.y, self.augment, self.seed, key)
        except KDistillError as exc:
            return {"error": exc}


def _as_is(batch: Batch) -> Batch:
    return batch


def jitter(max_shift: int) -> Augment:
    """Random translation of images (B, C, H, W) by up to `max_shift` pixels in each direction.

    Hinton et al. 2015 trained their MNIST teacher on inputs "jittered by up to two pixels in
    any direction". Shifted-in pixels take the batch's background value (its minimum).
    """

    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"jitter needs image batches (B, C, H, W), got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        k = max_shift
        padded = torch.nn.functional.pad(x, (k, k, k, k), value=float(x.min()))
        dy = torch.randint(0, 2 * k + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * k + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        chan = torch.arange(x.shape[1])[None, :, None, None]
        return padded[batch, chan, rows, cols]

    return apply


def crop_flip(padding: int, flip: bool, fill: Tensor) -> Augment:
    """Random crops of images (B, C, H, W) padded by `padding` pixels of `fill` (C,) on every
    side, and random horizontal flips (probability 1/2) when `flip`: the standard CIFAR
    augmentation (He et al. 2016, arXiv:1512.03385, section 4.2)."""

    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        if padding:
            k = padding
            padded = fill.to(x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * k, w + 2 * k).clone()
            padded[:, :, k:k + h, k:k + w] = x
            dy = torch.randint(0, 2 * k + 1, (b,), generator=gen)
            dx = torch.randint(0, 2 * k + 1, (b,), generator=gen)
            rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
            x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                       rows, cols]
        if flip:
            mirror = torch.rand(b, generator=gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x

    return apply


def compose(*augments: Augment | None) -> Augment | None:
    """The given augmentations applied in order (None entries skipped); None if none."""
    chosen = [a for a in augments if a is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]

    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        for augment in chosen:
            x = augment(x, gen)
        return x

    return apply
