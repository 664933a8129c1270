"""Translation methods: cross-attention KL (naive reference, masking), sequence-level KD's
decoded targets (and their cache), word-level KD from a top-k cache on seq2seq rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdistill.cache import CacheKey, TeacherCache, build_cache
from kdistill.cache_key import fingerprint_model
from kdistill.capture import capture
from kdistill.data.translation import (
    BOS,
    EOS,
    IGNORE_INDEX,
    PAD,
    pack,
    replace_targets,
    translation_splits,
)
from kdistill.losses import shift_labels, token_distill_loss
from kdistill.losses.attention import attention_probs_loss
from kdistill.methods import Outputs, build_method
from kdistill.methods.cross_attention import CrossAttnConfig
from kdistill.methods.seq_kd import SeqKDConfig
from kdistill.methods.token_kd import TokenKDConfig
from kdistill.models import build_model
from kdistill.schedules import Progress
from kdistill.tasks.decode import translate
from kdistill.teachers import CachedTeacher

from .test_translation_data import synthetic_pairs

V, L = 20, 9
P = Progress(0, 0, 10, 10)


def _model(seed: int, dim: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("seq2seq_transformer", input_shape=(2, L), num_classes=V,
                       args={"d_model": dim, "heads": 2, "enc_layers": layers,
                             "dec_layers": layers, "ff": 2 * dim, "dropout": 0.0}).eval()


def _rows(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(4, V, (int(k),), generator=g).tolist()
           for k in torch.randint(1, 7, (n,), generator=g)]
    tgt = [torch.randint(4, V, (int(k),), generator=g).tolist()
           for k in torch.randint(1, 7, (n,), generator=g)]
    return pack(src, tgt, L)


def _naive_row_kl(a_s: torch.Tensor, a_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ over valid rows of KL(mean-head teacher ‖ mean-head student), / number of rows."""
    s, t = a_s.mean(1), a_t.mean(1)
    total, count = torch.zeros(()), 0
    for b in range(s.shape[0]):
        for q in range(s.shape[1]):
            if rows[b, q]:
                p, r = t[b, q], s[b, q]
                total = total + sum(p[k] * (p[k].log() - r[k].log()) for k in range(len(p))
                                    if p[k] > 0)
                count += 1
    return total / count


def test_query_masked_attention_kl_matches_a_naive_loop_and_ignores_masked_rows() -> None:
    torch.manual_seed(0)
    a_s = torch.randn(3, 2, 5, 7).softmax(-1)
    a_t = torch.randn(3, 4, 5, 7).softmax(-1)  # other head count: heads averaged
    rows = torch.rand(3, 5) > 0.4
    got = attention_probs_loss(a_s, a_t, heads="mean", query_mask=rows)
    torch.testing.assert_close(got, _naive_row_kl(a_s, a_t, rows))
    noisy = a_s.clone()
    noisy[~rows[:, None].expand(3, 2, 5)] = 1.0 / 7  # change only the masked rows
    torch.testing.assert_close(attention_probs_loss(noisy, a_t, query_mask=rows), got)
    with pytest.raises(ValueError, match="query_mask"):
        attention_probs_loss(a_s, a_t, query_mask=rows[:, :4])


