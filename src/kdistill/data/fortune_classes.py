"""Text classification on the Debian `fortunes` categories: token ids (N, T) -> category.

Tasks (`FORTUNE_TASKS`, the recipe's `data.name`):
- "fortunes5": computers, people, science, politics, work (about 4.2 k texts); DATA.md gives
  TF-IDF + logistic regression about 65 % and MiniLM embeddings + logistic regression about
  75 % on this subset.
- "fortunes43": every category file of the package (about 15 k texts, 43 classes).

The category is the file name (`/usr/share/games/fortunes/<category>`; entries separated by
lines holding `%`), read by the same rules as the LM corpus in `text.py`: entries under 20
characters are dropped, the offensive `off/` set is never read. An exact text that appears in
two categories is dropped from both (its label would be a coin toss, and one copy would leak
into the test split); a repeat inside one category is kept once.

Split (`fortune_splits`): one seeded stratified permutation (`stratified_order`) of the labels;
the first `test_size` of it is the test split, the next `val_size` the validation split, the
rest the training split, each with every class in proportion. Texts are tokenised with the
teacher's tokenizer ([CLS] text [SEP], truncated to `seq_len`) and padded to `seq_len` with
its pad id, so every split is one int64 tensor (N, seq_len); models build their attention
mask as `ids != pad_id`. A fixed length (rather than padding per batch) is what the teacher
cache needs: cached hidden states and attention maps have one shape for every sample.
"""

from __future__ import annotations

import functools
import hashlib
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.data import text as text_data
from kdistill.data.datasets import DataSplits, stratified_order
from kdistill.errors import ConfigError, MissingDependencyError
from kdistill.types import TokenRoles

FIVE_CATEGORIES = ("computers", "people", "science", "politics", "work")
FORTUNE_TASKS: dict[str, tuple[str, ...] | None] = {
    "fortunes5": FIVE_CATEGORIES,
    "fortunes43": None,  # every category file
}
TOKENIZE_BATCH = 512


def _entries(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    found, entry = [], []
    for line in [*text.splitlines(), "%"]:
        if line.rstrip() == "%":
            joined = "\n".join(entry).strip()
            if len(joined) >= text_data.MIN_FORTUNE_CHARS:
                found.append(joined)
            entry = []
        else:
            entry.append(line)
    return found


@functools.cache
def _categories(directory: Path) -> dict[str, tuple[str, ...]]:
    """Category name -> its unique texts, texts found in two categories removed; sorted."""
    raw: dict[str, tuple[str, ...]] = {}
    for path in sorted(directory.iterdir()):
        # Category files have no extension (".dat" are indexes, ".u8" links).
        if path.is_file() and not path.suffix:
            raw[path.name] = tuple(dict.fromkeys(_entries(path)))
    owners: dict[str, int] = {}
    for texts in raw.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1
    return {name: tuple(t for t in texts if owners[t] == 1) for name, texts in raw.items()}


def fortune_categories(task: str, *, where: str = "data.name") -> dict[str, tuple[str, ...]]:
    """The categories of `task` (a key of `FORTUNE_TASKS`) and their texts, in class order."""
    directory = text_data.FORTUNES_DIR  # read at call time, so a test can point it elsewhere
    if not directory.is_dir() or not _categories(directory):
        raise MissingDependencyError(
            where, f"the fortune categories (Debian package fortunes, {directory})",
            "apt-get install fortunes")
    found = _categories(directory)
    wanted = FORTUNE_TASKS[task]
    if wanted is None:
        return dict(found)
    missing = [c for c in wanted if not found.get(c)]
    if missing:
        raise ConfigError(where, f"'{task}' needs the fortune categories {', '.join(missing)}, "
                                 f"not found in {directory} (apt-get install fortunes)")
    return {c: found[c] for c in wanted}


def token_roles(tokenizer: Any) -> TokenRoles:
    """The ids a transfer set's text views need: padding, the mask token ([MASK], else the
    unknown token; neither: the pad id, which the models read as absent), the special tokens
    that frame a text (never masked or cut) and the vocabulary's digest."""
    mask = next((i for i in (tokenizer.mask_token_id, tokenizer.unk_token_id) if i is not None),
                tokenizer.pad_token_id)
    # [UNK] and [MASK] stand for words: content, not frame (an n-gram may drop them)
    words = {tokenizer.unk_token_id, tokenizer.mask_token_id}
    frame = {int(i) for i in tokenizer.all_special_ids if i not in words}
    return TokenRoles(pad=int(tokenizer.pad_token_id), mask=int(mask),
                      special=tuple(sorted(frame | {int(tokenizer.pad_token_id)})),
                      vocab=text_data._tokenizer_digest(tokenizer))


def tokenize_padded(texts: list[str], tokenizer: Any, seq_len: int, *,
                    where: str = "data.tokenizer") -> Tensor:
    """(N, seq_len) int64 ids: [CLS] text [SEP], truncated, right-padded with the pad id."""
    if tokenizer.pad_token_id is None:
        raise ConfigError(where, "the tokenizer has no pad token to pad texts with")
    rows: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        enc = tokenizer(texts[start:start + TOKENIZE_BATCH], truncation=True,
                        max_length=seq_len, padding="max_length")
        rows += enc["input_ids"]
    if not rows:
        return torch.zeros(0, seq_len, dtype=torch.int64)
    return torch.tensor(rows, dtype=torch.int64)


def _count(size: float, n: int, field: str) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Real) or size <= 0:
        raise ConfigError(field, f"expected a count or a fraction in (0, 1), got {size!r}")
    if size < 1:
        return max(1, round(float(size) * n))
    if not float(size).is_integer():
        raise ConfigError(field, f"a count must be a whole number, got {size}")
    return int(size)


