"""Text corpora for causal-LM distillation: real offline corpora, split by document, packed.

A tiny word-level tokenizer trained in memory on real stdlib docstrings stands in for SmolLM2
(whose tokenizer takes seconds to load): packing and splitting do not depend on the vocabulary.
"""

from __future__ import annotations

import functools

import pytest
import torch

from kdistill.data import text
from kdistill.data.datasets import DataSplits
from kdistill.data.text import lm_splits, lm_splits_from_documents, read_corpus, split_documents
from kdistill.errors import ConfigError, MissingDependencyError

EOS = "[EOS]"


@functools.cache
def _docs() -> tuple[str, ...]:
    """300 real docstrings, each led by a unique marker word so its tokens can be traced."""
    every = read_corpus("stdlib_docs")[::20][:300]
    return tuple(f"zzdoc{i} {doc}" for i, doc in enumerate(every))


@functools.cache
def _tokenizer(vocab_size: int = 4000):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", EOS], show_progress=False
    )
    tok.train_from_iterator(_docs(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]")


SPLIT = dict(val_fraction=0.1, test_fraction=0.1, split_seed=0)


def _splits(docs=None, tokenizer=None, **overrides) -> DataSplits:
    args = dict(name="docs", seq_len=32, max_train_tokens=None, max_eval_tokens=None, **SPLIT)
    args.update(overrides)
    return lm_splits_from_documents(
        _docs() if docs is None else docs, tokenizer or _tokenizer(), **args
    )


def _markers(ids: torch.Tensor) -> set[int]:
    """The documents (by marker number) whose first token appears in these blocks."""
    vocab = {v: k for k, v in _tokenizer().get_vocab().items()}
    return {int(vocab[i][5:]) for i in ids.unique().tolist() if vocab[i].startswith("zzdoc")}


# --- corpora -------------------------------------------------------------------------------


def test_stdlib_docs_is_the_real_standard_library():
    docs = read_corpus("stdlib_docs")
    assert len(docs) > 3000
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in docs)  # json module
    assert all(len(d) >= text.MIN_DOCSTRING_CHARS and d == d.strip() for d in docs)
    assert len(set(docs)) == len(docs)  # exact duplicates dropped
    docs.clear()  # a fresh list each call: the per-process cache cannot be changed
    assert len(read_corpus("stdlib_docs")) > 3000


def test_fortunes_corpus_when_installed():
    if not text.FORTUNES_DIR.is_dir():
        pytest.skip("Debian package fortunes is not installed")
    docs = read_corpus("fortunes")
    assert len(docs) > 10000
    assert all(len(d) >= text.MIN_FORTUNE_CHARS for d in docs)
    assert not any(line.strip() == "%" for d in docs for line in d.splitlines())


def test_fortunes_parsing_skips_indexes_and_the_offensive_set(tmp_path, monkeypatch):
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_text("An offensive entry that must never be read.\n%\n")
    (tmp_path / "cats").write_text(
        "A first entry, long enough.\n%\nshort\n%\n  Second entry,\non two lines  \n"
    )
    (tmp_path / "cats.dat").write_bytes(b"\x00\x02binary index")
    monkeypatch.setattr(text, "FORTUNES_DIR", tmp_path)
    assert read_corpus("fortunes") == ["A first entry, long enough.", "Second entry,\non two lines"]


def test_fortunes_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(MissingDependencyError, match="apt-get install fortunes") as err:
        read_corpus("fortunes", where="llm.data.name")
    assert err.value.where == "llm.data.name"
    with pytest.raises(ConfigError, match="apt-get install fortunes"):
        lm_splits(
            "fortunes",
            _tokenizer(),
            seq_len=8,
            max_train_tokens=None,
            max_eval_tokens=None,
            where="data",
            **SPLIT,
        )


def test_unknown_corpus_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'fortunes'") as err:
        read_corpus("fortune")
    assert err.value.where == "data.name"


# --- splitting by document ------------------------------------------------------------------


