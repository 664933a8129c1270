"""benchmarks/batch1_speed.py's timing loop: every model timed once per round on that
round's text, in an order that changes between rounds, each on the second of two calls."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .conftest import REPO


class _Logged(nn.Module):
    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, int(x[0, 0])))
        return x


def test_rounds_shuffle_the_models_and_time_the_second_call() -> None:
    spec = importlib.util.spec_from_file_location("batch1", REPO / "benchmarks" / "batch1_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log: list[tuple[str, int]] = []
    models = {name: _Logged(name, log) for name in ("teacher", "a", "b", "c")}
    x = torch.arange(7)[:, None]
    times = bench.interleaved(models, x, rounds=12)
    assert all(len(t) == 12 for t in times.values())
    calls = log[4 * 5:]  # after five warm-up calls per model
    assert len(calls) == 12 * 4 * 2
    pairs = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert all(p[0] == p[1] for p in pairs)  # two calls back to back, same model, same text
    orders = [tuple(p[0][0] for p in pairs[r * 4:(r + 1) * 4]) for r in range(12)]
    assert len(set(orders)) > 1 and all(sorted(o) == sorted(models) for o in orders)
    assert [pairs[r * 4][0][1] for r in range(12)] == [r % 7 for r in range(12)]
