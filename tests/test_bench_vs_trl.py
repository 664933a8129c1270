"""benchmarks/vs_trl.py without TRL: its arguments, its step clock, the kdistill side of the
loss check and the table it prints (TRL and its environment are never needed here)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from .conftest import REPO


@pytest.fixture(scope="module")
def vs_trl() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module
    spec.loader.exec_module(module)
    return module


def test_arguments_and_their_limits(vs_trl: ModuleType) -> None:
    args = vs_trl.parse_args(["--steps", "3", "--warmup", "1", "--batch", "2", "--seq-len", "64"])
    assert (args.steps, args.warmup, args.batch, args.seq_len, args.beta) == (3, 1, 2, 64, 0.5)
    for bad in (["--warmup", "0"], ["--beta", "1.5"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            vs_trl.parse_args(bad)


def test_step_clock_times_the_steps_after_warmup(vs_trl: ModuleType) -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    clock = vs_trl._StepClock(optimizer)
    for pause in (0.0, 0.0, 0.02, 0.04):  # step i takes (at least) pause i
        time.sleep(pause)
        param.grad = torch.ones(2)
        optimizer.step()
    out = clock.result(warmup=2, tokens=[10, 11, 12, 13])
    assert out["tokens"] == [12, 13]
    assert out["step_s"][1] > out["step_s"][0] >= 0.02
    assert out["threads"] == [torch.get_num_threads()]


def test_kdistill_losses_and_the_table(vs_trl: ModuleType, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (1, 6), generator=gen)
    labels[0, -1] = -100
    torch.save({"student": torch.randn(1, 6, 11, generator=gen),
                "teacher": torch.randn(1, 6, 11, generator=gen), "labels": labels},
               tmp_path / "logits.pt")
    losses = vs_trl.kdistill_losses(tmp_path)
    assert set(losses) == {str(b) for b in vs_trl.BETAS}
    assert losses["0.5"] <= torch.log(torch.tensor(2.0)).item()  # JSD(0.5) is bounded by log 2
    rows = {v: {"tps": [100.0 + i], "best": [110.0 + i], "peak": [2000.0 - 100 * i],
                "imports": [300.0]} for i, v in enumerate(vs_trl.VARIANTS)}
    args = vs_trl.parse_args([])
    vs_trl._table(rows, args, 1e-7, {"tokens": 1000, "build_s": 2.0, "peak_mb": 900.0})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    pairs = dict(item.split("=") for item in last.split())
    assert pairs["loss_max_diff"] == "1.00e-07"
    assert float(pairs["kd_dense_speedup"]) == pytest.approx(102 / 100, abs=0.01)
    assert float(pairs["kd_gkd_on_speedup"]) == pytest.approx(105 / 101, abs=0.01)
