"""Sentence encoders for general (task-agnostic) distillation: token ids (N, T) -> (N, D).

The output of these models is an embedding, not logits: data of task "embedding"
(`kdistill.data.general_text`) has no classes, and the pipeline treats the (B, D) output the
way it treats logits elsewhere (cached once for the teacher, compared by the method, scored
against the teacher on held-out text).

- `hf_sentence_encoder`: a pretrained transformers encoder as loaded (`path: minilm` is
  all-MiniLM-L6-v2), mean-pooled over real tokens, exactly as sentence-transformers pools it.
  `normalize: true` adds the L2 normalisation of the packaged sentence-transformers pipeline;
  the default keeps the raw mean (the MSE term then also teaches the embedding's norm).
- `hf_sentence_student`: a smaller encoder of the same family: fewer layers copied from a
  subset of `init_from`'s (DistilBERT / TinyBERT-style, arXiv:1910.01108, 1909.10351), or
  random weights (`random_init: true`), optionally narrower (`hidden`, `heads`,
  `intermediate`; a narrower student cannot copy layers, so it starts from scratch).

Both build their attention mask as `ids != pad_id` (padding never changes an embedding) and
expose the same capture taps as `kdistill.models.text`: `tokens.<k>`, the hidden states after
layer k (`tokens.0` the embedding output), channels-first (B, hidden, T).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models.hf import MINILM
from kdistill.models.text import (
    _check_fits,
    _copied_layers,
    _encoder,
    _ids,
    _layer_map,
    _pretrained_encoder,
    _seq_len,
    mean_pool,
)
from kdistill.models.zoo import _positive_int


class SentenceEncoder(nn.Module):
    """A transformers encoder + mean pooling (+ optional L2 norm): ids (B, T) -> (B, D)."""

    def __init__(self, bert: nn.Module, *, pad_id: int, normalize: bool) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id, self.normalize = pad_id, normalize
        self.width = int(bert.config.hidden_size)
        self.tokens = nn.ModuleList(nn.Identity() for _ in range(bert.config.num_hidden_layers + 1))

    def forward(self, ids: Tensor) -> Tensor:
        ids = _ids(ids, "hf_sentence")
        mask = ids != self.pad_id
        out = self.bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        for tap, h in zip(self.tokens, out.hidden_states, strict=True):
            tap(h.transpose(1, 2))  # only for hooks: (B, hidden, T), as in models/text.py
        pooled = mean_pool(out.last_hidden_state, mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"args.{name}", f"expected true or false, got {value!r}")
    return value


def hf_sentence_encoder(input_shape: tuple[int, ...], num_classes: int = 0, *,
                        path: str = MINILM, normalize: bool = False) -> SentenceEncoder:
    """The pretrained encoder `path` as a sentence encoder (`arch: hf_sentence_encoder`).
    `num_classes` is ignored: the output width is the encoder's hidden size."""
    seq_len = _seq_len(input_shape, "hf_sentence_encoder")
    config, state = _pretrained_encoder(path)
    _check_fits(config, seq_len, "mean")
    return SentenceEncoder(_encoder(config, state), pad_id=config.pad_token_id,
                           normalize=_flag(normalize, "normalize"))


def hf_sentence_student(
    input_shape: tuple[int, ...],
    num_classes: int = 0,
    *,
    init_from: str = MINILM,
    layers: int = 2,
    layer_map: list[int] | None = None,
    random_init: bool = False,
    hidden: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
    normalize: bool = False,
) -> SentenceEncoder:
    """A `layers`-deep sentence encoder of `init_from`'s family (`arch: hf_sentence_student`).

    At `init_from`'s width it copies the embeddings and the layers of `layer_map` (default
    TinyBERT's uniform map: [2, 5] for 2 of 6), unless `random_init`. `hidden` (with `heads`
    dividing it and `intermediate`, default 4·hidden) makes it narrower, from scratch. The
    vocabulary, positions and pad id stay `init_from`'s: the student reads the same tokens.
    """
    seq_len = _seq_len(input_shape, "hf_sentence_student")
    source, state = _pretrained_encoder(init_from)
    _check_fits(source, seq_len, "mean")
    layers = _positive_int(layers, "layers")
    random_init = _flag(random_init, "random_init")
    width = source.hidden_size if hidden is None else _positive_int(hidden, "hidden")
    n_heads = (source.num_attention_heads if heads is None and width == source.hidden_size
               else _positive_int(heads if heads is not None else max(1, width // 64), "heads"))
    if width % n_heads:
        raise ConfigError("args.heads", f"{n_heads} heads do not divide hidden={width}")
    narrower = width != source.hidden_size
    if narrower and not random_init:
        raise ConfigError("args.hidden", f"layers can only be copied at init_from's width "
                                         f"({source.hidden_size}); set random_init: true to "
                                         f"train a {width}-wide student from scratch")
    ffn = (source.intermediate_size if intermediate is None and not narrower
           else _positive_int(intermediate if intermediate is not None else 4 * width,
                              "intermediate"))
    chosen = _layer_map(layers, layer_map, source.num_hidden_layers)
    # Attention dropout 0, as in hf_encoder_student: captured attention rows stay distributions.
    config = source.__class__(**{**source.to_dict(), "num_hidden_layers": layers,
                                 "hidden_size": width, "num_attention_heads": n_heads,
                                 "intermediate_size": ffn, "attention_probs_dropout_prob": 0.0})
    own = None if random_init else _copied_layers(state, chosen)
    return SentenceEncoder(_encoder(config, own), pad_id=config.pad_token_id,
                           normalize=_flag(normalize, "normalize"))
