"""General (task-agnostic) distillation: its losses, sentence encoders, the unlabelled corpus
(no leakage of the probe task's held-out texts), the embed_kd method and the whole pipeline
with the teacher cache and the transfer evaluation.

Tiny data: the fake fortunes directory of test_text_classification plus a few fake docstrings;
tiny random BERT encoders saved to a temporary directory stand in for all-MiniLM-L6-v2; the
real MiniLM tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import pipeline
from kdistill.build import build_data
from kdistill.capture import capture
from kdistill.config import TransferConfig, load_config
from kdistill.data import text as text_data
from kdistill.data.fortune_classes import fortune_splits
from kdistill.data.general_text import general_splits
from kdistill.errors import ConfigError
from kdistill.losses import cosine_distance, embedding_mse
from kdistill.losses.features import hidden_mse
from kdistill.methods import build_method
from kdistill.methods.base import Outputs
from kdistill.methods.embed_kd import EmbedKDConfig
from kdistill.models import build_model
from kdistill.models.hf import load_tokenizer
from kdistill.pipeline import stages, teaching
from kdistill.schedules import Progress
from tests.test_text_classification import _tiny_bert, fortunes_dir  # noqa: F401 - fixture

PROGRESS = Progress(step=0, epoch=0, total_steps=10, steps_per_epoch=10)
DOCS = tuple(f"Return the {w} of the given object, computed lazily and cached.\n\nMore text."
             for w in ("length", "hash", "size", "name", "type", "value", "sum", "mean", "mode",
                       "first item", "last item", "string form"))


@pytest.fixture
def corpus(fortunes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """Fake fortunes plus a dozen fake stdlib docstrings (reading the real stdlib takes s)."""
    monkeypatch.setattr(text_data, "stdlib_docs", lambda where="data.name": DOCS)
    return fortunes_dir


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _tiny_bert(tmp_path_factory.mktemp("bert"), layers=2)


# --- losses: naive references, zero at equality, masks ----------------------------------------


def test_embedding_mse_and_cosine_match_naive_references() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    torch.testing.assert_close(embedding_mse(s, t), nn.functional.mse_loss(s, t))
    naive = (1 - nn.functional.cosine_similarity(s, t, dim=1)).mean()
    torch.testing.assert_close(cosine_distance(s, t), naive)
    assert embedding_mse(s, t, reduction="none").shape == (5,)
    assert float(embedding_mse(t, t)) == 0.0 and abs(float(cosine_distance(t, t))) < 1e-6
    # cosine ignores the scale, MSE does not
    assert abs(float(cosine_distance(3 * t, t))) < 1e-6 and float(embedding_mse(3 * t, t)) > 0
    zero = cosine_distance(torch.zeros(2, 7), torch.randn(2, 7))
    assert torch.isfinite(zero) and abs(float(zero) - 1.0) < 1e-6
    (embedding_mse(s, t) + cosine_distance(s, t)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="adapter"):
        embedding_mse(torch.randn(2, 3), torch.randn(2, 4))


def test_hidden_mse_ignores_padded_tokens() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    per_token = (s - t).pow(2).mean(dim=1)
    torch.testing.assert_close(hidden_mse(s, t, mask=mask), per_token[mask].mean())
    torch.testing.assert_close(hidden_mse(s, t), per_token.mean())
    poisoned = s.clone()
    poisoned[1, :, 4] = float("inf")  # a padded position: neither value nor gradient
    torch.testing.assert_close(hidden_mse(poisoned, t, mask=mask), per_token[mask].mean())
    assert float(hidden_mse(t, t, mask=mask)) == 0.0


# --- models -------------------------------------------------------------------------------


def test_sentence_encoder_is_the_mean_over_real_tokens_and_ignores_padding(bert: str) -> None:
    from transformers import BertModel

    tok = load_tokenizer("minilm")
    enc = build_model("hf_sentence_encoder", input_shape=(16,), num_classes=0,
                      args={"path": bert}).eval()
    from kdistill.data.fortune_classes import tokenize_padded

    texts = ["a short text", "a somewhat longer text about computers and their bugs"]
    ids16, ids32 = tokenize_padded(texts, tok, 16), tokenize_padded(texts, tok, 32)
    with torch.no_grad():
        e16, e32 = enc(ids16), enc(ids32)
        ref = BertModel.from_pretrained(bert, attn_implementation="eager").eval()
        mask = ids16 != tok.pad_token_id
        h = ref(input_ids=ids16, attention_mask=mask.long()).last_hidden_state
        naive = torch.stack([h[i][mask[i]].mean(dim=0) for i in range(2)])
    assert e16.shape == (2, 32)
    torch.testing.assert_close(e16, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e16, e32, atol=1e-5, rtol=1e-5)
    unit = build_model("hf_sentence_encoder", input_shape=(16,), num_classes=0,
                       args={"path": bert, "normalize": True}).eval()
    with torch.no_grad():
        torch.testing.assert_close(unit(ids16).norm(dim=1), torch.ones(2))


def test_sentence_student_copies_mapped_layers_or_starts_narrow_from_scratch(bert: str) -> None:
    teacher = build_model("hf_sentence_encoder", input_shape=(8,), num_classes=0,
                          args={"path": bert}).state_dict()
    student = build_model("hf_sentence_student", input_shape=(8,), num_classes=0,
                          args={"init_from": bert, "layers": 1, "layer_map": [1]}).state_dict()
    assert torch.equal(student["bert.encoder.layer.0.output.dense.weight"],
                       teacher["bert.encoder.layer.1.output.dense.weight"])
    narrow = build_model("hf_sentence_student", input_shape=(8,), num_classes=0,
                         args={"init_from": bert, "layers": 1, "hidden": 16, "heads": 2,
                               "random_init": True})
    assert narrow(torch.tensor([[101, 2000, 102, 0]])).shape == (1, 16)
    with pytest.raises(ConfigError, match=r"args\.hidden.*random_init"):
        build_model("hf_sentence_student", input_shape=(8,), num_classes=0,
                    args={"init_from": bert, "hidden": 16, "heads": 2})
    with pytest.raises(ConfigError, match=r"args\.heads"):
        build_model("hf_sentence_student", input_shape=(8,), num_classes=0,
                    args={"init_from": bert, "hidden": 18, "heads": 4, "random_init": True})


# --- data: the unlabelled corpus, without the probe task's held-out texts ---------------------


def test_general_text_is_unlabelled_and_excludes_the_probe_tasks_held_out_texts(corpus: Path
                                                                                ) -> None:
    tok = load_tokenizer("minilm")
    transfer = TransferConfig(task="fortunes5", val_size=0.2, test_size=0.2)
    task = fortune_splits("fortunes5", tok, seq_len=16, val_size=0.2, test_size=0.2,
                          split_seed=0)
    cfg = load_config(None, ["data.name=general_text", "data.tokenizer=minilm",
                             "data.seq_len=16", "data.val_size=4", "data.test_size=0.1",
                             "baseline=false", "method.name=embed_kd",
                             "teacher.model.arch=hf_sentence_encoder"]).data
    splits = build_data(cfg, transfer=transfer)
    assert splits.task == "embedding" and splits.num_classes == 0
    assert (splits.train_y == -1).all() and splits.input_shape == (16,)
    rows = {tuple(r) for x in (splits.train_x, splits.val_x, splits.test_x) for r in x.tolist()}
    held_out = {tuple(r) for x in (task.val_x, task.test_x) for r in x.tolist()}
    assert rows.isdisjoint(held_out)  # no probe test (or validation) text, even unlabelled
    assert {tuple(r) for r in task.train_x.tolist()} <= rows  # training texts may stay
    # Without the exclusion those texts would be there: the check above can fail.
    unfiltered = build_data(cfg)
    assert held_out <= {tuple(r) for x in (unfiltered.train_x, unfiltered.val_x,
                                           unfiltered.test_x) for r in x.tolist()}
    assert len(unfiltered.train_x) > len(splits.train_x)
    again = general_splits(tok, seq_len=16, val_size=4, test_size=0.1, split_seed=0,
                           train_limit=5)
    assert len(again.train_x) == 5 and again.fingerprint != unfiltered.fingerprint


# --- the method ------------------------------------------------------------------------------


def test_embed_kd_terms_projection_and_hidden_pairs(bert: str) -> None:
    ids = torch.tensor([[101, 2054, 2003, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    teacher = build_model("hf_sentence_encoder", input_shape=(6,), num_classes=0,
                          args={"path": bert}).eval()
    student = build_model("hf_sentence_student", input_shape=(6,), num_classes=0,
                          args={"init_from": bert, "layers": 1, "hidden": 16, "heads": 2,
                                "random_init": True})
    cfg = EmbedKDConfig(mse_weight=2.0, cos_weight=0.5, hidden_pairs=[("tokens.1", "tokens.2")])
    method = build_method(cfg)
    method.setup(student, teacher, ids)
    assert isinstance(method.projection, nn.Linear) and method.projection.in_features == 16
    with torch.no_grad(), capture(teacher, method.teacher_layers) as t_feats:
        t_emb = teacher(ids)
        t_feats = dict(t_feats)
    with capture(student, method.student_layers) as s_feats:
        s_emb = student(ids)
        s_feats = dict(s_feats)
    out = Outputs(s_emb, t_emb, s_feats, t_feats)
    batch = {"index": torch.arange(2), "input": ids, "label": torch.full((2,), -1)}
    terms = method.loss_terms(out, batch, PROGRESS)
    projected = method.projection(s_emb)
    torch.testing.assert_close(terms["mse"], 2.0 * embedding_mse(projected, t_emb))
    torch.testing.assert_close(terms["cos"], 0.5 * cosine_distance(projected, t_emb))
    mask = ids != 0
    expected = hidden_mse(method.hidden_adapters[0](s_feats["tokens.1"]),
                                t_feats["tokens.2"], mask=mask)
    torch.testing.assert_close(terms["hidden"], expected)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in method.parameters())
    with pytest.raises(ConfigError, match=r"method\.hidden_pairs"):
        build_method(EmbedKDConfig(hidden_pairs=[("tokens.1", "bert.embeddings.word_embeddings")]
                                   )).setup(student, teacher, ids)


def test_general_recipe_errors_name_the_field(tmp_path: Path) -> None:
    base = ["data.name=general_text", "data.tokenizer=minilm", "method.name=embed_kd",
            "teacher.model.arch=hf_sentence_encoder"]
    with pytest.raises(ConfigError, match=r"baseline: unlabelled text has no labels"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"transfer: .*general_text"):
        load_config(None, ["transfer={task: fortunes5}"])


# --- the pipeline: cache once, transfer evaluation, resume -----------------------------------

RECIPE = """
name: general-tiny
output_dir: {out}
threads: 1
data: {{name: general_text, tokenizer: minilm, seq_len: 16, val_size: 6, test_size: 0.1}}
teacher:
  model: {{arch: hf_sentence_encoder, args: {{path: {bert}}}}}
