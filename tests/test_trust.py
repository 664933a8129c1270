"""The trust boundary and the bounded readers: what a recipe may make kdistill import and call,
and files that cannot make a reader traceback, loop or exhaust memory (docs/security.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from kdistill.errors import ConfigError, is_out_of_memory
from kdistill.io import parse_yaml_value, read_json, read_yaml
from kdistill.models import build_model
from kdistill.models.factory import check_target

from .conftest import REPO

# A user module: its top level leaves IMPORTED behind; every callable in it would leave CALLED.
USER = """\
from __future__ import annotations

import pathlib
from os import system  # re-exported: still the standard library's function
from torch.nn import Linear  # re-exported: still torch's class

import torch

HERE = pathlib.Path(__file__).parent
(HERE / "IMPORTED").touch()


def touch_file(name: str = "CALLED"):
    (HERE / name).touch()
    return torch.nn.Linear(4, 2)


class NotAModel:
    def __init__(self):
        (HERE / "CALLED").touch()


class Net(torch.nn.Module):
    def __init__(self, input_shape, num_classes, width: int = 3):
        super().__init__()
        (HERE / "BUILT").touch()
        self.fc = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class MyLinear(Linear):  # a dependency's layer, subclassed in the user's own project
    pass


def factory(width: int = 2) -> torch.nn.Module:  # a string annotation (future import)
    return torch.nn.Linear(width, 2)


def _private() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)
"""


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`trustmodels` importable from tmp_path/user; returns that folder."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "trustmodels.py").write_text(USER)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "trustmodels", raising=False)
    return folder


def build(target: str, **args: object) -> nn.Module:
    return build_model("custom", target=target, input_shape=(4,), num_classes=2, args=args,
                       where="student.model")


@pytest.mark.parametrize(("target", "text"), [
    ("os:system", "standard library"),
    ("subprocess:run", "standard library"),
    ("builtins:eval", "standard library"),
    ("shutil:rmtree", "standard library"),
    ("pickle:loads", "standard library"),
    ("torch:load", "installed package"),
    ("torch.nn:Linear", "installed package"),  # a dependency's nn.Module: refused too
    ("numpy:load", "installed package"),
    ("yaml:unsafe_load", "installed package"),
    ("kdistill.models.zoo:MLP", "kdistill's own code"),
    ("kdistill.io:atomic_write_text", "kdistill's own code"),
])
def test_library_targets_are_refused_before_any_call(
    target: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "RAN"
    with pytest.raises(ConfigError) as info:
        build(target, command=f"touch {marker}", args=["touch", str(marker)])
    assert info.value.where == "student.model.target" and text in info.value.message
    assert not marker.exists()


@pytest.mark.parametrize(("name", "text"), [
    ("touch_file", "is a function, not an nn.Module subclass"),  # unannotated: never called
    ("NotAModel", "is a class, not an nn.Module subclass"),
    ("system", "standard library"),  # `from os import system` does not make it the user's
    ("Linear", "installed package"),
    ("HERE", "a PosixPath value, not a class or function"),
])
def test_user_module_objects_that_are_not_models_are_refused_uncalled(
    user: Path, name: str, text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(f"trustmodels:{name}", command=f"touch {user / 'CALLED'}")
    assert text in info.value.message
    assert (user / "IMPORTED").exists()  # arch: custom is the explicit request to import it
    assert not (user / "CALLED").exists()


@pytest.mark.parametrize("target", ["trustmodels:_private", "trustmodels:Net.__init__",
                                    "trustmodels:Net.__init__.__globals__", "trustmodels:",
                                    ":Net", "trust models:Net", ".trustmodels:Net"])
def test_private_and_malformed_names_are_refused_before_import(user: Path, target: str) -> None:
    with pytest.raises(ConfigError, match=r"package\.module:Name"):
        build(target)
    assert not (user / "IMPORTED").exists()


def test_user_models_classes_subclasses_and_annotated_factories_build(user: Path) -> None:
    assert isinstance(build("trustmodels:Net"), nn.Module) and (user / "BUILT").exists()
    assert isinstance(build("trustmodels:MyLinear", in_features=4, out_features=2), nn.Linear)
    assert build("trustmodels:factory", width=5).in_features == 5


def test_check_target_imports_but_builds_nothing(user: Path) -> None:
    check_target("trustmodels:Net", "teacher.model")
    assert (user / "IMPORTED").exists() and not (user / "BUILT").exists()
    with pytest.raises(ConfigError) as info:
        check_target("os:system", "teacher.model")
    assert info.value.where == "teacher.model.target"
    with pytest.raises(ConfigError, match="needs target"):
        check_target(None, "teacher.model")


def test_custom_modules_are_found_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwdmodels.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwdmodels", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert isinstance(build("cwdmodels:Net"), nn.Module)
    assert sys.path == before  # the working directory was on the path for that import only


def test_a_model_too_large_to_allocate_is_one_line_with_its_size() -> None:
    width = 2**40  # 2^40 x 64 float32 weights: 256 TiB, refused by the allocator at once
    with pytest.raises(ConfigError) as info:
        build_model("mlp", input_shape=(64,), num_classes=10, args={"hidden": [width]},
                    where="student.model")
    params = 64 * width + width + width * 10 + 10
    assert info.value.where == "student.model"
    assert f"{params:,} parameters" in info.value.message
    assert "too large to allocate" in info.value.message


def test_memory_errors_of_a_custom_builder_name_the_target(
    user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trustmodels  # type: ignore[import-not-found]

    def out_of_memory(*args: object, **kwargs: object) -> nn.Module:
        raise MemoryError

    monkeypatch.setattr(trustmodels.Net, "__init__", out_of_memory)
    with pytest.raises(ConfigError, match=r"target 'trustmodels:Net' is too large to allocate "
                                          r"\(its size could not be estimated\)"):
        build("trustmodels:Net")
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 bytes"))
    assert not is_out_of_memory(RuntimeError("shapes cannot be multiplied"))


# --- bounded YAML --------------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    """`levels` anchors, each a list of nine aliases of the one before: 9^levels strings."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "".join(f"      {line}\n" for line in lines)


