"""The user's text for language models: corpora (`text_files`), chat rows (`chat`), prompt
files for `kdistill generate`, and translation pairs (`translation_pairs`).

A tiny word-level tokenizer with a chat template, saved like a model's, stands in for SmolLM2
(whose tokenizer takes seconds to load): rows, masks and packing do not depend on the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.config import data_source
from kdistill.config.generate import GenerateConfig
from kdistill.data import LoadContext
from kdistill.data.prompts import read_prompt_file
from kdistill.data.sft import encode_chat, encode_pair
from kdistill.errors import ConfigError
from kdistill.types import IGNORE_INDEX

pytest.importorskip("transformers")

EOS = "[EOS]"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
WORDS = ("system user assistant : the a cat dog sat on mat and ran far away why is sky blue "
         "because light scatters what time it now late hello world translate good morning "
         "guten morgen bonjour le monde . ? ! one two three four five six seven eight nine ten")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS] * 2, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", EOS], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]",
                                   pad_token="[PAD]")
    fast.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return str(path)


def _tok(path: str):
    from kdistill.models.hf import load_tokenizer

    return load_tokenizer(path)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- chat ----------------------------------------------------------------------------------


CHATS = [
    {"messages": [{"role": "user", "content": "why is the sky blue ?"},
                  {"role": "assistant", "content": "because light scatters ."},
                  {"role": "user", "content": "what time is it ?"},
                  {"role": "assistant", "content": "it is late ."}]},
    *({"prompt": f"hello {n} cat", "completion": f"the cat sat {n} ."}
      for n in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")),
]


def test_chat_rows_train_on_the_assistant_tokens_only(tmp_path: Path, tokenizer_dir: str):
    tok = _tok(tokenizer_dir)
    ids, labels = encode_chat(tok, CHATS[0]["messages"])
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "because light scatters . [EOS] it is late . [EOS]"
    assert tok.decode(ids).startswith("user : why is the sky blue ? [EOS] assistant : because")
    # One turn: exactly the rows of the built-in generated data (encode_pair).
    prompt_ids, answer_ids = encode_pair(tok, "hello one cat", "the cat sat one .", system=None)
    pair = encode_chat(tok, [{"role": "user", "content": "hello one cat"},
                             {"role": "assistant", "content": "the cat sat one ."}])
    assert pair == (prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)

    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    splits = data_source(name="chat", path=str(path), tokenizer=tokenizer_dir, seq_len=24,
                         val_size=2, test_size=2).load(LoadContext())
    assert splits.task == "causal_lm" and splits.num_classes == len(tok)
    assert (len(splits.train_x), len(splits.val_x), len(splits.test_x)) == (7, 2, 2)
    assert splits.train_x.shape == (7, 24) and splits.train_y.dtype == torch.int64
    for x, y in zip(splits.train_x, splits.train_y, strict=True):
        kept = y != IGNORE_INDEX
        assert torch.equal(x[kept], y[kept])  # labels are the ids where trained
        assert tok.decode(y[kept]).endswith(EOS) and "user" not in tok.decode(y[kept])


def test_chat_errors_name_the_row(tmp_path: Path, tokenizer_dir: str):
    def load(records: list[dict]):
        path = write_jsonl(tmp_path / "c.jsonl", records)
        return data_source(name="chat", path=str(path), tokenizer=tokenizer_dir,
                           val_size=1, test_size=1).load(LoadContext())

    ok = {"prompt": "hello", "completion": "world"}
    with pytest.raises(ConfigError, match=r"c.jsonl:2: has no assistant turn"):
        load([ok, {"messages": [{"role": "user", "content": "hi"}]}, ok, ok])
    with pytest.raises(ConfigError, match=r"c.jsonl:1: messages\[0\] has role 'bot'"):
        load([{"messages": [{"role": "bot", "content": "hi"}]}, ok, ok, ok])
    with pytest.raises(ConfigError, match=r"c.jsonl: needs a 'messages' column, or 'prompt' "
                                          r"and 'completion'"):
        load([{"text": "hello"}])
    with pytest.raises(ConfigError, match=r"c.jsonl:3: column 'completion' is ''"):
        load([ok, ok, {"prompt": "a", "completion": ""}, ok])


# --- prompts for kdistill generate ---------------------------------------------------------


def test_prompt_files_for_generate(tmp_path: Path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "why is the sky blue ?", "reference": "light scatters"},
        {"id": "chat-1", "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hello"}]},
        {"prompt": "what time is it ?"}])
    prompts = read_prompt_file(str(path), limit=None, seed=0, where="prompts")
    by_id = {p.id: p for p in prompts}
    assert set(by_id) == {"1", "chat-1", "3"} and by_id["1"].reference == "light scatters"
    assert by_id["chat-1"].prompt[-1] == {"role": "user", "content": "hello"}
    assert read_prompt_file(str(path), limit=2, seed=0, where="prompts") == prompts[:2]
    cfg = GenerateConfig.model_validate({"prompts": {"name": "file", "path": str(path)},
                                         "output": {"path": "x.jsonl"}})
    assert cfg.prompts.load() == prompts
    assert GenerateConfig.model_validate({"output": {"path": "x"}}).prompts.name == \
        "stdlib_functions"
    from kdistill.config.loading import validated

    for prompts_section, message in (({"name": "file"}, "prompts.path: name: file reads"),
                                     ({"path": "p.jsonl"}, "prompts.path: only with name: file")):
        with pytest.raises(ConfigError, match=message):
            validated(GenerateConfig, {"prompts": prompts_section, "output": {"path": "x"}},
                      "gen.yaml")
    write_jsonl(path, [{"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(ConfigError, match=r"prompts.jsonl:1: a prompt ends before the "
                                          r"assistant's turn"):
        read_prompt_file(str(path), limit=None, seed=0, where="prompts")
    write_jsonl(path, [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: id '1' is also row 1's"):
        read_prompt_file(str(path), limit=None, seed=0, where="prompts")


def test_generated_conversations_become_training_rows(tmp_path: Path, tokenizer_dir: str):
    """`kdistill generate` writes a conversation prompt as a list of messages; the built-in
    `generated` source reads it back (sequence-level KD from a chat prompt file)."""
    messages = [{"role": "user", "content": "hello cat"}]
    records = [{"id": str(k), "prompt": messages if k % 2 else f"hello {k}",
                "response": "the cat sat .", "finished": True} for k in range(10)]
    path = write_jsonl(tmp_path / "gen.jsonl", records)
    splits = data_source(name="generated", path=str(path), tokenizer=tokenizer_dir,
                         seq_len=16, val_size=0.2, test_size=0.2).load(LoadContext())
    tok = _tok(tokenizer_dir)
    labelled = splits.train_y[0][splits.train_y[0] != IGNORE_INDEX]
    assert tok.decode(labelled) == "the cat sat . [EOS]"


# --- corpora -------------------------------------------------------------------------------


def test_text_files_pack_documents_like_the_built_in_corpora(tmp_path: Path, tokenizer_dir: str):
    paragraphs = [f"the cat sat on the mat {n} . the dog ran far away ." for n in WORDS.split()[
        -10:]]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    load = lambda **kw: data_source(name="text_files", tokenizer=tokenizer_dir,  # noqa: E731
                                    seq_len=8, **kw).load(LoadContext())
    splits = load(path=str(corpus), val_size=2, test_size=2)
    tok = _tok(tokenizer_dir)
    assert splits.task == "causal_lm" and splits.train_x.shape[1] == 8
    assert torch.equal(splits.train_x, splits.train_y)  # packed: every label a real token
    stream = splits.train_x.flatten().tolist()
    assert stream.count(tok.eos_token_id) >= 5  # EOS between documents
    # The very split and packing of the built-in corpora (`lm_splits_from_documents`).
    from kdistill.data.text import lm_splits_from_documents

    builtin = lm_splits_from_documents(paragraphs, tok, name="corpus", seq_len=8,
                                       val_fraction=0.2, test_fraction=0.2, split_seed=0,
                                       max_train_tokens=None, max_eval_tokens=None)
    for split in ("train_x", "val_x", "test_x"):
        assert torch.equal(getattr(splits, split), getattr(builtin, split))
    # The same documents as a folder of files and as a JSON Lines table's text column.
    folder = tmp_path / "docs"
    folder.mkdir()
    for k, p in enumerate(paragraphs):
        (folder / f"{k:02d}.txt").write_text(p)
    table = write_jsonl(tmp_path / "docs.jsonl", [{"text": p} for p in paragraphs])
    assert torch.equal(load(path=str(folder), documents="files", val_size=2,
                            test_size=2).train_x, splits.train_x)
    same = load(path=str(table), val_size=2, test_size=2)
    assert torch.equal(same.train_x, splits.train_x)
    # `documents` splits .txt files and `text` names a table's column: each refused elsewhere.
    with pytest.raises(ConfigError, match=r"^data.text: .* applies to tables only"):
        load(path=str(folder), text="body", val_size=2, test_size=2)
    with pytest.raises(ConfigError, match=r"^data.documents: .* applies to .txt files only"):
        load(path=str(table), documents="lines", val_size=2, test_size=2)
    corpus.write_text("\n\n".join(paragraphs[::-1]) + "\n")
    assert load(path=str(corpus), val_size=2, test_size=2).fingerprint != splits.fingerprint
    with pytest.raises(ConfigError, match=r"data.seq_len: the val split .* fewer than one block"):
        load(path=str(corpus), val_size=1, test_size=1, max_eval_tokens=4)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match=r"empty.txt: is empty"):
        load(path=str(tmp_path / "empty.txt"))


# --- translation ---------------------------------------------------------------------------


def test_translation_pairs_pack_like_the_built_in_pairs(tmp_path: Path):
    words = ["good", "morning", "cat", "dog", "sky", "blue", "light", "time", "world", "mat"]
    pairs = [(f"{a} {b} {n}", f"{b.upper()} {a.upper()} {n}") for n, (a, b) in enumerate(
        (a, b) for a in words for b in words[:4])]
    path = tmp_path / "pairs.tsv"
    path.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))
    test = tmp_path / "test.tsv"
    test.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs[:3]))
    splits = data_source(name="translation_pairs", path=str(path), test_path=str(test),
                         val_size=4, seq_len=24, vocab_size=200).load(LoadContext())
    assert splits.task == "seq2seq" and splits.train_x.shape[1:] == (2, 24)
    assert splits.references == tuple(t for _, t in pairs[:3])
    assert splits.tokenizer_json and splits.num_classes <= 200
    assert (splits.train_y[:, 0] == IGNORE_INDEX).all()  # BOS is never a target
    assert torch.equal(splits.train_y[:, 1:][splits.train_y[:, 1:] != IGNORE_INDEX],
                       splits.train_x[:, 1, 1:][splits.train_y[:, 1:] != IGNORE_INDEX])
    assert any("3 test source sentences are exact copies" in n for n in splits.notes)
    path.write_text("source\ttarget\nhello\t\n")
    with pytest.raises(ConfigError, match=r"pairs.tsv:2: column 'target' is empty"):
        data_source(name="translation_pairs", path=str(path)).load(LoadContext())
