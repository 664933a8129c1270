"""Distilling text classifiers: each loss on the text models, and the cached teacher.

Tiny data (a fake fortunes directory, see test_text_classification) and tiny random BERT
encoders saved to a temporary directory; the real all-MiniLM-L6-v2 tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import pipeline
from kdistill.capture import capture
from kdistill.config import load_config
from kdistill.data.fortune_classes import tokenize_padded
from kdistill.methods import build_method
from kdistill.methods.attention_maps import AttentionDistillConfig
from kdistill.methods.base import Outputs
from kdistill.methods.fitnet import FitNetConfig
from kdistill.methods.kd import KDConfig
from kdistill.models import build_model
from kdistill.models.hf import load_tokenizer
from kdistill.pipeline import stages, teaching
from kdistill.schedules import Progress
from tests.test_text_classification import _tiny_bert, fortunes_dir  # noqa: F401 - fixture

PROGRESS = Progress(step=0, epoch=0, total_steps=10, steps_per_epoch=10)
ATTN = "bert.encoder.layer.{}.attention.self"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    path = _tiny_bert(tmp_path_factory.mktemp("bert"), layers=2)
    torch.manual_seed(0)
    teacher = build_model("hf_encoder_classifier", input_shape=(16,), num_classes=3,
                          args={"path": path}).eval()
    student = build_model("hf_encoder_student", input_shape=(16,), num_classes=3,
                          args={"init_from": path, "layers": 1, "random_init": True})
    ids = tokenize_padded(["hello world", "computers have bugs in their programs", "x y"],
                          load_tokenizer("minilm"), 16)
    return teacher, student, ids


def _terms(method, student: nn.Module, teacher: nn.Module, ids: torch.Tensor
           ) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    method.setup(student, teacher, ids)
    with torch.no_grad(), capture(teacher, method.teacher_layers) as t_feats:
        t_logits = teacher(ids)
        t_feats = dict(t_feats)
    with capture(student, method.student_layers) as s_feats:
        s_logits = student(ids)
        s_feats = dict(s_feats)
    out = Outputs(student_logits=s_logits, teacher_logits=t_logits, student_feats=s_feats,
                  teacher_feats=t_feats)
    batch = {"index": torch.arange(len(ids)), "input": ids, "label": torch.tensor([0, 1, 2])}
    return method.loss_terms(out, batch, PROGRESS)


def test_logit_kd_on_a_textcnn_is_zero_against_itself_and_trains(models) -> None:  # type: ignore[no-untyped-def]
    _, _, ids = models
    cnn = build_model("textcnn", input_shape=(16,), num_classes=3,
                      args={"vocab_size": 30522, "pad_id": 0, "embed_dim": 8, "channels": 4})
    method = build_method(KDConfig(alpha=1.0))
    terms = _terms(method, cnn.eval(), cnn, ids)
    assert abs(float(terms["kd"].detach())) < 1e-6  # the same network as teacher: nothing to learn
    teacher = build_model("textcnn", input_shape=(16,), num_classes=3,
                          args={"vocab_size": 30522, "pad_id": 0, "embed_dim": 8, "channels": 4})
    terms = _terms(method, cnn.train(), teacher.eval(), ids)
    sum(terms.values()).backward()
    assert float(terms["kd"]) > 0 and cnn.embed.weight.grad is not None


def test_attention_distillation_with_a_layer_map(models) -> None:  # type: ignore[no-untyped-def]
    teacher, student, ids = models
    cfg = AttentionDistillConfig(pairs=[(ATTN.format(0), ATTN.format(1))], output_index=1,
                                 heads="match")
    method = build_method(cfg)
    student.zero_grad()
    terms = _terms(method, student.train(), teacher, ids)
    assert float(terms["attn"]) > 0 and torch.isfinite(terms["attn"])
    terms["attn"].backward()
    query = student.bert.encoder.layer[0].attention.self.query.weight
    assert query.grad is not None and float(query.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    # The teacher's own attention against itself costs nothing: the maps are what is matched.
    same = build_method(AttentionDistillConfig(pairs=[(ATTN.format(1), ATTN.format(1))],
                                               output_index=1, heads="match"))
    assert float(_terms(same, teacher, teacher, ids)["attn"]) < 1e-6


def test_hidden_state_distillation_maps_each_token_through_one_linear_map(models) -> None:  # type: ignore[no-untyped-def]
    teacher, student, ids = models
    method = build_method(FitNetConfig(student_layer="tokens.1", teacher_layer="tokens.2"))
    terms = _terms(method, student.train(), teacher, ids)
    # Channels-first (hidden, T): the adapter is a 1x1 convolution over the hidden width,
    # TinyBERT's per-token W_h; on (T, hidden) it would mix positions instead.
    conv = method.adapter.conv
    assert isinstance(conv, nn.Conv1d) and (conv.in_channels, conv.out_channels) == (32, 32)
    terms["hint"].backward()
    assert conv.weight.grad is not None and torch.isfinite(terms["hint"])
    with torch.no_grad(), capture(teacher, ["tokens.2", "bert.encoder.layer.1"]) as feats:
        teacher(ids)
    torch.testing.assert_close(feats["tokens.2"], feats["bert.encoder.layer.1"].transpose(1, 2))


RECIPE = """
name: text-tiny
output_dir: {out}
threads: 1
data: {{name: fortunes5, tokenizer: minilm, seq_len: 16, val_size: 10, test_size: 0.2}}
teacher:
  model: {{arch: hf_encoder_classifier, args: {{path: {bert}}}}}
  train: {{epochs: 1, batch_size: 8, optimizer: {{name: adamw, lr: 0.001}}, log_every: 2}}
student:
  model: {{arch: hf_encoder_student, args: {{init_from: {bert}, layers: 1, layer_map: [1]}}}}
method:
  name: attn
  pairs: [[bert.encoder.layer.0.attention.self, bert.encoder.layer.1.attention.self]]
  output_index: 1
  heads: match
train: {{epochs: 1, batch_size: 8, optimizer: {{name: adamw, lr: 0.001}}, log_every: 2}}
cache: {{dtype: float16}}
eval: {{batch_size: 8, throughput_batch: 4, latency_repeats: 3}}
"""


def test_teacher_outputs_are_cached_and_a_second_run_never_runs_the_teacher(
    tmp_path: Path, fortunes_dir: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    bert = _tiny_bert(tmp_path / "bert", layers=2)
    recipe = tmp_path / "text.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert=bert))
    cfg = load_config(recipe)
    lines: list[str] = []
    first = pipeline.run(cfg, echo=lines.append)
    assert any("running the teacher once" in line and "attention.self[1]" in line
               for line in lines)
    assert first.teacher_forwards == 0  # distillation read logits and attention maps from disk
    rows = first.rows
    assert rows["teacher"][0]["params"] > rows["student"][0]["params"]
    assert {"accuracy", "latency_ms", "throughput"} <= rows["student"][0].keys()

    # Second run: the teacher is neither trained nor run over the training set again.
    def no_teacher(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(teaching, "build_cache", no_teacher)
    monkeypatch.setattr(stages, "train_model", no_teacher)
    again: list[str] = []
    second = pipeline.run(cfg, echo=again.append)
    assert "teacher: done earlier, loaded" in again
    assert "cache: valid teacher cache found" in again
    assert second.teacher_forwards == 0
    assert second.rows["student"][0]["accuracy"] == rows["student"][0]["accuracy"]
