"""What `kdistill.engine.train` accepts, checked once at the start: its settings, the batches,
the teacher. Misuse is a `TypeError` naming the argument, before any training.

`LoopSettings` holds what the loop itself reads; a recipe's `train:` section
(`kdistill.config.TrainSettings`) has the same fields and more (batch size, optimizer, seeds,
augmentation, which shape the loader and optimizer the pipeline builds) and is accepted too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from kdistill.config import TrainSettings
from kdistill.data.loader import BatchLoader
from kdistill.devices import DEVICE_PATTERN
from kdistill.methods.base import Method
from kdistill.schedules import Schedule, check_range
from kdistill.teachers import CachedTeacher, EnsembleTeacher, OnlineTeacher, Teacher
from kdistill.types import Batch


class LoopSettings(BaseModel):
    """The training loop's own settings, for `train()` called from Python. The defaults change
    nothing the caller set up: one epoch, the optimizer's learning rate throughout
    (`lr_schedule` 1), no clipping, fp32, on the device the student is on (`device` None; a
    name such as "cuda" moves student and method there), eager, DDP under torchrun."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: Annotated[int, Field(ge=1)] = 1
    grad_accum: Annotated[int, Field(ge=1)] = 1
    lr_schedule: Schedule = Field(1.0, description="multiplier on each group's lr, e.g. "
                                  "{kind: cosine, start: 1, end: 0.05}; 1: the lr as given")
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = None
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the networks' forward; fp16 adds a gradient scaler "
        "and needs a GPU")
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="None: where the "
                               "student is; auto, cpu, cuda, cuda:N or mps: moved there")
    compile: bool = Field(False, description="torch.compile the student's forward and the "
                          "method's loss terms")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp, or fsdp "
                                             "(student and teacher sharded with FSDP2)")
    max_steps: Annotated[int, Field(ge=1)] | None = None
    log_every: Annotated[int, Field(ge=1)] = 50
    eval_every_epochs: Annotated[int, Field(ge=1)] = 1
    checkpoint_every_steps: Annotated[int, Field(ge=1)] | None = None

    @field_validator("lr_schedule")
    @classmethod
    def _lr_non_negative(cls, v: Schedule) -> Schedule:
        return check_range(v, "lr_schedule", low=0.0)


Settings = LoopSettings | TrainSettings


class Batches(Protocol):
    """What the loop iterates: the batches of one epoch from a given batch on; `length` is the
    number of batches per epoch (None: unknown, the run then needs `max_steps`)."""

    length: int | None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


class LoaderBatches:
    """kdistill's `BatchLoader`: the batch order is a function of (seed, epoch), so a resumed
    run sees exactly the batches the uninterrupted one would."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader, self.length = loader, len(loader)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        return self.loader.epoch(epoch, start=start)


class IterableBatches:
    """Any iterable of `(inputs, labels)` pairs or dicts with "input" and "label" (and
    optionally "index", the sample ids a teacher cache is read by; other keys are kept), such as
    a torch `DataLoader`. It is iterated afresh every epoch. Batches without "index" get running
    positions in the epoch (0, 1, ...), which are sample ids only if the loader does not
    shuffle. A resumed epoch skips the batches the checkpoint had consumed: exact when the
    loader yields the same batches for the same epoch, as a DataLoader does when it shuffles
    with torch's global RNG (its seed is drawn from (seed, epoch) here) and its transforms
    draw no random numbers; not with a sampler `generator=` of its own."""

    def __init__(self, source: Iterable[Any], *, needs_ids: bool = False,
                 seed: int = 0) -> None:
        self.source, self.needs_ids, self.seed = source, needs_ids, seed
        self.length = len(source) if isinstance(source, Sized) else None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        # A DataLoader draws its shuffling seed from torch's global RNG when iterated. It draws
        # here from a copy seeded by (seed, epoch): each epoch has its own order, the same in
        # a resumed run, and the training's random stream (dropout) does not depend on it.
        # (A sampler draws lazily, at the first batch: that one is fetched in the copy too.)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_of(self.seed, epoch))
            items = iter(self.source)
            first = list(itertools.islice(items, 1))
        seen = 0
        for number, item in enumerate(itertools.chain(first, items)):
            batch = as_batch(item, seen, needs_ids=self.needs_ids)
            seen += len(batch["label"])
            if number >= start:
                yield batch


def seed_of(*keys: int) -> int:
    """A stable mix of integer keys into one seed (no Python hash randomisation)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return seed


