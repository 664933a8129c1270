"""English -> German / French message pairs from the machine's gettext catalogs (seq2seq).

The catalogs under `/usr/share/locale/<lang>/LC_MESSAGES/*.mo` map English UI messages to
translations written by people (see shared/DATA.md). They are read at run time, never copied
into the repository. What `translation_splits` does, in order:

1. Read every catalog of the language (sorted by file name, so the first catalog that holds a
   message wins, on every machine with the same catalogs). Skip the header (empty msgid),
   plural entries (tuple keys: they need a plural rule, not a sentence) and context entries
   (`ctxt\\x04msgid`: the same English with several meanings). A catalog that gettext cannot
   parse (e.g. a non-UTF-8 header, net-tools' German one on this project's image) is skipped.
2. Normalise both sides (`normalise`): remove GTK/Qt accelerator markers (`_File`, `&File`:
   keyboard hints, not text), collapse whitespace (help texts carry newlines and column
   alignment that a sentence model cannot and need not reproduce).
3. Deduplicate by English source; drop pairs without a letter on either side, and identical
   pairs (mostly untranslated names, which teach copying, not translating).
4. Split by unique source message with `split_seed`: test, validation, training, so no
   English sentence is in two splits.
5. Train a joint BPE (HF `tokenizers`) on the training split only, deterministically; drop
   pairs longer than `seq_len - 2` tokens on either side (room for BOS and EOS).

Packing (`DataSplits.task == "seq2seq"`): one example is one int64 row of shape (2, L),
L = `seq_len`: row 0 the source ids then EOS, padded with PAD; row 1 the decoder input
`BOS y1 .. yn EOS`, padded with PAD. The label (L,) is row 1 with -100 at BOS and at padding,
the causal-LM convention: decoder position t predicts label t + 1 (`shift_labels`), so
token-level losses, the top-k teacher cache (keyed by sample index), the batch loader and DDP
sharding (dim 0) work unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import gettext
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kdistill.data.datasets import DataSplits
from kdistill.errors import ConfigError, MissingDependencyError
from kdistill.types import IGNORE_INDEX

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, in this order
LOCALE_DIR = Path("/usr/share/locale")
LANGUAGES = {"gettext_en_de": "de", "gettext_en_fr": "fr"}

# `_File` / `&Open`: an accelerator marker before a letter, at a word start. `&&` is a literal
# ampersand in Qt; `snake_case` keeps its underscore (not at a word start), and so does a
# mid-word mnemonic such as GTK's "ö_ffnen": telling the two apart would need a word list.
_ACCEL = re.compile(r"(?<![\w&])[_&](?=\w)")


def normalise(text: str) -> str:
    """Accelerator markers removed, whitespace collapsed to single spaces, ends stripped."""
    return " ".join(_ACCEL.sub("", text).replace("&&", "&").split())


@functools.cache
def _read_catalogs(directory: Path) -> tuple[tuple[str, str], ...]:
    """(source, target) pairs of every catalog in `directory`; the first catalog wins."""
    pairs: dict[str, str] = {}
    for path in sorted(directory.glob("*.mo")):
        try:
            with path.open("rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # unreadable or another charset: not worth guessing encodings for
        for key, value in catalog.items():
            if not isinstance(key, str) or not key or "\x04" in key:
                continue  # plural entry, header, or message with context
            src, tgt = normalise(key), normalise(str(value))
            if src in pairs or not src or not tgt or src == tgt:
                continue
            if not (any(c.isalpha() for c in src) and any(c.isalpha() for c in tgt)):
                continue
            pairs[src] = tgt
    return tuple(pairs.items())


def read_pairs(name: str, *, root: Path = LOCALE_DIR, where: str = "data.name") -> list[
    tuple[str, str]
]:
    """Every (English, translation) pair of the catalogs of `name`'s language, deduplicated."""
    if name not in LANGUAGES:
        raise ConfigError(where, f"unknown translation data {name!r}; expected one of: "
                                 f"{', '.join(LANGUAGES)}")
    directory = root / LANGUAGES[name] / "LC_MESSAGES"
    if not any(directory.glob("*.mo")):
        raise ConfigError(where, f"no gettext catalogs for language '{LANGUAGES[name]}' in "
                                 f"{directory} (install packages with translations, e.g. "
                                 f"`apt-get install coreutils-l10n` or any *-l10n package)")
    return list(_read_catalogs(directory))


def train_tokenizer(texts: list[str], vocab_size: int) -> str:
    """A joint BPE over `texts` (both languages), as the JSON string of a HF `tokenizers`
    Tokenizer. Metaspace pre-tokenisation keeps word boundaries, so decoding gives back the
    text (spaces included) for sacrebleu. Deterministic: same texts, same vocabulary."""
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise MissingDependencyError("data.name", "the tokenizers package",
                                     "pip install tokenizers") from None
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


@dataclass(frozen=True)
class TextCodec:
    """Token ids <-> text with a saved tokenizer (the data's `tokenizer_json`)."""

    tokenizer_json: str

    @functools.cached_property
    def _tok(self):  # type: ignore[no-untyped-def]
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int] | Tensor) -> str:
        """Ids up to the first EOS, specials dropped."""
        out = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(i)
        return self._tok.decode(out)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())


