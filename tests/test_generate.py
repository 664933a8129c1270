"""Sequence-level KD: `kdistill generate` (batched, resumable JSONL) and SFT data from it.

A tiny random Llama saved with a tiny word-level tokenizer (with a chat template) stands in
for SmolLM2: batching, resume and re-tokenisation do not depend on the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.config.generate import load_generate_config
from kdistill.data.prompts import Prompt, load_prompts, stdlib_functions
from kdistill.data.sft import IGNORE_INDEX, encode_pair, sft_splits
from kdistill.errors import ConfigError
from kdistill.pipeline.generate import generate, run_generate

pytest.importorskip("transformers")

EOS = "[EOS]"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CORPUS = ("What does the Python function do ? Answer in two sentences . user assistant system : "
          "json dumps loads re sub math sqrt Serialize obj to a JSON formatted str Return the "
          "square root of x")
PROMPTS = [Prompt(id=f"p{i}", prompt=f"What does the Python function {name} do ?",
                  reference=f"ref {i}")
           for i, name in enumerate(["json", "dumps", "loads", "re sub", "math sqrt"])]
SETTINGS = dict(batch_size=2, max_new_tokens=5, do_sample=True, temperature=1.0, top_p=0.9,
                seed=3, system=None, threads=1)


def _tokenizer(kind: str = "word"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", EOS], show_progress=False)
    else:  # another vocabulary and granularity: sub-word pieces
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=[EOS, "[UNK]"],
                                      show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([CORPUS] * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("teacher")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(teacher: str, out: Path, prompts: list[Prompt] = PROMPTS, **overrides):
    return generate(teacher, prompts, out, **{**SETTINGS, **overrides})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- generate ------------------------------------------------------------------------------


def test_generate_writes_one_line_per_prompt(teacher_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    result = _run(teacher_dir, out)
    lines = _lines(out)
    assert [r["id"] for r in lines] == [p.id for p in PROMPTS]
    assert result.n_generated == 5 and result.n_skipped == 0 and result.new_tokens > 0
    first = lines[0]
    assert first["prompt"] == PROMPTS[0].prompt and first["reference"] == "ref 0"
    assert first["teacher"] == teacher_dir and first["params"]["top_p"] == 0.9
    assert 1 <= first["new_tokens"] <= 5 and isinstance(first["response"], str)
    # Ended by EOS before max_new_tokens = finished; random weights rarely say EOS.
    assert all(r["finished"] for r in lines if r["new_tokens"] < 5)
    assert any(not r["finished"] and r["new_tokens"] == 5 for r in lines)
    assert result.tokens_per_s > 0
    # Seeded per batch: the same call gives the same file, another seed other answers.
    again = tmp_path / "again.jsonl"
    _run(teacher_dir, again)
    assert again.read_bytes() == out.read_bytes()
    _run(teacher_dir, tmp_path / "seed4.jsonl", seed=4)
    assert [r["response"] for r in _lines(tmp_path / "seed4.jsonl")] != [
        r["response"] for r in lines]
    # A second call finds everything done and loads no model.
    assert _run(teacher_dir, out).n_generated == 0 and out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize("damage", ["delete_last_line", "torn_last_line", "torn_mid_batch"])
def test_resume_gives_the_uninterrupted_file(teacher_dir: str, tmp_path: Path,
                                             damage: str) -> None:
    full = tmp_path / "full.jsonl"
    _run(teacher_dir, full)
    expected = full.read_bytes()
    lines = expected.decode().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    if damage == "delete_last_line":
        out.write_text("".join(lines[:-1]))
    elif damage == "torn_last_line":
        out.write_text("".join(lines[:-1]) + lines[-1][:17])
    else:  # the first prompt of the second batch written, the second torn
        out.write_text("".join(lines[:3]) + lines[3][:10])
    result = _run(teacher_dir, out)
    assert out.read_bytes() == expected
    assert result.n_generated == (1 if damage != "torn_mid_batch" else 2)


def test_other_settings_on_the_same_file_are_refused(teacher_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    _run(teacher_dir, out, prompts=PROMPTS[:2])
    with pytest.raises(ConfigError, match=r"other settings \(max_new_tokens 5 -> 7\); use an"):
        _run(teacher_dir, out, max_new_tokens=7)
    stranger = tmp_path / "notes.txt"
    stranger.write_text("my notes, no newline at the end")
    with pytest.raises(ConfigError, match="does not end like a file written by"):
        _run(teacher_dir, stranger)
    assert stranger.read_text() == "my notes, no newline at the end"  # left untouched
    out.write_text(out.read_text() + "not json\n")
    with pytest.raises(ConfigError, match=r"gen.jsonl:3: not a line written by"):
        _run(teacher_dir, out)


# --- fine-tuning data ----------------------------------------------------------------------


def _records(path: Path, n: int = 12) -> Path:
    words = ["json dumps", "math sqrt", "re sub", "loads", "Serialize obj", "str"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i % (n // 2)}", "prompt": f"What does {words[i % 6]} "
                                "do ?", "response": "Return the square root of x ." * (i % 3),
                                "reference": None}) + "\n")
    return path


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_sft_labels_only_the_answer(tmp_path: Path, kind: str) -> None:
    tok = _tokenizer(kind)
    path = _records(tmp_path / "gen.jsonl")
    d = sft_splits(path, tok, seq_len=40, val_fraction=0.2, test_fraction=0.2, split_seed=0,
                   system=None, where="data")
    assert d.task == "causal_lm" and d.num_classes == len(tok) and d.input_shape == (40,)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(d.train_x) + len(d.val_x) + len(d.test_x) == len(records)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pairs = [encode_pair(tok, r["prompt"], r["response"], system=None) for r in records]
    expected = {(tuple(p), tuple((p + a)[:40][len(p):])) for p, a in pairs}
    for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)):
        assert x.dtype == y.dtype == torch.int64 and x.shape[1] == 40
        for row, label in zip(x, y, strict=True):
            trained = (label != IGNORE_INDEX).nonzero().flatten()
            start, stop = int(trained[0]), int(trained[-1]) + 1
            assert torch.equal(label[start:stop], row[start:stop])  # contiguous answer
            assert row[stop - 1] == tok.eos_token_id  # the end of turn is trained on
            assert (label[:start] == IGNORE_INDEX).all() and (label[stop:] == IGNORE_INDEX).all()
            assert (row[stop:] == pad).all()  # right padding
            # The prompt is the chat-formatted prompt; the answer its re-tokenised response.
            assert (tuple(row[:start].tolist()), tuple(row[start:stop].tolist())) in expected
    # Splits hold disjoint prompts: both answers of one prompt land in the same split.
    def prompts(x: torch.Tensor, y: torch.Tensor) -> set[tuple[int, ...]]:
        starts = [int((label != IGNORE_INDEX).nonzero()[0]) for label in y]
        return {tuple(row[:start].tolist()) for row, start in zip(x, starts, strict=True)}

    split_prompts = [prompts(d.train_x, d.train_y), prompts(d.val_x, d.val_y),
                     prompts(d.test_x, d.test_y)]
    assert [len(s) for s in split_prompts] == [4, 1, 1]  # 6 ids, 2 answers each
    assert len(set().union(*split_prompts)) == 6
    same = sft_splits(path, tok, seq_len=40, val_fraction=0.2, test_fraction=0.2, split_seed=0,
                      system=None, where="data")
    assert same.fingerprint == d.fingerprint and torch.equal(same.train_x, d.train_x)


def test_sft_with_another_tokenizer_retokenises(tmp_path: Path) -> None:
    path = _records(tmp_path / "gen.jsonl")
    word, bpe = _tokenizer("word"), _tokenizer("bpe")
    args = dict(seq_len=64, val_fraction=0.2, test_fraction=0.2, split_seed=0, system=None,
                where="data")
    a, b = sft_splits(path, word, **args), sft_splits(path, bpe, **args)
    assert a.num_classes != b.num_classes and a.fingerprint != b.fingerprint
    # The same answer, in each tokenizer's own pieces.
    _, aa = encode_pair(word, "What does json dumps do ?", "Serialize obj", system=None)
    _, ab = encode_pair(bpe, "What does json dumps do ?", "Serialize obj", system=None)
    assert len(ab) > len(aa)  # sub-words: more tokens
    assert word.decode(aa, skip_special_tokens=True) == "Serialize obj"
    assert bpe.decode(ab, skip_special_tokens=True).replace(" ", "") == "Serializeobj"
    # An answer cut by max_new_tokens is not closed: no end-of-turn token to learn.
    _, cut = encode_pair(word, "What does json dumps do ?", "Serialize obj", system=None,
                         finished=False)
    assert cut == aa[:-1] and aa[-1] == word.eos_token_id
    # Without a chat template: a plain "role: text" transcript, the answer closed by EOS.
    plain = _tokenizer("word")
    plain.chat_template = None
    prompt, answer = encode_pair(plain, "What does json dumps do ?", "Serialize obj", system=None)
    assert plain.decode(prompt) == "user : What does json dumps do ? assistant :"
    assert answer[-1] == plain.eos_token_id and plain.decode(answer[:-1]) == "Serialize obj"


def test_sft_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = _records(tmp_path / "gen.jsonl")
    path.write_text(path.read_text() + '{"id": "x", "prompt": "a"\n')
    with pytest.raises(ConfigError, match=r"gen.jsonl:13: not a JSON line"):
        sft_splits(path, _tokenizer(), seq_len=40, val_fraction=0.2, test_fraction=0.2,
                   split_seed=0, system=None, where="data")
    with pytest.raises(ConfigError, match=r"raise data\.seq_len"):
        sft_splits(_records(tmp_path / "ok.jsonl"), _tokenizer(), seq_len=3, val_fraction=0.2,
                   test_fraction=0.2, split_seed=0, system=None, where="data")


# --- prompt sets and the command ------------------------------------------------------------


def test_stdlib_functions_prompts() -> None:
    import json as json_module

    prompts = {p.id: p for p in stdlib_functions()}
    assert len(prompts) > 300
    dumps = prompts["json.dumps"]
    assert dumps.prompt == ("What does the Python function `json.dumps` do? "
                            "Answer in two sentences.")
    assert dumps.reference and json_module.dumps.__doc__.strip().startswith(
        dumps.reference.split("``")[0])
    assert prompts["itertools.chain"].reference.startswith("Return a chain object")  # not sig
    assert "shutil.os" not in prompts and "math.pi" not in prompts
    first = load_prompts("stdlib_functions", limit=20, seed=1, where="prompts")
    assert first[:10] == load_prompts("stdlib_functions", limit=10, seed=1, where="prompts")
    with pytest.raises(ConfigError, match="did you mean 'stdlib_functions'"):
        load_prompts("stdlib_function", limit=None, seed=0, where="prompts")


def test_generate_command(teacher_dir: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdistill.cli import app

    recipe = tmp_path / "gen.yaml"
    recipe.write_text(f"teacher: {{path: {teacher_dir}}}\nprompts: {{limit: 3}}\n"
                      f"output: {{path: {tmp_path / 'out.jsonl'}}}\n"
                      "sampling: {max_new_tokens: 3}\nbatch_size: 2\nthreads: 1\n")
    result = CliRunner().invoke(app, ["generate", str(recipe), "prompts.seed=4"])
    assert result.exit_code == 0, result.output
    assert "3 prompt(s)" in result.output and "tokens/s" in result.output
    lines = _lines(tmp_path / "out.jsonl")
    expected = load_prompts("stdlib_functions", limit=3, seed=4, where="prompts")
    assert [r["id"] for r in lines] == [p.id for p in expected]
    with pytest.raises(ConfigError, match=r"sampling\.top_q: unknown key"):
        load_generate_config(str(recipe), ["sampling.top_q=0.5"])
    with pytest.raises(ConfigError, match="batch_size"):
        run_generate(load_generate_config(str(recipe), ["batch_size=0"]))


def test_text_format_continues_plain_text_and_writes_documents(teacher_dir: str,
                                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kdistill.data.text_files import TextFiles
    from kdistill.models.hf import load_tokenizer

    out = tmp_path / "cont.jsonl"
    _run(teacher_dir, out, prompt_format="text", do_sample=False)
    lines = _lines(out)
    assert [r["params"]["prompt_format"] for r in lines] == ["text"] * len(PROMPTS)
    for prompt, record in zip(PROMPTS, lines, strict=True):
        assert record["text"] == prompt.prompt + record["response"]  # nothing stripped
    # Greedy: the same continuation as the model's own generate on the raw prompt ids (no
    # chat template around them).
    tok = load_tokenizer(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    ids = torch.tensor([tok(PROMPTS[0].prompt).input_ids])
    own = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                         do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    assert tok.decode(own[0, ids.shape[1]:], skip_special_tokens=True) == lines[0]["response"]
    # Another prompt format on the same file is refused (resume keys on the settings).
    with pytest.raises(ConfigError, match="prompt_format"):
        _run(teacher_dir, out, do_sample=False)
    # The documents are what `text_files` reads (its default column is `text`).
    docs = TextFiles(name="text_files", path=str(out), tokenizer=teacher_dir, val_size=1,
                     test_size=1).training_documents()
    assert set(docs) <= {r["text"].strip() for r in lines} and len(docs) == len(lines) - 2
    # A conversation cannot be continued as plain text: refused before the teacher loads.
    talk = [Prompt(id="c", prompt=[{"role": "user", "content": "hi"}])]
    with pytest.raises(ConfigError, match="prompt 'c' is a conversation"):
        _run("no/such/teacher", tmp_path / "talk.jsonl", talk, prompt_format="text")
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"output: {{path: {tmp_path / 'o.jsonl'}}}\n")
    with pytest.raises(ConfigError, match="system: a chat system message"):
        load_generate_config(str(recipe), ["prompt_format=text", "system=hi"])


def test_generate_recipes_load() -> None:
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("generate-*.yaml"))
    assert recipes
    for recipe in recipes:
        assert len(recipe.read_text().splitlines()) < 40
        cfg = load_generate_config(str(recipe))
        assert cfg.output.path.endswith(".jsonl")
        assert cfg.prompts.load()


def test_generate_command_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    recipe = tmp_path / "gen.yaml"
    recipe.write_text(f"output: {{path: {tmp_path / 'out.jsonl'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "kdistill", "generate", str(recipe),
                           "sampling.temperature=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("sampling.temperature: Input should be greater than 0 "
                                        "(got 0)")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_run_on_generated_answers_is_sequence_level_kd(teacher_dir: str,
                                                        tmp_path: Path) -> None:
    # kdistill generate -> kdistill run with `data: {name: generated}`: the baseline learns the
    # teacher's answers by CE (sequence-level KD); the student adds token-level KD on them.
    from kdistill import load_config, run

    prompts = [Prompt(id=f"q{i}", prompt=f"What does the Python function {w} do ?")
               for i, w in enumerate(["json dumps", "loads", "re sub", "math sqrt"] * 5)]
    out = tmp_path / "gen.jsonl"
    _run(teacher_dir, out, prompts, max_new_tokens=6, do_sample=False)
    recipe = tmp_path / "seq.yaml"
    recipe.write_text(f"""\
