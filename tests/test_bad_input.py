"""Bad input through the CLI entry point (`kdistill.cli.main`, in-process for speed).

Every case must end in ONE line on stderr that names the field or file, exit code 2 for bad
input (1 for a runtime failure), no traceback, and no finished checkpoint lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from kdistill import cli
from kdistill.checkpoint import load_checkpoint
from kdistill.models.zoo import MLP

# A tiny run: one teacher epoch, one student epoch of 20 steps, no baseline.
QUICK = ["teacher.train.epochs=1", "train.epochs=1", "baseline=false"]


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
        with pytest.raises(SystemExit) as info:
            cli.main()
        out, err = capsys.readouterr()
        code = info.value.code
        return Result(code if isinstance(code, int) else 1, out, err)

    return call


def one_line(result: Result, code: int, *expected: str) -> str:
    """The error line, after checking the exit code, that it is one line, with no traceback."""
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def loadable(ckpt: Path) -> int:
    """Load a checkpoint of the tiny student; return its step (fails if it is damaged)."""
    _, state = load_checkpoint(ckpt, student=MLP((64,), 10, hidden=[16]), method=torch.nn.Module())
    return int(state["step"])


# --- the recipe: YAML, keys, types, ranges -------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("train: {epochs: 3\nmethod: [\n", ["r.yaml: invalid YAML at line 2"]),  # malformed
    ("- a\n- b\n", ["r.yaml", "a recipe is a mapping"]),
    ("nmae: x\n", ["r.yaml: nmae: unknown key"]),
], ids=["malformed-yaml", "not-a-mapping", "unknown-key"])
def test_bad_recipe_file(kdistill, tmp_path: Path, text: str, expected: list[str]) -> None:
    one_line(kdistill("validate", str(write(tmp_path / "r.yaml", text))), 2, *expected)


@pytest.mark.parametrize(("override", "expected"), [
    ("method.temprature=3", ["method.temprature: unknown key"]),
    ("train.epochs=lots", ["train.epochs", "'lots'"]),  # wrong type
    ("method.temperature=-2", ["method.temperature", "must be > 0"]),
    ("method.alpha=1.5", ["method.alpha", "<= 1"]),
    ("method.alpha=-0.1", ["method.alpha", ">= 0"]),
    ("train.epochs", ["override", "key.path=value"]),  # no value
], ids=["unknown-key", "wrong-type", "negative-temperature", "alpha-above-1",
        "alpha-below-0", "override-without-value"])
def test_bad_override(kdistill, tiny_recipe: Path, override: str, expected: list[str]) -> None:
    one_line(kdistill("validate", str(tiny_recipe), override), 2, *expected)


GENERAL = Path(__file__).resolve().parents[1] / "recipes" / "general-minilm.yaml"


@pytest.mark.parametrize(("override", "expected"), [
    ("baseline=true", ["baseline: unlabelled text has no labels", "baseline: false"]),
    ("method.name=kd", ["method: 'kd' is for classification data", "embed_kd"]),
    ("transfer.task=fortunes7", ["transfer.task", "fortunes5"]),
    ("student.model.args.hidden=128", ["student.model.args.hidden", "random_init: true"]),
], ids=["general-baseline", "general-wrong-method", "general-unknown-task",
        "general-narrow-copy"])
def test_bad_general_recipe(kdistill, override: str, expected: list[str]) -> None:
    one_line(kdistill("validate", str(GENERAL), override), 2, *expected)


def test_missing_recipe(kdistill, tmp_path: Path) -> None:
    one_line(kdistill("run", str(tmp_path / "nope.yaml")), 2, "nope.yaml: recipe file not found")


def test_debug_shows_the_traceback(kdistill, tmp_path: Path) -> None:
    result = kdistill("--debug", "run", str(tmp_path / "nope.yaml"))
    assert result.code == 2
    assert "Traceback" in result.err and "nope.yaml: recipe file not found" in result.err


# --- data and models -------------------------------------------------------------------------


def test_empty_training_set(kdistill, tiny_recipe: Path) -> None:
    one_line(kdistill("validate", str(tiny_recipe), "data.val_size=0.9999"), 2,
             "data.val_size", "leaves no training samples")


def test_unknown_data_set(kdistill, tiny_recipe: Path) -> None:
    one_line(kdistill("validate", str(tiny_recipe), "data.name=digit"), 2,
             "data.name", "did you mean 'digits'")


def test_missing_teacher_weights(kdistill, tiny_recipe: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone.safetensors"
    one_line(kdistill("validate", str(tiny_recipe), f"teacher.model.weights={gone}"), 2,
             "teacher.model.weights", "file not found", str(gone))


def test_truncated_teacher_weights(kdistill, tiny_recipe: Path, tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    save_model(MLP((64,), 10, hidden=[64]), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line(kdistill("validate", str(tiny_recipe), f"teacher.model.weights={path}"), 2,
             "teacher.model.weights", str(path))


def test_weights_of_another_model(kdistill, tiny_recipe: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(3)}, path)
    one_line(kdistill("validate", str(tiny_recipe), f"teacher.model.weights={path}"), 2,
             "teacher.model.weights", "does not fit the model", "1 unexpected: x")


class _Payload:
    """Pickles to a call of os.mkdir: what a malicious weights file would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_weights_file_with_pickled_code_is_refused_not_run(
    kdistill, tiny_recipe: Path, tmp_path: Path
) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    torch.save({"layers.0.linear.weight": _Payload(marker)}, path)
    line = one_line(kdistill("validate", str(tiny_recipe), f"teacher.model.weights={path}"), 2,
                    "teacher.model.weights", str(path), "never runs code")
    assert "mkdir" in line  # the refused global is named
    assert not marker.exists()


