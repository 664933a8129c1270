"""The run's own files when they are damaged, planted or cut short (`kdistill.cli.main`,
in-process): checkpoints, the latest pointer, stage markers and models, teacher caches, a
full disk, a second process on one run directory, and `kdistill report` on crafted files.

As for bad recipes (tests/test_bad_input.py): one line on stderr that names the file, exit
code 2 for bad input (1 for a runtime failure), no traceback, no finished checkpoint lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.test_bad_input import QUICK, _Payload, loadable, one_line, write


def _ckpts(tiny_recipe: Path) -> Path:
    return tiny_recipe.parent / "runs" / "tiny" / "seed-0" / "student" / "checkpoints"


def test_nan_loss_stops_and_keeps_the_last_checkpoint(
    kdistill, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The KD term turns NaN from step 1 on (what a diverging run produces; a learning rate
    # large enough to do it is refused by the recipe schema).
    import kdistill.methods.kd as kd_method

    real = kd_method.KD.loss_terms

    def diverging(self: kd_method.KD, out: object, batch: object, progress: object) -> dict:
        terms = real(self, out, batch, progress)
        if progress.step >= 1:  # type: ignore[attr-defined]
            terms["kd"] = terms["kd"] * float("nan")
        return terms

    monkeypatch.setattr(kd_method.KD, "loss_terms", diverging)
    result = kdistill("run", str(tiny_recipe), *QUICK, "train.checkpoint_every_steps=1")
    one_line(result, 1, "non-finite loss at step 1", "term 'kd'", "last good checkpoint")
    assert loadable(_ckpts(tiny_recipe) / "step-00000001") == 1
    teacher = tiny_recipe.parent / "runs" / "tiny" / "teacher" / "model.safetensors"
    assert teacher.is_file()  # the finished teacher stage is untouched


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Raise KeyboardInterrupt when the student stage logs `step` (a kill mid-training)."""
    from kdistill.logger import MetricsLogger

    original = MetricsLogger.log

    def log(self: MetricsLogger, record: dict) -> None:
        if "student" in str(self.path) and record.get("step") == step:
            raise KeyboardInterrupt
        original(self, record)

    monkeypatch.setattr(MetricsLogger, "log", log)


EVERY_5 = [*QUICK, "train.checkpoint_every_steps=5", "train.log_every=1"]


