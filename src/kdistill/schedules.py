"""Schedules: a value that follows training progress, for the temperature and every loss weight.

A recipe writes a plain number for a constant, or a mapping with a `kind`:

    temperature: {kind: linear, start: 8, end: 2}            # high T early, low T late
    alpha: {kind: cosine, start: 0.7, end: 0.3, unit: epoch}  # soft/hard weight that moves
    alpha: {kind: step, values: [0.9, 0.5], milestones: [0.5]}
    temperature: {kind: warmup, start: 1, value: 4, warmup: 0.1}  # ramp 1 -> 4 over 10 %

Positions are fractions of training in [0, 1]: by optimiser step (`unit: step`, the default) or
by finished epochs (`unit: epoch`, the value only changes at epoch boundaries). `milestones`
and `warmup` are fractions too, so a schedule keeps its shape when the run length changes.

Every value is a finite number: `.nan` or `.inf` is refused when the recipe is read (one field
error), never met mid-run as a NaN loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, model_validator


@dataclass(frozen=True)
class Progress:
    """Where training stands; passed to every method so schedules are explicit."""

    step: int  # optimiser steps taken so far (0 at the first step)
    epoch: int  # current epoch (0-based)
    total_steps: int  # optimiser steps in the whole run
    steps_per_epoch: int

    def fraction(self, unit: Literal["step", "epoch"] = "step") -> float:
        """Fraction of training done, in [0, 1]."""
        if unit == "epoch":
            total_epochs = max(1, math.ceil(self.total_steps / max(1, self.steps_per_epoch)))
            return min(1.0, self.epoch / max(1, total_epochs - 1)) if total_epochs > 1 else 0.0
        return min(1.0, self.step / max(1, self.total_steps - 1))


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    unit: Literal["step", "epoch"] = "step"


class Constant(_Base):
    kind: Literal["constant"]
    value: FiniteFloat

    def at(self, x: float) -> float:
        return self.value


class Linear(_Base):
    kind: Literal["linear"]
    start: FiniteFloat
    end: FiniteFloat

    def at(self, x: float) -> float:
        return self.start + (self.end - self.start) * x


class Cosine(_Base):
    kind: Literal["cosine"]
    start: FiniteFloat
    end: FiniteFloat

    def at(self, x: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * x))


class Step(_Base):
    """Piecewise constant: `values[i]` until the fraction reaches `milestones[i]`."""

    kind: Literal["step"]
    values: list[FiniteFloat] = Field(min_length=1)
    milestones: list[Annotated[float, Field(gt=0, lt=1)]] = []

    @model_validator(mode="after")
    def _check(self) -> Step:
        if len(self.milestones) != len(self.values) - 1:
            raise ValueError("step schedule needs len(milestones) == len(values) - 1")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError("step schedule milestones must increase")
        return self

    def at(self, x: float) -> float:
        i = sum(1 for m in self.milestones if x >= m)
        return self.values[i]


class Warmup(_Base):
    """Linear ramp from `start` to `value` over the first `warmup` fraction, then constant."""

    kind: Literal["warmup"]
    value: FiniteFloat
    start: FiniteFloat = 0.0
    warmup: float = Field(gt=0, le=1)

    def at(self, x: float) -> float:
        return self.value if x >= self.warmup else self.start + (self.value - self.start) * (
            x / self.warmup
        )


ScheduleModel = Annotated[Constant | Linear | Cosine | Step | Warmup, Field(discriminator="kind")]
Schedule = FiniteFloat | ScheduleModel
"""The type recipe fields use: a plain (finite) number or one of the schedule mappings."""


def value_at(schedule: Schedule, progress: Progress) -> float:
    """The schedule's value at this point of training."""
    if isinstance(schedule, int | float):
        return float(schedule)
    return schedule.at(progress.fraction(schedule.unit))


def bounds(schedule: Schedule) -> tuple[float, float]:
    """Smallest and largest value the schedule takes (for range checks in configs)."""
    if isinstance(schedule, int | float):
        return float(schedule), float(schedule)
    if isinstance(schedule, Constant):
        vals = [schedule.value]
    elif isinstance(schedule, Linear | Cosine):
        vals = [schedule.start, schedule.end]
    elif isinstance(schedule, Step):
        vals = list(schedule.values)
    else:
        vals = [schedule.start, schedule.value]
    return min(vals), max(vals)


def check_range(
    schedule: Schedule, name: str, *, low: float | None = None, high: float | None = None,
    low_open: bool = False,
) -> Schedule:
    """Raise ValueError (pydantic turns it into a field error) if the schedule leaves a range."""
    lo, hi = bounds(schedule)
    if low is not None and (lo <= low if low_open else lo < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low} (got {lo})")
    if high is not None and hi > high:
        raise ValueError(f"{name} must be <= {high} (got {hi})")
    return schedule


# Field types for method configs: schedules with their range checked once, here.
Temperature = Annotated[
    Schedule, AfterValidator(lambda v: check_range(v, "temperature", low=0.0, low_open=True))
]
"""A temperature schedule: every value > 0."""
UnitWeight = Annotated[Schedule, AfterValidator(lambda v: check_range(v, "alpha", low=0.0,
                                                                      high=1.0))]
"""A mixing weight schedule such as KD's α: every value in [0, 1]."""
