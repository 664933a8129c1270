"""In-memory batching with sample indices, deterministic per (seed, epoch) and resumable.

For data sets that fit in memory (all the built-in ones) slicing tensors is several times
faster than `torch.utils.data.DataLoader` with per-sample `__getitem__` + collate, and the
batch order is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted run would. Every batch carries `index`, the sample ids that key the teacher cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from kdistill.types import Batch

Augment = Callable[[Tensor, torch.Generator], Tensor]


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
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, _generator(self.seed, epoch, b))
            yield {"index": idx, "input": x, "label": self.y[idx]}


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
