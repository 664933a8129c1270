"""Greedy and beam search: beam 1 is greedy, beam finds what greedy misses, scores are true."""

from __future__ import annotations

import math

import torch

from kdistill.data.translation import BOS, EOS, PAD, pack
from kdistill.models import build_model
from kdistill.tasks.decode import beam_search, greedy_decode

A, B, V = 4, 5, 16


class Toy:
    """A decoder whose next-token distribution depends on the last token only:
    after BOS: A 0.5, B 0.4, rest 0.1 spread; after A: uniform over 10 tokens (each <= 0.1);
    after B: EOS 0.99. Greedy takes A (0.5 · 0.1 at best); the best sequence is B EOS (0.396)."""

    def _probs(self, last: int) -> torch.Tensor:
        p = torch.full((V,), 1e-6)
        if last == BOS:
            p[A], p[B], p[6:12] = 0.5, 0.4, 0.1 / 6
        elif last == B:
            p[EOS], p[6] = 0.99, 0.01
        elif last == A:
            p[6:16] = 0.1
        else:
            p[EOS] = 1.0
        return p / p.sum()

    def start(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"n": torch.zeros(len(src))}

    def step(self, state: dict[str, torch.Tensor], tokens: torch.Tensor):  # type: ignore[no-untyped-def]
        logits = torch.stack([self._probs(int(t)).log() for t in tokens])
        return logits, state

    def reorder(self, state: dict[str, torch.Tensor], index: torch.Tensor):  # type: ignore[no-untyped-def]
        return {k: v.index_select(0, index) for k, v in state.items()}


def test_beam_finds_the_better_sequence_greedy_misses() -> None:
    src = torch.ones(2, 3, dtype=torch.int64)
    g_ids, g_score = greedy_decode(Toy(), src, max_len=5)
    b_ids, b_score = beam_search(Toy(), src, beam=2, max_len=5, length_penalty=0.0)
    assert g_ids[0, 0] == A and b_ids[0, :2].tolist() == [B, EOS]
    assert (b_ids[:, 2:] == PAD).all()
    assert (b_score >= g_score).all()
    torch.testing.assert_close(b_score, torch.full((2,), math.log(0.4 * 0.99)), atol=1e-4,
                               rtol=0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("seq2seq_transformer", input_shape=(2, 9), num_classes=V,
                       args={"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 2,
                             "ff": 32, "dropout": 0.0}).eval()


def _sources() -> torch.Tensor:
    torch.manual_seed(1)
    src = [torch.randint(4, V, (int(n),)).tolist() for n in torch.randint(1, 7, (12,))]
    return pack(src, [[4]] * 12, 9)[0][:, 0]


def test_beam_of_one_is_greedy() -> None:
    model, src = _model(), _sources()
    g_ids, g_score = greedy_decode(model, src, max_len=8)
    b_ids, b_score = beam_search(model, src, beam=1, max_len=8)
    assert torch.equal(g_ids, b_ids)
    torch.testing.assert_close(g_score, b_score)


def test_beam_scores_are_the_model_log_probabilities_of_its_outputs() -> None:
    model, src = _model(), _sources()
    ids, score = beam_search(model, src, beam=4, max_len=8, length_penalty=1.0)
    # Teacher-force the chosen outputs: their summed token log-probabilities (up to EOS).
    rows = [[int(i) for i in r[: (r == EOS).nonzero()[0, 0] + 1 if (r == EOS).any()
                                 else len(r)]] for r in ids]
    dec = torch.full((len(src), 9), PAD, dtype=torch.int64)
    for i, r in enumerate(rows):
        dec[i, : len(r) + 1] = torch.tensor([BOS, *r])
    with torch.no_grad():
        logp = model(torch.stack([torch.nn.functional.pad(src, (0, 9 - src.shape[1])),
                                  dec], dim=1)).log_softmax(-1)
    expected = torch.stack([sum(logp[i, t, tok] for t, tok in enumerate(r))
                            for i, r in enumerate(rows)])
    torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)
    # Beam search with no length normalisation never ends below greedy on this model.
    _, g_score = greedy_decode(model, src, max_len=8)
    _, b0 = beam_search(model, src, beam=4, max_len=8, length_penalty=0.0)
    assert (b0 >= g_score - 1e-5).all()
