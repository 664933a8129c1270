"""Text classifiers over padded token ids (N, T) int64: a TextCNN and BERT-style encoders.

Every model here builds its own attention mask as `ids != pad_id`, so a batch is just the
id tensor the data gives (`kdistill.data.fortune_classes`), and padding never changes a
prediction (the tests check that a text padded to 32 or to 64 tokens gets the same logits).

- `textcnn` (Kim 2014, arXiv:1408.5882): embeddings, 1-D convolutions of widths 3/4/5, ReLU,
  max-pool over the windows that start on a real token, dropout, linear.
- `hf_encoder_classifier`: a pretrained transformers encoder (`path: minilm` is
  all-MiniLM-L6-v2), mean-pooled over real tokens (or its [CLS] token) + a linear head.
- `hf_encoder_student`: the same architecture with fewer layers, initialised from a subset
  of the pretrained layers (`layer_map`), DistilBERT / TinyBERT-style (arXiv:1910.01108,
  1909.10351).

Layers a distillation method can read (names for `capture`, as the `attn` and `fitnet`
methods take them), with `bert` the transformers model inside the wrapper:
- `bert.encoder.layer.<i>.attention.self[1]`: layer i's attention probabilities
  (B, heads, T, T). The encoders run with eager attention, the implementation that returns
  them (SDPA returns none), and the student's attention dropout is 0 so that what is
  captured in training is a distribution.
- `tokens.<k>`: the hidden states after layer k, `tokens.0` the embedding output (TinyBERT's
  numbering), laid out channels-first as (B, hidden, T). The layout is the point: the
  `fitnet` method's adapter for a (C, L) feature is a 1x1 convolution over C, which on
  (hidden, T) is exactly TinyBERT's per-token linear map W_h; on (T, hidden) it would mix
  positions. `tokens.<k>` are identity modules; they compute nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models.hf import MINILM, _transformers, load_tokenizer, resolve_source
from kdistill.models.zoo import _positive_int, _positive_ints, _probability


def _ids(x: Tensor, arch: str) -> Tensor:
    if x.is_floating_point():
        raise TypeError(f"'{arch}' takes int64 token ids (N, T), not float inputs")
    return x


def _seq_len(input_shape: Sequence[int], arch: str) -> int:
    if len(tuple(input_shape)) != 1:
        raise ConfigError("arch", f"'{arch}' takes token ids (N, T); the data gives inputs of "
                                  f"shape {tuple(input_shape)} (use a text task, e.g. "
                                  f"data.name: fortunes5)")
    return int(input_shape[0])


class TextCNN(nn.Module):
    """Embeddings -> Conv1d per width -> ReLU -> masked max over time -> dropout -> linear.

    A window is pooled only if it starts on a real token: windows that start in the padding
    would see only pad embeddings, and their (constant) response must not win the max. Each
    sequence is zero-extended by w - 1 columns so that the last real tokens start windows too.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, pad_id: int, embed_dim: int,
                 widths: Sequence[int], channels: int, dropout: float,
                 project_dim: int | None = None) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # A per-token linear map to fewer dimensions: the convolutions' cost scales with their
        # input width, so wide pretrained embeddings need not make every window wide.
        self.project = (nn.Linear(embed_dim, project_dim, bias=False)
                        if project_dim is not None else None)
        conv_in = embed_dim if project_dim is None else project_dim
        self.convs = nn.ModuleList(nn.Conv1d(conv_in, channels, w) for w in widths)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(channels * len(widths), num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        ids = _ids(ids, "textcnn")
        mask = ids != self.pad_id
        # Zero the pad embeddings explicitly: padding_idx keeps them zero only at init.
        x = self.embed(ids) * mask.unsqueeze(-1)  # (B, T, E)
        if self.project is not None:
            x = self.project(x)  # no bias: pad positions stay exactly zero
        x = x.transpose(1, 2)  # (B, E, T)
        starts = mask.unsqueeze(1)  # (B, 1, T): one window starts on every position
        pooled = []
        for conv in self.convs:
            # w - 1 zero columns at the end: every real token, the last ones included, starts
            # a window, whether the batch holds padding after it or not (so a text gets the
            # same logits at any padded length).
            h = torch.relu(conv(nn.functional.pad(x, (0, conv.kernel_size[0] - 1))))  # (B,C,T)
            pooled.append(h.masked_fill(~starts, float("-inf")).amax(dim=2))
        return self.head(self.drop(torch.cat(pooled, dim=1)))


def textcnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    tokenizer: str = MINILM,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    embed_dim: int = 128,
    widths: Sequence[int] = (3, 4, 5),
    channels: int = 100,
    dropout: float = 0.5,
    init_embeddings: str | None = None,
    project_dim: int | None = None,
) -> TextCNN:
    """A TextCNN (`arch: textcnn`) over the vocabulary of `tokenizer` (the data's tokenizer),
    or of `vocab_size` ids with pad id `pad_id` when both are given (no tokenizer loaded).
    `init_embeddings: minilm` (or an encoder directory) starts from that encoder's word
    embeddings (Kim 2014's "static/non-static" pretrained vectors); embed_dim must match.
    `project_dim: k` maps each token's embedding to k dimensions (a linear map without bias)
    before the convolutions; with `init_embeddings` it starts as the table's top k principal
    directions, so the student starts from the most of the pretrained vectors k numbers keep."""
    _seq_len(input_shape, "textcnn")
    if vocab_size is None or pad_id is None:
        tok = load_tokenizer(tokenizer, where="args.tokenizer")
        vocab_size = len(tok) if vocab_size is None else vocab_size
        pad_id = tok.pad_token_id if pad_id is None else pad_id
    vocab_size = _positive_int(vocab_size, "vocab_size")
    if not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size:
        raise ConfigError("args.pad_id", f"expected an id in [0, {vocab_size}), got {pad_id!r}")
    embed_dim = _positive_int(embed_dim, "embed_dim")
    if project_dim is not None and _positive_int(project_dim, "project_dim") > embed_dim:
        raise ConfigError("args.project_dim", f"expected at most embed_dim ({embed_dim}), "
                                              f"got {project_dim}")
    model = TextCNN(vocab_size, num_classes, pad_id=pad_id, embed_dim=embed_dim,
                    widths=_positive_ints(widths, "widths"),
                    channels=_positive_int(channels, "channels"),
                    dropout=_probability(dropout, "dropout"),
                    project_dim=project_dim)
    if init_embeddings is not None:
        _, state = _pretrained_encoder(init_embeddings)
        table = state.get("embeddings.word_embeddings.weight")
        if table is None or tuple(table.shape) != tuple(model.embed.weight.shape):
            got = None if table is None else tuple(table.shape)
            raise ConfigError("args.init_embeddings", f"'{init_embeddings}' has word embeddings "
                                                      f"{got}; this TextCNN needs "
                                                      f"{tuple(model.embed.weight.shape)} (set "
                                                      f"embed_dim and the tokenizer to match)")
        with torch.no_grad():
            model.embed.weight.copy_(table)
            if model.project is not None:
                model.project.weight.copy_(_principal_directions(table, pad_id,
                                                                 model.project.out_features))
    return model


