"""Unlabelled sentences for general (task-agnostic) distillation: `data.name: general_text`.

The corpus (`general_documents`) is real text found on every machine of the project:
- every entry of the Debian `fortunes` package, all categories (the rules of `text.py`:
  entries of at least 20 characters, no offensive `off/` set, exact repeats once);
- the first paragraph of each Python standard-library docstring (`text.stdlib_docs`), its
  whitespace collapsed to one line, kept from 40 characters on: short prose about code.
20,140 texts in all on CPython 3.11 (14,942 fortunes); exact duplicates are kept once.

No leakage into the evaluation: the held-out texts (validation and test split) of the labelled
task that evaluates the encoder (`transfer.task`, e.g. fortunes5, split as
`fortune_classes.split_texts` splits it for that task) are removed before anything else, so
the student never sees a probe or fine-tuning test text, not even unlabelled. Its training
texts may stay: they are training data of that task anyway.

Split: one seeded permutation of the remaining texts; the first `test_size` is the test split
(held-out cosine agreement in the report), the next `val_size` the validation split (the
agreement logged during training), the rest the training split, cut to `train_limit`. Texts
are tokenised like the fortune tasks ([CLS] text [SEP], truncated and padded to `seq_len`).
There are no labels: `train_y` is -1 everywhere (a loss that wrongly reads labels fails at
once), and the pipeline replaces `val_y` / `test_y` by the teacher's embeddings of those
texts, which is what a student embedding is scored against (`task: "embedding"`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Any

import torch

from kdistill.data import text as text_data
from kdistill.data.datasets import DataSplits
from kdistill.data.fortune_classes import _count, split_texts, tokenize_padded
from kdistill.errors import ConfigError

GENERAL_TEXT = "general_text"
EMBEDDING = "embedding"  # DataSplits.task of unlabelled text for sentence encoders
MIN_PARAGRAPH_CHARS = 40


def general_documents(where: str = "data.name") -> list[str]:
    """The unlabelled corpus in a fixed order: fortunes first, then docstring paragraphs."""
    paragraphs = (" ".join(doc.split("\n\n")[0].split())
                  for doc in text_data.stdlib_docs(where))
    kept = [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS]
    return list(dict.fromkeys([*text_data.fortunes(where), *kept]))


def held_out_texts(task: str, *, val_size: float, test_size: float, split_seed: int,
                   where: str = "transfer") -> set[str]:
    """The validation and test texts of fortune task `task` under this split."""
    _, texts, _, (_, val, test) = split_texts(task, val_size=val_size, test_size=test_size,
                                              split_seed=split_seed, where=where)
    return {texts[i] for i in [*val.tolist(), *test.tolist()]}


def general_splits(
    tokenizer: Any,
    *,
    seq_len: int,
    val_size: float,
    test_size: float,
    split_seed: int,
    train_limit: int | None = None,
    exclude: Collection[str] = (),
    where: str = "data",
) -> DataSplits:
    """Tokenised train / validation / test splits of the unlabelled corpus.

    Args:
        tokenizer: the teacher's Hugging Face tokenizer (needs a pad token).
        seq_len: tokens per text (T), [CLS] and [SEP] included.
        val_size, test_size: a fraction (< 1) of the texts left after `exclude`, or a count.
        split_seed: seeds the one permutation that fixes the three splits.
        train_limit: keep only the first N training texts (the permutation's order).
        exclude: texts removed before splitting (the evaluation task's held-out texts).
        where: the recipe section naming fields in errors.

    Returns:
        `DataSplits` with task "embedding", inputs (N, seq_len) int64, `num_classes` 0 and
        labels -1 (there are none).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 3:
        raise ConfigError(f"{where}.seq_len", f"needs room for [CLS], a token and [SEP] (>= 3), "
                                              f"got {seq_len!r}")
    removed = set(exclude)
    docs = [d for d in general_documents(where=f"{where}.name") if d not in removed]
    n = len(docs)
    n_test = _count(test_size, n, f"{where}.test_size")
    n_val = _count(val_size, n, f"{where}.val_size")
    if n_test + n_val >= n:
        raise ConfigError(f"{where}.val_size", f"validation ({n_val}) + test ({n_test}) leave no "
                                               f"training texts of the {n} unlabelled ones")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
    test_idx, val_idx = order[:n_test], order[n_test:n_test + n_val]
    train_idx = order[n_test + n_val:][:train_limit]

    def ids(idx: torch.Tensor) -> torch.Tensor:
        return tokenize_padded([docs[i] for i in idx.tolist()], tokenizer, seq_len)

    train_x, val_x, test_x = ids(train_idx), ids(val_idx), ids(test_idx)
    params = {"seq_len": seq_len, "val": n_val, "test": n_test, "split_seed": split_seed,
              "train_limit": train_limit, "excluded": len(removed),
              "vocab": text_data._tokenizer_digest(tokenizer), "pad": tokenizer.pad_token_id}
    h = hashlib.sha256(f"{GENERAL_TEXT}|{sorted(params.items())}".encode())
    h.update(memoryview(train_x.numpy()).cast("B"))

    def no_labels(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x),), -1, dtype=torch.int64)

    return DataSplits(
        name=GENERAL_TEXT, train_x=train_x, train_y=no_labels(train_x), val_x=val_x,
        val_y=no_labels(val_x), test_x=test_x, test_y=no_labels(test_x), num_classes=0,
        input_shape=(seq_len,), fingerprint=h.hexdigest(), task=EMBEDDING,
    )
