"""Shared fixtures: tiny recipes on the real sklearn digits (1797 images), seconds to run."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)  # 2-vCPU VMs stall with 2 intra-op threads

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = """\
name: tiny
data: {name: digits, val_size: 200}
teacher:
  model: {arch: mlp, args: {hidden: [64]}}
  train: {epochs: 3, batch_size: 64, optimizer: {name: adam, lr: 0.01}}
student:
  model: {arch: mlp, args: {hidden: [16]}}
method: {name: kd, temperature: 4.0, alpha: 0.9}
train: {epochs: 2, batch_size: 64, optimizer: {name: adam, lr: 0.01}, seeds: [0],
       eval_every_epochs: 1}
eval: {latency_repeats: 3, throughput_batch: 16}
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A complete recipe file whose runs go under tmp_path/runs."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE + f"output_dir: {tmp_path / 'runs'}\n")
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def kdistill(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`kdistill(*args)` runs the console script's `main()` and returns its exit and output."""

    def call(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["kdistill", *args])
        capsys.readouterr()
        from kdistill import cli  # here: the environment above is set before kdistill loads

        with pytest.raises(SystemExit) as info:
            cli.main()
        out, err = capsys.readouterr()
        code = info.value.code
        return Result(code if isinstance(code, int) else 1, out, err)

    return call
