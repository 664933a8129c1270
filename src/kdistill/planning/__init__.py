"""The memory plan (`kdistill plan RECIPE.yaml`, and one line at the start of a run): the
estimated peak memory of each stage of a run for a device, precision and batch, against the
device's memory, with the recipe fields to change when it does not fit. docs/memory.md says
what is counted and how the estimate was checked."""

from __future__ import annotations

from kdistill.planning.estimate import plan
from kdistill.planning.memory import Advice, MemoryPlan, Part, Phase, Stage, capacity
from kdistill.types import Echo

__all__ = ["Advice", "MemoryPlan", "Part", "Phase", "Stage", "capacity", "plan", "plan_command"]


def plan_command(recipe: str | None, overrides: list[str], *, echo: Echo = print) -> int:
    """`kdistill plan [RECIPE.yaml] [key=value ...]`: print the plan's table, its one line and
    any warning; 1 when the plan does not fit the device, else 0. Bad input raises a
    `ConfigError` (the CLI prints it as one line, exit 2)."""
    from kdistill.config import load_config

    result = plan(load_config(recipe, overrides))
    echo(result.table())
    echo("")
    for note in result.notes:
        echo(f"note: {note}")
    echo(result.one_line())
    for line in result.warnings():
        echo(f"warning: {line}")
    return 1 if result.fits is False else 0
