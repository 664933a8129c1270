"""The CLI end to end in a subprocess: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def kdistill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdistill", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_run_tiny_recipe_end_to_end(tiny_recipe: Path, tmp_path: Path) -> None:
    proc = kdistill("run", str(tiny_recipe), "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "distilled student" in proc.stdout
    assert proc.stdout.startswith("memory plan (cpu, fp32): peak ")  # the run's first line
    assert (tmp_path / "runs" / "tiny" / "report.md").is_file()
    # memory_plan: false skips the plan (it builds the data and models once more).
    proc = kdistill("run", str(tiny_recipe), "train.epochs=1", "memory_plan=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "memory plan" not in proc.stdout and "distilled student" in proc.stdout


def test_validate_and_methods(tiny_recipe: Path, tmp_path: Path) -> None:
    proc = kdistill("validate", str(tiny_recipe), cwd=tmp_path)
    assert proc.returncode == 0 and "ok:" in proc.stdout, proc.stderr
    proc = kdistill("methods", cwd=tmp_path)
    assert proc.returncode == 0
    assert "kd" in proc.stdout and "1503.02531" in proc.stdout
    assert "token_kd" in proc.stdout and "gkd" in proc.stdout and "causal" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["method.temprature=3"], "method.temprature: unknown key"),
        (["train.epochs=lots"], "train.epochs"),
        (["method.temperature=-2"], "temperature must be > 0"),
        (["teacher.model.weights=missing.safetensors"], "teacher.model.weights: file not found"),
        (["--build", "teacher.model.arch=custom", "teacher.model.target=usermodels:ThreeWay",
          "teacher.model.args={}"], "teacher.model: outputs 3 classes but data 'digits' has 10"),
        (["teacher.model.arch=resnet9000"], "teacher.model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny_recipe: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    # A user's own model module, importable from the working directory.
    (tmp_path / "usermodels.py").write_text(
        "import torch\n\nclass ThreeWay(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 3)\n\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    proc = kdistill("validate", str(tiny_recipe), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    for args in (["bogus"], ["run", "--no-such-option"]):
        proc = kdistill(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "No such" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_recipe_and_debug_traceback(tmp_path: Path) -> None:
    proc = kdistill("run", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "nope.yaml: recipe file not found" in proc.stderr
    proc = kdistill("--debug", "run", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


GENERATE_RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("generate-*.yaml"))


@pytest.mark.parametrize("recipe", GENERATE_RECIPES, ids=[p.stem for p in GENERATE_RECIPES])
def test_validate_accepts_generate_recipes(recipe: Path, tmp_path: Path) -> None:
    # One recipe loader for every command: `validate` knows a generate recipe by its keys.
    # Paths in recipes are relative to the working directory (the repository's root here).
    named = yaml.safe_load(recipe.read_text()).get("prompts", {}).get("recipe")
    extra = [f"prompts.recipe={recipe.parents[1] / named}"] if named else []
    proc = kdistill("validate", str(recipe), f"output.path={tmp_path / 'out.jsonl'}", *extra,
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok:" in proc.stdout and "generate:" in proc.stdout and "prompts" in proc.stdout
    proc = kdistill("validate", str(recipe), "sampling.top_q=0.5", cwd=tmp_path)
    assert proc.returncode == 2 and "sampling.top_q: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_and_help_list_the_overrides(tmp_path: Path) -> None:
    proc = kdistill("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("kdistill ")
    proc = kdistill("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "key.path=value" in text and "train.seeds=[0,1,2]" in text
    assert "[RECIPE.yaml] [key.path=value ...]" in text  # not eaten as a style tag
    proc = kdistill(cwd=tmp_path)  # no command: the help, not an error
    assert proc.returncode == 0 and "run" in proc.stdout and "validate" in proc.stdout


@pytest.mark.parametrize(("override", "expected"), [
    ("train.optimizer.lr=1e6", "train.optimizer.lr: Input should be less than or equal to 10"),
    ("train.optimizer.lr=.nan", "train.optimizer.lr: Input should be a finite number"),
    ("train.clip_grad_norm=.inf", "train.clip_grad_norm: Input should be a finite number"),
    ("train.seeds=[0,0]", "train.seeds: seed 0 appears twice"),
    ("train.seeds=[99999999999999999999]", "train.seeds.0: Input should be less than"),
])
def test_absurd_or_non_finite_settings_are_refused(override: str, expected: str,
                                                   tmp_path: Path) -> None:
    proc = kdistill("validate", override, cwd=tmp_path)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_validate_checks_a_custom_target_without_building_it(tiny_recipe: Path,
                                                              tmp_path: Path) -> None:
    # The model's __init__ would leave a file: plain `validate` imports and inspects the
    # class, never calls it; `--build` builds it (and so runs the user's code).
    (tmp_path / "usermodels.py").write_text(
        "import pathlib\nimport torch\n\nclass Marker(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        pathlib.Path('built').touch()\n        self.fc = torch.nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1))\n")
    args = ["student.model.arch=custom", "student.model.target=usermodels:Marker",
            "student.model.args={}"]
    proc = kdistill("validate", str(tiny_recipe), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "built").exists()
    proc = kdistill("validate", "--build", str(tiny_recipe), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "built").exists()
    proc = kdistill("validate", str(tiny_recipe), "student.model.arch=custom",
                    "student.model.target=os:system", cwd=tmp_path)
    assert proc.returncode == 2 and "student.model.target" in proc.stderr


def test_plan_prints_the_stages_and_refuses_bad_input(tiny_recipe: Path, tmp_path: Path) -> None:
    proc = kdistill("plan", str(tiny_recipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| student |" in proc.stdout and "memory plan (cpu, fp32): peak" in proc.stdout
    assert not (tmp_path / "runs").exists()  # a plan writes nothing
    proc = kdistill("plan", str(tiny_recipe), "train.batch_size=0", cwd=tmp_path)
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr
