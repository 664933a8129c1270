"""The few types every layer shares: a batch, the ignored-label value, a data set's splits.

They sit at the bottom of the package (they import only torch) so that methods, data sources,
tasks, the engine and the teachers can name them without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

Batch = dict[str, Tensor]
"""A batch: `index` (B,) sample ids into the training set, `input` (B, ...), `label` (B,) or
(B, T) for token tasks; methods may add keys in `prepare_batch`."""

IGNORE_INDEX = -100
"""A label position that is not trained on or scored (padding, prompts; torch's default)."""

Echo = Callable[[str], None]
"""Receives one human-readable progress line."""


@dataclass(frozen=True)
class TokenRoles:
    """Which token ids of a padded text input (N, T) a transfer set's views may touch: `pad`
    fills the tail, `mask` replaces masked tokens ([MASK], else the unknown token), `special`
    (the frame: [CLS], [SEP], BOS, EOS, padding) are never masked or cut; `vocab` is the
    tokenizer's digest (inputs of two sources mix only under one tokenizer)."""

    pad: int
    mask: int
    special: tuple[int, ...]
    vocab: str = ""


@dataclass(frozen=True, eq=False)  # tensors: compare fields, not splits
class DataSplits:
    """A data set split into train / validation / test tensors, ready for a DataLoader.

    Inputs are float32 and already normalised, labels int64. `val_*` is taken out of the
    training set. `fingerprint` is the sha256 (hex) of the training split's bytes and the
    split parameters: it identifies the exact data a teacher cache was built on.

    `task: "causal_lm"` (text corpora): inputs are (N, T) int64 token ids, labels the same
    (N, T) ids with -100 at positions that are not trained on (padding); the loss shifts them
    (position t predicts label t + 1). `num_classes` is then the vocabulary size.

    `task: "seq2seq"` (translation, `kdistill.data.translation`): inputs are (N, 2, L) int64,
    row 0 the source ids + EOS, row 1 the decoder input BOS y1 .. yn EOS, both PAD(0)-padded;
    labels (N, L) are row 1 with -100 at BOS and padding, shifted like causal LMs (decoder
    position t predicts label t + 1). `tokenizer_json` is the tokenizer that made the ids (to
    decode outputs) and `references` the test split's raw target texts (for BLEU / chrF).

    The user's files (`kdistill.data` sources such as `image_folder`, `text_classification`)
    may add: `class_names`, the name of each class id (for reports and export; also saved as
    `labels.json` in the run directory); `notes`, lines the run should echo (exact duplicates
    across splits, skipped files, converted images); `augment`, a random augmentation of
    training batches, `f(x_batch, generator) -> x_batch`, that the training loader applies
    (inputs are then not deterministic: no teacher cache). An image folder's `*_x` are not
    tensors but `kdistill.data.image_folder.ImageFiles`, decoded on indexing.

    Padded text inputs for classification carry `tokens` (`TokenRoles`: what a transfer set's
    masking and n-gram views may change). A run with `transfer_set.unlabelled` adds
    `unlabelled_x`, the other source's inputs (none of them a validation or test input), which
    only the teacher labels.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    task: str = "classification"  # or "causal_lm", "seq2seq"
    tokenizer_json: str | None = None
    references: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    augment: Callable[[Tensor, Any], Tensor] | None = None
    tokens: TokenRoles | None = None
    unlabelled_x: Tensor | None = None