def test_split_documents_is_a_seeded_partition():
    train, val, test = split_documents(101, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (71, 10, 20)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(101))
    again = split_documents(101, 0.1, 0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not torch.equal(train, split_documents(101, 0.1, 0.2, seed=4)[0])
    assert [len(s) for s in split_documents(5, 0.01, 0.01, seed=0)] == [3, 1, 1]


def test_blocks_are_the_split_documents_packed_with_eos():
    tok = _tokenizer()
    d = _splits()
    assert d.task == "causal_lm" and d.name == "docs"
    assert d.num_classes == len(tok) and d.input_shape == (32,)
    docs = _docs()
    xs, ys = (d.train_x, d.val_x, d.test_x), (d.train_y, d.val_y, d.test_y)
    for x, y, idx in zip(xs, ys, split_documents(300, 0.1, 0.1, seed=0), strict=True):
        assert x.dtype == y.dtype == torch.int64 and x.shape[1] == 32 and len(x) > 0
        assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()  # labels: a copy of the ids
        stream = []
        for i in idx.tolist():
            stream += [*tok(docs[i], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert x.flatten().tolist() == stream[: x.numel()]
        assert len(stream) - x.numel() < 32  # only the last partial block is dropped


def test_no_document_is_in_two_splits():
    d = _splits(seq_len=16)
    train, val, test = (_markers(x) for x in (d.train_x, d.val_x, d.test_x))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) >= 295  # all but the few cut off with a partial block


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = _splits(), _splits(), _splits(split_seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert not torch.equal(a.train_x[:4], c.train_x[:4]) and a.fingerprint != c.fingerprint


def test_token_limits_keep_whole_blocks_from_the_start(monkeypatch):
    full = _splits()
    d = _splits(max_train_tokens=200, max_eval_tokens=70)
    assert d.train_x.shape == (6, 32) and torch.equal(d.train_x, full.train_x[:6])
    assert d.val_x.shape == d.test_x.shape == (2, 32)
    assert torch.equal(d.val_x, full.val_x[:2])
    # Tokenising stops early, in batches: the batch size must not change the result.
    monkeypatch.setattr(text, "TOKENIZE_BATCH", 3)
    small = _splits(max_train_tokens=200, max_eval_tokens=70)
    assert torch.equal(small.train_x, d.train_x) and small.fingerprint == d.fingerprint


def test_fingerprint_follows_tokenizer_seq_len_corpus_and_limits():
    base = _splits().fingerprint
    assert _splits(tokenizer=_tokenizer(500)).fingerprint != base
    assert _splits(seq_len=16).fingerprint != base
    assert _splits(docs=_docs()[:-1]).fingerprint != base
    assert _splits(name="other").fingerprint != base
    assert _splits(max_eval_tokens=64).fingerprint != base  # same train ids, other eval data


def test_lm_splits_reads_a_corpus_by_name():
    d = lm_splits(
        "stdlib_docs",
        _tokenizer(),
        seq_len=64,
        max_train_tokens=640,
        max_eval_tokens=128,
        where="llm.data.name",
        **SPLIT,
    )
    assert d.name == "stdlib_docs" and d.task == "causal_lm"
    assert d.train_x.shape == (10, 64) and d.val_x.shape == d.test_x.shape == (2, 64)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_len": 100_000}, "data.seq_len"),  # no split holds one block
        ({"seq_len": 1}, "data.seq_len"),
        ({"max_train_tokens": 31}, "data.seq_len"),  # fewer tokens than one block
        ({"max_train_tokens": 0}, "data.max_train_tokens"),
        ({"max_eval_tokens": 2.5}, "data.max_eval_tokens"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"test_fraction": 1.0}, "data.test_fraction"),
        ({"test_fraction": True}, "data.test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction"),
        ({"split_seed": "0"}, "data.split_seed"),
    ],
)
def test_bad_arguments_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _splits(where="data", **overrides)
    assert err.value.where == field


def test_a_tokenizer_without_eos_is_refused():
    tok = _tokenizer()
    plain = type(tok)(tokenizer_object=tok.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="EOS"):
        _splits(tokenizer=plain)


def test_given_training_documents_leave_validation_and_test_as_they_were():
    """Sequence-level KD on a corpus: the teacher's texts replace the training split only, so
    the student is scored on the very blocks the other students are."""
    base = _splits()
    teacher_text = [f"zzdoc{i} generated text number {i}" for i in range(200, 260)]
    given = _splits(train_documents=teacher_text)
    assert torch.equal(given.val_x, base.val_x) and torch.equal(given.test_x, base.test_x)
    assert _markers(given.train_x) <= set(range(200, 260))  # only the given documents
    assert given.fingerprint != base.fingerprint
    # The fingerprint follows the blocks: other texts, another cache.
    assert _splits(train_documents=teacher_text[1:]).fingerprint != given.fingerprint


def test_train_path_reads_a_tables_text_column(tmp_path):
    import json

    from kdistill.data.builtin import TextCorpus

    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                            for i, t in enumerate([" first text ", "second", "  "])))
    corpus = TextCorpus(name="stdlib_docs", tokenizer="unused", train_path=str(path))
    assert corpus.training_documents() == ["first text", "second"]  # blank rows dropped
    (tmp_path / "bad.jsonl").write_text('{"response": "no text column"}\n')
    with pytest.raises(ConfigError, match="text"):
        TextCorpus(name="stdlib_docs", tokenizer="x",
                   train_path=str(tmp_path / "bad.jsonl")).training_documents()
    with pytest.raises(ConfigError) as err:
        TextCorpus(name="stdlib_docs", tokenizer="x",
                   train_path=str(tmp_path / "none.jsonl")).training_documents()
    assert err.value.where == "data.train_path"
