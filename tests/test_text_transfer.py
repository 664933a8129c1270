"""Text transfer sets (issue #17, scope 1; Tang et al. 2019, arXiv:1903.12136): token masking
and n-gram views of padded text, and another source's unlabelled inputs that only the teacher
labels, never one of the data's validation or test inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill import pipeline
from kdistill.build import add_unlabelled, build_train_loader
from kdistill.cache import TeacherCache
from kdistill.config import RunConfig, TrainSettings, load_config
from kdistill.config.schema import RunTransferSet
from kdistill.data.transfer import TransferViews, ViewRows, mask_tokens, ngram_cut
from kdistill.errors import ConfigError
from kdistill.losses import hard_cross_entropy
from kdistill.models import build_model
from kdistill.pipeline import teaching
from kdistill.types import IGNORE_INDEX, DataSplits, TokenRoles
from tests.test_text_classification import _tiny_bert, fortunes_dir  # noqa: F401 - fixture

CLS, SEP, PAD, MASK = 101, 102, 0, 103
ROLES = TokenRoles(pad=PAD, mask=MASK, special=(PAD, CLS, SEP, MASK))


def _row(*content: int, length: int = 10) -> list[int]:
    ids = [CLS, *content, SEP]
    return ids + [PAD] * (length - len(ids))


def test_ngram_cut_keeps_one_window_of_content_between_the_special_tokens() -> None:
    x = torch.tensor([_row(5, 6, 7, 8, 9), _row(5, 6, 7, 8, 9), _row(5, 6)])
    cut = torch.tensor([True, False, True])
    n = torch.tensor([2, 2, 5])
    start = torch.tensor([0.99, 0.5, 0.0])
    out = ngram_cut(x, cut, n, start, ROLES)
    assert out[0].tolist() == _row(8, 9)  # the last window: ⌊0.99·(5 − 2 + 1)⌋ = 3
    assert out[1].tolist() == x[1].tolist()  # not cut
    assert out[2].tolist() == _row(5, 6)  # n clipped to the two content tokens
    low = ngram_cut(x[:1], cut[:1], torch.tensor([3]), torch.tensor([0.0]), ROLES)
    assert low[0].tolist() == _row(5, 6, 7)


def test_masking_never_touches_special_tokens_and_has_its_rate() -> None:
    x = torch.tensor([_row(*range(200, 206))] * 2000)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    out = mask_tokens(x, u, 0.25, ROLES)
    special = torch.isin(x, torch.tensor(ROLES.special))
    assert torch.equal(out[special], x[special])
    masked = (out == MASK) & ~special
    assert masked.float().sum() / (~special).sum() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(out[~masked], x[~masked])


def _splits(n: int = 30) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([_row(*torch.randint(200, 300, (int(k),), generator=g).tolist())
                      for k in torch.randint(1, 8, (n,), generator=g)])
    y = torch.arange(n) % 3
    return DataSplits(name="t", train_x=x, train_y=y, val_x=x[:4] + 1000, val_y=y[:4],
                      test_x=x[:4] + 2000, test_y=y[:4], num_classes=3, input_shape=(10,),
                      fingerprint="f", tokens=ROLES)


def test_text_views_are_pure_functions_and_the_cache_rows_are_those_views() -> None:
    ts = RunTransferSet(views=3, mask_prob=0.2, ngram_prob=0.5)
    splits = _splits()
    views = TransferViews(splits.train_x, splits.train_y, ts, ROLES)
    i, k = torch.arange(30), torch.arange(30) % 3
    first = views.inputs(i, k)
    assert torch.equal(first, views.inputs(i.flip(0), k.flip(0)).flip(0))  # batch-independent
    assert not torch.equal(first, splits.train_x)  # the views do change the text
    rows = ViewRows(views)
    assert torch.equal(rows[i * 3 + k], first)
    loader = build_train_loader(splits, TrainSettings(batch_size=7), seed=0, where="train",
                                transfer_set=ts)
    batch = next(iter(loader.epoch(0)))
    assert torch.equal(batch["input"], views.inputs(batch["index"], batch["view"]))


def test_unlabelled_inputs_reach_the_distilled_student_only_with_no_label() -> None:
    splits = _splits()
    extra = torch.tensor([_row(400 + j, 401, 402) for j in range(6)])
    splits = DataSplits(**{**splits.__dict__, "unlabelled_x": extra})
    ts = RunTransferSet(views=2, mask_prob=0.1)
    train = TrainSettings(batch_size=64)
    alone = build_train_loader(splits, train, seed=0, where="train", transfer_set=ts)
    taught = build_train_loader(splits, train, seed=0, where="train", transfer_set=ts,
                                unlabelled=True)
    assert len(alone.x) == 30 and len(taught.x) == 36
    batch = next(iter(taught.epoch(0)))
    unlabelled = batch["index"] >= 30
    assert unlabelled.sum() == 6 and (batch["label"][unlabelled] == IGNORE_INDEX).all()
    # The labels' CE skips them: the same value as on the labelled rows alone.
    logits = torch.randn(len(batch["label"]), 3)
    labelled = ~unlabelled
    assert torch.allclose(hard_cross_entropy(logits, batch["label"]),
                          hard_cross_entropy(logits[labelled], batch["label"][labelled]))
    rows, k, key = teaching.cache_inputs(RunConfig(data={"name": "digits"}, transfer_set=ts),
                                         splits)
    assert len(rows) == 36 * 2 and k == 2 and key != teaching.cache_inputs(
        RunConfig(data={"name": "digits"}, transfer_set=ts),
        DataSplits(**{**splits.__dict__, "unlabelled_x": extra[:5]}))[2]


@pytest.mark.parametrize(("transfer_set", "method", "message"), [
    ({"mask_prob": 0.1, "jitter": 2}, "kd", "one input holds one kind"),
    ({"ngram_max": 3, "flip": True}, "kd", "ngram_max: used only with ngram_prob"),
    ({"mask_prob": 0.1, "unlabelled": {"name": "mnist1d"}}, "dkd", "method kd"),
    ({"views": 2}, "kd", "no augmentation"),
    ({"views": 2, "unlabelled": {"name": "mnist1d"}}, "kd", "set views: 1"),
])
def test_text_transfer_set_settings_are_checked(transfer_set: dict, method: str,
                                                message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(data={"name": "digits"}, method={"name": method}, transfer_set=transfer_set)


def test_views_must_fit_the_inputs() -> None:
    images = DataSplits(name="i", train_x=torch.rand(4, 1, 8, 8), train_y=torch.arange(4),
                        val_x=torch.rand(2, 1, 8, 8), val_y=torch.arange(2),
                        test_x=torch.rand(2, 1, 8, 8), test_y=torch.arange(2), num_classes=4,
                        input_shape=(1, 8, 8), fingerprint="i")
    with pytest.raises(ConfigError, match="not"):
        build_train_loader(images, TrainSettings(), seed=0, where="train",
                           transfer_set=RunTransferSet(mask_prob=0.1))
    with pytest.raises(ConfigError, match="token ids"):
        build_train_loader(_splits(), TrainSettings(), seed=0, where="train",
                           transfer_set=RunTransferSet(jitter=1))


def test_another_source_must_add_inputs_of_the_same_kind() -> None:
    from kdistill.build import build_data

    same = RunConfig(data={"name": "digits"}, transfer_set={"views": 1,
                                                             "unlabelled": {"name": "digits"}})
    with pytest.raises(ConfigError, match="nothing to add") as err:
        add_unlabelled(build_data(same.data), same)
    assert err.value.where == "transfer_set.unlabelled"
    other = RunConfig(data={"name": "digits"}, transfer_set={"views": 1,
                                                              "unlabelled": {"name": "mnist1d"}})
    with pytest.raises(ConfigError, match=r"use the data's input size"):
        add_unlabelled(build_data(other.data), other)


def test_token_roles_frame_the_text_and_name_the_vocabulary() -> None:
    from kdistill.data.fortune_classes import token_roles
    from kdistill.models.hf import load_tokenizer

    tok = load_tokenizer("minilm")
    roles = token_roles(tok)
    assert roles.mask == tok.mask_token_id and roles.pad == tok.pad_token_id
    assert {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id} == set(roles.special)
    assert len(roles.vocab) == 64  # [UNK] and [MASK] are words: an n-gram may drop them


RECIPE = """
name: text-transfer
output_dir: {out}
threads: 1
data: {{name: fortunes5, tokenizer: minilm, seq_len: 16, val_size: 10, test_size: 0.2}}
teacher:
  model: {{arch: hf_encoder_classifier, args: {{path: {bert}}}}}
  train: {{epochs: 1, batch_size: 8, optimizer: {{name: adamw, lr: 0.001}}}}
