"""Shared fixtures: tiny recipes on the real sklearn digits (1797 images), seconds to run."""

from __future__ import annotations

import os
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
