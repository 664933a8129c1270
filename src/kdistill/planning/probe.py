"""Measuring instruments of the memory plan: tensor bytes alive, bytes saved for backward, and
this process's resident memory.

- `LiveBytes`: a dispatch mode that sees every tensor an operator creates inside the block and
  keeps the running total of their storages still alive (a weak reference on each storage
  tells when it is freed), and its peak. It is the allocator's view of a forward or a training
  step, on any device, with no allocator statistics (the CPU has none).
- `saved_bytes`: `torch.autograd.graph.saved_tensors_hooks` summing the distinct storages that
  autograd keeps for the backward pass: the activations of a training step.
- `rss`, `reset_peak`: /proc/self/status (Linux): the resident set, split into anonymous
  memory (heap, tensors) and file-backed pages (libraries' code, memory-mapped files), and
  its high-water mark, which writing "5" to /proc/self/clear_refs resets.

Parameters, buffers and the inputs handed in as `known` are not counted: they exist before
the block and the plan counts them as their own parts.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _key(t: Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def storage_keys(tensors: Iterable[Tensor]) -> set[tuple[str, int]]:
    """The storages of `tensors` (views of one storage give one key)."""
    return {_key(t) for t in tensors if isinstance(t, Tensor)}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the block that are still alive, and their peak.

    Every storage is logged in creation order (`events`: +bytes at creation, −bytes when
    freed, with its key), so a peak can be recomputed leaving some storages out
    (`peak_without`), e.g. the parameters' gradients, which the plan counts on their own.
    """

    def __init__(self, known: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.known = storage_keys(known)
        self.live = 0
        self.peak = 0
        self.events: list[tuple[int, tuple[str, int]]] = []
        self._alive: set[tuple[str, int]] = set()

    def _freed(self, key: tuple[str, int], nbytes: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= nbytes
            self.events.append((-nbytes, key))

    def track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        nbytes = storage.nbytes()
        if nbytes == 0 or key in self.known or key in self._alive:
            return
        self._alive.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.events.append((nbytes, key))
        weakref.finalize(storage, self._freed, key, nbytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.track(t)
        return out

    def peak_without(self, keys: set[tuple[str, int]]) -> int:
        """The peak of live bytes had the storages `keys` never been allocated."""
        live = peak = 0
        for delta, key in self.events:
            if key not in keys:
                live += delta
                peak = max(peak, live)
        return peak


@contextlib.contextmanager
def saved_bytes(known: Iterable[Tensor] = ()) -> Iterator[dict[tuple[str, int], int]]:
    """Within the block, the distinct storages autograd saves for backward: key -> bytes.

    A storage saved by several operators (a ReLU's output is also the next Linear's input)
    counts once; parameters and the storages in `known` are left out."""
    skip = storage_keys(known)
    saved: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _key(t)
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct storages in a tensor, or in a (nested) tuple/list/dict of them."""
    seen: dict[tuple[str, int], int] = {}
    for t in tree_leaves(value):
        if isinstance(t, Tensor):
            seen[_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class Memory:
    """This process's memory from /proc/self/status, in bytes."""

    rss: int
    peak: int  # VmHWM: the high-water mark since start or the last `reset_peak`
    anon: int
    file: int


def rss() -> Memory | None:
    """The current resident memory, or None where /proc/self/status is not there."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    if len(fields) < 4:
        return None
    return Memory(fields["VmRSS"], fields["VmHWM"], fields["RssAnon"], fields["RssFile"])


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Growth:
    """What a block added to this process's memory: resident after it, and its peak."""

    resident: int = 0  # RSS after − RSS before (anonymous and file-backed pages)
    peak: int = 0  # high-water mark during the block − RSS before (0 where not measurable)
    anon: int = 0  # the anonymous part of `resident`


@contextlib.contextmanager
def measure_growth() -> Iterator[list[Growth]]:
    """`with measure_growth() as out:` ... `out[0]` is the block's `Growth` (zeros off Linux)."""
    out: list[Growth] = []
    resettable = reset_peak()
    before = rss()
    try:
        yield out
    finally:
        after = rss()
        if before is None or after is None:
            out.append(Growth())
        else:
            peak = after.peak - before.rss if resettable else after.rss - before.rss
            out.append(Growth(after.rss - before.rss, max(peak, after.rss - before.rss),
                              after.anon - before.anon))


@dataclass(frozen=True)
class Line:
    """bytes(batch) = const + per_sample · batch, fitted on two probe batches."""

    const: float
    per_sample: float

    def at(self, batch: int) -> int:
        return max(0, round(self.const + self.per_sample * batch))


def fit(b1: int, v1: int, b2: int, v2: int) -> Line:
    """The line through (b1, v1) and (b2, v2); through the origin when b1 == b2. A negative
    intercept (a probe at batch 1 took another kernel) is dropped: bytes ∝ batch then."""
    if b1 == b2:
        return Line(0.0, v1 / max(b1, 1))
    slope = max(0.0, (v2 - v1) / (b2 - b1))
    const = v1 - slope * b1
    if const < 0:
        return Line(0.0, v2 / b2)
    return Line(const, slope)
