"""docs/recipes.md is generated from the recipe schema; these tests keep the two in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.config import RunConfig
from kdistill.methods import METHODS
from kdistill.report.recipes_doc import COMMAND, HEADER, main, recipes_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return recipes_markdown()


def test_committed_doc_is_up_to_date(doc: str) -> None:
    committed = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert committed == doc, f"docs/recipes.md is stale: the schema changed; run `{COMMAND}`"


def test_every_key_and_method_is_documented(doc: str) -> None:
    assert doc.startswith(HEADER + "\n")
    for key in RunConfig.model_fields:
        assert f"| `{key}` |" in doc, key
    for name, cls in METHODS.items():
        assert f"### `method.name: {name}`" in doc, name
        for key in cls.config_type.model_fields.keys() - {"name"}:
            assert f"| `method.{key}` |" in doc, (name, key)


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
    assert "(required)" in _row(doc, "method.student_layer")[2]  # fitnet's


def test_check_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "recipes.md"
    stale.write_text("old\n")
    assert main([str(stale), "--check"]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main([str(stale)]) == 0
    assert main([str(stale), "--check"]) == 0
