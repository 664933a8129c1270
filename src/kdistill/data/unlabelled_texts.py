"""The user's texts without labels, for a text transfer set: `transfer_set.unlabelled:
{name: texts, path: more.txt, tokenizer: minilm, seq_len: 64}`.

Tang et al. 2019 (arXiv:1903.12136) distil on the task's texts plus unlabelled in-domain
text; the teacher labels it, only the distilled student trains on it. The texts come from a
.txt file or a folder of .txt files (`documents`: one per line, the default, a paragraph or a
whole file) or a table's `text` column (CSV, TSV, JSON Lines, Parquet, a saved HF dataset),
tokenised and padded exactly as `text_classification` and `fortunes5` texts are
(`[CLS] text [SEP]`, `seq_len` tokens). Texts equal to one of the data's own (training,
validation or test) are dropped by `kdistill.build.add_unlabelled`. This is not a `data:`
source: with no labels there is nothing to train or score a student alone on.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from kdistill.data import text as text_data
from kdistill.data.builtin import Tokenizer, _tokenizer
from kdistill.data.fortune_classes import token_roles, tokenize_padded
from kdistill.data.source import LoadContext, Source
from kdistill.data.splitting import existing, file_digest, fingerprint
from kdistill.data.text_files import read_documents
from kdistill.errors import ConfigError
from kdistill.types import IGNORE_INDEX, DataSplits


class UnlabelledTexts(Source):
    """Texts with no label, one input each, for `transfer_set.unlabelled` only."""

    name: Literal["texts"]
    path: str = Field(description="a .txt file, a folder of .txt files, or a table")
    documents: Literal["lines", "paragraphs", "files"] = Field(
        "lines", description=".txt files only: a text is a line, a paragraph (text between "
                             "blank lines) or a whole file (a table's text is one row)")
    text: str = Field("text", description="tables: the column holding the text")
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=3)] = Field(
        128, description="tokens per text, special tokens included (truncated, padded): the "
                         "data's seq_len")

    def load(self, ctx: LoadContext) -> DataSplits:
        where = ctx.where
        path = existing(self.path, f"{where}.path")
        texts = read_documents(self, path, where)
        if not texts:
            raise ConfigError(f"{where}.path", f"{path} holds no text")
        tokenizer = _tokenizer(self.tokenizer, f"{where}.tokenizer")
        x = tokenize_padded(texts, tokenizer, self.seq_len, where=f"{where}.tokenizer")
        none = torch.full((len(x),), IGNORE_INDEX, dtype=torch.int64)
        params = {"documents": self.documents, "text": self.text, "seq_len": self.seq_len,
                  "vocab": text_data._tokenizer_digest(tokenizer)}
        return DataSplits(
            name=path.stem, train_x=x, train_y=none, val_x=x[:0], val_y=none[:0],
            test_x=x[:0], test_y=none[:0], num_classes=0, input_shape=(self.seq_len,),
            fingerprint=fingerprint("texts", params, [file_digest(path)], x),
            tokens=token_roles(tokenizer))