def test_an_alias_bomb_under_model_args_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text("teacher:\n  model:\n    arch: mlp\n    args:\n" + alias_bomb())
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: refused: .*aliases are expanded"):
        read_yaml(path)
    assert time.perf_counter() - start < 1.0
    # A few aliases (a recipe reusing a block) are fine.
    path.write_text("a: &x {hidden: [8, 8]}\nb: *x\nc: *x\n")
    assert read_yaml(path) == {"a": {"hidden": [8, 8]}, "b": {"hidden": [8, 8]},
                               "c": {"hidden": [8, 8]}}


@pytest.mark.parametrize(("data", "text"), [
    ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 9)"),
    (bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 at offset 128)"),
    (b"a: \x07b\n", "character #x0007"),
    (b"a: &x [1, *x]\n", "refers to itself"),
    (b"[" * 100 + b"]" * 100, "nested more than 64 levels"),
    (b"[" * 20000 + b"]" * 20000, "nested"),
    (b"a: " + b"1" * 5000, "invalid YAML value"),
    (b"!!python/object/apply:os.system ['touch PWNED']\n", "could not determine a constructor"),
    (b"train: {epochs: 3\n", "invalid YAML at line 2"),
], ids=["latin-1", "random-bytes", "control-char", "recursive", "deep", "very-deep",
        "huge-int", "python-tag", "malformed"])
def test_bad_yaml_files_are_one_error_naming_the_file(
    tmp_path: Path, data: bytes, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert info.value.where == str(path) and text in info.value.message, info.value.message
    assert not (tmp_path / "PWNED").exists()


def test_yaml_size_limit_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("a: [" + "1, " * 400_000 + "1]\n")
    with pytest.raises(ConfigError, match="over 1,048,576 bytes"):
        read_yaml(path)
    assert parse_yaml_value("[0, 1, {a: .5}]") == [0, 1, {"a": 0.5}]
    with pytest.raises(ConfigError, match=r"train.seeds: refused: .*aliases"):
        parse_yaml_value("[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(["*a"] * 20) + "]",
                         where="train.seeds", max_nodes=100)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_read_as_safe_load_reads_them(recipe: Path) -> None:
    assert read_yaml(recipe) == yaml.safe_load(recipe.read_text())


# --- JSON files kdistill reads back --------------------------------------------------------


@pytest.mark.parametrize(("data", "text"), [
    (None, "stage marker not found; delete it"),
    (b"\xff\xfe{}", "not UTF-8 text (byte 0xff at offset 0)"),
    (b'{"a": ', "not valid JSON (Expecting value at line 1, column 7)"),
    (b"null", "stage marker should be an object, got null"),
    (b"[]", "stage marker should be an object, got an array"),
    (b'"x"', "stage marker should be an object, got a string"),
], ids=["missing", "undecodable", "invalid", "null", "array", "string"])
def test_read_json_names_the_file_and_what_it_should_be(
    tmp_path: Path, data: bytes | None, text: str
) -> None:
    path = tmp_path / "stage.json"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        read_json(path, what="stage marker", hint="delete it")
    assert info.value.where == str(path) and text in info.value.message, info.value.message


def test_read_json_accepts_the_expected_types(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert read_json(path, expect=list) == [1, 2]
    path.write_text("true")
    with pytest.raises(ConfigError, match="should be a number, got true or false"):
        read_json(path, expect=(int, float))
    with pytest.raises(ConfigError, match="is a directory"):
        read_json(tmp_path)


def test_temperature_and_weights_must_be_finite() -> None:
    from kdistill.config import load_config

    for override in ("method.temperature=.nan", "method.temperature=.inf",
                     "method.alpha=.nan", "method.temperature={kind: linear, start: 4, end: .inf}"):
        with pytest.raises(ConfigError, match="finite number"):
            load_config(None, [override])
    assert load_config(None, ["method.temperature=1e30"]).method.temperature == 1e30


def test_out_of_memory_is_recognised_on_torch_errors() -> None:
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert is_out_of_memory(exc)
    else:  # pragma: no cover - no machine has 4 EiB
        pytest.fail("allocated 4 EiB")
