"""The user's translation pairs (`data.name: translation_pairs`): seq2seq data from a table.

A TSV (or CSV, JSON Lines, Parquet, saved HF dataset) with a `source` and a `target` column
(names configurable). Pairs are split by row with `split_seed` (or given as validation / test
files), then packed exactly like the built-in gettext pairs (`kdistill.data.translation`): a
joint BPE trained on the training split only, rows (N, 2, seq_len), labels with -100 at BOS
and padding, `tokenizer_json` and the test split's raw target texts as `references`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from kdistill.data.source import LoadContext
from kdistill.data.splitting import SPLITS, FileSplits, duplicate_notes, file_digest
from kdistill.data.tables import assign_rows, check_present, read_split_tables
from kdistill.data.translation import pack_pair_splits
from kdistill.errors import ConfigError
from kdistill.types import DataSplits


class TranslationPairs(FileSplits):
    """Sentence pairs for translation (seq2seq): a source and a target text column; a joint
    BPE trained on the training split; pairs longer than `seq_len - 2` tokens dropped."""

    name: Literal["translation_pairs"]
    task = "seq2seq"
    source: str = Field("source", description="the column holding the text to translate")
    target: str = Field("target", description="the column holding its translation")
    seq_len: Annotated[int, Field(ge=4)] = Field(
        128, description="tokens per side, BOS and EOS included")
    vocab_size: Annotated[int, Field(ge=8)] = Field(
        8000, description="size of the joint BPE trained on the training split")

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        tables = read_split_tables(self, [self.source, self.target], where=where)
        for table in tables.values():
            for column in (self.source, self.target):
                table.texts(column)
                check_present(table, column)
        rows = assign_rows(self, tables, where=where, what="pairs")
        # Test first, as the built-in pairs: the first split a seq_len cannot hold is named.
        parts = {s: [(a.strip(), b.strip()) for a, b in zip(
            rows[s].column(self.source), rows[s].column(self.target), strict=True)]
            for s in ("test", "val", "train")}
        if any(len(parts[s]) == 0 for s in SPLITS):
            raise ConfigError(f"{where}.path", "every split needs at least one pair")
        digests = [file_digest(Path(p)) for p in (self.path, self.val_path, self.test_path) if p]
        params = ["translation_pairs", self.source, self.target, self.seq_len, self.vocab_size,
                  self.split_seed, sorted(tables),
                  *(self.holdout(s) for s in ("val", "test") if s not in tables)]
        splits = pack_pair_splits(Path(self.path).stem, parts, seq_len=self.seq_len,
                                  vocab_size=self.vocab_size, params=params, where=where,
                                  extra="|".join(digests).encode())
        keys = {s: [a for a, _ in parts[s]] for s in SPLITS}  # by source sentence
        return replace(splits, notes=duplicate_notes(keys, "source sentences"))
