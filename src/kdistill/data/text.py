"""Real text corpora, available offline, packed into fixed-length blocks for causal-LM distillation.

Corpora (`CORPORA`, read by `read_corpus`):
- "stdlib_docs": the docstrings (module, class, function) of the Python standard library's own
  `.py` files, cleaned by `ast.get_docstring`, >= 40 characters, exact duplicates dropped. Always
  available. On CPython 3.11.7: 601 files -> 6,263 documents, 1.58 M characters (408 k SmolLM2
  tokens); reading it takes 2-4 s on 2 vCPUs, once per process. The exact corpus depends on the
  Python version, which the fingerprint catches (it hashes the training token ids).
  Tokenising with SmolLM2's fast tokenizer runs at about 0.5 M tokens/s.
- "fortunes": the entries of the Debian package `fortunes` (`apt-get install fortunes`), without
  the offensive `off/` set, >= 20 characters, exact duplicates dropped: 14,942 texts, 2.5 M
  characters (695 k SmolLM2 tokens).

Split by document, then pack (`lm_splits`): the documents are shuffled once by `split_seed` and
cut into test / validation / train sets of whole documents (`split_documents`), so no text ever
appears in two splits. Within each split, every document is tokenised without special tokens,
followed by the tokenizer's EOS id, and the streams are concatenated in shuffled order and cut
into blocks of `seq_len` tokens; the last partial block is dropped. Packing produces no padding,
so every label is a real next token: labels are a copy of the ids (the loss shifts them, and
-100 would mark ignored positions). A block may span a document boundary; the EOS token between
the two is what tells the model a new text begins. With token limits, only as many documents
as needed are tokenised, so a small run on a large corpus stays fast.
"""

from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import itertools
import numbers
import os
import sysconfig
import tokenize
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data.datasets import DataSplits
from kdistill.errors import ConfigError, MissingDependencyError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})
MIN_DOCSTRING_CHARS = 40
MIN_FORTUNE_CHARS = 20
TOKENIZE_BATCH = 256  # documents per tokenizer call: fast-tokenizer batching, bounded overshoot

_HAS_DOCSTRING = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Docstrings live only in statement bodies; skipping expressions makes the walk ~4x cheaper.
_STATEMENT = (ast.stmt, ast.excepthandler, ast.match_case)


# --- corpora -------------------------------------------------------------------------------


