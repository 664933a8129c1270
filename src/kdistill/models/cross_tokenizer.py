"""A teacher with its own tokenizer, projected onto the student's: `arch: projected_lm`.

Logit-level KD compares two next-token distributions over one vocabulary. When teacher and
student tokenize differently, this module turns the teacher into a model *of the student's
tokens*: it reads the student's ids (B, T), rebuilds the text, runs the teacher on the
teacher's own tokenization of that text, and returns log-probabilities (B, T, V_student) of
the next student token at every student position. Everything downstream (the top-k cache,
`token_kd`, evaluation) then works unchanged, offline from the cache.

The projection, at student position t whose prefix ends at byte e (text[:e] read):
- u is the teacher's last position whose prefix ends at b <= e, and s = text[b:e] the bytes
  the student has read past it (empty when the two tokenizations share a boundary at e).
- Of the teacher's `candidates` most likely next tokens w at u, those that begin with s and
  reach past it are consistent with text[:e]; each gives its probability p(w) to the student
  token v that begins the remainder w[len(s):] (the longest student token that is a prefix of
  it). q(v) ∝ Σ p(w), renormalised over the consistent candidates: p(next student token | text
  read so far), the teacher conditioned on the bytes it has not yet tokenized.
- EOS maps to EOS. Where no candidate is consistent (the text went where the teacher's top
  candidates did not), q is the observed next token: KD then equals CE at that position.
Approximations, measured in docs/llm.md: continuations that span several teacher tokens (w = s
exactly, or w shorter than s) and mass outside the top `candidates` are dropped; "longest
student token" stands in for the student tokenizer's own first token of the remainder. This
is the byte-level view of cross-tokenizer distillation (ULD, arXiv:2402.12030, matches sorted
probabilities instead; ALM, arXiv:2503.20083, and TRL's GOLD align spans of the two
tokenizations): here the teacher is moved into the student's vocabulary exactly where the two
agree on the text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.types import IGNORE_INDEX

SEPARATOR = 0xFF  # never a byte of UTF-8 text: stands for a special token (EOS) in the stream
MAX_CANDIDATES = 1024  # the projection's Python loop is linear in it: 0.8 s a batch at 1024
ZERO_LOGPROB = -1e4  # zero mass, finite (caches refuse -inf), still zero at any temperature


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: printable bytes stand for themselves, the
    other 68 bytes for the characters U+0100 onwards, in byte order (Radford et al. 2019)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The UTF-8 bytes each token id stands for; None for special tokens (EOS, padding).

    Byte-level BPE tokens (GPT-2, Llama 3, SmolLM2, `kdistill tokenizer`) map to bytes
    exactly, partial UTF-8 characters included; other tokenizers through their decoder (only
    approximately: a SentencePiece "▁" or WordPiece "##" token's bytes depend on context)."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    if _is_byte_level(tokenizer):
        dec = _byte_decoder()
        for i, tok in enumerate(tokens):
            if i in special or tok is None:
                out.append(None)
            else:  # an added token outside the byte alphabet: its own UTF-8
                out.append(bytes(dec[c] for c in tok) if all(c in dec for c in tok)
                           else tok.encode())
        return out
    for i, tok in enumerate(tokens):
        out.append(None if i in special or tok is None
                   else tokenizer.convert_tokens_to_string([tok]).encode())
    return out


def token_byte_lengths(tokenizer: Any) -> Tensor | None:
    """(V,) int64: bytes per token id (0 for special tokens), for bits per byte; None for a
    tokenizer that is not byte-level (a SentencePiece "▁" or WordPiece "##" token's bytes
    depend on its neighbours, so counting them per token would be wrong)."""
    if not _is_byte_level(tokenizer):
        return None
    return torch.tensor([len(b) if b is not None else 0 for b in token_bytes(tokenizer)])


@dataclass
class _Row:
    """One student block as a byte stream, with the teacher's tokenization of the same text."""

    stream: bytes  # the text's bytes; SEPARATOR where a special token stands
    student_ends: list[int]  # end offset of each student token
    teacher_ids: list[int] = field(default_factory=list)
    teacher_ends: list[int] = field(default_factory=list)