name: seq
output_dir: {tmp_path / 'runs'}
data: {{name: generated, path: {out}, tokenizer: {teacher_dir}, seq_len: 24, val_size: 0.2,
        test_size: 0.2}}
teacher: {{model: {{arch: hf_causal_lm, args: {{path: {teacher_dir}}}}}}}
student: {{model: {{arch: llama, args: {{hidden: 16, layers: 1, heads: 2}}}}}}
method: {{name: token_kd, kind: reverse_kl}}
train: {{epochs: 2, batch_size: 4, optimizer: {{name: adam, lr: 0.01}}}}
eval: {{latency_repeats: 3}}
""")
    result = run(load_config(recipe), echo=lambda _: None)
    assert {"teacher", "baseline", "student"} <= set(result.rows)
    assert all(result.rows[r][0]["perplexity"] > 1 for r in ("teacher", "baseline", "student"))
    # Prompts repeat across ids, so the teacher's answers are learnable: far above chance.
    assert result.rows["baseline"][0]["accuracy"] > 0.3
    # The report's samples continue each test row's own question (its untrained prefix).
    samples = json.loads((result.run_dir / "samples.json").read_text())
    assert all(s["prompt"].rstrip().endswith("assistant :") for s in samples)
    assert all("What does the Python function" in s["prompt"] for s in samples)
    # The same recipe over a regenerated file is other data: finished stages are redone.
    records = _lines(out)
    records[0]["response"] = "something else entirely"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines: list[str] = []
    run(load_config(recipe), echo=lines.append)
    assert any("baseline: recipe changed" in line for line in lines)
    with pytest.raises(ConfigError, match=r"data\.path: Input should be a valid string"):
        load_config(recipe, ["data.path=null"])