def as_batch(item: Any, seen: int = 0, *, needs_ids: bool = False) -> Batch:
    """One loader item as the loop's dict batch; `seen`: samples before it in the epoch."""
    if isinstance(item, dict):
        batch = dict(item)
    elif isinstance(item, tuple | list) and len(item) == 2:
        batch = {"input": item[0], "label": item[1]}
    else:
        raise TypeError(f"loader: yields {type(item).__name__}; expected (inputs, labels) "
                        "tensors or a dict with 'input' and 'label' (and optionally 'index')")
    for key in ("input", "label"):
        if not isinstance(batch.get(key), Tensor):
            got = type(batch.get(key)).__name__ if key in batch else "nothing"
            raise TypeError(f"loader: a batch's '{key}' is {got}; expected a tensor")
    if "index" not in batch:
        if needs_ids:
            raise TypeError("loader: its batches carry no 'index' (sample ids), which a "
                            "CachedTeacher reads its outputs by; yield dicts with 'input', "
                            "'label' and 'index', or use kdistill.BatchLoader")
        n = len(batch["label"])
        batch["index"] = torch.arange(seen, seen + n)  # on the host, like the cache it keys
    return batch


def as_batches(loader: object, teacher: Teacher | None, seed: int = 0) -> Batches:
    """The loop's view of `loader`; a cached teacher needs real sample ids in every batch (a
    TypeError at the first batch without them)."""
    if isinstance(loader, BatchLoader):
        return LoaderBatches(loader)
    if isinstance(loader, str | bytes | Tensor | dict) or not isinstance(loader, Iterable):
        raise TypeError(f"loader: expected a BatchLoader or an iterable of (inputs, labels) "
                        f"batches such as a DataLoader; got {type(loader).__name__}")
    return IterableBatches(loader, needs_ids=_reads_cache(teacher), seed=seed)


def _reads_cache(teacher: Teacher | None) -> bool:
    if isinstance(teacher, EnsembleTeacher):
        return any(_reads_cache(t) for t in teacher.sources)
    return isinstance(teacher, CachedTeacher)


def as_teacher(teacher: object) -> Teacher | None:
    """A plain network becomes an `OnlineTeacher` (frozen, eval mode, run without gradients)."""
    if teacher is None or isinstance(teacher, OnlineTeacher | CachedTeacher | EnsembleTeacher):
        return teacher
    if isinstance(teacher, nn.Module):
        return OnlineTeacher(teacher)
    if callable(teacher) and hasattr(teacher, "forwards"):  # another `Teacher`
        return teacher  # type: ignore[return-value]
    raise TypeError(f"teacher: expected an nn.Module, a kdistill teacher (OnlineTeacher, "
                    f"CachedTeacher) or None; got {type(teacher).__name__}")


def check_arguments(student: object, method: object, optimizer: object, cfg: object,
                    checkpoint_dir: object) -> None:
    """A TypeError naming the first argument of the wrong kind."""
    expected: list[tuple[str, object, type | tuple[type, ...], str]] = [
        ("student", student, nn.Module, "an nn.Module"),
        ("method", method, Method, "a kdistill Method (kdistill.build_method(config))"),
        ("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer"),
        ("cfg", cfg, (LoopSettings, TrainSettings, type(None)),
         "a kdistill.LoopSettings, a TrainSettings or None"),
        ("checkpoint_dir", checkpoint_dir, (str, Path, type(None)), "a path or None"),
    ]
    for name, value, kind, what in expected:
        if not isinstance(value, kind):
            raise TypeError(f"{name}: expected {what}; got {type(value).__name__}")


def groups(batches: Iterator[Batch], size: int) -> Iterator[tuple[list[Batch], bool]]:
    """Consecutive groups of `size` batches (one optimiser step each), and whether a group is
    the epoch's last (read one group ahead, so loaders without len() work too)."""
    group = list(itertools.islice(batches, size))
    while group:
        following = list(itertools.islice(batches, size))
        yield group, not following
        group = following
