"""The user's texts without labels in a text transfer set (issue #17, scope 1):
`transfer_set.unlabelled: {name: texts, path: ...}` reads .txt files and tables, drops any
text equal to one of the data's own, and only the distilled student trains on the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill import pipeline
from kdistill.build import add_unlabelled, build_data
from kdistill.config import load_config
from kdistill.data.fortune_classes import tokenize_padded
from kdistill.data.source import LoadContext
from kdistill.data.unlabelled_texts import UnlabelledTexts
from kdistill.errors import ConfigError
from kdistill.types import IGNORE_INDEX
from tests.test_text_classification import _tiny_bert, fortunes_dir  # noqa: F401 - fixture
from tests.test_text_transfer import RECIPE

TEXTS = ["the printer is on fire again", "my cat ate the keyboard", "love is patient"]


def _load(tmp_path: Path, name: str, body: str, **fields: str) -> list[list[int]]:
    path = tmp_path / name
    path.write_text(body)
    cfg = UnlabelledTexts(name="texts", path=str(path), tokenizer="minilm", seq_len=12,
                          **fields)
    splits = cfg.load(LoadContext(where="transfer_set.unlabelled"))
    assert (splits.train_y == IGNORE_INDEX).all() and len(splits.val_x) == len(splits.test_x) == 0
    return splits.train_x.tolist()


def test_texts_come_from_lines_paragraphs_and_table_columns(tmp_path: Path) -> None:
    from kdistill.models.hf import load_tokenizer

    expected = tokenize_padded(TEXTS, load_tokenizer("minilm"), 12).tolist()
    assert _load(tmp_path, "a.txt", "\n".join(TEXTS) + "\n\n") == expected
    paragraphs = "\n\n".join(TEXTS)
    assert _load(tmp_path, "b.txt", paragraphs, documents="paragraphs") == expected
    csv = "id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS))
    assert _load(tmp_path, "c.csv", csv, text="body") == expected


@pytest.mark.parametrize(("name", "body", "fields", "message"), [
    ("a.csv", "text\nhello\n", {"documents": "files"}, r"unlabelled\.documents: .* a table"),
    ("a.txt", "hello\n", {"text": "body"}, r"unlabelled\.text: .* plain text"),
    ("a.txt", "\n\n", {}, r"a\.txt: is empty"),
    ("a.csv", "body\nhello\n", {}, r"a\.csv: has no column 'text' \(columns: body\)"),
])
def test_bad_text_files_are_one_line_errors(tmp_path: Path, name: str, body: str,
                                            fields: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, name, body, **fields)


def test_texts_are_not_a_data_source(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {name: texts, path: x.txt, tokenizer: minilm}\n")
    with pytest.raises(ConfigError, match=r"texts without labels: use them as transfer_set"):
        load_config(recipe)


def test_a_run_distils_on_the_users_unlabelled_texts(tmp_path: Path,
                                                     fortunes_dir: Path) -> None:  # noqa: F811
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert=_tiny_bert(tmp_path / "b")))
    cfg = load_config(recipe)
    data = build_data(cfg.data)
    first = sorted(p for p in fortunes_dir.iterdir() if not p.suffix)[0]
    own = [t for t in first.read_text().split("\n%\n") if len(t.strip()) > 20]
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join([own[0].replace("\n", " "), *TEXTS, TEXTS[0]]) + "\n")
    cfg = load_config(recipe, [f"transfer_set.unlabelled={{name: texts, path: {mine}, "
                               "tokenizer: minilm, seq_len: 16}"])
    splits = add_unlabelled(data, cfg)
    assert splits.unlabelled_x is not None and len(splits.unlabelled_x) == 3  # repeat dropped
    lines: list[str] = []
    result = pipeline.run(cfg, echo=lines.append)
    assert any("3 unlabelled inputs from 'mine'" in line for line in lines), lines
    from kdistill.cache import TeacherCache

    cache = TeacherCache(result.run_dir / "cache" / "teacher")
    assert cache.num_samples == 2 * (len(data.train_x) + 3)


def test_validate_reads_the_unlabelled_texts_and_names_the_field_that_differs(
        tmp_path: Path, fortunes_dir: Path) -> None:  # noqa: F811
    from kdistill.build import validate

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert=_tiny_bert(tmp_path / "b")))
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(TEXTS * 3) + "\n")
    base = f"transfer_set.unlabelled={{name: texts, path: {mine}, tokenizer: minilm, seq_len: 16}}"
    for override, field in [("transfer_set.unlabelled.path=nope.txt", "path"),
                            ("transfer_set.unlabelled.seq_len=32", "seq_len"),
                            ("transfer_set.unlabelled.tokenizer=smollm2", "tokenizer")]:
        cfg = load_config(recipe, [base, override])
        with pytest.raises(ConfigError, match=rf"^transfer_set\.unlabelled\.{field}: "):
            validate(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("transfer_set.unlabelled={path: x.txt}",
     r"transfer_set\.unlabelled\.name: missing; expected name: one of mnist, .*, texts$"),
    ("transfer_set.unlabelled={name: texts, path: x.txt, tokenizer: minilm, bogus: 1}",
     r"transfer_set\.unlabelled\.bogus: unknown key"),  # no "texts" tag in the path
    ("compress=[{kind: prun, amount: 0.5}]", r"compress\.0\.kind: unknown stage kind"),
    ("compress=[{amount: 0.5}]", r"compress\.0\.kind: missing; expected kind: one of prune"),
])
def test_union_errors_name_the_field_the_user_wrote(tmp_path: Path, override: str,
                                                    message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert="minilm"))
    with pytest.raises(ConfigError, match=message):
        load_config(recipe, [override])


def test_a_new_unlabelled_name_starts_that_section_afresh(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert="minilm"))
    cfg = load_config(recipe, ["transfer_set.unlabelled.name=texts",
                               "transfer_set.unlabelled.path=x.txt",
                               "transfer_set.unlabelled.tokenizer=minilm"])
    assert cfg.transfer_set is not None and cfg.transfer_set.unlabelled is not None
    assert cfg.transfer_set.unlabelled.name == "texts"  # fortunes43's val_size etc. dropped
    assert cfg.transfer_set.mask_prob == 0.2  # the rest of transfer_set stays


def test_sentence_pairs_refuse_single_texts(tmp_path: Path) -> None:
    from kdistill.build import add_unlabelled, build_data

    table = tmp_path / "pairs.csv"
    rows = [f'"{a} number {i}","{b}",{i % 2}' for i in range(20) for a, b in [TEXTS[:2]]]
    table.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    mine = tmp_path / "mine.txt"
    mine.write_text("\n".join(TEXTS) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{name: text_classification, path: {table}, text: a, text_pair: b, "
        "tokenizer: minilm, seq_len: 16, val_size: 2, test_size: 2}\n"
        "transfer_set: {views: 1, unlabelled: {name: texts, path: " + str(mine) +
        ", tokenizer: minilm, seq_len: 16}}\n")
    cfg = load_config(recipe)
    with pytest.raises(ConfigError, match=r"^transfer_set\.unlabelled\.name: .*sentence pairs"):
        add_unlabelled(build_data(cfg.data), cfg)