def split_texts(task: str, *, val_size: float, test_size: float, split_seed: int,
                where: str = "data") -> tuple[dict[str, tuple[str, ...]], list[str], Tensor,
                                              tuple[Tensor, Tensor, Tensor]]:
    """(categories, texts, labels (N,), (train, val, test) indices) of a fortune task: the
    split `fortune_splits` tokenises, also used to keep its held-out texts out of the
    unlabelled corpus of general distillation (`kdistill.data.general_text`)."""
    if task not in FORTUNE_TASKS:
        raise ConfigError(f"{where}.name", f"unknown fortune task {task!r}; expected one of: "
                                           f"{', '.join(FORTUNE_TASKS)}")
    categories = fortune_categories(task, where=f"{where}.name")
    texts = [t for texts in categories.values() for t in texts]
    labels = torch.tensor([k for k, ts in enumerate(categories.values()) for _ in ts],
                          dtype=torch.int64)
    n = len(texts)
    n_test = _count(test_size, n, f"{where}.test_size")
    n_val = _count(val_size, n, f"{where}.val_size")
    if n_test + n_val >= n:
        raise ConfigError(f"{where}.val_size", f"validation ({n_val}) + test ({n_test}) leave no "
                                               f"training texts of the {n} in '{task}'")
    order = stratified_order(labels, seed=int(split_seed))
    split = (order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test])
    return categories, texts, labels, split


def fortune_splits(
    task: str,
    tokenizer: Any,
    *,
    seq_len: int,
    val_size: float,
    test_size: float,
    split_seed: int,
    train_limit: int | None = None,
    where: str = "data",
) -> DataSplits:
    """Tokenised, stratified train / validation / test splits of a fortune-category task.

    Args:
        task: "fortunes5" or "fortunes43".
        tokenizer: a Hugging Face tokenizer with a pad token (the teacher's).
        seq_len: tokens per text (T), [CLS] and [SEP] included; longer texts are truncated.
        val_size, test_size: a fraction (< 1) of all texts, or a count.
        split_seed: seeds the one permutation that fixes all three splits.
        train_limit: keep only the first N (stratified) training texts.
        where: the recipe section naming fields in errors.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 3:
        raise ConfigError(f"{where}.seq_len", f"needs room for [CLS], a token and [SEP] (>= 3), "
                                              f"got {seq_len!r}")
    categories, texts, labels, (train_idx, val_idx, test_idx) = split_texts(
        task, val_size=val_size, test_size=test_size, split_seed=split_seed, where=where)
    n_val, n_test = len(val_idx), len(test_idx)
    if train_limit is not None:
        train_idx = train_idx[:train_limit]

    def ids(idx: Tensor) -> Tensor:
        return tokenize_padded([texts[i] for i in idx.tolist()], tokenizer, seq_len)

    train_x, val_x, test_x = ids(train_idx), ids(val_idx), ids(test_idx)
    roles = token_roles(tokenizer)  # its vocab is the tokenizer's digest: hashed once
    params = {"seq_len": seq_len, "val": n_val, "test": n_test, "split_seed": split_seed,
              "train_limit": train_limit, "vocab_size": len(tokenizer),
              "pad": tokenizer.pad_token_id, "vocab": roles.vocab}
    h = hashlib.sha256(f"{task}|{sorted(params.items())}|{list(categories)}".encode())
    h.update(memoryview(train_x.numpy()).cast("B"))
    h.update(memoryview(labels[train_idx].numpy()).cast("B"))
    return DataSplits(
        name=task, train_x=train_x, train_y=labels[train_idx], val_x=val_x,
        val_y=labels[val_idx], test_x=test_x, test_y=labels[test_idx],
        num_classes=len(categories), input_shape=(seq_len,), fingerprint=h.hexdigest(),
        tokens=roles,
    )
