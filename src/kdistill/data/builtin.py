"""The built-in data sets as sources (`data.name: mnist`, `fortunes5`, `stdlib_docs`, ...).

Each config holds only the fields its loader reads; the loaders live beside the data they read
(`datasets`, `fortune_classes`, `text`, `sft`, `general_text`, `translation`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from kdistill.data.source import LoadContext, Source
from kdistill.errors import ConfigError
from kdistill.types import DataSplits

SplitSeed = Annotated[int, Field(ge=-(2**63), lt=2**63, description="seeds the split")]
TrainLimit = Annotated[int, Field(gt=0)] | None
Fraction = Annotated[float, Field(gt=0, lt=1)]
Tokenizer = Annotated[str, Field(description="the tokenizer of the teacher ('smollm2', "
                                             "'minilm' or a path)")]


def _tokenizer(name: str, where: str):  # type: ignore[no-untyped-def]
    from kdistill.models.hf import load_tokenizer  # transformers: imported only for text

    return load_tokenizer(name, where=where)


class BuiltinImages(Source):
    """The built-in image and signal sets (MNIST, Fashion-MNIST, sklearn digits, MNIST-1D) with
    their official test split; validation is taken out of the training set, stratified."""

    name: Literal["mnist", "fashion_mnist", "digits", "mnist1d"] = "mnist1d"
    val_size: Annotated[float, Field(gt=0)] = Field(
        500, description="validation split: a count, or a fraction (< 1) of the training set")
    split_seed: SplitSeed = 0
    train_limit: TrainLimit = Field(None, description="keep only the first N training samples")

    @field_validator("val_size")
    @classmethod
    def _whole_count(cls, v: float) -> float:
        if v >= 1 and not float(v).is_integer():
            raise ValueError("a count must be a whole number")
        return v

    def load(self, ctx: LoadContext) -> DataSplits:
        from kdistill.data.datasets import load_dataset

        val: int | float = int(self.val_size) if self.val_size >= 1 else self.val_size
        splits = load_dataset(self.name, val_size=val, split_seed=self.split_seed,
                              train_limit=self.train_limit, where=ctx.where)
        if len(splits.val_x) == 0:
            raise ConfigError(f"{ctx.where}.val_size",
                              f"{self.val_size} leaves an empty validation split")
        return splits


class FortuneClasses(Source):
    """Text classification: the category of a fortune (5 or 43 categories), padded token ids
    of the teacher's tokenizer, stratified splits."""

    name: Literal["fortunes5", "fortunes43"]
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=3)] = Field(
        128, description="tokens per text, [CLS] and [SEP] included (truncated, padded)")
    val_size: Annotated[float, Field(gt=0)] = Field(
        500, description="validation split: a fraction (< 1) of the texts, or a count")
    test_size: Fraction = Field(0.05, description="test split: a fraction of the texts")
    split_seed: SplitSeed = 0
    train_limit: TrainLimit = Field(None, description="keep only the first N training texts")

    def load(self, ctx: LoadContext) -> DataSplits:
        from kdistill.data.fortune_classes import fortune_splits

        return fortune_splits(self.name, _tokenizer(self.tokenizer, f"{ctx.where}.tokenizer"),
                              seq_len=self.seq_len, val_size=self.val_size,
                              test_size=self.test_size, split_seed=self.split_seed,
                              train_limit=self.train_limit, where=ctx.where)


class TextCorpus(Source):
    """A built-in text corpus (the standard library's docstrings, or fortunes) for causal-LM
    distillation: documents split by a seeded permutation, packed into blocks of `seq_len`."""

    name: Literal["stdlib_docs", "fortunes"]
    task = "causal_lm"
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=2)] = Field(128, description="tokens per block")
    val_size: Fraction = Field(0.05, description="validation split: a fraction of the documents")
    test_size: Fraction = Field(0.05, description="test split: a fraction of the documents")
    split_seed: SplitSeed = 0
    max_train_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="at most this many training tokens (whole blocks)")
    max_eval_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="at most this many tokens in each of validation and test")
    train_path: str | None = Field(
        None, description="train on the `text` column of this table (what `kdistill generate` "
        "wrote: sequence-level KD on the corpus) instead of the corpus's training split; "
        "validation and test stay the corpus's own")

    def _train_file(self, where: str) -> list[str] | None:
        if self.train_path is None:
            return None
        from kdistill.data.splitting import existing
        from kdistill.data.tables import read_table

        table = read_table(existing(self.train_path, f"{where}.train_path"), ["text"])
        texts = [t.strip() for t in table.texts("text") if t.strip()]
        if not texts:
            raise ConfigError(self.train_path, "holds no text in its 'text' column")
        return texts

    def training_documents(self, where: str = "data") -> list[str]:
        """The training split's documents (what `kdistill tokenizer` learns a vocabulary on)."""
        from kdistill.data.text import read_corpus, split_documents

        given = self._train_file(where)
        if given is not None:
            return given
        docs = read_corpus(self.name, where=f"{where}.name")
        train, _, _ = split_documents(len(docs), self.val_size, self.test_size, self.split_seed)
        return [docs[i] for i in train.tolist()]

    def load(self, ctx: LoadContext) -> DataSplits:
        from kdistill.data.text import lm_splits

        return lm_splits(self.name, _tokenizer(self.tokenizer, f"{ctx.where}.tokenizer"),
                         seq_len=self.seq_len, val_fraction=self.val_size,
                         test_fraction=self.test_size, split_seed=self.split_seed,
                         max_train_tokens=self.max_train_tokens,
                         max_eval_tokens=self.max_eval_tokens, where=ctx.where,
                         train_documents=self._train_file(ctx.where))


