"""Every recipe in recipes/examples/ end to end through the CLI (`kdistill.cli.main`), on
data files the test writes where the recipe looks for them (`data/...` under the working
directory), with tiny models and a step or two (dotted overrides).

The recipes name real teachers (MiniLM, SmolLM2); the overrides swap in tiny models so the
default suite stays fast: what is tested here is that each kind of file goes through a whole
run (or `kdistill generate`) and the run directory gets its report, labels and statistics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdistill import cli

from .conftest import REPO
from .test_user_data_tables import TEXTS
from .test_user_data_text import EOS, TEMPLATE, WORDS

pytest.importorskip("transformers")

EXAMPLES = REPO / "recipes" / "examples"
FAST = ["teacher.train.epochs=1", "train.epochs=1", "train.max_steps=2", "baseline=false",
        "eval.latency_repeats=3", "eval.throughput_batch=4"]
TINY_LLAMA = "{hidden: 16, layers: 1, heads: 2}"


@dataclass
class Result:
    code: int
    err: str


@pytest.fixture
def kdistill(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             tmp_path: Path):
    """`kdistill(*args)`: the console script's main() in tmp_path (where data/ is)."""
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["kdistill", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            cli.main()
        code = info.value.code
        return Result(code if isinstance(code, int) else 1, capsys.readouterr().err)

    return call


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer with a chat template, and a tiny random Llama beside it (a
    teacher for `kdistill generate`), saved like a model's folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS] * 2, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", EOS], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]",
                                   pad_token="[PAD]")
    fast.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tiny-lm")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(fast), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=32, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id)).save_pretrained(path)
    return path


def _ok(result: Result) -> None:
    assert result.code == 0, result.err
    assert "Traceback" not in result.err


def test_image_folder_example(kdistill, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c, name in enumerate(["cat", "dog", "fox"]):  # digits 0, 1, 2 as three "pets"
        folder = tmp_path / "data" / "pets" / name
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == c)[:10]):
            grey = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).save(
                folder / f"{k}.jpg")
    _ok(kdistill("run", str(EXAMPLES / "image-folder.yaml"), *FAST, "data.image_size=12",
                 "teacher.model.args={channels: [4], hidden: 8}", "train.batch_size=8",
                 "student.model.args={channels: [4], hidden: 8}", "teacher.train.batch_size=8"))
    run = tmp_path / "runs" / "pets"
    assert (run / "report.md").is_file()
    assert json.loads((run / "labels.json").read_text())["classes"] == ["cat", "dog", "fox"]
    assert len(json.loads((run / "normalization.json").read_text())["mean"]) == 3
    assert '<td class="label">fox</td>' in (run / "report.html").read_text()  # names


