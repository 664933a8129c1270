"""Bad input through the CLI entry point (`kdistill.cli.main`, in-process for speed).

Every case must end in ONE line on stderr that names the field or file, exit code 2 for bad
input (1 for a runtime failure), no traceback, and no finished checkpoint lost.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from kdistill.checkpoint import load_checkpoint
from kdistill.models.zoo import MLP
from tests.conftest import Result

# A tiny run: one teacher epoch, one student epoch of 20 steps, no baseline.
QUICK = ["teacher.train.epochs=1", "train.epochs=1", "baseline=false"]


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


# --- recipes that would run code, hyper-parameters, runtime failures -------------------------


def test_user_module_that_fails_to_import(kdistill, tiny_recipe: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Its multi-line message is folded into the one line (errors.KDistillError.__str__).
    write(tmp_path / "brokenmodels.py", "raise RuntimeError('first line\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    one_line(kdistill("validate", str(tiny_recipe), "teacher.model.arch=custom",
                      "teacher.model.target=brokenmodels:Net"), 2,
             "teacher.model.target: cannot import module 'brokenmodels'",
             "first line second line")


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


@pytest.mark.parametrize(("name", "expected"), [
    ("..", "'..' is not a run name"), (".", "'.' is not a run name"),
    ("a" * 300, "name: String should have at most 100 characters")])
def test_run_names_that_leave_output_dir_are_refused(kdistill, tiny_recipe: Path, name: str,
                                                     expected: str) -> None:
    before = sorted(p.name for p in tiny_recipe.parent.iterdir())
    one_line(kdistill("run", str(tiny_recipe), *QUICK, f"name={name}"), 2, expected)
    assert sorted(p.name for p in tiny_recipe.parent.iterdir()) == before  # nothing written


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
