"""The user's text: classification tables (`text_classification`) and corpora (`text_files`).

`text_classification`: a table (CSV, TSV, JSON Lines, Parquet, a saved HF dataset; see
`kdistill.data.tables`) with a text column, optionally a second text column (sentence pairs,
encoded as the tokenizer's pair: `[CLS] a [SEP] b [SEP]` for BERT-like tokenizers) and a label
column. Texts are tokenised with the teacher's tokenizer and padded to `seq_len`, exactly like
the built-in `fortunes5` (int64 (N, seq_len), models mask `ids != pad_id`); labels become class
ids (`kdistill.data.splitting.LabelMap`), saved as `labels.json` in the run directory.

`text_files`: plain text for token-level distillation of a causal LM: a `.txt` file, a folder
of `.txt` files (read recursively, in sorted order), or a table's text column. The documents
(a file's paragraphs, its lines, whole files, or a table's rows) are split by a seeded
permutation and each split is packed into blocks of `seq_len` tokens with EOS between
documents, like the built-in `stdlib_docs` (`kdistill.data.text`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from kdistill.data import text as text_data
from kdistill.data.builtin import Tokenizer, _tokenizer
from kdistill.data.fortune_classes import TOKENIZE_BATCH, token_roles, tokenize_padded
from kdistill.data.source import LoadContext
from kdistill.data.splitting import (
    SPLITS,
    FileSplits,
    LabelMap,
    duplicate_notes,
    existing,
    file_digest,
    fingerprint,
    save_labels,
    split_rows,
)
from kdistill.data.tables import (
    Table,
    _utf8,
    assign_rows,
    check_present,
    is_hf_dataset,
    read_split_tables,
)
from kdistill.errors import ConfigError
from kdistill.types import DataSplits

_PARAGRAPH = re.compile(r"\n\s*\n")


def _digests(cfg: FileSplits) -> list[str]:
    return [file_digest(Path(p)) for p in (cfg.path, cfg.val_path, cfg.test_path) if p]


def _tokenize_pairs(first: list[str], second: list[str], tokenizer: Any, seq_len: int) -> Tensor:
    """(N, seq_len) ids of text pairs as the tokenizer joins them, truncated, right-padded."""
    if tokenizer.pad_token_id is None:
        raise ConfigError("data.tokenizer", "the tokenizer has no pad token to pad texts with")
    rows: list[list[int]] = []
    for start in range(0, len(first), TOKENIZE_BATCH):
        end = start + TOKENIZE_BATCH
        rows += tokenizer(first[start:end], second[start:end], truncation=True,
                          max_length=seq_len, padding="max_length")["input_ids"]
    return torch.tensor(rows, dtype=torch.int64).view(-1, seq_len)


class TextClassification(FileSplits):
    """Text classification from a table: a text column (or two, for sentence pairs) and a label
    column; the teacher's tokenizer, `seq_len` tokens per row. String labels are mapped to ids
    in sorted order (saved as labels.json in the run directory)."""

    name: Literal["text_classification"]
    text: str = Field("text", description="the column holding the text")
    text_pair: str | None = Field(None, description="a second text column (sentence pairs)")
    label: str = Field("label", description="the column holding the class (a name or an id)")
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=3)] = Field(
        128, description="tokens per row, special tokens included (truncated, padded)")

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        texts = [self.text, *([self.text_pair] if self.text_pair else [])]
        tables = read_split_tables(self, [*texts, self.label], where=where)
        for table in tables.values():
            check_present(table, self.label)
            for column in texts:
                table.texts(column)
        train = tables["train"]
        column = f"column '{self.label}'"
        labels = LabelMap.from_training(train.columns[self.label], train.locate, column)
        rows = assign_rows(self, tables, where=where, what="texts",
                           labels=labels.encode(train.columns[self.label], train.locate, column))
        tokenizer = _tokenizer(self.tokenizer, f"{where}.tokenizer")
        x, y = {}, {}
        for split, part in rows.items():
            y[split] = labels.encode(part.column(self.label), part.locate, column)
            if self.text_pair:
                x[split] = _tokenize_pairs(part.column(self.text), part.column(self.text_pair),
                                           tokenizer, self.seq_len)
            else:
                x[split] = tokenize_padded(part.column(self.text), tokenizer, self.seq_len)
        keys = {s: list(zip(*(rows[s].column(c) for c in texts), strict=True)) for s in SPLITS}
        params = {"text": self.text, "pair": self.text_pair, "label": self.label,
                  "seq_len": self.seq_len, "split": _split_params(self, tables),
                  "vocab": text_data._tokenizer_digest(tokenizer), "classes": labels.names}
        save_labels(ctx.run_dir, labels.names)
        return DataSplits(
            name=Path(self.path).stem, train_x=x["train"], train_y=y["train"],
            val_x=x["val"], val_y=y["val"], test_x=x["test"], test_y=y["test"],
            num_classes=len(labels.names), input_shape=(self.seq_len,),
            fingerprint=fingerprint("text_classification", params, _digests(self),
                                    x["train"], y["train"]),
            class_names=labels.names, tokens=token_roles(tokenizer),
            notes=duplicate_notes(keys, "texts") + labels.notes(y["train"]))


def _split_params(cfg: FileSplits, tables: dict[str, Table]) -> list[Any]:
    return [cfg.split_seed, sorted(tables), *(cfg.holdout(s) for s in ("val", "test")
                                             if s not in tables)]


# --- corpora -------------------------------------------------------------------------------


def _txt_documents(path: Path, documents: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".txt") \
        if path.is_dir() else [path]
    if not files:
        raise ConfigError(str(path), "holds no .txt files")
    docs: list[str] = []
    for file in files:
        text = _utf8(file).replace("\r\n", "\n")
        if documents == "files":
            parts = [text]
        elif documents == "lines":
            parts = text.split("\n")
        else:
            parts = _PARAGRAPH.split(text)
        docs += [p.strip() for p in parts if p.strip()]
    if not docs:
        raise ConfigError(str(path), "holds no text")
    return docs


def read_documents(cfg: Any, path: Path, where: str) -> list[str]:
    """The documents of a .txt file or folder (split by `cfg.documents`) or of a table's
    `cfg.text` column; the field that does not apply to `path` is refused when it differs from
    its default (overrides re-validate the whole dumped recipe, so `model_fields_set` cannot
    tell what the user wrote)."""
    txt = path.suffix.lower() == ".txt" or (path.is_dir() and not is_hf_dataset(path))
    unused = "text" if txt else "documents"
    if getattr(cfg, unused) != type(cfg).model_fields[unused].default:
        raise ConfigError(f"{where}.{unused}", f"{path} is {'plain text' if txt else 'a table'}"
                          f": {unused} applies to {'tables' if txt else '.txt files'} only; "
                          f"remove it")
    if txt:
        return _txt_documents(path, cfg.documents)
    from kdistill.data.tables import read_table

    table = read_table(path, [cfg.text])
    return [t.strip() for t in table.texts(cfg.text) if t.strip()]


class TextFiles(FileSplits):
    """Plain text for causal-LM distillation: a .txt file, a folder of .txt files or a table's
    text column; documents split by a seeded permutation, each split packed into blocks of
    `seq_len` tokens with EOS between documents (the built-in corpora's packing)."""

    name: Literal["text_files"]
    task = "causal_lm"
    documents: Literal["paragraphs", "lines", "files"] = Field(
        "paragraphs", description=".txt files: a document is a paragraph (text between blank "
                                  "lines), a line, or a whole file; a table: one row")
    text: str = Field("text", description="tables: the column holding the text")
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=2)] = Field(128, description="tokens per block")
    max_train_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="at most this many training tokens (whole blocks)")
    max_eval_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="at most this many tokens in each of validation and test")

    def _read(self, path: Path, where: str) -> list[str]:
        return read_documents(self, path, where)

    def _split_documents(self, where: str) -> tuple[dict[str, list[str]], list[str]]:
        """({split: documents}, the splits given as files of their own)."""
        docs = {"train": self._read(existing(self.path, f"{where}.path"), where)}
        for split in ("val", "test"):
            own = self.given(split)
            if own is not None:
                docs[split] = self._read(existing(own, f"{where}.{split}_path"), where)
        parts = split_rows(self, len(docs["train"]), have=set(docs), where=where,
                           what="documents")
        return {s: docs[s] if s in docs and s != "train" else
                [docs["train"][i] for i in parts[s].tolist()] for s in SPLITS}, sorted(docs)

    def training_documents(self, where: str = "data") -> list[str]:
        """The training split's documents (what `kdistill tokenizer` learns a vocabulary on)."""
        return self._split_documents(where)[0]["train"]

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        split_docs, given = self._split_documents(where)
        tokenizer = _tokenizer(self.tokenizer, f"{where}.tokenizer")
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{where}.tokenizer", "the tokenizer has no EOS token to "
                                                    "separate documents")
        blocks = {}
        for split, limit, field in (("train", self.max_train_tokens, "max_train_tokens"),
                                    ("val", self.max_eval_tokens, "max_eval_tokens"),
                                    ("test", self.max_eval_tokens, "max_eval_tokens")):
            texts = split_docs[split]
            blocks[split] = text_data._pack(texts, torch.arange(len(texts)), tokenizer,
                                            tokenizer.eos_token_id, self.seq_len, limit)
            if len(blocks[split]) == 0:
                raise ConfigError(f"{where}.seq_len", f"the {split} split ({len(texts)} "
                                  f"documents, {field}={limit}) holds fewer than one block of "
                                  f"{self.seq_len} tokens; lower seq_len or add text")
        params = {"documents": self.documents, "text": self.text, "seq_len": self.seq_len,
                  "split": [self.split_seed, given,
                            *(self.holdout(s) for s in ("val", "test") if s not in given)],
                  "limits": [self.max_train_tokens, self.max_eval_tokens],
                  "vocab": text_data._tokenizer_digest(tokenizer)}
        return DataSplits(
            name=Path(self.path).stem, train_x=blocks["train"], train_y=blocks["train"].clone(),
            val_x=blocks["val"], val_y=blocks["val"].clone(), test_x=blocks["test"],
            test_y=blocks["test"].clone(), num_classes=len(tokenizer),
            input_shape=(self.seq_len,), task="causal_lm",
            fingerprint=fingerprint("text_files", params, _digests(self), blocks["train"]),
            notes=duplicate_notes(split_docs, "documents"))