def test_disk_full_on_checkpoint_write(
    kdistill, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.checkpoint as checkpoint

    real_save = checkpoint.save_model

    def save(model: torch.nn.Module, filename: str) -> None:
        if ".tmp-step-00000010" in filename and "student" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(model, filename)

    monkeypatch.setattr(checkpoint, "save_model", save)
    result = kdistill("run", str(tiny_recipe), *EVERY_5)
    ckpts = _ckpts(tiny_recipe)
    one_line(result, 1, f"{ckpts / 'step-00000010' / 'student.safetensors'}: write failed",
             "No space left on device", f"previous checkpoint {ckpts / 'step-00000005'} is intact")
    assert loadable(ckpts / "step-00000005") == 5
    assert not any(p.name.startswith(".tmp") for p in ckpts.iterdir())  # no half-written one
    # With space again, the run resumes from it and finishes.
    monkeypatch.setattr(checkpoint, "save_model", real_save)
    result = kdistill("run", str(tiny_recipe), *EVERY_5)
    assert result.code == 0, result.err
    assert "resumed from step 5" in result.out


def test_disk_full_on_the_final_model_keeps_the_checkpoint(
    kdistill, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.io as checkpoint  # a stage's model goes through the atomic writer

    real_save = checkpoint.save_model

    def save(model: torch.nn.Module, filename: str) -> None:
        if "student/model.safetensors" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(model, filename)

    monkeypatch.setattr(checkpoint, "save_model", save)
    result = kdistill("run", str(tiny_recipe), *QUICK)
    model = _ckpts(tiny_recipe).parent / "model.safetensors"
    one_line(result, 1, f"{model}: write failed", "No space left on device")
    assert loadable(_ckpts(tiny_recipe) / "step-00000020") == 20  # the finished training
    monkeypatch.setattr(checkpoint, "save_model", real_save)
    result = kdistill("run", str(tiny_recipe), *QUICK)
    assert result.code == 0 and "resumed from step 20" in result.out, result.err


@pytest.fixture
def interrupted(kdistill, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A student stage killed at step 12: checkpoints at steps 5 and 10 are on disk."""
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 12)
        assert kdistill("run", str(tiny_recipe), *EVERY_5).code == 130  # as after Ctrl-C
    ckpts = _ckpts(tiny_recipe)
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000005", "step-00000010"]
    return ckpts


def test_truncated_checkpoint(kdistill, tiny_recipe: Path, interrupted: Path) -> None:
    damaged = interrupted / "step-00000010" / "student.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    one_line(kdistill("run", str(tiny_recipe), *EVERY_5), 2, str(damaged),
             f"delete {damaged.parent}")
    # Doing what the message says resumes from the checkpoint before it.
    for file in damaged.parent.iterdir():
        file.unlink()
    damaged.parent.rmdir()
    result = kdistill("run", str(tiny_recipe), *EVERY_5)
    assert result.code == 0 and "resumed from step 5" in result.out, result.err


def _resum(ckpt: Path) -> None:
    """Recompute a checkpoint's checksums: a tamperer who knows the format."""
    from kdistill.io import file_digest

    sums = {name: file_digest(ckpt / name) for name in json.loads(
        (ckpt / "checksums.json").read_text())}
    (ckpt / "checksums.json").write_text(json.dumps(sums))


def test_tampered_checkpoint_with_pickled_code(
    kdistill, tiny_recipe: Path, interrupted: Path
) -> None:
    marker = tiny_recipe.parent / "PWNED"
    trainer = interrupted / "step-00000010" / "trainer.pt"
    torch.save({"optimizer": _Payload(marker), "scheduler": {}, "rng": torch.zeros(1)}, trainer)
    # The checksum no longer matches: the file is refused before it is even opened.
    one_line(kdistill("run", str(tiny_recipe), *EVERY_5), 2, str(trainer), "checksum")
    # With matching checksums, weights_only=True refuses the pickled call, naming it.
    _resum(trainer.parent)
    one_line(kdistill("run", str(tiny_recipe), *EVERY_5), 2, str(trainer), "mkdir")
    assert not marker.exists()


def test_tampered_checkpoint_state(kdistill, tiny_recipe: Path, interrupted: Path) -> None:
    state = interrupted / "step-00000010" / "state.json"
    state.write_text(json.dumps({"step": "ten"}))
    one_line(kdistill("run", str(tiny_recipe), *EVERY_5), 2, str(state), "damaged checkpoint")
    _resum(state.parent)
    one_line(kdistill("run", str(tiny_recipe), *EVERY_5), 2, str(state), "unreadable checkpoint")


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"../../../../../../etc",
                                     b"outside"], ids=["undecodable", "parent", "link"])
def test_a_bad_latest_pointer_resumes_from_the_newest_checkpoint(
    kdistill, tiny_recipe: Path, interrupted: Path, pointer: bytes
) -> None:
    outside = tiny_recipe.parent / "outside"
    shutil.copytree(interrupted / "step-00000005", outside)  # a real checkpoint elsewhere
    (interrupted / "outside").symlink_to(outside)
    (interrupted / "latest").write_bytes(pointer)
    result = kdistill("run", str(tiny_recipe), *EVERY_5)
    assert result.code == 0 and "resumed from step 10" in result.out, result.err


def test_a_planted_metrics_link_is_refused_not_written_through(
    kdistill, tiny_recipe: Path, interrupted: Path
) -> None:
    target = tiny_recipe.parent / "precious.txt"
    target.write_text("keep\n")
    metrics = interrupted.parent / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(target)
    one_line(kdistill("run", str(tiny_recipe), *EVERY_5), 2, str(metrics), "symbolic link")
    assert target.read_text() == "keep\n"


def test_truncated_stage_model(kdistill, tiny_recipe: Path) -> None:
    assert kdistill("run", str(tiny_recipe), *QUICK).code == 0
    model = tiny_recipe.parent / "runs" / "tiny" / "teacher" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    one_line(kdistill("run", str(tiny_recipe), *QUICK), 2, str(model), "delete it")


def test_stale_teacher_cache_is_rebuilt(kdistill, tiny_recipe: Path) -> None:
    assert kdistill("run", str(tiny_recipe), *QUICK).code == 0
    logits = tiny_recipe.parent / "runs" / "tiny" / "cache" / "teacher" / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:1000])  # torn by a crash or a full disk
    result = kdistill("run", str(tiny_recipe), *QUICK)
    assert result.code == 0, result.err
    assert "damaged teacher cache" in result.out  # a torn file fails its checksum
    assert logits.stat().st_size > 1000


def test_disk_full_while_writing_the_teacher_cache(
    kdistill, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdistill.cache as cache

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache.np.lib.format, "open_memmap", full)
    directory = tiny_recipe.parent / "runs" / "tiny" / "cache" / "teacher"
    one_line(kdistill("run", str(tiny_recipe), *QUICK), 1, str(directory),
             "No space left on device", "cache.enabled: false")


