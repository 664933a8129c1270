"""Encoder-decoder transformers behind the packed seq2seq interface (`kdistill.data.translation`).

Both models take a packed batch x (B, 2, L) int64 (row 0 source ids, row 1 decoder input,
PAD = 0 padding) and return teacher-forced logits (B, L, V): position t predicts the token
after decoder input t. For decoding (`kdistill.tasks.decode`) they also implement

    start(src (B, S)) -> state;  step(state, tokens (B,)) -> (logits (B, V), state);
    reorder(state, index (B',)) -> state       (beam search keeps rows `index`)

`seq2seq_transformer` is written here (pre-LN, learned positions, shared source/target
embedding tied to the output layer: one joint BPE vocabulary), with a key/value cache for
decoding and every attention's probabilities passed through an identity module, so forward
hooks (`kdistill.capture`) read them without editing the model: `encoder.<i>.attn.probs`
(B, H, S, S), `decoder.<i>.self_attn.probs` (B, H, T, T), `decoder.<i>.cross_attn.probs`
(B, H, T, S). `hf_seq2seq` wraps a Hugging Face encoder-decoder
(`AutoModelForSeq2SeqLM.from_pretrained(path)`) using the data's token ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError, MissingDependencyError
from kdistill.models.zoo import _positive_int, _probability

PAD = 0
State = dict[str, Tensor]


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values m, with explicit softmax.

    `key_mask` (B, Lk) bool, True = real token; `causal` masks keys after the query. The
    probabilities (B, H, Lq, Lk) pass through `probs` (identity) for hooks, then dropout."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.probs = nn.Identity()
        self.drop = nn.Dropout(dropout)

    def split(self, t: Tensor) -> Tensor:  # (B, L, D) -> (B, H, L, D / H)
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
               causal: bool) -> Tensor:
        q = self.split(self.q(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        if causal:
            lq, lk = scores.shape[-2:]  # queries are the last lq of lk positions
            future = torch.ones(lq, lk, dtype=torch.bool, device=x.device).triu(lk - lq + 1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = self.probs(scores.softmax(dim=-1))
        out = (self.drop(probs) @ v).transpose(1, 2)
        return self.out(out.reshape(x.shape[0], x.shape[1], -1))

    def forward(self, x: Tensor, m: Tensor, key_mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        return self.attend(x, self.split(self.k(m)), self.split(self.v(m)), key_mask, causal)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim),
                                 nn.Dropout(dropout))

    def forward(self, y: Tensor, memory: Tensor, src_mask: Tensor, tgt_mask: Tensor | None,
                cache: State | None = None, i: int = 0) -> Tensor:
        """Teacher-forced over all of y (cache None), or one new position with `cache`
        holding this layer's past self-attention keys/values and the memory's keys/values."""
        h = self.norm1(y)
        a = self.self_attn
        if cache is None:
            y = y + a(h, h, tgt_mask, causal=True)
        else:
            k, v = a.split(a.k(h)), a.split(a.v(h))
            if f"k{i}" in cache:
                k, v = torch.cat([cache[f"k{i}"], k], 2), torch.cat([cache[f"v{i}"], v], 2)
            cache[f"k{i}"], cache[f"v{i}"] = k, v
            y = y + a.attend(h, k, v, None, causal=False)  # past positions only: no mask
        h = self.norm2(y)
        c = self.cross_attn
        if cache is None:
            y = y + c(h, memory, src_mask)
        else:
            if f"mk{i}" not in cache:
                cache[f"mk{i}"], cache[f"mv{i}"] = c.split(c.k(memory)), c.split(c.v(memory))
            y = y + c.attend(h, cache[f"mk{i}"], cache[f"mv{i}"], src_mask, causal=False)
        return y + self.mlp(self.norm3(y))


class Seq2SeqTransformer(nn.Module):
    """Pre-LN encoder-decoder transformer: packed (B, 2, L) ids -> logits (B, L, V)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, d_model: int = 256,
                 heads: int = 4, enc_layers: int = 4, dec_layers: int = 4, ff: int = 1024,
                 dropout: float = 0.1, max_len: int | None = None) -> None:
        super().__init__()
        if len(input_shape) != 2 or input_shape[0] != 2:
            raise ConfigError("arch", f"'seq2seq_transformer' needs packed seq2seq rows (2, L) "
                                      f"(data: gettext_en_de ...); the data gives "
                                      f"{tuple(input_shape)}")
        dim, heads = _positive_int(d_model, "d_model"), _positive_int(heads, "heads")
        if dim % heads:
            raise ConfigError("args.heads", f"d_model {dim} is not divisible by heads {heads}")
        ff, dropout = _positive_int(ff, "ff"), _probability(dropout, "dropout")
        self.max_len = _positive_int(max_len or input_shape[1], "max_len")
        if self.max_len < input_shape[1]:
            raise ConfigError("args.max_len", f"{max_len} < the data's {input_shape[1]} tokens")
        self.vocab, self.dim = num_classes, dim
        self.embed = nn.Embedding(num_classes, dim, padding_idx=PAD)
        # Scaled by sqrt(dim) on the way in and tied to the output layer (Vaswani et al. 2017,
        # arXiv:1706.03762): an N(0, 1/dim) init keeps both the inputs and the logits O(1).
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.src_pos = nn.Parameter(torch.randn(1, self.max_len, dim) * 0.02)
        self.tgt_pos = nn.Parameter(torch.randn(1, self.max_len, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ff, dropout)
                                     for _ in range(_positive_int(enc_layers, "enc_layers")))
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, ff, dropout)
                                     for _ in range(_positive_int(dec_layers, "dec_layers")))
        self.enc_norm, self.dec_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def _logits(self, y: Tensor) -> Tensor:  # tied output layer: the embedding's transpose
        return self.dec_norm(y) @ self.embed.weight.T

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D) and its key mask (B, S)."""
        mask = src != PAD
        x = self.drop(self.embed(src) * math.sqrt(self.dim) + self.src_pos[:, : src.shape[1]])
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def forward(self, x: Tensor) -> Tensor:
        memory, src_mask = self.encode(x[:, 0])
        tgt = x[:, 1]
        y = self.drop(self.embed(tgt) * math.sqrt(self.dim) + self.tgt_pos[:, : tgt.shape[1]])
        tgt_mask = tgt != PAD
        tgt_mask[:, 0] = True  # a row of only padding still has one key: no all -inf row
        for layer in self.decoder:
            y = layer(y, memory, src_mask, tgt_mask)
        return self._logits(y)

    def start(self, src: Tensor) -> State:
        memory, mask = self.encode(src)
        return {"memory": memory, "src_mask": mask,
                "pos": torch.zeros(len(src), dtype=torch.int64)}

    def step(self, state: State, tokens: Tensor) -> tuple[Tensor, State]:
        pos = int(state["pos"][0])
        if pos >= self.max_len:
            raise ValueError(f"decoding past max_len={self.max_len} positions")
        y = self.embed(tokens[:, None]) * math.sqrt(self.dim) + self.tgt_pos[:, pos : pos + 1]
        for i, layer in enumerate(self.decoder):
            y = layer(y, state["memory"], state["src_mask"], None, cache=state, i=i)
        state["pos"] = state["pos"] + 1
        return self._logits(y)[:, 0], state

    @staticmethod
    def reorder(state: State, index: Tensor) -> State:
        return {k: v.index_select(0, index) for k, v in state.items()}


def seq2seq_transformer(input_shape: tuple[int, ...], num_classes: int, *, d_model: int = 256,
                        heads: int = 4, enc_layers: int = 4, dec_layers: int = 4,
                        ff: int = 1024, dropout: float = 0.1,
                        max_len: int | None = None) -> Seq2SeqTransformer:
    """The registry's `seq2seq_transformer`; see `Seq2SeqTransformer`."""
    return Seq2SeqTransformer(input_shape, num_classes, d_model=d_model, heads=heads,
                              enc_layers=enc_layers, dec_layers=dec_layers, ff=ff,
                              dropout=dropout, max_len=max_len)


