"""Encoder-decoder models: padding masks, causality, cached decoding, hooks, the HF wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.capture import capture
from kdistill.data.translation import BOS, EOS, PAD, pack
from kdistill.errors import ConfigError
from kdistill.models import build_model
from kdistill.tasks.decode import greedy_decode, translate

V, L = 24, 10


def _model(seed: int = 0, **args: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = {"d_model": 16, "heads": 2, "enc_layers": 2, "dec_layers": 2, "ff": 32,
            "dropout": 0.0, **args}
    return build_model("seq2seq_transformer", input_shape=(2, L), num_classes=V,
                       args=spec).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return pack([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]],
                [[16, 17], [18, 19, 20, 21, 22], [23, 4, 5, 6]], L)


def test_forward_shape_and_padding_does_not_leak() -> None:
    model = _model()
    x, _ = _batch()
    logits = model(x)
    assert logits.shape == (3, L, V)
    # Row 0 alone (less padding around it in the batch) gives the same logits where it is real,
    # and changing the padding ids' *positions* content cannot matter: pads are masked keys.
    alone = model(x[:1])
    real = x[0, 1] != PAD
    torch.testing.assert_close(alone[0][real], logits[0][real], atol=1e-5, rtol=1e-5)
    trimmed = model(x[:1, :, :6])  # fewer pad columns: same logits at the real positions
    torch.testing.assert_close(trimmed[0][real[:6]], logits[0][real], atol=1e-5, rtol=1e-5)


def test_decoder_is_causal() -> None:
    model = _model()
    x, _ = _batch()
    changed = x.clone()
    changed[:, 1, 3] = 4  # a later decoder input token
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_cached_step_decoding_equals_teacher_forced_logits() -> None:
    model = _model(dec_layers=3)
    x, _ = _batch()
    full = model(x)
    state = model.start(x[:, 0])
    for t in range(6):
        logits, state = model.step(state, x[:, 1, t])
        real = (x[:, 1, : t + 1] != PAD).all(1)  # prefixes without padding (decoding never
        assert real.any()                        # feeds PAD to an open hypothesis)
        torch.testing.assert_close(logits[real], full[real, t], atol=1e-5, rtol=1e-5)


def test_cross_attention_probabilities_are_hookable_and_mask_padding() -> None:
    model = _model()
    x, _ = _batch()
    names = ["decoder.1.cross_attn.probs", "decoder.0.self_attn.probs", "encoder.0.attn.probs"]
    with capture(model, names) as feats:
        model(x)
        cross = feats["decoder.1.cross_attn.probs"]
        assert cross.shape == (3, 2, L, L)  # (B, heads, target positions, source positions)
        torch.testing.assert_close(cross.sum(-1), torch.ones(3, 2, L))
        assert cross[0, :, :, 4:].abs().max() == 0  # row 0's source: 3 tokens + EOS
        self_attn = feats["decoder.0.self_attn.probs"]
        assert torch.triu(self_attn[1, 0], 1).abs().max() == 0  # no look-ahead


def test_batched_greedy_equals_one_sentence_at_a_time() -> None:
    model = _model(seed=3)
    x, _ = _batch()
    together = translate(model, x[:, 0], max_len=L - 1, batch_size=3)
    alone = torch.cat([translate(model, x[i : i + 1, 0], max_len=L - 1) for i in range(3)])
    assert torch.equal(together, alone)
    ids, score = greedy_decode(model, x[:, 0], max_len=L - 1)
    assert torch.equal(ids, together) and (score <= 0).all()


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model\.args\.heads"):
        build_model("seq2seq_transformer", input_shape=(2, L), num_classes=V,
                    args={"d_model": 10, "heads": 3})
    with pytest.raises(ConfigError, match=r"model\.arch.*packed seq2seq rows"):
        build_model("seq2seq_transformer", input_shape=(40,), num_classes=V)


def _tiny_bart(path: Path, vocab: int) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                        decoder_start_token_id=BOS, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(path)
    return path


def test_hf_encoder_decoder_behind_the_same_interface(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = _tiny_bart(tmp_path / "bart", V + 3)  # a padded table: logits are cut to V
    model = build_model("hf_seq2seq", input_shape=(2, L), num_classes=V,
                        args={"path": str(path)}).eval()
    x, _ = _batch()
    logits = model(x)
    assert logits.shape == (3, L, V)
    state = model.start(x[:, 0])
    for t in range(3):
        step, state = model.step(state, x[:, 1, t])
        torch.testing.assert_close(step, logits[:, t], atol=1e-4, rtol=1e-4)
    ids = translate(model, x[:, 0], beam=2, max_len=L - 1)
    assert ids.shape == (3, L - 1) and ids.max() < V
    with pytest.raises(ConfigError, match=r"model\.args\.path.*vocabulary has 27 entries"):
        build_model("hf_seq2seq", input_shape=(2, L), num_classes=100, args={"path": str(path)})
    with pytest.raises(ConfigError, match=r"model\.args\.path: cannot load"):
        build_model("hf_seq2seq", input_shape=(2, L), num_classes=V,
                    args={"path": str(tmp_path / "missing")})