def pack(src: list[list[int]], tgt: list[list[int]], seq_len: int) -> tuple[Tensor, Tensor]:
    """Rows (N, 2, L) and labels (N, L) as described in the module docstring."""
    x = torch.full((len(src), 2, seq_len), PAD, dtype=torch.int64)
    y = torch.full((len(src), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        s_row, t_row = [*s, EOS], [BOS, *t, EOS]
        x[i, 0, : len(s_row)] = torch.tensor(s_row)
        x[i, 1, : len(t_row)] = torch.tensor(t_row)
        y[i, 1 : len(t_row)] = torch.tensor(t_row[1:])  # BOS is never a target
    return x, y


def _count(value: float, total: int, field: str) -> int:
    n = round(value * total) if value < 1 else int(value)
    if value >= 1 and not float(value).is_integer():
        raise ConfigError(field, f"a count must be a whole number, got {value}")
    if not 1 <= n < total:
        raise ConfigError(field, f"{value} leaves no pairs for the split (of {total} messages)")
    return n


def translation_splits(
    name: str,
    *,
    seq_len: int,
    vocab_size: int,
    val_size: float,
    test_size: float,
    split_seed: int,
    train_limit: int | None = None,
    pairs: list[tuple[str, str]] | None = None,
    where: str = "data",
) -> DataSplits:
    """Packed train / val / test splits of `name` (or of the given `pairs`, for tests)."""
    if seq_len < 4:
        raise ConfigError(f"{where}.seq_len", f"needs room for BOS, EOS and a token; got {seq_len}")
    if vocab_size <= len(SPECIALS) + 1:
        raise ConfigError(f"{where}.vocab_size", f"must exceed {len(SPECIALS) + 1}; got "
                                                 f"{vocab_size}")
    if pairs is None:
        pairs = read_pairs(name, where=f"{where}.name")
    # A cheap bound before tokenising: a message with more words than tokens cannot fit.
    pairs = [(s, t) for s, t in pairs if max(len(s.split()), len(t.split())) <= seq_len - 2]
    if len(pairs) < 3:
        raise ConfigError(f"{where}.seq_len", f"{len(pairs)} message pair(s) have at most "
                                              f"{seq_len - 2} words a side; raise seq_len")
    order = list(range(len(pairs)))
    random.Random(split_seed).shuffle(order)  # pairs are unique by source: split by message
    n_test = _count(test_size, len(order), f"{where}.test_size")
    n_val = _count(val_size, len(order) - n_test, f"{where}.val_size")
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val],
             "train": order[n_test + n_val :]}
    if train_limit is not None:
        parts["train"] = parts["train"][:train_limit]
    return pack_pair_splits(
        name, {split: [pairs[i] for i in idx] for split, idx in parts.items()},
        seq_len=seq_len, vocab_size=vocab_size, where=where,
        params=[name, seq_len, vocab_size, val_size, test_size, split_seed, train_limit])


def pack_pair_splits(name: str, parts: dict[str, list[tuple[str, str]]], *, seq_len: int,
                     vocab_size: int, params: list[object], where: str = "data",
                     extra: bytes = b"") -> DataSplits:
    """The joint BPE trained on `parts["train"]` and every split packed (see the module
    docstring); pairs longer than `seq_len - 2` tokens a side are dropped. The fingerprint
    hashes `params`, the tokenizer, the training rows and `extra` (e.g. the files' digests)."""
    train_texts = [text for pair in parts["train"] for text in pair]
    tokenizer_json = train_tokenizer(train_texts, vocab_size)
    codec = TextCodec(tokenizer_json)
    tensors: dict[str, tuple[Tensor, Tensor]] = {}
    references: tuple[str, ...] = ()
    for split, chosen in parts.items():
        src = [codec.encode(s) for s, _ in chosen]
        tgt = [codec.encode(t) for _, t in chosen]
        keep = [k for k in range(len(chosen)) if max(len(src[k]), len(tgt[k])) <= seq_len - 2]
        if not keep:
            raise ConfigError(f"{where}.seq_len", f"no {split} pair fits {seq_len} tokens")
        tensors[split] = pack([src[k] for k in keep], [tgt[k] for k in keep], seq_len)
        if split == "test":  # the raw reference text, for sacrebleu (not ids decoded back)
            references = tuple(chosen[k][1] for k in keep)
    h = hashlib.sha256(repr(params).encode())
    h.update(tokenizer_json.encode())
    h.update(memoryview(tensors["train"][0].numpy()).cast("B"))
    h.update(extra)
    return DataSplits(
        name=name, train_x=tensors["train"][0], train_y=tensors["train"][1],
        val_x=tensors["val"][0], val_y=tensors["val"][1],
        test_x=tensors["test"][0], test_y=tensors["test"][1],
        num_classes=codec.vocab_size, input_shape=(2, seq_len), fingerprint=h.hexdigest(),
        task="seq2seq", tokenizer_json=tokenizer_json, references=references,
    )


def replace_targets(splits: DataSplits, targets: list[list[int]], fingerprint: str) -> DataSplits:
    """The same splits with the training targets replaced (sequence-level KD): `targets[i]`
    are the new ids `y1 .. yn` (no BOS, no EOS) of training pair i, cut to fit the row."""
    length = splits.train_y.shape[1]
    new_x, new_y = pack([[] for _ in targets], [t[: length - 2] for t in targets], length)
    x = splits.train_x.clone()
    x[:, 1] = new_x[:, 1]  # the sources stay; only the decoder rows and labels change
    return dataclasses.replace(splits, train_x=x, train_y=new_y, fingerprint=fingerprint)
