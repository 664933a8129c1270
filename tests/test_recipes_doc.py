"""docs/recipes.md is generated from the recipe schema; these tests keep the two in step."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from kdistill.config import RunConfig
from kdistill.methods import METHODS, Method, MethodConfig
from kdistill.report.recipes_doc import (
    COMMAND,
    HEADER,
    main,
    method_parameters,
    recipes_markdown,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return recipes_markdown()


def test_committed_doc_is_up_to_date(doc: str) -> None:
    committed = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert committed == doc, f"docs/recipes.md is stale: the schema changed; run `{COMMAND}`"


def test_every_key_is_documented_and_every_method_key_is_listed(doc: str) -> None:
    assert doc.startswith(HEADER + "\n")
    for key in RunConfig.model_fields:
        assert f"| `{key}` |" in doc, key
    assert "`kdistill methods NAME`" in doc
    for name, cls in METHODS.items():
        keys = [row[0] for row in method_parameters(name)]
        assert keys == [f"method.{k}" for k in cls.config_type.model_fields if k != "name"]
        assert f"### `method.name: {name}`" not in doc  # per-method keys live in the CLI


def test_adding_a_method_needs_no_regenerated_doc(doc: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    class NewConfig(MethodConfig):
        """loss = something new."""

        name: Literal["new"] = "new"
        weight: float = Field(2.0, gt=0, description="how much")

    class New(Method):
        config_type = NewConfig

    monkeypatch.setitem(METHODS, "new", New)
    assert recipes_markdown() == doc
    assert method_parameters("new") == [("method.weight", "float", "2.0", "how much (> 0)")]


def test_kdistill_methods_name_prints_the_parameter_table() -> None:
    from typer.testing import CliRunner

    from kdistill.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["methods", "fitnet"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "Romero" in out.output and "adapter" in out.output
    for key, type_, default, _ in method_parameters("fitnet"):
        line = next(x for x in out.output.splitlines() if f" {key} " in x)
        assert type_ in line and default in line, line
    listing = runner.invoke(app, ["methods"], terminal_width=200)
    assert listing.exit_code == 0 and all(name in listing.output for name in METHODS)
    unknown = runner.invoke(app, ["methods", "fitnett"])
    assert unknown.exit_code != 0 and "unknown method 'fitnett'" in str(unknown.exception)


def _row(doc: str, key: str) -> list[str]:
    line = next(x for x in doc.splitlines() if x.startswith(f"| `{key}` |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_rows_show_type_default_and_constraints(doc: str) -> None:
    assert _row(doc, "train.optimizer.lr")[1:4] == [
        "float", "`0.002`; `0.001` if the recipe sets `train.optimizer`", "> 0, <= 10"]
    # The built-in teacher trains for 40 epochs; a written teacher.train starts from 200.
    assert _row(doc, "teacher.train.epochs")[2] == "`40`; `200` if the recipe sets `teacher.train`"
    assert _row(doc, "train.lr_schedule")[1:3] == [
        "number or schedule", "`{kind: cosine, start: 1.0, end: 0.05}`"]
    assert _row(doc, "train.precision")[1] == "one of 'fp32' \\| 'bf16' \\| 'fp16'"
    assert _row(doc, "more_teachers")[1] == "list of teacher sections"
    assert _row(doc, "data.test_size")[3] == "> 0, < 1"
    fitnet = {row[0]: row for row in method_parameters("fitnet")}
    assert fitnet["method.student_layer"][2] == "(required)"
    assert fitnet["method.temperature"][1:3] == ("number or schedule", "4.0")


def test_check_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "recipes.md"
    stale.write_text("old\n")
    assert main([str(stale), "--check"]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main([str(stale)]) == 0
    assert main([str(stale), "--check"]) == 0