def test_text_csv_example(kdistill, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    lines = ["text,label"] + [f'"{t}",{label}' for label, texts in TEXTS.items() for t in texts]
    (tmp_path / "data" / "reviews.csv").write_text("\n".join(lines) + "\n")
    _ok(kdistill("run", str(EXAMPLES / "text-csv.yaml"), *FAST, "data.seq_len=16",
                 "data.val_size=3", "data.test_size=3", "teacher.model.arch=textcnn",
                 "teacher.model.args={tokenizer: minilm, embed_dim: 8, channels: 4}",
                 "student.model.args={tokenizer: minilm, embed_dim: 8, channels: 2}"))
    run = tmp_path / "runs" / "reviews"
    assert json.loads((run / "labels.json").read_text())["classes"] == list(TEXTS)
    assert "distilled student" in (run / "report.md").read_text()


def test_text_csv_transfer_example(kdistill, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    lines = ["text,label"] + [f'"{t}",{label}' for label, texts in TEXTS.items() for t in texts]
    (tmp_path / "data" / "reviews.csv").write_text("\n".join(lines) + "\n")
    words = " ".join(t for texts in TEXTS.values() for t in texts).split()
    more = [" ".join(words[i:i + 6]) for i in range(len(words) - 6)]
    first = next(iter(TEXTS.values()))[0]
    (tmp_path / "data" / "more-reviews.txt").write_text("\n".join([first, *more]) + "\n")
    _ok(kdistill("run", str(EXAMPLES / "text-csv-transfer.yaml"), *FAST, "data.seq_len=16",
                 "data.val_size=3", "data.test_size=3", "teacher.model.arch=textcnn",
                 "teacher.model.args={tokenizer: minilm, embed_dim: 8, channels: 4}",
                 "student.model.args={tokenizer: minilm, embed_dim: 8, project_dim: 4}",
                 "transfer_set.unlabelled.seq_len=16", "transfer_set.swap_classes=2",
                 "train.batch_size=8"))
    run = tmp_path / "runs" / "reviews-transfer"
    assert "distilled student" in (run / "report.md").read_text()
    from kdistill.cache import TeacherCache

    reviews = {t.lower() for texts in TEXTS.values() for t in texts}
    added = {m.lower() for m in more} - reviews  # `first` and repeats are dropped
    train = len(lines) - 1 - 6
    assert TeacherCache(run / "cache" / "teacher").num_samples == 4 * (train + len(added))


def _lm(tokenizer_dir: Path) -> list[str]:
    return [*FAST, f"data.tokenizer={tokenizer_dir}", "data.seq_len=16", "teacher.model.arch=llama",
            f"teacher.model.args={TINY_LLAMA}", "teacher.train={epochs: 1, batch_size: 4}",
            f"student.model.args={TINY_LLAMA}", "train.batch_size=4", "eval.samples=0"]


def test_chat_jsonl_example(kdistill, tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "data").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"why is the sky blue {n} ?"},
                          {"role": "assistant", "content": f"because light scatters {n} ."}]}
            for n in WORDS.split()[-10:]]
    rows += [{"prompt": f"hello {n}", "completion": f"good morning {n} ."}
             for n in WORDS.split()[-10:]]
    (tmp_path / "data" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _ok(kdistill("run", str(EXAMPLES / "chat-jsonl.yaml"), *_lm(tokenizer_dir)))
    assert "test perplexity" in (tmp_path / "runs" / "my-chat" / "report.md").read_text()


def test_text_files_example(kdistill, tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    for k, n in enumerate(WORDS.split()[-10:]):
        (corpus / f"{k}.txt").write_text(f"the cat sat on the mat {n} .\n\nthe dog ran far "
                                         f"away {n} . why is the sky blue ?\n")
    _ok(kdistill("run", str(EXAMPLES / "text-files.yaml"), *_lm(tokenizer_dir),
                 "data.val_size=0.1", "data.test_size=0.1"))
    assert (tmp_path / "runs" / "my-corpus" / "report.md").is_file()


def test_generate_prompts_example(kdistill, tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "data").mkdir()
    prompts = [{"prompt": "why is the sky blue ?", "reference": "light scatters"},
               {"id": "greeting", "messages": [{"role": "user", "content": "hello world"}]},
               {"prompt": "what time is it now ?"}]
    (tmp_path / "data" / "prompts.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in prompts))
    _ok(kdistill("generate", str(EXAMPLES / "generate-prompts.yaml"),
                 f"teacher.path={tokenizer_dir}", "sampling.max_new_tokens=3"))
    out = tmp_path / "runs" / "generated" / "my-prompts.jsonl"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in records} == {"1", "greeting", "3"}
    assert next(r for r in records if r["id"] == "greeting")["prompt"] == prompts[1]["messages"]
    assert next(r for r in records if r["id"] == "1")["reference"] == "light scatters"


def test_translate_tsv_example(kdistill, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    words = ["good", "morning", "cat", "dog", "sky", "blue", "light", "time", "world", "mat"]
    pairs = [(f"{a} {b}", f"{b.upper()} {a.upper()}") for a in words for b in words]
    (tmp_path / "data" / "pairs.tsv").write_text(
        "source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))
    _ok(kdistill("run", str(EXAMPLES / "translate-tsv.yaml"), *FAST, "data.seq_len=12",
                 "data.vocab_size=120", "data.val_size=5", "data.test_size=5",
                 "teacher.model.args={d_model: 16, heads: 2, enc_layers: 1, dec_layers: 1, "
                 "ff: 32}", "student.model.args={d_model: 8, heads: 2, enc_layers: 1, "
                 "dec_layers: 1, ff: 16}", "teacher.train.batch_size=16", "train.batch_size=16",
                 "eval.beam=2", "eval.samples=1"))
    run = tmp_path / "runs" / "my-translation"
    assert "BLEU" in (run / "report.md").read_text()
    assert (run / "tokenizer.json").is_file()


def test_arrays_example(kdistill, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 5)) + y[:, None] * 2.0
    np.savez(tmp_path / "data" / "features.npz", x=x, y=np.array(["a", "b", "c"])[y])
    _ok(kdistill("run", str(EXAMPLES / "arrays.yaml"), *FAST,
                 "teacher.model.args={hidden: [8]}", "student.model.args={hidden: [4]}"))
    run = tmp_path / "runs" / "my-arrays"
    assert json.loads((run / "labels.json").read_text())["classes"] == ["a", "b", "c"]
    assert set(json.loads((run / "normalization.json").read_text())) == {"mean", "std"}


def test_a_bad_file_is_one_line_through_the_cli(kdistill, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reviews.csv").write_text('text,label\n"a b",x\n"c",y,z\n')
    result = kdistill("run", str(EXAMPLES / "text-csv.yaml"), *FAST)
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip().splitlines() == [
        "error: data/reviews.csv:3: has 3 field(s) where the header has 2"]
    assert not (tmp_path / "runs" / "reviews" / "labels.json").exists()