def _principal_directions(table: Tensor, pad_id: int, k: int) -> Tensor:
    """The top k principal directions (k, E) of an embedding table's rows, pad row excluded.

    The rows are centred for the directions only: the map stays linear (no bias), so a pad
    embedding of zero still projects to zero."""
    rows = torch.cat([table[:pad_id], table[pad_id + 1:]]).double()
    if k > min(rows.shape):
        raise ConfigError("args.project_dim", f"expected at most {min(rows.shape)} (the "
                                              f"embedding table has {len(rows)} rows besides "
                                              f"the pad row), got {k}")
    _, _, vh = torch.linalg.svd(rows - rows.mean(dim=0), full_matrices=False)
    return vh[:k].to(table.dtype)


class EncoderClassifier(nn.Module):
    """A transformers encoder + pooling + linear head: ids (B, T) -> logits (B, classes)."""

    def __init__(self, bert: nn.Module, num_classes: int, *, pad_id: int, pooling: str,
                 dropout: float) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id, self.pooling = pad_id, pooling
        config = bert.config
        self.tokens = nn.ModuleList(nn.Identity() for _ in range(config.num_hidden_layers + 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        ids = _ids(ids, "hf_encoder")
        mask = ids != self.pad_id
        out = self.bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        for tap, h in zip(self.tokens, out.hidden_states, strict=True):
            tap(h.transpose(1, 2))  # only for hooks: (B, hidden, T), see the module docstring
        h = out.last_hidden_state
        # [CLS], or the mean over real tokens as sentence-transformers pools all-MiniLM-L6-v2
        pooled = h[:, 0] if self.pooling == "cls" else mean_pool(h, mask)
        return self.head(self.drop(pooled))


@functools.lru_cache(maxsize=2)
def _pretrained_encoder(path: str) -> tuple[Any, dict[str, Tensor]]:
    """(config, state dict) of a pretrained encoder, loaded once per process (the teacher and
    a student initialised from it both need them); callers build their own modules."""
    directory, gguf = resolve_source(path, where="args.path")
    if gguf is not None:
        raise ConfigError("args.path", f"'{path}' is a GGUF causal LM, not an encoder")
    tf = _transformers()
    model = tf.AutoModel.from_pretrained(directory, local_files_only=True,
                                         trust_remote_code=False, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    return model.config, state


def _encoder(config: Any, state: dict[str, Tensor] | None) -> nn.Module:
    tf = _transformers()
    model = tf.AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # [CLS] tanh pooler: unused (we pool ourselves), not counted
    if state is not None:
        model.load_state_dict(state)  # copies: the module never shares the cached tensors
    return model


def _check_fits(config: Any, seq_len: int, pooling: str) -> None:
    if pooling not in ("mean", "cls"):
        raise ConfigError("args.pooling", f"expected 'mean' or 'cls', got {pooling!r}")
    if seq_len > config.max_position_embeddings:
        raise ConfigError("arch", f"data.seq_len {seq_len} is longer than the encoder's "
                                  f"{config.max_position_embeddings} positions")


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """The mean of hidden states h (B, T, H) over real tokens, mask (B, T) bool -> (B, H):
    sentence-transformers' pooling for all-MiniLM-L6-v2."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _layer_map(layers: int, layer_map: list[int] | None, n_src: int) -> list[int]:
    """The source layer of each student layer: `layer_map`, or TinyBERT's uniform map,
    student layer m <- source layer (m + 1)·N/M − 1 ([2, 5] for 2 of 6)."""
    chosen = layer_map if layer_map is not None else [
        (m + 1) * n_src // layers - 1 for m in range(layers)]
    if (not isinstance(chosen, list) or len(chosen) != layers
            or not all(isinstance(i, int) and 0 <= i < n_src for i in chosen)):
        raise ConfigError("args.layer_map", f"needs {layers} layer indices in [0, {n_src}) "
                                            f"(one per student layer); got {chosen!r}")
    return chosen


def _copied_layers(state: dict[str, Tensor], chosen: list[int]) -> dict[str, Tensor]:
    """A student state dict: every non-layer tensor of `state` (embeddings), and student
    layer m = source layer chosen[m]."""
    own: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("encoder.layer."):
            idx, rest = key.removeprefix("encoder.layer.").split(".", 1)
            for m in (m for m, src in enumerate(chosen) if src == int(idx)):
                own[f"encoder.layer.{m}.{rest}"] = value
        else:
            own[key] = value
    return own


def hf_encoder_classifier(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    path: str = MINILM,
    pooling: str = "mean",
    dropout: float = 0.1,
) -> EncoderClassifier:
    """A pretrained encoder (`arch: hf_encoder_classifier`) with a new linear head."""
    seq_len = _seq_len(input_shape, "hf_encoder_classifier")
    config, state = _pretrained_encoder(path)
    _check_fits(config, seq_len, pooling)
    return EncoderClassifier(_encoder(config, state), num_classes, pad_id=config.pad_token_id,
                             pooling=pooling, dropout=_probability(dropout, "dropout"))


def hf_encoder_student(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    init_from: str = MINILM,
    layers: int = 2,
    layer_map: list[int] | None = None,
    random_init: bool = False,
    pooling: str = "mean",
    dropout: float = 0.1,
) -> EncoderClassifier:
    """A `layers`-deep encoder of `init_from`'s width (`arch: hf_encoder_student`).

    It copies `init_from`'s embeddings and its layers listed in `layer_map` (0-based; default
    TinyBERT's uniform map, student layer m <- teacher layer (m + 1)·N/M − 1: [2, 5] for 2 of
    6 layers). `random_init: true` keeps the architecture with random weights (to measure
    what the copied layers are worth). Attention dropout is 0: the `attn` method reads the
    student's attention probabilities in training, and dropout would break the rows' sums.
    """
    seq_len = _seq_len(input_shape, "hf_encoder_student")
    source_config, state = _pretrained_encoder(init_from)
    _check_fits(source_config, seq_len, pooling)
    layers = _positive_int(layers, "layers")
    chosen = _layer_map(layers, layer_map, source_config.num_hidden_layers)
    config = source_config.__class__(**{**source_config.to_dict(), "num_hidden_layers": layers,
                                        "attention_probs_dropout_prob": 0.0})
    own = None if random_init else _copied_layers(state, chosen)
    return EncoderClassifier(_encoder(config, own), num_classes, pad_id=config.pad_token_id,
                             pooling=pooling, dropout=_probability(dropout, "dropout"))
