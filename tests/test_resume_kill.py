"""A run killed with SIGKILL mid-training resumes to the same final weights, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import TINY_RECIPE

LONG = ["train.epochs=40", "train.log_every=1", "train.checkpoint_every_steps=7",
        "baseline=false"]


def _start(recipe: Path, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "kdistill", "run", str(recipe), *LONG],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _records(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len(lines)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tiny.yaml").write_text(TINY_RECIPE + "output_dir: runs\n")
    straight = _start(tmp_path / "straight" / "tiny.yaml", tmp_path / "straight")
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err.decode()

    metrics = tmp_path / "killed" / "runs" / "tiny" / "seed-0" / "student" / "metrics.jsonl"
    proc = _start(tmp_path / "killed" / "tiny.yaml", tmp_path / "killed")
    deadline = time.monotonic() + 300
    while _records(metrics) < 100 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # really killed mid-run (800 steps in all)
    ckpts = metrics.parent / "checkpoints"
    assert ckpts.is_dir() and not (metrics.parent / "model.safetensors").exists()

    resumed = _start(tmp_path / "killed" / "tiny.yaml", tmp_path / "killed")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert "resumed from step" in out.decode()
    a = (tmp_path / "straight" / "runs" / "tiny" / "seed-0" / "student" / "model.safetensors")
    b = metrics.parent / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