class Generated(Source):
    """Answers written by `kdistill generate` (sequence-level KD): one JSON object per line with
    `id`, `prompt` and `response` (and `finished`); split by prompt id, each row the chat-
    formatted prompt (masked) and the answer the student learns."""

    name: Literal["generated"]
    task = "causal_lm"
    path: str = Field(description="the JSONL file written by `kdistill generate`")
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=2)] = Field(128, description="tokens per row")
    val_size: Fraction = Field(0.05, description="validation split: a fraction of the prompts")
    test_size: Fraction = Field(0.05, description="test split: a fraction of the prompts")
    split_seed: SplitSeed = 0
    system: str | None = Field(None, description="system prompt of the chat format")

    def load(self, ctx: LoadContext) -> DataSplits:
        from kdistill.data.sft import sft_splits

        return sft_splits(self.path, _tokenizer(self.tokenizer, f"{ctx.where}.tokenizer"),
                          seq_len=self.seq_len, val_fraction=self.val_size,
                          test_fraction=self.test_size, split_seed=self.split_seed,
                          system=self.system, where=ctx.where)


class GeneralText(Source):
    """Unlabelled sentences (fortunes and stdlib docstring paragraphs) for general distillation
    of a sentence encoder; the evaluating task's held-out texts are removed first."""

    name: Literal["general_text"]
    task = "embedding"
    tokenizer: Tokenizer
    seq_len: Annotated[int, Field(ge=3)] = Field(128, description="tokens per text")
    val_size: Annotated[float, Field(gt=0)] = Field(
        500, description="validation split: a fraction (< 1) of the texts, or a count")
    test_size: Fraction = Field(0.05, description="test split: a fraction of the texts")
    split_seed: SplitSeed = 0
    train_limit: TrainLimit = Field(None, description="keep only the first N training texts")

    def load(self, ctx: LoadContext) -> DataSplits:
        from kdistill.data.general_text import general_splits

        return general_splits(_tokenizer(self.tokenizer, f"{ctx.where}.tokenizer"),
                              seq_len=self.seq_len, val_size=self.val_size,
                              test_size=self.test_size, split_seed=self.split_seed,
                              train_limit=self.train_limit, exclude=ctx.exclude_texts,
                              where=ctx.where)


class GettextPairs(Source):
    """English → German / French UI messages from the machine's gettext catalogs, packed
    (N, 2, seq_len) with a joint BPE trained on the training split."""

    name: Literal["gettext_en_de", "gettext_en_fr"]
    task = "seq2seq"
    seq_len: Annotated[int, Field(ge=3)] = Field(
        128, description="tokens per side, BOS and EOS included")
    vocab_size: Annotated[int, Field(ge=8)] = Field(
        8000, description="size of the joint BPE trained on the training split")
    val_size: Annotated[float, Field(gt=0)] = Field(
        500, description="validation split: a fraction (< 1) of the pairs, or a count")
    test_size: Fraction = Field(0.05, description="test split: a fraction of the pairs")
    split_seed: SplitSeed = 0
    train_limit: TrainLimit = Field(None, description="keep only the first N training pairs")

    def load(self, ctx: LoadContext) -> DataSplits:
        from kdistill.data.translation import translation_splits

        return translation_splits(self.name, seq_len=self.seq_len, vocab_size=self.vocab_size,
                                  val_size=self.val_size, test_size=self.test_size,
                                  split_seed=self.split_seed, train_limit=self.train_limit)