USER_MODELS = """\
import pathlib
import torch

pathlib.Path(__file__).with_name("IMPORTED").touch()  # evidence that this code ran


class ThreeWay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable `usermodels` module that leaves a file behind when imported."""
    package = tmp_path / "user"
    package.mkdir()
    write(package / "usermodels.py", USER_MODELS)
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    return package / "IMPORTED"


def test_teacher_student_class_count_mismatch(kdistill, tiny_recipe: Path, user_module: Path):
    one_line(kdistill("validate", "--build", str(tiny_recipe), "teacher.model.arch=custom",
                      "teacher.model.target=usermodels:ThreeWay", "teacher.model.args={}"), 2,
             "teacher.model: outputs 3 classes but data 'digits' has 10")
    assert user_module.exists()  # arch: custom is the explicit request to import it


@pytest.mark.parametrize(("args", "expected"), [
    (["teacher.model.arch=usermodels:ThreeWay"], "teacher.model.arch: unknown arch"),
    (["teacher.model.target=usermodels:ThreeWay"],
     "teacher.model.target: only used with arch 'custom'"),
])
def test_module_path_is_not_imported_without_arch_custom(
    kdistill, tiny_recipe: Path, user_module: Path, args: list[str], expected: str
) -> None:
    one_line(kdistill("validate", str(tiny_recipe), *args), 2, expected)
    assert not user_module.exists() and "usermodels" not in sys.modules


def test_unknown_layer_lists_the_closest_names(kdistill, tiny_recipe: Path) -> None:
    one_line(kdistill("validate", str(tiny_recipe), "method.name=fitnet",
                      "method.student_layer=layers.0", "method.teacher_layer=layer.0"), 2,
             "method.teacher_layer: no module named 'layer.0'", "closest: layers.0")


