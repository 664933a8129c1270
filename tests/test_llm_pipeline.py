"""A whole causal-LM distillation run on real text (stdlib docstrings) with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill import load_config, run
from kdistill.errors import ConfigError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-word WordLevel tokenizer trained on real docstrings, saved like a HF model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdistill.data.text import read_corpus

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=600, special_tokens=["[UNK]", "</s>"],
                                        show_progress=False)
    tok.train_from_iterator(read_corpus("stdlib_docs")[:800], trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(path)
    return path


def _recipe(tmp_path: Path, tokenizer_dir: Path, method: str) -> Path:
    path = tmp_path / "lm.yaml"
    path.write_text(f"""\
name: lm
output_dir: {tmp_path / 'runs'}
data: {{name: stdlib_docs, tokenizer: {tokenizer_dir}, seq_len: 16, val_size: 0.05,
        max_train_tokens: 2048, max_eval_tokens: 256}}
teacher:
  model: {{arch: llama, args: {{hidden: 32, layers: 2, heads: 2}}}}
  train: {{epochs: 3, batch_size: 16, optimizer: {{name: adam, lr: 0.01}}}}
student:
  model: {{arch: llama, args: {{hidden: 16, layers: 1, heads: 2}}}}
method: {method}
train: {{epochs: 2, batch_size: 16, grad_accum: 2, optimizer: {{name: adam, lr: 0.01}},
        eval_every_epochs: 1}}
eval: {{latency_repeats: 3}}
""")
    return path


def test_token_kd_run_caches_the_teacher_and_reports_perplexity(
        tmp_path: Path, tokenizer_dir: Path) -> None:
    recipe = _recipe(tmp_path, tokenizer_dir, "{name: token_kd, kind: jsd, beta: 0.5}")
    cfg = load_config(recipe)
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    assert any("tokens in blocks of 16" in line for line in lines)
    assert result.teacher_forwards == 0  # (128 blocks x 16 x 600 logits) fit the cache
    rows = result.rows
    for role in ("teacher", "baseline", "student"):
        row = rows[role][0]
        assert 1 < row["perplexity"] < 600 and 0 <= row["accuracy"] <= 1
    assert 0 <= rows["student"][0]["agreement"] <= 1
    report = (cfg.run_dir / "report.md").read_text()
    assert "test perplexity" in report and "tokens/s" in report
    # Greedy continuations of test prompts, side by side, decoded with the data's tokenizer.
    samples = json.loads((cfg.run_dir / "samples.json").read_text())
    assert len(samples) == 3 and {"prompt", "teacher", "baseline", "student"} <= set(samples[0])
    assert all(s["prompt"] and isinstance(s["student"], str) for s in samples)
    assert "## Greedy continuations" in report and samples[0]["prompt"].split()[0] in report
    val = [r for r in map(json.loads, (cfg.run_dir / "seed-0/student/metrics.jsonl")
                          .read_text().splitlines()) if r["split"] == "val"]
    assert len(val) == 2 and "perplexity" in val[0]


def test_a_classification_method_on_text_is_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    # Refused when the recipe is read, before any data is loaded.
    with pytest.raises(ConfigError, match=r"method: 'kd' is for classification data"):
        load_config(_recipe(tmp_path, tokenizer_dir, "{name: kd}"))


def test_a_teacher_with_another_tokenizer_points_to_sequence_level_kd(
        tmp_path: Path, tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kdistill.build import validate
    from kdistill.models import build_model

    other = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(["some other words entirely"] * 3, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "</s>"], show_progress=False))
    for name, tok in (("same", None), ("other", other)):
        teacher = build_model("llama", input_shape=(16,), num_classes=600,
                              args={"hidden": 16, "layers": 1, "heads": 2})
        teacher.model.save_pretrained(tmp_path / name)
        if tok is None:
            PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / name)
        else:
            PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                    unk_token="[UNK]").save_pretrained(tmp_path / name)
    recipe = _recipe(tmp_path, tokenizer_dir, "{name: token_kd}")
    same = load_config(recipe, [f"teacher.model={{arch: hf_causal_lm, args: {{path: "
                                f"{tmp_path / 'same'}}}}}", "teacher.train=null"])
    validate(same)  # one vocabulary: fine
    other_cfg = load_config(recipe, [f"teacher.model={{arch: hf_causal_lm, args: {{path: "
                                     f"{tmp_path / 'other'}}}}}", "teacher.train=null"])
    with pytest.raises(ConfigError, match=r"teacher.model: .*another tokenizer.*sequence-level"):
        validate(other_cfg)
    # A student initialised from a pretrained LM inherits its embedding rows: same check.
    student_cfg = load_config(recipe, [f"student.model={{arch: llama, args: {{init_from: "
                                       f"{tmp_path / 'other'}}}}}"])
    with pytest.raises(ConfigError, match=r"student.model.args.init_from: .*another tokenizer"):
        validate(student_cfg)


def test_top_k_cache_run_and_its_config_checks(tmp_path: Path, tokenizer_dir: Path) -> None:
    recipe = _recipe(tmp_path, tokenizer_dir, "{name: token_kd, kind: forward_kl}")
    cfg = load_config(recipe, ["cache.topk=8", "cache.dtype=bfloat16", "baseline=false"])
    lines: list[str] = []
    result = run(cfg, echo=lines.append)
    assert any("top-8 log-probabilities" in line for line in lines)
    assert result.teacher_forwards == 0
    manifest = json.loads((cfg.run_dir / "cache/teacher/manifest.json").read_text())
    assert manifest["format"] == "topk" and manifest["topk"] == 8
    assert manifest["fields"]["topk_indices"]["dtype"] == "uint16"  # 600 tokens > uint8
    assert result.rows["student"][0]["perplexity"] > 1
    load_config(recipe, ["cache.topk=8", "method.kind=jsd"])  # densified per micro-batch
    with pytest.raises(ConfigError, match=r"method\.topk_missing: reverse KL"):
        load_config(recipe, ["cache.topk=8", "method.kind=reverse_kl"])
    load_config(recipe, ["cache.topk=8", "method.kind=reverse_kl", "method.topk_missing=uniform"])
    with pytest.raises(ConfigError, match=r"cache\.topk: a top-k teacher cache feeds"):
        load_config(recipe, ["cache.topk=8", "method={name: kd}"])
    # Each kind of teacher target refuses the other's field (it would be ignored).
    with pytest.raises(ConfigError, match=r"method\.chunk_size: chunks the dense teacher"):
        load_config(recipe, ["cache.topk=8", "method.chunk_size=64"])
    with pytest.raises(ConfigError, match=r"method\.topk_missing: applies to a top-k"):
        load_config(recipe, ["method.topk_missing=uniform"])
    load_config(recipe, ["method.chunk_size=64"])  # dense teacher: chunked
    with pytest.raises(ConfigError, match=r"^.*: method: beta: .* kind forward_kl does not"):
        load_config(recipe, ["method.beta=0.3"])
    assert load_config(recipe, ["method.beta=0.3", "method.kind=jsd"]).method.beta == 0.3


def test_limits_that_would_be_ignored_on_text_are_refused(tmp_path: Path,
                                                         tokenizer_dir: Path) -> None:
    recipe = _recipe(tmp_path, tokenizer_dir, "{name: token_kd}")
    with pytest.raises(ConfigError, match=r"data\.train_limit: unknown key"):
        load_config(recipe, ["data.train_limit=100"])
