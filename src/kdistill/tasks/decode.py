"""Greedy and beam-search decoding for encoder-decoder models (`kdistill.models.seq2seq`).

A model decodes through three methods (both zoo models have them):
`start(src (B, S)) -> state`, `step(state, tokens (B,)) -> (logits (B, V), state)` and
`reorder(state, index) -> state`. Outputs are (B, max_len) int64 rows `y1 .. yn EOS`,
PAD after EOS (no BOS), with their summed log-probabilities (B,).

Beam search (batched: B sentences x K beams in one tensor) keeps the K best prefixes by
summed log-probability; a hypothesis that emitted EOS stays in the beam with its score frozen
(its only continuation is PAD at log-probability 0), so finished and open hypotheses compete
on the same scale. The final choice among the K divides each score by length^length_penalty
(length counted with EOS; 0 = no normalisation, 1 = per-token average), which counters the
search's preference for short outputs. With K = 1 it is greedy decoding exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from kdistill.data.translation import BOS, EOS, PAD

State = dict[str, Tensor]


class Decodable(Protocol):
    def start(self, src: Tensor) -> State: ...
    def step(self, state: State, tokens: Tensor) -> tuple[Tensor, State]: ...
    def reorder(self, state: State, index: Tensor) -> State: ...


def _check(model: object) -> Decodable:
    if not all(hasattr(model, m) for m in ("start", "step", "reorder")):
        raise TypeError(f"{type(model).__name__} cannot decode: it needs start / step / "
                        "reorder (use arch seq2seq_transformer or hf_seq2seq)")
    return model  # type: ignore[return-value]


@torch.no_grad()
def greedy_decode(model: Decodable, src: Tensor, *, max_len: int) -> tuple[Tensor, Tensor]:
    """Argmax at every step. src (B, S) -> ids (B, max_len), log-probabilities (B,)."""
    b = len(src)
    state = model.start(src)
    tokens = torch.full((b,), BOS, dtype=torch.int64, device=src.device)
    out = torch.full((b, max_len), PAD, dtype=torch.int64, device=src.device)
    score = torch.zeros(b, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    for t in range(max_len):
        logits, state = model.step(state, tokens)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nxt = logp.argmax(-1)
        score += torch.where(done, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(done, PAD, nxt)
        out[:, t] = nxt
        done |= nxt == EOS
        if bool(done.all()):
            break
        tokens = nxt
    return out, score


@torch.no_grad()
def beam_search(model: Decodable, src: Tensor, *, beam: int, max_len: int,
                length_penalty: float = 1.0) -> tuple[Tensor, Tensor]:
    """src (B, S) -> the best of `beam` hypotheses per sentence: ids (B, max_len) and their
    summed log-probabilities (B,) (not length-normalised)."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1; got {beam}")
    b, k, dev = len(src), beam, src.device
    state = model.start(src)
    state = model.reorder(state, torch.arange(b, device=dev).repeat_interleave(k))
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all K beams start as the same empty prefix: keep one
    tokens = torch.full((b * k,), BOS, dtype=torch.int64, device=dev)
    seqs = torch.zeros((b * k, 0), dtype=torch.int64, device=dev)
    finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    for _ in range(max_len):
        logits, state = model.step(state, tokens)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B·K, V)
        vocab = logp.shape[-1]
        pad_only = torch.full_like(logp, float("-inf"))
        pad_only[:, PAD] = 0.0
        logp = torch.where(finished[:, None], pad_only, logp)
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * vocab)
        scores, flat = cand.topk(k, dim=1)  # (B, K)
        rows = (torch.arange(b, device=dev)[:, None] * k + flat // vocab).reshape(-1)
        tok = (flat % vocab).reshape(-1)
        state = model.reorder(state, rows)
        seqs = torch.cat([seqs[rows], tok[:, None]], dim=1)
        was_done = finished[rows]
        lengths = lengths[rows] + (~was_done).float()
        finished = was_done | (tok == EOS)
        tokens = tok
        if bool(finished.all()):
            break
    flat_scores = scores.reshape(-1)
    norm = flat_scores / lengths.clamp_min(1.0) ** length_penalty
    pick = torch.arange(b, device=dev) * k + norm.reshape(b, k).argmax(dim=1)
    out = torch.full((b, max_len), PAD, dtype=torch.int64, device=dev)
    out[:, : seqs.shape[1]] = seqs[pick]
    return out, flat_scores[pick]


def translate(model: nn.Module, src: Tensor, *, beam: int = 1, max_len: int,
              length_penalty: float = 1.0, batch_size: int = 64) -> Tensor:
    """Decode every row of src (N, S) in eval mode, `batch_size` sentences at a time (each
    batch cut to its longest source: padding columns are masked anyway). beam 1 = greedy."""
    decodable = _check(model)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        parts = []
        for start in range(0, len(src), batch_size):
            chunk = src[start : start + batch_size].to(device)
            width = max(int((chunk != PAD).sum(1).max()), 1)
            chunk = chunk[:, :width]
            if beam == 1:
                ids, _ = greedy_decode(decodable, chunk, max_len=max_len)
            else:
                ids, _ = beam_search(decodable, chunk, beam=beam, max_len=max_len,
                                     length_penalty=length_penalty)
            parts.append(ids.cpu())
        return torch.cat(parts) if parts else torch.zeros((0, max_len), dtype=torch.int64)
    finally:
        model.train(was_training)
