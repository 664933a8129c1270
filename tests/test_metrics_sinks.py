"""Metric sinks: metrics.jsonl always, TensorBoard event files when asked, quiet progress bars
when the output is not a terminal."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from kdistill.errors import MissingDependencyError
from kdistill.logger import MetricsLogger, read_metrics


def _event_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train(step: int, kd: float) -> dict[str, object]:
    return {"step": step, "epoch": 0, "split": "train", "loss/kd": kd, "loss/ce": 0.25,
            "loss": kd + 0.25, "lr": 0.01}


def test_tensorboard_event_files_hold_every_scalar(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tensorboard"
    with MetricsLogger(tmp_path / "metrics.jsonl", tensorboard_dir=tb) as logger:
        logger.log(_train(5, 1.0))
        logger.log(_train(10, 0.5))
        logger.log({"step": 10, "epoch": 0, "split": "val", "accuracy": 0.75, "nll": 0.8})
        # Readable before close: each record is flushed (a killed run keeps its curves).
        assert _event_scalars(tb)["val/accuracy"] == [(10, 0.75)]
    scalars = _event_scalars(tb)
    assert scalars["train/loss/kd"] == [(5, 1.0), (10, 0.5)]
    assert scalars["train/lr"] == [(5, pytest.approx(0.01)), (10, pytest.approx(0.01))]
    assert {"train/loss", "train/loss/ce", "train/epoch", "val/nll"} <= set(scalars)
    assert not any(tag.endswith("/step") or tag.endswith("/split") for tag in scalars)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3  # the JSONL is always written


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tensorboard"
    with MetricsLogger(tb / "m.jsonl", tensorboard_dir=tb) as first:
        for step in (1, 2, 3, 4):
            first.log(_train(step, 1.0))
    # Killed after step 4 with a checkpoint at step 2: the resumed run logs 3 and 4 again.
    with MetricsLogger(tb / "m.jsonl", tensorboard_dir=tb) as resumed:
        for step in (3, 4, 5):
            resumed.log(_train(step, 0.5))
    assert _event_scalars(tb)["train/loss/kd"] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5),
                                                   (5, 0.5)]


def test_tensorboard_requested_but_not_installed(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(MissingDependencyError) as info:
        MetricsLogger(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    assert str(info.value).startswith("logging.tensorboard: tensorboard is not installed")
    assert "pip install -e '.[tensorboard]'" in str(info.value)
    logger = MetricsLogger(tmp_path / "m.jsonl")  # without TensorBoard nothing is needed
    logger.log({"step": 1, "split": "train", "loss": float("nan")})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1, "split": "train",
                                                              "loss": None}
    assert not (tmp_path / "tb").exists()


def test_hf_progress_bars_are_quiet_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as tf_logging

    from kdistill.models.hf import quiet_progress_bars

    # Undone after the test: the flag, the hub's own switch and the GGUF module's tqdm.
    monkeypatch.setattr(gguf_utils, "tqdm", gguf_utils.tqdm)
    monkeypatch.setattr(tf_logging, "_tqdm_active", tf_logging._tqdm_active)
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    try:
        quiet_progress_bars()
        assert not tf_logging.is_progress_bar_enabled()  # "Loading weights", hub downloads
        out = io.StringIO()
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors",
                                 file=out):
            pass
        assert out.getvalue() == ""
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()