def _valid_span(b: bytes) -> tuple[int, str] | None:
    """(start, text): the block's bytes minus a partial UTF-8 character cut at either edge by
    the packing; None when no such trim decodes."""
    lo = 0
    while lo < min(len(b), 3) and 0x80 <= b[lo] < 0xC0:
        lo += 1
    for cut in range(4):
        try:
            return lo, b[lo:len(b) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


class Projection:
    """The byte-level alignment and vocabulary projection between two tokenizers (pure Python
    over token ids and probabilities; no model)."""

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self.teacher_tok = teacher_tokenizer
        self.teacher_bytes = token_bytes(teacher_tokenizer)
        self.student_bytes = token_bytes(student_tokenizer)
        self.student_vocab = len(self.student_bytes)
        self.teacher_eos = teacher_tokenizer.eos_token_id
        self.student_eos = student_tokenizer.eos_token_id
        self._lookup = {b: i for i, b in enumerate(self.student_bytes) if b}
        self._longest = max((len(b) for b in self._lookup), default=1)
        self._first: dict[bytes, int] = {}
        self.unaligned_segments = 0

    def digest(self) -> str:
        """Identifies the pair of vocabularies (the teacher cache's key must change with it)."""
        h = hashlib.sha256()
        for table in (self.teacher_bytes, self.student_bytes):
            for b in table:
                h.update(b"\x01" if b is None else b"\x02" + len(b).to_bytes(2, "big") + b)
        return h.hexdigest()

    def first_student_token(self, r: bytes) -> int:
        """The longest student token that is a prefix of `r` (byte-level vocabularies hold all
        256 bytes, so one always exists)."""
        if r not in self._first:
            for n in range(min(len(r), self._longest), 0, -1):
                if r[:n] in self._lookup:
                    self._first[r] = self._lookup[r[:n]]
                    break
            else:
                self._first[r] = -1
        return self._first[r]

    def row(self, student_ids: list[int]) -> _Row:
        """The student block's bytes and the teacher's tokenization of them: each run of text
        tokenized as a whole, a special student token becoming the teacher's EOS."""
        pieces: list[bytes] = []
        ends: list[int] = []
        for i in student_ids:
            b = self.student_bytes[i] if 0 <= i < self.student_vocab else None
            pieces.append(bytes([SEPARATOR]) if b is None else b)
            ends.append((ends[-1] if ends else 0) + len(pieces[-1]))
        row = _Row(b"".join(pieces), ends)
        start = 0
        for segment in row.stream.split(bytes([SEPARATOR])):
            self._tokenize_segment(row, segment, start)
            start += len(segment)
            if start < len(row.stream):  # the separator: the teacher's EOS
                row.teacher_ids.append(self.teacher_eos)
                row.teacher_ends.append(start + 1)
                start += 1
        return row

    def _tokenize_segment(self, row: _Row, segment: bytes, offset: int) -> None:
        span = _valid_span(segment)
        if span is None or not span[1]:
            self.unaligned_segments += span is None
            return
        lo, text = span
        ids = self.teacher_tok(text, add_special_tokens=False).input_ids
        parts = [self.teacher_bytes[i] for i in ids]
        if any(p is None for p in parts) or b"".join(parts) != text.encode():  # type: ignore[arg-type]
            self.unaligned_segments += 1  # a normalising tokenizer: no byte-exact alignment
            return
        end = offset + lo
        for i, p in zip(ids, parts, strict=True):
            end += len(p)  # type: ignore[arg-type]
            row.teacher_ids.append(i)
            row.teacher_ends.append(end)

    def targets(self, row: _Row, next_ids: list[int | None], top_ids: list[list[int]],
                top_probs: list[list[float]]) -> list[dict[int, float] | None]:
        """q at every student position t < T − 1: a {student id: probability} dict, from the
        teacher's top candidates (`top_ids[u]`, `top_probs[u]` at teacher position u). None
        where the projection does not hold: the observed next teacher token does not map to
        the observed next student token `next_ids[t]` (the student's token runs past the
        teacher's, or its BPE chose a shorter first token), or no candidate fits the text."""
        out: list[dict[int, float] | None] = []
        for t, observed in enumerate(next_ids):
            u, s = self.context(row, row.student_ends[t])
            if SEPARATOR in s or (observed is not None and (
                    u + 1 >= len(row.teacher_ids)
                    or self.student_token(row.teacher_ids[u + 1], s) != observed)):
                out.append(None)
                continue
            out.append(self._project(s, top_ids[u], top_probs[u]) or None)
        return out

    @staticmethod
    def context(row: _Row, e: int) -> tuple[int, bytes]:
        """(u, s) for a student prefix ending at byte e: u the teacher's last position whose
        prefix ends at or before e (-1: none), s the bytes read past it (a lone SEPARATOR
        when u is -1, so that no candidate can fit)."""
        u = bisect.bisect_right(row.teacher_ends, e) - 1
        return u, row.stream[row.teacher_ends[u]:e] if u >= 0 else bytes([SEPARATOR])

    def student_token(self, w: int, s: bytes) -> int:
        """The student token that teacher token `w` begins, once the student has read `s` (the
        first bytes of `w`) past the teacher's boundary; -1 when `w` does not reach past `s`."""
        if w == self.teacher_eos:
            return -1 if s else self.student_eos
        tw = self.teacher_bytes[w]
        if tw is None or len(tw) <= len(s) or not tw.startswith(s):
            return -1
        return self.first_student_token(tw[len(s):])

    def _project(self, s: bytes, ids: list[int], probs: list[float]) -> dict[int, float]:
        q: dict[int, float] = {}
        for w, p in zip(ids, probs, strict=True):
            v = self.student_token(w, s)
            if v >= 0:
                q[v] = q.get(v, 0.0) + p
        total = sum(q.values())
        return {v: p / total for v, p in q.items()} if total > 0 else {}

    def teacher_blocks(self, student_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's own tokenization of each student block: ids (N, T') right-padded
        with EOS, and labels with -100 at the padding (to score the teacher on its own
        tokens: bits per byte compare it with students over another vocabulary)."""
        rows = [self.row(ids).teacher_ids for ids in student_ids.tolist()]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.teacher_eos] * (longest - len(r)) for r in rows])
        labels = torch.tensor([r + [IGNORE_INDEX] * (longest - len(r)) for r in rows])
        return ids, labels


class OracleLM(nn.Module):
    """A diagnostic 'teacher' that knows the text: all its mass on the observed next token.
    Projected (`ProjectedLM(OracleLM(V_teacher), ...)`), its fallbacks measure how often the
    two tokenizations alone break the projection (`benchmarks/cross_tokenizer_projection.py`)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # a device for ProjectedLM to read

    def forward(self, ids: Tensor) -> Tensor:
        logits = torch.full((*ids.shape, self.vocab), -30.0, device=ids.device)
        return logits.scatter(-1, ids.roll(-1, dims=1)[..., None], 0.0)


class ProjectedLM(nn.Module):
    """A causal-LM teacher over another tokenizer, seen through `Projection`: student ids
    (B, T) -> log-probabilities (B, T, V_student) of the next student token. Never trained
    (its outputs carry no gradient). Where the projection does not hold at a position whose
    next token is known (`Projection.targets`), the target is that token (KD = CE there):
    the outputs depend on the ids' next tokens, so this module teaches but is never scored
    on them (evaluation scores `teacher` on `Projection.teacher_blocks`)."""

    def __init__(self, teacher: nn.Module, projection: Projection, *, candidates: int) -> None:
        super().__init__()
        self.teacher, self.projection, self.candidates = teacher, projection, candidates
        self.fallbacks, self.positions = 0, 0

    def fingerprint_extra(self) -> str:
        """Beside the weights, in the teacher cache's key: the two vocabularies and
        `candidates` (`kdistill.cache_key.fingerprint_model`)."""
        return f"projection {self.projection.digest()} candidates {self.candidates}"

    def summary(self) -> str:
        """How often the projection held, over every position this module has scored."""
        share = self.fallbacks / max(self.positions, 1)
        return (f"projection: {self.positions:,} student positions, {share:.1%} taught the "
                f"observed token (no consistent teacher candidate), "
                f"{self.projection.unaligned_segments} text segment(s) without teacher targets")

    @torch.no_grad()
    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.is_floating_point():
            raise TypeError("a causal LM takes int64 token ids, not float inputs")
        b, t = input_ids.shape
        proj = self.projection
        id_rows = input_ids.tolist()
        rows = [proj.row(ids) for ids in id_rows]
        top_ids, top_probs = self.teacher_top(rows)
        at: list[tuple[int, int, int]] = []
        mass: list[float] = []
        for i, (row, ids) in enumerate(zip(rows, id_rows, strict=True)):
            # The last position has no observed next token: a prediction (greedy decoding).
            targets = proj.targets(row, [*ids[1:], None], top_ids[i], top_probs[i])
            for pos, dist in enumerate(targets):
                if dist is None and pos + 1 < t:  # the observed next token: KD equals CE here
                    self.fallbacks += 1
                    dist = {ids[pos + 1]: 1.0}
                at += [(i, pos, v) for v in dist or {}]
                mass += (dist or {}).values()
        self.positions += b * (t - 1)
        q = torch.zeros(b, t, proj.student_vocab)
        if at:  # one scatter for the whole batch: per-element writes cost microseconds each
            q[tuple(torch.tensor(at).T)] = torch.tensor(mass)
        q[q.sum(-1) == 0] = 1.0 / proj.student_vocab  # nothing known: uniform
        out = torch.where(q > 0, q.log(), torch.full_like(q, ZERO_LOGPROB))
        return out.to(input_ids.device)

    def teacher_top(self, rows: list[_Row]) -> tuple[list[list[list[int]]],
                                                      list[list[list[float]]]]:
        """The teacher's `candidates` most likely next tokens and their probabilities at every
        teacher position of every row (rows right-padded: causal attention never looks ahead,
        so the padding changes no real position)."""
        longest = max((len(r.teacher_ids) for r in rows), default=0)
        if longest == 0:
            return [[] for _ in rows], [[] for _ in rows]
        pad = self.projection.teacher_eos
        ids = torch.tensor([r.teacher_ids + [pad] * (longest - len(r.teacher_ids)) for r in rows])
        device = next(self.teacher.parameters()).device
        logprobs = torch.log_softmax(self.teacher(ids.to(device)).float(), dim=-1)
        k = min(self.candidates, logprobs.shape[-1])
        values, indices = logprobs.topk(k, dim=-1)
        probs, indices = values.exp().cpu().tolist(), indices.cpu().tolist()
        return ([ix[: len(r.teacher_ids)] for ix, r in zip(indices, rows, strict=True)],
                [pr[: len(r.teacher_ids)] for pr, r in zip(probs, rows, strict=True)])


def projected_causal_lm(input_shape: tuple[int, ...], num_classes: int, *, tokenizer: str,
                        path: str = "smollm2", candidates: int = 64) -> ProjectedLM:
    """`arch: projected_lm`: the pretrained causal LM at `path` (its own tokenizer), projected
    onto `tokenizer`, which must be the data's (the student's) tokenizer."""
    from kdistill.errors import ConfigError
    from kdistill.models.hf import load_tokenizer, pretrained_causal_lm

    if isinstance(candidates, bool) or not isinstance(candidates, int) or not (
            1 <= candidates <= MAX_CANDIDATES):
        raise ConfigError("args.candidates", f"a number of teacher tokens in 1 .. "
                                             f"{MAX_CANDIDATES}, got {candidates!r}")
    teacher_tok = load_tokenizer(path, where="args.path")
    student_tok = load_tokenizer(tokenizer, where="args.tokenizer")
    for where, tok in (("args.path", teacher_tok), ("args.tokenizer", student_tok)):
        # Byte-exact alignment needs byte-level tokens (GPT-2 style BPE, `kdistill tokenizer`).
        if not _is_byte_level(tok):
            raise ConfigError(where, "the projection aligns the two tokenizations byte by "
                                     "byte and needs byte-level BPE tokenizers (GPT-2, Llama "
                                     "3, Qwen, SmolLM2, `kdistill tokenizer`); this one is not")
        if tok.eos_token_id is None:
            raise ConfigError(where, "the tokenizer has no EOS token (documents are joined "
                                     "by it)")
    if len(student_tok) != num_classes:
        raise ConfigError("args.tokenizer", f"has {len(student_tok)} tokens but the data's "
                                            f"tokenizer {num_classes}: name the data's tokenizer")
    teacher = pretrained_causal_lm(input_shape, len(teacher_tok), path=path)
    return ProjectedLM(teacher, Projection(teacher_tok, student_tok), candidates=candidates)
