"""Text classification from the user's tables (`data.name: text_classification`) and the bad
files every table reader must refuse with one line naming the file, the line and the column.

Texts are real fortunes-like sentences written by the test; the tokenizer is the real
all-MiniLM-L6-v2 WordPiece (what `fortunes5` uses).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from kdistill.config import data_source
from kdistill.data import LoadContext
from kdistill.data.fortune_classes import tokenize_padded
from kdistill.data.tables import read_table
from kdistill.errors import ConfigError

pytest.importorskip("transformers")

TEXTS = {
    "computers": ["The program crashed again after the update.", "Never trust a computer you "
                  "cannot throw out of a window.", "There are two hard problems in computing.",
                  "The compiler refused my code politely.", "A byte walks into a bar."],
    "science": ["Light bends around heavy stars.", "The experiment failed to reproduce.",
                "Cells divide when they grow too large.", "Entropy always wins in the end.",
                "The theory predicts a new particle."],
    "work": ["The meeting could have been an email.", "Monday arrives every week on time.",
             "My boss praised the quarterly report.", "Overtime pays for the new coffee machine.",
             "The deadline moved again, further away."],
}


def rows() -> list[tuple[str, str]]:
    return [(t, label) for label, texts in TEXTS.items() for t in texts]


def write_csv(path: Path, data: list[tuple[str, str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["text", "label"])
        writer.writerows(data)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(run_dir: Path | None = None, **fields):
    fields.setdefault("tokenizer", "minilm")
    fields.setdefault("seq_len", 16)
    return data_source(name="text_classification", **fields).load(LoadContext(run_dir=run_dir))


def test_csv_gives_the_built_in_text_layout_and_saves_labels(tmp_path: Path):
    from kdistill.models.hf import load_tokenizer

    path = write_csv(tmp_path / "reviews.csv", rows())
    splits = load(tmp_path / "run", path=str(path), val_size=3, test_size=3)
    assert splits.name == "reviews" and splits.task == "classification"
    assert splits.class_names == ("computers", "science", "work") and splits.num_classes == 3
    assert (len(splits.train_x), len(splits.val_x), len(splits.test_x)) == (9, 3, 3)
    assert sorted(splits.test_y.tolist()) == [0, 1, 2]  # stratified
    assert splits.train_x.dtype == torch.int64 and splits.train_x.shape == (9, 16)
    assert splits.input_shape == (16,)
    # Exactly fortunes5's encoding: [CLS] text [SEP], padded with the pad id.
    texts = dict((t, lab) for t, lab in rows())
    tok = load_tokenizer("minilm")
    decoded = tok.decode(splits.train_x[0], skip_special_tokens=True)
    original = next(t for t in texts if t.lower().startswith(decoded[:10]))
    assert torch.equal(splits.train_x[0], tokenize_padded([original], tok, 16)[0])
    assert splits.class_names[splits.train_y[0]] == texts[original]
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["classes"] == [
        "computers", "science", "work"]
    assert splits.notes == ()


def test_every_table_format_reads_the_same_rows(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    data = rows()
    files = [write_csv(tmp_path / "a.csv", data),
             write_csv(tmp_path / "a.tsv", data, delimiter="\t"),
             write_jsonl(tmp_path / "a.jsonl", [{"text": t, "label": lab} for t, lab in data])]
    table = datasets.Dataset.from_dict({"text": [t for t, _ in data],
                                        "label": [lab for _, lab in data]})
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    files += [tmp_path / "a.parquet", tmp_path / "saved"]
    first = load(path=str(files[0]))
    for other in files[1:]:
        splits = load(path=str(other))
        assert torch.equal(splits.train_x, first.train_x), other
        assert torch.equal(splits.test_y, first.test_y), other
    # A saved DatasetDict brings its own splits.
    datasets.DatasetDict({"train": table, "validation": table.select(range(3)),
                          "test": table.select(range(3, 6))}).save_to_disk(str(tmp_path / "dd"))
    splits = load(path=str(tmp_path / "dd"))
    assert (len(splits.train_x), len(splits.val_x), len(splits.test_x)) == (15, 3, 3)
    assert any("3 validation and 3 test texts are exact copies" in n for n in splits.notes)
    with pytest.raises(ConfigError, match=r"data.val_size: .*already holds a validation split"):
        load(path=str(tmp_path / "dd"), val_size=0.2)


def test_sentence_pairs_integer_labels_and_given_splits(tmp_path: Path):
    pairs = [{"premise": a, "hypothesis": b, "label": k % 3}
             for k, (a, b) in enumerate(zip(TEXTS["science"] * 2, TEXTS["work"] * 2,
                                            strict=True))]
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    test = write_jsonl(tmp_path / "test.jsonl", pairs[:3])
    splits = load(path=str(train), test_path=str(test), text="premise", text_pair="hypothesis",
                  val_size=3, seq_len=32)
    assert splits.class_names == ("0", "1", "2") and len(splits.test_x) == 3
    from kdistill.models.hf import load_tokenizer

    tok = load_tokenizer("minilm")
    expected = tok(pairs[0]["premise"], pairs[0]["hypothesis"], truncation=True, max_length=32,
                   padding="max_length")["input_ids"]
    assert splits.test_x[0].tolist() == expected
    assert tok.sep_token_id in splits.test_x[0, 1:].tolist()  # [SEP] between the two texts
    assert any("3 test texts are exact copies" in n for n in splits.notes)


def test_fingerprint_follows_the_file(tmp_path: Path):
    path = write_csv(tmp_path / "t.csv", rows())
    first = load(path=str(path)).fingerprint
    assert load(path=str(path)).fingerprint == first
    data = rows()
    data[0] = ("The program crashed again after the upgrade.", data[0][1])
    write_csv(path, data)
    assert load(path=str(path)).fingerprint != first


BAD = {
    "ragged": ("bad.csv", 'text,label\n"a b",work\n"c d",work,extra\n', r"bad.csv:3: has 3 "
               r"field\(s\) where the header has 2"),
    "encoding": ("bad.csv", b"text,label\nok,work\ncaf\xe9,work\n", r"bad.csv:3: is not UTF-8"),
    "empty": ("bad.csv", "", r"bad.csv: is empty"),
    "header only": ("bad.csv", "text,label\n", r"bad.csv: holds no rows"),
    "missing column": ("bad.csv", "text,category\na,work\n", r"bad.csv: has no column 'label' "
                       r"\(columns: text, category\)"),
    "empty label": ("bad.csv", "text,label\na,work\nb,\n", r"bad.csv:3: column 'label' is "
                    r"empty"),
    "mixed labels": ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "work"}\n',
                     r"bad.jsonl:2: column 'label' 'work' is a text but the first row's is a "
                     r"number"),
    "negative": ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": -2}\n',
                 r"bad.jsonl:2: column 'label' -2 is out of range"),
    "not json": ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', r"bad.jsonl:2: "
                 r"is not a JSON line"),
    "no field": ("bad.jsonl", '{"text": "a", "label": 1}\n{"label": 2}\n', r"bad.jsonl:2: has "
                 r"no field 'text'"),
    "text not text": ("bad.jsonl", '{"text": 5, "label": 1}\n', r"bad.jsonl:1: column 'text' "
                      r"is 5; expected text"),
    "format": ("bad.xlsx", "x", r"bad.xlsx: unknown table format"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_tables_are_one_line_naming_file_line_and_column(tmp_path: Path, case: str):
    name, content, message = BAD[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message) as info:
        load(path=str(path))
    assert "\n" not in str(info.value)


def test_labels_the_training_split_never_had(tmp_path: Path):
    train = write_csv(tmp_path / "train.csv", rows())
    val = write_csv(tmp_path / "val.csv", [("A new text.", "sports")])
    with pytest.raises(ConfigError, match=r"val.csv:2: column 'label' 'sports' is not one of "
                                          r"the training split's classes"):
        load(path=str(train), val_path=str(val))
    with pytest.raises(ConfigError, match=r"data.val_path: .*nowhere.csv: no such file"):
        load(path=str(train), val_path=str(tmp_path / "nowhere.csv"))
    ids = write_csv(tmp_path / "ids.csv", [(t, str(k % 3 + 1)) for k, (t, _) in
                                            enumerate(rows())])
    splits = load(path=str(ids))  # 1-based ids: class 0 is empty, and the note says so
    assert splits.num_classes == 4 and any("class id(s) 0 have no training rows" in n
                                            for n in splits.notes)


def test_csv_quoted_fields_keep_their_lines(tmp_path: Path):
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"two\nlines",a\n"x",b\n"y",c,d\n')
    with pytest.raises(ConfigError, match=r"q.csv:5: has 3 field"):
        read_table(path, ["text", "label"])
    path.write_text('text,label\n"two\nlines",a\n\n"x",b\n')
    table = read_table(path, ["text", "label"])
    assert table.columns["text"] == ["two\nlines", "x"] and table.lines == [2, 5]