student:
  model: {{arch: textcnn, args: {{tokenizer: minilm, embed_dim: 16, channels: 8, project_dim: 8}}}}
method: {{name: kd, temperature: 2.0, alpha: 0.5}}
transfer_set:
  views: 2
  mask_prob: 0.2
  ngram_prob: 0.3
  swap_prob: 0.2
  swap_classes: 4
  unlabelled: {{name: fortunes43, tokenizer: minilm, seq_len: 16, val_size: 2, test_size: 0.1}}
train: {{epochs: 1, batch_size: 8, optimizer: {{name: adam, lr: 0.001}}}}
eval: {{batch_size: 8, throughput_batch: 4, latency_repeats: 3}}
baseline: false
memory_plan: false
"""


def test_a_run_distils_on_text_views_and_another_sources_texts(
        tmp_path: Path, fortunes_dir: Path) -> None:  # noqa: F811
    """fortunes43 holds every fortunes5 text and the extra category's: only the latter are
    added (no validation or test text), the teacher's cached outputs on every view equal the
    teacher on that view, and the distilled student never runs the teacher."""
    art = [f"paint brush canvas colour gallery number {i}." for i in range(7)]
    (fortunes_dir / "art").write_text("\n%\n".join(art) + "\n%\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs", bert=_tiny_bert(tmp_path / "b")))
    cfg = load_config(recipe)
    lines: list[str] = []
    result = pipeline.run(cfg, echo=lines.append)
    assert any("7 unlabelled inputs from 'fortunes43'" in line for line in lines), lines
    assert result.teacher_forwards == 0
    from kdistill.build import build_data

    splits = add_unlabelled(build_data(cfg.data), cfg)
    assert splits.unlabelled_x is not None and len(splits.unlabelled_x) == 7
    held_out = {tuple(r.tolist()) for r in torch.cat([splits.val_x, splits.test_x])}
    assert not held_out & {tuple(r.tolist()) for r in splits.unlabelled_x}
    cache = TeacherCache(result.run_dir / "cache" / "teacher")
    n = len(splits.train_x) + 7
    assert cache.num_samples == 2 * n
    rows, _, _ = teaching.cache_inputs(cfg, splits)
    teacher = build_model("hf_encoder_classifier", input_shape=(16,), num_classes=5,
                          args={"path": str(tmp_path / "b")})
    from kdistill.weights import load_weights

    load_weights(teacher, result.run_dir / "teacher" / "model.safetensors")
    picked = torch.tensor([0, 1, 2 * n - 2, 2 * n - 1])  # first and last (unlabelled) rows
    with torch.no_grad():
        live = teacher.eval()(rows[picked])
    stored = cache.read("logits", picked).float()
    assert torch.allclose(stored, live, atol=1e-4)
    assert isinstance(teacher, nn.Module)