def test_atomic_tensor_file_keeps_the_old_file_on_a_full_disk(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """seq_kd's decoded targets go through the same temp-then-rename writer as models."""
    from safetensors.torch import load_file

    from kdistill import io as checkpoint
    from kdistill.errors import TrainingError

    path = tmp_path / "cache" / "targets.safetensors"
    checkpoint.save_tensors_atomic({"targets": torch.arange(6).view(2, 3).t()}, path)
    assert torch.equal(load_file(str(path))["targets"], torch.arange(6).view(2, 3).t())

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(TrainingError, match=r"targets.safetensors: write failed"):
        checkpoint.save_tensors_atomic({"targets": torch.zeros(1)}, path)
    assert torch.equal(load_file(str(path))["targets"], torch.arange(6).view(2, 3).t())
    assert sorted(p.name for p in path.parent.iterdir()) == ["targets.safetensors"]


# --- trust and integrity (#15) ---------------------------------------------------------------


def test_a_zeroed_teacher_cache_is_rebuilt_not_read(kdistill, tiny_recipe: Path) -> None:
    assert kdistill("run", str(tiny_recipe), *QUICK).code == 0
    logits = tiny_recipe.parent / "runs" / "tiny" / "cache" / "teacher" / "logits.npy"
    size = logits.stat().st_size
    data = bytearray(logits.read_bytes())
    data[128:] = bytes(size - 128)  # the header kept, every value zero: a crash without fsync
    logits.write_bytes(bytes(data))
    result = kdistill("run", str(tiny_recipe), *QUICK, "train.epochs=2")  # redo the student
    assert result.code == 0, result.err
    assert "stale teacher cache" in result.out or "damaged" in result.out
    assert logits.read_bytes() != bytes(data)


# `kdistill report` on run directories whose files hold the wrong bytes or types.

EVAL = {"teacher": [{"accuracy": 0.9, "errors": 10, "params": 100, "seed": None}],
        "student": [{"accuracy": 0.8, "errors": 20, "params": 10, "seed": 0,
                     "per_class_accuracy": [0.8, None]}]}


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "seed-0" / "student").mkdir(parents=True)
    write(run / "config.yaml", "name: crafted\ndata: {name: digits}\n")
    write(run / "eval.json", json.dumps(EVAL))
    return run


def test_report_on_a_crafted_run_works(kdistill, tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    (run / "seed-0" / "student" / "metrics.jsonl").write_bytes(
        b'{"split": "train", "step": 1, "loss": 0.5}\n\xff\xfe\n[1]\n{"split": "train", '
        b'"step": "x", "loss": 1}\n{"split": "val", "epoch": 0, "step": 2, "accuracy": "hi"}\n{')
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not an image of this run")
    (run / "seed-0" / "student" / "leak.png").symlink_to(secret)
    result = kdistill("report", str(run))
    assert result.code == 0, result.err
    page = (run / "report.html").read_text()
    assert "crafted" in page and "leak.png" not in page  # a linked image is not embedded
    secret.write_text("name: secret-token\n")  # a YAML file of the machine's
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(secret)
    one_line(kdistill("report", str(run)), 2, "config.yaml: a run file is a symbolic link")


@pytest.mark.parametrize(("file", "data", "text"), [
    ("eval.json", b"null", "eval.json: the evaluation rows should be an object, got null"),
    ("eval.json", b"[]", "should be an object, got an array"),
    ("eval.json", b'{"student": {"accuracy": 1}}', "'student' is not a list of rows"),
    ("eval.json", b'{"student": [{"accuracy": "high"}]}', "student.accuracy: expected a number"),
    ("eval.json", b"\x89PNG\r\n", "is not UTF-8 text (byte 0x89 at offset 0)"),
    ("config.yaml", "name: caf\u00e9\n".encode("latin-1"), "config.yaml: the resolved recipe "
     "is not UTF-8 text"),
    ("config.yaml", b"- a\n", "expected the resolved recipe (a mapping)"),
    ("samples.json", b'{"a": 1}', "samples.json: the samples should be an array"),
    ("samples.json", b'[{"prompt": 3}]', "expected a list of {model: text} objects"),
    ("compress/eval.json", b'[{"accuracy": "x"}]', "row 0: expected an object with numbers"),
], ids=["eval-null", "eval-array", "eval-role", "eval-value", "eval-binary", "config-latin1",
        "config-list", "samples-object", "samples-value", "compress-value"])
def test_report_on_run_files_of_the_wrong_types(kdistill, tmp_path: Path, file: str,
                                                 data: bytes, text: str) -> None:
    run = _run_dir(tmp_path)
    (run / file).parent.mkdir(exist_ok=True)
    (run / file).write_bytes(data)
    one_line(kdistill("report", str(run)), 2, text)


# --- the run directory: containment, the lock, damaged markers ------------------------------


def test_a_second_run_on_the_same_directory_stops_naming_the_first(tiny_recipe: Path) -> None:
    import subprocess
    import time

    first = subprocess.Popen([sys.executable, "-m", "kdistill", "run", str(tiny_recipe),
                              "train.epochs=200"], cwd=tiny_recipe.parent,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tiny_recipe.parent / "runs" / "tiny" / ".lock"
        for _ in range(600):  # until the first run holds the lock (its pid is written)
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "kdistill", "run", str(tiny_recipe)],
                                cwd=tiny_recipe.parent, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"another kdistill run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("marker", ["null", "[]", "\x00\xff"])
def test_a_damaged_stage_marker_redoes_the_stage(kdistill, tiny_recipe: Path,
                                                 marker: str) -> None:
    assert kdistill("run", str(tiny_recipe), *QUICK).code == 0
    stage = tiny_recipe.parent / "runs" / "tiny" / "seed-0" / "student" / "stage.json"
    stage.write_bytes(marker.encode("latin-1"))
    result = kdistill("run", str(tiny_recipe), *QUICK)
    assert result.code == 0, result.err
    assert "student (seed 0): training" in result.out
    assert json.loads(stage.read_text())["complete"] is True


