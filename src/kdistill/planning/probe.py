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
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

# glibc's malloc serves requests below its mmap threshold from the heap, whose freed memory
# stays in the process (resident) for later requests; larger ones get their own mapping,
# unmapped when freed. The threshold starts at 128 KiB and rises, as such mappings are freed,
# up to 32 MiB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX), which a run reaches within its
# first steps: tensors under 32 MiB are "heap" below.
HEAP_MAX = 32 * 2**20


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

    def deltas(self, without: Collection[tuple[str, int]] = ()) -> tuple[int, ...]:
        """The signed sizes in order (+ created, − freed), leaving the storages `without` out."""
        return tuple(delta for delta, key in self.events if key not in without)


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


def heap_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages under `HEAP_MAX` (served from malloc's heap)."""
    sizes = {_key(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for n in sizes.values() if n < HEAP_MAX)


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


def _at(v1: int, v2: int, b1: int, b2: int, batch: int) -> int:
    """v(batch) on the line through (b1, v1), (b2, v2), never across zero."""
    v = v1 * batch / b1 if b1 == b2 else v1 + (v2 - v1) * (batch - b1) / (b2 - b1)
    return max(0, round(v)) if v1 >= 0 else min(0, round(v))


@dataclass(frozen=True)
class Trace:
    """Signed storage sizes in creation order (+ created, − freed) at two probe batches.

    Each size is extrapolated on its own to the batch asked for (a + b·batch: a row per
    sample, plus what does not grow with the batch); replaying them gives the peak of live
    bytes and the peak of those in heap-sized pieces (< `HEAP_MAX`). Probes whose sequences
    differ (another kernel chosen at the other batch) fall back to a line through the two
    peaks, all of it counted as mapped (not heap)."""

    b1: int
    d1: tuple[int, ...]
    b2: int
    d2: tuple[int, ...]

    @staticmethod
    def sizes(b1: int, s1: Iterable[int], b2: int, s2: Iterable[int]) -> Trace:
        """A trace of storages that all stay alive (e.g. what autograd saved)."""
        return Trace(b1, tuple(s1), b2, tuple(s2))

    def _aligned(self) -> bool:
        return len(self.d1) == len(self.d2) and all(
            (x > 0) == (y > 0) for x, y in zip(self.d1, self.d2, strict=True))

    def replay(self, batch: int) -> tuple[int, int]:
        """(peak of live bytes, peak of live heap bytes) at `batch`."""
        if not self._aligned():
            return _peak_line(self, batch), 0
        live = heap = peak = heap_peak = 0
        for x, y in zip(self.d1, self.d2, strict=True):
            d = _at(x, y, self.b1, self.b2, batch)
            live += d
            peak = max(peak, live)
            if abs(d) < HEAP_MAX:
                heap += d
                heap_peak = max(heap_peak, heap)
        return peak, heap_peak

    def at(self, batch: int) -> int:
        return self.replay(batch)[0]

    def heap_at(self, batch: int) -> int:
        return self.replay(batch)[1]


def _peak(deltas: tuple[int, ...]) -> int:
    live = peak = 0
    for d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def _peak_line(t: Trace, batch: int) -> int:
    p1, p2 = _peak(t.d1), _peak(t.d2)
    if t.b1 == t.b2:
        return round(p1 * batch / t.b1)
    slope = max(0.0, (p2 - p1) / (t.b2 - t.b1))
    const = p1 - slope * t.b1
    return max(0, round(const + slope * batch)) if const >= 0 else round(p2 * batch / t.b2)
