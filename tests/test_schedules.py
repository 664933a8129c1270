import math

import pytest
from pydantic import TypeAdapter, ValidationError

from kdistill.schedules import Progress, Schedule, bounds, check_range, value_at

ADAPTER = TypeAdapter(Schedule)


def at(spec: object, step: int, total: int = 11, per_epoch: int = 1) -> float:
    sched = ADAPTER.validate_python(spec)
    return value_at(sched, Progress(step, step // per_epoch, total, per_epoch))


def test_constant_number_and_mapping() -> None:
    assert at(4, 0) == at(4, 10) == 4.0
    assert at({"kind": "constant", "value": 2.5}, 7) == 2.5


def test_linear_high_early_low_late() -> None:
    spec = {"kind": "linear", "start": 8, "end": 2}
    assert at(spec, 0) == 8.0
    assert at(spec, 5) == pytest.approx(5.0)  # halfway of steps 0..10
    assert at(spec, 10) == 2.0


def test_cosine_endpoints_and_midpoint() -> None:
    spec = {"kind": "cosine", "start": 1.0, "end": 0.0}
    assert at(spec, 0) == pytest.approx(1.0)
    assert at(spec, 5) == pytest.approx(0.5)
    assert at(spec, 10) == pytest.approx(0.0, abs=1e-12)
    assert at(spec, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_step_milestones() -> None:
    spec = {"kind": "step", "values": [0.7, 0.3], "milestones": [0.5]}
    assert at(spec, 4) == 0.7
    assert at(spec, 5) == 0.3


def test_warmup_ramps_then_holds() -> None:
    spec = {"kind": "warmup", "value": 4.0, "warmup": 0.5}
    assert at(spec, 0) == 0.0
    assert at(spec, 2) == pytest.approx(4.0 * 0.2 / 0.5)
    assert at(spec, 8) == 4.0


def test_epoch_unit_changes_only_at_epoch_boundaries() -> None:
    spec = {"kind": "linear", "start": 10, "end": 0, "unit": "epoch"}
    # 3 epochs of 4 steps: epochs 0, 1, 2 -> fractions 0, 0.5, 1
    values = [at(spec, s, total=12, per_epoch=4) for s in range(12)]
    assert values[:4] == [10.0] * 4
    assert values[4:8] == [5.0] * 4
    assert values[8:] == [0.0] * 4


def test_bad_schedules_are_rejected() -> None:
    with pytest.raises(ValidationError):
        ADAPTER.validate_python({"kind": "linear", "start": 1})  # no end
    with pytest.raises(ValidationError):
        ADAPTER.validate_python({"kind": "step", "values": [1, 2], "milestones": []})
    with pytest.raises(ValidationError):
        ADAPTER.validate_python({"kind": "linear", "start": 1, "end": 0, "extra": 1})
    with pytest.raises(ValidationError):
        ADAPTER.validate_python({"kind": "zigzag"})


def test_bounds_and_range_check() -> None:
    spec = ADAPTER.validate_python({"kind": "linear", "start": 0.9, "end": 0.3})
    assert bounds(spec) == (0.3, 0.9)
    check_range(spec, "alpha", low=0, high=1)
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        check_range(ADAPTER.validate_python({"kind": "linear", "start": 0.5, "end": 1.5}),
                    "alpha", low=0, high=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        check_range(0.0, "temperature", low=0, low_open=True)