def _docstrings(tree: ast.Module) -> list[str]:
    """Every module/class/function docstring of a parsed file, in source order."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _HAS_DOCSTRING):
            # strip(): cleandoc keeps a whitespace-only last line when there is no margin
            doc = (ast.get_docstring(node, clean=True) or "").strip()
            if doc:
                found.append(doc)
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, _STATEMENT)]
        stack.extend(reversed(children))
    return found


def _unique(texts: list[str]) -> tuple[str, ...]:
    # Exact duplicates (shared boilerplate docstrings, repeated fortunes) would otherwise land
    # in two splits; keep the first occurrence so the order stays deterministic.
    return tuple(dict.fromkeys(texts))


@functools.cache
def _stdlib_docs(root: str) -> tuple[str, ...]:
    docs: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS)  # sorted: determinism
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            try:
                with tokenize.open(os.path.join(folder, file)) as f:  # honours coding cookies
                    tree = ast.parse(f.read())
            except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
                continue  # a template or a file for another Python: not part of the corpus
            docs += [d for d in _docstrings(tree) if len(d) >= MIN_DOCSTRING_CHARS]
    return _unique(docs)


@functools.cache
def _fortunes(directory: Path) -> tuple[str, ...]:
    # Category files have no extension (".dat" are indexes, ".u8" links); the offensive set
    # lives in the `off/` subdirectory, which a flat listing never enters.
    entries: list[str] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entry: list[str] = []
        for line in [*text.splitlines(), "%"]:
            if line.rstrip() == "%":
                joined = "\n".join(entry).strip()
                if len(joined) >= MIN_FORTUNE_CHARS:
                    entries.append(joined)
                entry = []
            else:
                entry.append(line)
    return _unique(entries)


def stdlib_docs(where: str = "data.name") -> tuple[str, ...]:
    """Docstrings of the Python standard library (about 6.3 k documents, 1.6 M characters)."""
    return _stdlib_docs(sysconfig.get_paths()["stdlib"])


def fortunes(where: str = "data.name") -> tuple[str, ...]:
    """Entries of the Debian `fortunes` package, without the offensive set (about 14.9 k)."""
    directory = FORTUNES_DIR  # read at call time, so a test can point it elsewhere
    if not directory.is_dir() or not _fortunes(directory):
        raise MissingDependencyError(
            where,
            f"the fortunes corpus (Debian package fortunes, {directory})",
            "apt-get install fortunes",
        )
    return _fortunes(directory)


CORPORA: dict[str, Callable[[str], tuple[str, ...]]] = {
    "stdlib_docs": stdlib_docs,
    "fortunes": fortunes,
}


def read_corpus(name: str, *, where: str = "data.name") -> list[str]:
    """The documents of a built-in corpus, in a fixed order (a fresh list: callers may edit it)."""
    if name not in CORPORA:
        close = difflib.get_close_matches(str(name), CORPORA, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            where, f"unknown text corpus {name!r}{hint}; expected one of: {', '.join(CORPORA)}"
        )
    return list(CORPORA[name](where))


# --- splitting and packing -----------------------------------------------------------------


def split_documents(
    n_docs: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded split of `range(n_docs)` into disjoint (train, val, test) document indices.

    One permutation: test takes the first documents, validation the next, train the rest, so
    the train order is itself shuffled. A positive fraction always gets at least one document.
    """
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(test_fraction * n_docs)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n_docs)) if val_fraction > 0 else 0
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return train, val, test