class HFSeq2Seq(nn.Module):
    """A Hugging Face encoder-decoder behind the packed interface. Its embedding must cover the
    data's vocabulary (a model trained on, or initialised for, the data's tokenizer); the
    decoder input is given explicitly (the data's BOS first), so the model's own
    `decoder_start_token_id` is not used. Decoding recomputes the decoder over the prefix
    each step (no cache: simple, and correct for any architecture)."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.hf, self.vocab = model, vocab  # logits past `vocab` (padded tables) are cut off

    def forward(self, x: Tensor) -> Tensor:
        src, tgt = x[:, 0], x[:, 1]
        out = self.hf(input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt,
                      decoder_attention_mask=(tgt != PAD).long(), use_cache=False)
        return out.logits[..., : self.vocab]

    def start(self, src: Tensor) -> State:
        mask = (src != PAD).long()
        memory = self.hf.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
        return {"memory": memory, "src_mask": mask, "prefix": src.new_zeros(len(src), 0)}

    def step(self, state: State, tokens: Tensor) -> tuple[Tensor, State]:
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)
        out = self.hf(encoder_outputs=(state["memory"],), attention_mask=state["src_mask"],
                      decoder_input_ids=prefix, use_cache=False)
        return out.logits[:, -1, : self.vocab], {**state, "prefix": prefix}

    @staticmethod
    def reorder(state: State, index: Tensor) -> State:
        return {k: v.index_select(0, index) for k, v in state.items()}


def hf_seq2seq(input_shape: tuple[int, ...], num_classes: int, *, path: str) -> HFSeq2Seq:
    """`AutoModelForSeq2SeqLM.from_pretrained(path)` (a local directory; nothing is fetched)."""
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ConfigError("arch", f"'hf_seq2seq' needs packed seq2seq rows (2, L); the data "
                                  f"gives {tuple(input_shape)}")
    try:
        from transformers import AutoModelForSeq2SeqLM
    except ImportError:
        raise MissingDependencyError("args.path", "transformers",
                                     "pip install 'kdistill[llm]'") from None
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True,
                                                      trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("args.path", f"cannot load an encoder-decoder from {path!r}: "
                                       f"{first}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < num_classes:
        raise ConfigError("args.path", f"the model's vocabulary has {rows} entries but the "
                                       f"data's tokenizer {num_classes}: it must use the data's "
                                       f"token ids")
    return HFSeq2Seq(model, num_classes)
