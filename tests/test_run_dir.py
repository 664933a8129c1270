"""A run stays in its directory: names, links, locks, atomic writes, checkpoint pointers and
checksums (docs/security.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdistill.errors import ConfigError, TrainingError
from kdistill.io import atomic_write_text, make_dirs
from kdistill.logger import MetricsLogger, read_metrics
from kdistill.models.zoo import MLP
from kdistill.rundir import RunDirectory, check_run_name

from .conftest import REPO

# --- names and containment -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("..", "not a run name"),
    (".", "not a run name"),
    ("a/b", "path separator"),
    ("../escape", "path separator"),
    ("a\\b", "path separator"),
    ("x\0y", "path separator"),
    ("", "non-empty"),
    ("x" * 300, "is 300 characters long; a run name has at most 100"),
])
def test_run_names_that_leave_output_dir_are_refused(tmp_path: Path, name: str, text: str):
    with pytest.raises(ConfigError) as info:
        RunDirectory.open(tmp_path / "runs", name)
    assert info.value.where == "name" and text in info.value.message
    assert not (tmp_path / "runs").exists()  # refused before anything was created
    assert check_run_name("x" * 100) == "x" * 100


def test_run_directory_paths_stay_inside_and_refuse_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with RunDirectory.open(tmp_path / "runs", "r") as rd:
        assert rd.root == tmp_path / "runs" / "r" and rd.root.is_dir()
        stage = rd.dir("seed-0", "student")
        assert stage == rd.root / "seed-0" / "student" and stage.is_dir()
        assert rd.path("seed-0/student", "metrics.jsonl") == stage / "metrics.jsonl"
        for bad in ("..", "../x", "seed-0/../../x", "."):
            with pytest.raises(ConfigError, match="not a path inside the run directory"):
                rd.path(bad)
        # Links planted where kdistill writes: a metrics file, a checkpoint dir, a cache dir.
        (stage / "metrics.jsonl").symlink_to(outside / "m")
        (stage / "checkpoints").symlink_to(outside)
        (rd.root / "cache").symlink_to(outside)
        for parts in (("seed-0", "student", "metrics.jsonl"),
                      ("seed-0", "student", "checkpoints", "latest"), ("cache", "teacher")):
            with pytest.raises(ConfigError, match="is a symbolic link") as info:
                rd.path(*parts)
            assert Path(info.value.where).is_symlink()
    assert list(outside.iterdir()) == []


def test_a_linked_run_directory_and_files_in_the_way_are_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="the run directory is a symbolic link"):
        RunDirectory.open(tmp_path / "runs", "r")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        RunDirectory.open(tmp_path / "file", "r")
    assert info.value.where == "output_dir" and f"{tmp_path / 'file'} is a file" in str(info.value)
    (tmp_path / "runs" / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        RunDirectory.open(tmp_path / "runs", "f")
    with pytest.raises(ConfigError, match=r"cannot create directory .*file/x \(.*file is a file"):
        make_dirs(tmp_path / "file" / "x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="Permission denied"):
        RunDirectory.open(tmp_path / "ro", "r")


# --- writes never follow a link ------------------------------------------------------------


def test_atomic_write_replaces_a_planted_link_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    link = tmp_path / "run" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    atomic_write_text(link, "name: x\n")
    assert not link.is_symlink() and link.read_text() == "name: x\n"
    assert target.read_text() == "keep"
    assert sorted(p.name for p in link.parent.iterdir()) == ["config.yaml"]  # no temp left


def test_atomic_write_into_a_file_where_a_directory_is_expected(tmp_path: Path) -> None:
    (tmp_path / "seed-0").write_text("")
    with pytest.raises(TrainingError, match=r"seed-0 is a file, not a directory"):
        atomic_write_text(tmp_path / "seed-0" / "student" / "stage.json", "{}")


def test_metrics_are_never_appended_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    path = tmp_path / "stage" / "metrics.jsonl"
    path.parent.mkdir()
    path.symlink_to(target)
    with pytest.raises(ConfigError, match="the metrics file is a symbolic link"):
        MetricsLogger(path)
    path.unlink()
    logger = MetricsLogger(path)
    logger.log({"step": 0, "loss": 1.0})
    path.unlink()
    path.symlink_to(target)  # planted while the run is going
    with pytest.raises(ConfigError, match="symbolic link"):
        logger.log({"step": 1, "loss": 0.5})
    with pytest.raises(ConfigError, match="symbolic link"):
        logger.truncate_after(0)
    assert target.read_text() == "keep\n"


def test_truncating_metrics_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n[1, 2]\n\xff\xfe\n{"step": "x"}\n{"step": 3}\nnull\n{"st')
    assert read_metrics(path) == [{"step": 1}, {"step": "x"}, {"step": 3}]
    MetricsLogger(path).truncate_after(2)
    assert read_metrics(path) == [{"step": 1}]


# --- one run per directory -----------------------------------------------------------------

HOLD = """\
import sys
from kdistill.rundir import RunDirectory
rd = RunDirectory.open(sys.argv[1], sys.argv[2])
print("locked", rd.stale_pid, flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin (or kills this process)
"""


def _holder(output_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir), "r"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("locked")
    return proc


def test_a_second_run_on_the_same_directory_stops_naming_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            RunDirectory.open(tmp_path, "r")
        assert info.value.where == str(tmp_path / "r")
        assert f"another kdistill run (pid {holder.pid}) is using this run directory" in str(
            info.value)
        holder.kill()  # kill -9: no cleanup runs, the kernel drops the flock
        holder.wait()
        with RunDirectory.open(tmp_path, "r") as rd:  # the stale lock is taken over
            assert rd.stale_pid == holder.pid
            assert (rd.root / ".lock").read_text() == f"{os.getpid()}\n"
        second = _holder(tmp_path)  # released when the `with` ended
        second.communicate("")
        assert second.returncode == 0
    finally:
        holder.kill()
        holder.wait()


# --- checkpoints -----------------------------------------------------------------------------


def _save(ckpt_dir: Path, step: int, student: nn.Module | None = None) -> Path:
    student = student or MLP((8,), 3, hidden=[4])
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    trainer = {"optimizer": opt.state_dict(), "scheduler": {}, "rng": torch.get_rng_state()}
    state = {"step": step, "train_state": {"step": step, "epoch": 0, "batch": step,
                                           "samples": 8 * step, "log_sums": {"kd": 0.5}}}
    return save_checkpoint(ckpt_dir, student=student, method=nn.Module(),
                           trainer_state=trainer, state=state)


def _load(path: Path) -> int:
    _, state = load_checkpoint(path, student=MLP((8,), 3, hidden=[4]), method=nn.Module())
    return int(state["step"])


@pytest.mark.parametrize("pointer", [b"../elsewhere/step-00000009", b"/tmp",
                                     b"step-00000001/../..", b"\xff\xfe\x00", b"",
                                     b"state.json", b"linked"],
                         ids=["outside", "absolute", "dotdot", "undecodable", "empty",
                              "not-a-checkpoint", "linked-checkpoint"])
def test_a_bad_latest_pointer_falls_back_to_the_newest_checkpoint(tmp_path: Path,
                                                                  pointer: bytes) -> None:
    ckpts = tmp_path / "checkpoints"
    _save(ckpts, 1)
    newest = _save(ckpts, 2)
    elsewhere = tmp_path / "elsewhere"
    _save(elsewhere, 9)
    (ckpts / "linked").symlink_to(elsewhere / "step-00000009")
    (ckpts / "latest").write_bytes(pointer)
    assert latest_checkpoint(ckpts) == newest and _load(newest) == 2


def test_a_linked_pointer_or_checkpoint_directory_is_not_followed(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    newest = _save(ckpts, 3)
    (tmp_path / "evil").write_text("step-00000003")
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(tmp_path / "evil")
    assert latest_checkpoint(ckpts) == newest  # the link is ignored, the newest one used
    _save(ckpts, 4)
    assert (tmp_path / "evil").read_text() == "step-00000003"  # replaced, not written through
    linked = tmp_path / "linked"
    linked.symlink_to(ckpts)
    with pytest.raises(ConfigError, match="the checkpoint directory is a symbolic link"):
        latest_checkpoint(linked)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a checkpoint directory"):
        latest_checkpoint(tmp_path / "afile")
    assert latest_checkpoint(tmp_path / "none") is None


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the header still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip-student", "zero-trainer", "zero-state",
                                    "no-checksums", "flip-checksums"])
def test_damaged_checkpoint_files_are_detected_by_their_checksum(tmp_path: Path,
                                                                 damage: str) -> None:
    path = _save(tmp_path / "checkpoints", 5)
    assert _load(path) == 5
    file = {"flip-student": "student.safetensors", "zero-trainer": "trainer.pt",
            "zero-state": "state.json", "no-checksums": "checksums.json",
            "flip-checksums": "checksums.json"}[damage]
    target = path / file
    if damage.startswith("flip"):
        _flip_last_byte(target) if file != "checksums.json" else target.write_text(
            target.read_text().replace('"student.safetensors": "', '"student.safetensors": "0'))
    elif damage.startswith("zero"):  # a crash before the data reached the disk
        target.write_bytes(bytes(target.stat().st_size))
    else:
        target.unlink()
    with pytest.raises(ConfigError) as info:
        _load(path)
    assert str(path) in info.value.where and f"delete {path}" in info.value.message
    if damage in ("flip-student", "zero-trainer", "zero-state"):
        assert info.value.where == str(target) and "checksum" in info.value.message


def test_checkpoint_state_of_the_wrong_types_is_one_error(tmp_path: Path) -> None:
    import json

    from kdistill.io import file_digest

    path = _save(tmp_path / "checkpoints", 5)
    state = path / "state.json"
    for bad in ({"step": 5, "train_state": {"step": "5"}}, {"step": 5, "train_state": None},
                {"step": -1, "train_state": {}}, [], None):
        state.write_text(json.dumps(bad))
        sums = json.loads((path / "checksums.json").read_text())
        sums["state.json"] = file_digest(state)  # consistent checksums: the content is wrong
        (path / "checksums.json").write_text(json.dumps(sums))
        with pytest.raises(ConfigError, match="unreadable checkpoint file"):
            _load(path)