def _pack(
    documents: Sequence[str],
    order: Tensor,
    tokenizer: Any,
    eos_id: int,
    seq_len: int,
    max_tokens: int | None,
) -> Tensor:
    """Tokenise `documents[order]` (EOS after each), concatenate, cut into (N, seq_len) blocks.

    With `max_tokens`, tokenisation stops once enough tokens for the kept blocks are there; the
    result is the same as tokenising everything and truncating.
    """
    limit = None if max_tokens is None else (max_tokens // seq_len) * seq_len
    pieces: list[list[int]] = []
    total = 0
    for start in range(0, len(order), TOKENIZE_BATCH):
        if limit is not None and total >= limit:
            break
        batch = [documents[i] for i in order[start : start + TOKENIZE_BATCH].tolist()]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append([*ids, eos_id])
            total += len(ids) + 1
    n_blocks = total // seq_len
    if limit is not None:
        n_blocks = min(n_blocks, limit // seq_len)
    stream = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=total)
    return torch.from_numpy(stream[: n_blocks * seq_len].copy()).view(n_blocks, seq_len)


def _check_int(value: object, field: str, *, minimum: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(field, f"expected {expected}, got {value!r}")


def _check_fractions(val_fraction: float, test_fraction: float, where: str) -> None:
    for field, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
            raise ConfigError(f"{where}.{field}", f"expected a fraction in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"{where}.val_fraction",
            f"val_fraction + test_fraction must be < 1 (leave documents for training), got "
            f"{val_fraction} + {test_fraction}",
        )


def _tokenizer_digest(tokenizer: Any) -> str:
    # name_or_path is empty for in-memory tokenizers: hash the vocabulary itself too.
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(repr(vocab).encode()).hexdigest()


def lm_splits_from_documents(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    name: str,
    seq_len: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    max_train_tokens: int | None,
    max_eval_tokens: int | None,
    where: str = "data",
    train_documents: Sequence[str] | None = None,
) -> DataSplits:
    """`lm_splits` over a given list of documents (the corpus already read); with
    `train_documents`, those (in their order) replace the training split's documents."""
    where = where.removesuffix(".name")
    _check_int(seq_len, f"{where}.seq_len", minimum=2)  # one block must predict one token
    _check_int(split_seed, f"{where}.split_seed", minimum=-(2**63))
    _check_int(max_train_tokens, f"{where}.max_train_tokens", minimum=1, allow_none=True)
    _check_int(max_eval_tokens, f"{where}.max_eval_tokens", minimum=1, allow_none=True)
    _check_fractions(val_fraction, test_fraction, where)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ConfigError(where, "the tokenizer has no EOS token to separate documents")

    train_idx, val_idx, test_idx = split_documents(
        len(documents), val_fraction, test_fraction, int(split_seed)
    )
    texts = {"train": documents if train_documents is None else train_documents,
             "val": documents, "test": documents}
    if train_documents is not None:
        train_idx = torch.arange(len(train_documents))
    blocks = {}
    for split, order, limit, field in (
        ("train", train_idx, max_train_tokens, "max_train_tokens"),
        ("val", val_idx, max_eval_tokens, "max_eval_tokens"),
        ("test", test_idx, max_eval_tokens, "max_eval_tokens"),
    ):
        ids = _pack(texts[split], order, tokenizer, eos_id, seq_len, limit)
        if len(ids) == 0:
            raise ConfigError(
                f"{where}.seq_len",
                f"the {split} split of {name!r} ({len(order)} documents, {field}={limit}) "
                f"holds fewer than one block of {seq_len} tokens; lower {where}.seq_len or "
                f"raise {where}.{field} / the split's fraction",
            )
        blocks[split] = ids

    params = {
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "max_train_tokens": max_train_tokens,
        "max_eval_tokens": max_eval_tokens,
        # The folder's name, not its full path: the same tokenizer installed elsewhere (another
        # venv, another machine) must give the same fingerprint; the vocabulary digest and the
        # hashed ids tell different tokenizers apart.
        "tokenizer": Path(tokenizer.name_or_path or "").name,
        "vocab_size": len(tokenizer),
        "vocab": _tokenizer_digest(tokenizer),
    }
    if train_documents is not None:  # only then: the corpora's fingerprints stay as they were
        params["train"] = "given"
    h = hashlib.sha256(f"{name}|{sorted(params.items())}".encode())
    h.update(memoryview(blocks["train"].numpy()).cast("B"))
    return DataSplits(
        name=name,
        train_x=blocks["train"],
        train_y=blocks["train"].clone(),
        val_x=blocks["val"],
        val_y=blocks["val"].clone(),
        test_x=blocks["test"],
        test_y=blocks["test"].clone(),
        num_classes=len(tokenizer),
        input_shape=(seq_len,),
        fingerprint=h.hexdigest(),
        task="causal_lm",
    )


def lm_splits(
    name: str,
    tokenizer: Any,
    *,
    seq_len: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    max_train_tokens: int | None,
    max_eval_tokens: int | None,
    where: str,
    train_documents: Sequence[str] | None = None,
) -> DataSplits:
    """Read a corpus, split it by document and pack each split into (N, seq_len) int64 blocks.

    Args:
        name: a key of `CORPORA`.
        tokenizer: a Hugging Face tokenizer (called on a list of texts; needs an EOS token).
        seq_len: tokens per block (T).
        val_fraction, test_fraction: fractions of the documents held out, each in (0, 1).
        split_seed: seeds the document permutation (split membership and order).
        max_train_tokens: keep only the first whole blocks of the shuffled train stream that
            fit in this many tokens; None keeps all. `max_eval_tokens` likewise for val and test.
        where: the recipe section naming fields in errors (`data` -> `data.seq_len`, ...).
    """
    where = where.removesuffix(".name")
    documents = read_corpus(name, where=f"{where}.name")
    return lm_splits_from_documents(
        documents,
        tokenizer,
        name=name,
        seq_len=seq_len,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        max_train_tokens=max_train_tokens,
        max_eval_tokens=max_eval_tokens,
        where=where,
        train_documents=train_documents,
    )