def test_tensorboard_requested_but_not_installed(
    kdistill, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    one_line(kdistill("validate", str(tiny_recipe), "logging.tensorboard=true"), 2,
             "logging.tensorboard", "tensorboard is not installed", "pip install")


# --- runtime: training, checkpoints, caches --------------------------------------------------


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


def test_user_module_that_fails_to_import(kdistill, tiny_recipe: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Its multi-line message is folded into the one line (errors.KDistillError.__str__).
    write(tmp_path / "brokenmodels.py", "raise RuntimeError('first line\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    one_line(kdistill("validate", str(tiny_recipe), "teacher.model.arch=custom",
                      "teacher.model.target=brokenmodels:Net"), 2,
             "teacher.model.target: cannot import module 'brokenmodels'",
             "first line second line")


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


@pytest.mark.parametrize(("target", "args"), [
    ("os:system", "{command: 'touch {marker}'}"),
    ("subprocess:run", "{args: [touch, '{marker}']}"),
    ("builtins:eval", "{source: \"open('{marker}', 'w')\"}"),
    ("pathlib:Path.touch", "{self: '{marker}'}"),
], ids=["os-system", "subprocess-run", "eval", "path-touch"])
def test_a_recipe_cannot_run_commands_even_under_validate(
    kdistill, tiny_recipe: Path, tmp_path: Path, target: str, args: str
) -> None:
    marker = tmp_path / "PWNED"
    one_line(kdistill("validate", str(tiny_recipe), "teacher.model.arch=custom",
                      f"teacher.model.target={target}",
                      "teacher.model.args=" + args.replace("{marker}", str(marker))), 2,
             "teacher.model.target", "standard library", "docs/security.md")
    assert not marker.exists()


@pytest.mark.parametrize("override", [
    "method.temperature=.nan", "method.temperature=.inf", "method.alpha=.nan",
    "method.temperature={kind: cosine, start: .inf, end: 1}",
])
def test_non_finite_hyper_parameters_are_refused_by_validate(
    kdistill, tiny_recipe: Path, override: str
) -> None:
    field = override.split("=")[0]
    one_line(kdistill("validate", str(tiny_recipe), override), 2, field,
             "Input should be a finite number")


def test_a_student_too_large_to_allocate(kdistill, tiny_recipe: Path) -> None:
    one_line(kdistill("validate", str(tiny_recipe), "student.model.args.hidden=[1099511627776]"),
             2, "student.model: arch 'mlp' is too large to allocate",
             f"{(64 + 1 + 10) * 2**40 + 10:,} parameters")  # digits: 64 inputs, 10 classes


def test_weights_file_whose_keys_are_not_names(kdistill, tiny_recipe: Path,
                                               tmp_path: Path) -> None:
    path = tmp_path / "ints.pt"
    torch.save({1: torch.zeros(3)}, path)
    one_line(kdistill("validate", str(tiny_recipe), f"teacher.model.weights={path}"), 2,
             "teacher.model.weights", "does not hold a state dict")


def test_a_teacher_with_nan_outputs_is_blamed_before_distillation(
    kdistill, tiny_recipe: Path, tmp_path: Path
) -> None:
    teacher = MLP((64,), 10, hidden=[64])
    with torch.no_grad():
        teacher.head.weight.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_model(teacher, str(path))
    one_line(kdistill("run", str(tiny_recipe), *QUICK, "teacher.train=null",
                      f"teacher.model.weights={path}"), 1,
             "teacher: its output 'logits' is NaN or infinite for training sample 0",
             "nothing was cached")


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


@pytest.mark.parametrize(("name", "expected"), [
    ("..", "'..' is not a run name"), (".", "'.' is not a run name"),
    ("a" * 300, "name: String should have at most 100 characters")])
def test_run_names_that_leave_output_dir_are_refused(kdistill, tiny_recipe: Path, name: str,
                                                     expected: str) -> None:
    before = sorted(p.name for p in tiny_recipe.parent.iterdir())
    one_line(kdistill("run", str(tiny_recipe), *QUICK, f"name={name}"), 2, expected)
    assert sorted(p.name for p in tiny_recipe.parent.iterdir()) == before  # nothing written


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


def test_an_online_teacher_with_nan_outputs_is_blamed(kdistill, tiny_recipe: Path,
                                                      tmp_path: Path) -> None:
    # Jittered inputs run the teacher online (no cache to check): its first batch is checked.
    weights = tmp_path / "nan.safetensors"
    model = MLP((1, 8, 8), 10, hidden=[64])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_model(model, str(weights))
    result = kdistill("run", str(tiny_recipe), *QUICK, "teacher.train=null",
                      f"teacher.model.weights={weights}", "train.augment=jitter")
    one_line(result, 1, "teacher: non-finite outputs (NaN or +inf) for row 0",
             "teacher.model.weights")