def test_cross_attn_terms_are_word_kd_plus_masked_cross_attention_kl() -> None:
    student, teacher = _model(0, 8, 1), _model(1, 16, 2)
    s_name, t_name = "decoder.0.cross_attn.probs", "decoder.1.cross_attn.probs"
    method = build_method(CrossAttnConfig(pairs=[(s_name, t_name)], alpha=0.3, weight=2.0,
                                          temperature=2.0))
    x, y = _rows()
    with capture(student, [s_name]) as sf, capture(teacher, [t_name]) as tf:
        s_logits, t_logits = student(x), teacher(x)
    out = Outputs(s_logits, t_logits, dict(sf), dict(tf))
    terms = method.loss_terms(out, {"input": x, "label": y}, P)
    labels = shift_labels(y)
    ref = token_distill_loss(s_logits, t_logits, labels, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(terms["kd"], 0.3 * ref.kd)
    torch.testing.assert_close(terms["ce"], 0.7 * ref.ce)
    rows = labels != IGNORE_INDEX
    torch.testing.assert_close(terms["attn"], 2.0 * _naive_row_kl(sf[s_name], tf[t_name], rows))
    # Padded target rows do not count: garbage there leaves the term unchanged.
    noisy = dict(sf)
    noisy[s_name] = sf[s_name].clone()
    noisy[s_name][~rows[:, None].expand_as(noisy[s_name][..., 0])] = 1.0 / L
    again = method.loss_terms(Outputs(s_logits, t_logits, noisy, dict(tf)),
                              {"input": x, "label": y}, P)
    torch.testing.assert_close(again["attn"], terms["attn"])


def test_word_level_kd_from_a_topk_cache_on_seq2seq_rows(tmp_path: Path) -> None:
    # k = V keeps every token: the top-k path must then equal the dense one.
    teacher, student = _model(1, 16, 2), _model(0, 8, 1)
    x, y = _rows(10)
    key = CacheKey(teacher="t", data="d", dtype="float32", layers=(), topk=V)
    cache = build_cache(tmp_path / "cache", teacher, x, key, batch_size=4)
    batch = {"index": torch.tensor([7, 2, 5]), "input": x[[7, 2, 5]], "label": y[[7, 2, 5]]}
    topk, _ = CachedTeacher(TeacherCache(cache.directory))(batch, ())
    method = build_method(TokenKDConfig(alpha=0.6))
    s_logits = student(batch["input"])
    sparse = method.loss_terms(Outputs(s_logits, None, teacher_topk=tuple(topk)), batch, P)
    with torch.no_grad():
        dense = method.loss_terms(Outputs(s_logits, teacher(batch["input"])), batch, P)
    for k in ("kd", "ce"):
        torch.testing.assert_close(sparse[k], dense[k], atol=1e-5, rtol=1e-5)
    assert method.batch_items(batch) == int((shift_labels(batch["label"]) != -100).sum())


def _tiny_splits():  # type: ignore[no-untyped-def]
    return translation_splits("gettext_en_de", seq_len=12, vocab_size=300, val_size=20,
                              test_size=0.1, split_seed=0, pairs=synthetic_pairs(120))


class FakeTools:
    """A small `DataTools` (kdistill.methods.base) over a folder: the task's decoding is
    `translate` of the sources, targets replaced by `replace_targets`."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.lines, self.decoded = directory, [], 0
        self.echo = self.lines.append

    def fingerprint(self, model: torch.nn.Module) -> str:
        return fingerprint_model(model)

    def cached_tensors(self, name: str, make):  # type: ignore[no-untyped-def]
        path = self.directory / f"{name}.safetensors"
        if path.is_file():
            return load_file(str(path))
        tensors = make()
        save_file(tensors, str(path))
        return tensors

    def decode(self, model, inputs, *, beam, length_penalty, batch_size):  # type: ignore[no-untyped-def]
        self.decoded += 1
        return translate(model, inputs[:, 0], beam=beam, max_len=inputs.shape[-1] - 1,
                         length_penalty=length_penalty, batch_size=batch_size)

    def with_decoded_targets(self, splits, ids, key):  # type: ignore[no-untyped-def]
        rows = [row.tolist() for row in ids]
        targets = [[i for i in (r[: r.index(EOS)] if EOS in r else r) if i != PAD] for r in rows]
        return replace_targets(splits, targets, f"{splits.fingerprint}|{key}")


def test_seq_kd_trains_on_the_teachers_beam_outputs_cached_by_teacher(tmp_path: Path) -> None:
    splits = _tiny_splits()
    torch.manual_seed(0)
    teacher = build_model("seq2seq_transformer", input_shape=splits.input_shape,
                          num_classes=splits.num_classes,
                          args={"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1,
                                "ff": 32}).eval()
    method = build_method(SeqKDConfig(beam=2))
    assert not method.uses_teacher  # alpha 0: the teacher only makes the targets
    tools = FakeTools(tmp_path)
    new = method.prepare_data(splits, teacher, tools)
    assert tools.decoded == 1 and "beam-2 translations" in tools.lines[-1]
    expected = translate(teacher, splits.train_x[:, 0], beam=2, max_len=11)
    for row, out in zip(new.train_x[:, 1], expected, strict=True):
        ids = out.tolist()
        ids = (ids[: ids.index(EOS)] if EOS in ids else ids)[:10]  # room for BOS, EOS
        assert row[: len(ids) + 2].tolist() == [BOS, *ids, EOS]
        assert (row[len(ids) + 2 :] == PAD).all()
    assert torch.equal(new.train_x[:, 0], splits.train_x[:, 0])
    assert torch.equal(new.val_x, splits.val_x) and new.fingerprint != splits.fingerprint
    assert len(list(tmp_path.glob("seq_kd-*.safetensors"))) == 1

    again = method.prepare_data(splits, teacher, tools)  # read back, not decoded again
    assert tools.decoded == 1
    assert torch.equal(again.train_x, new.train_x) and again.fingerprint == new.fingerprint
    with torch.no_grad():  # another teacher: another cache entry, decoded anew
        teacher.embed.weight.mul_(2)
    other = method.prepare_data(splits, teacher, tools)
    assert tools.decoded == 2 and other.fingerprint != new.fingerprint
    assert len(list(tmp_path.glob("seq_kd-*.safetensors"))) == 2
    # Another beam is another key as well.
    beam3 = build_method(SeqKDConfig(beam=3)).prepare_data(splits, teacher, tools)
    assert tools.decoded == 3 and beam3.fingerprint not in (new.fingerprint, other.fingerprint)
    # The loss: next-token CE on the new targets only (alpha 0).
    logits = torch.randn(4, 12, splits.num_classes)
    terms = method.loss_terms(Outputs(logits), {"label": new.train_y[:4]}, P)
    assert set(terms) == {"ce"}
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shift_labels(new.train_y[:4]).reshape(-1)))