student:
  model: {{arch: hf_sentence_student, args: {{init_from: {bert}, layers: 1, random_init: true}}}}
method: {{name: embed_kd, hidden_pairs: [[tokens.1, tokens.2]]}}
baseline: false
train: {{epochs: 2, batch_size: 8, optimizer: {{name: adamw, lr: 0.003}}, log_every: 2,
        eval_every_epochs: 1, seeds: [0, 1]}}
cache: {{dtype: float16}}
transfer:
  task: fortunes5
  val_size: 0.2
  test_size: 0.2
  finetune: {{epochs: 1, batch_size: 8, optimizer: {{name: adamw, lr: 0.001}}}}
eval: {{batch_size: 8, throughput_batch: 4, latency_repeats: 3}}
"""


def test_pipeline_caches_the_teacher_once_and_reports_probe_and_finetuning(
    tmp_path: Path, corpus: Path, bert: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "general.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert=bert))
    cfg = load_config(recipe)
    lines: list[str] = []
    first = pipeline.run(cfg, echo=lines.append)
    assert any("running the teacher once" in line and "sentence embeddings and tokens.2" in line
               for line in lines)
    assert first.teacher_forwards == 0  # embeddings and hidden states read from the cache
    rows = first.rows
    assert list(rows) == ["teacher", "untrained", "student"]
    assert [r["seed"] for r in rows["student"]] == [0, 1]
    assert abs(rows["teacher"][0]["cosine"] - 1.0) < 1e-5
    for role in ("untrained", "student"):
        for r in rows[role]:
            assert {"cosine", "probe_accuracy", "finetune_accuracy", "params"} <= r.keys()
            assert 0.0 <= r["probe_accuracy"] <= 1.0 and -1.0 <= r["cosine"] <= 1.0
    # Distillation moved the student towards the teacher on held-out text.
    for u, s in zip(rows["untrained"], rows["student"], strict=True):
        assert s["cosine"] > u["cosine"]
    run_dir = first.run_dir
    assert json.loads((run_dir / "eval.json").read_text()) == rows
    report = (run_dir / "report.md").read_text()
    assert "linear probe acc %" in report and "before distillation" in report
    assert "cos w/ teacher" in (run_dir / "report.html").read_text()
    val = [json.loads(x) for x in (run_dir / "seed-0" / "student" / "metrics.jsonl")
           .read_text().splitlines()]
    assert [r["cosine"] for r in val if r["split"] == "val"]  # held-out agreement per epoch
    assert (run_dir / "seed-1" / "finetune-untrained" / "model.safetensors").is_file()

    # The untrained row is the student stage's own initialisation.
    init = stages.initial_student(cfg, build_data(cfg.data, transfer=cfg.transfer), 0)
    torch.manual_seed(0)
    again = build_model("hf_sentence_student", input_shape=(16,), num_classes=0,
                        args={"init_from": bert, "layers": 1, "random_init": True})
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(),
                                                 again.state_dict().values(), strict=True))

    # Second run: no teacher pass over the training set, no training, same numbers.
    def no_teacher(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("ran again")

    monkeypatch.setattr(teaching, "build_cache", no_teacher)
    monkeypatch.setattr(stages, "train_model", no_teacher)
    again_lines: list[str] = []
    second = pipeline.run(cfg, echo=again_lines.append)
    assert "cache: valid teacher cache found" in again_lines
    assert any("finetune-student (seed 1): done earlier" in line for line in again_lines)
    for role in ("untrained", "student"):
        assert [r["finetune_accuracy"] for r in second.rows[role]] == [
            r["finetune_accuracy"] for r in rows[role]]
        assert [r["probe_accuracy"] for r in second.rows[role]] == [
            r["probe_accuracy"] for r in rows[role]]
