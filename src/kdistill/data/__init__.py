"""Data: the sources a recipe can name under `data:` (`SOURCES`), their loaders and batching.

`SOURCES` maps each `data.name` to its typed config (`kdistill.data.source.Source`); the
recipe's `data` section is a discriminated union over them, so a field that a source does
not use is refused. Adding a source: one file here, one line in `SOURCES`, one recipe.

The built-in sets are in `builtin`; the user's own files in `image_folder`, `arrays`,
`text_files` (text classification tables, text corpora), `chat` (conversations) and `pairs`
(translation), sharing `splitting` (splits, duplicates, labels, fingerprints) and `tables`
(CSV, TSV, JSON Lines, Parquet, saved HF datasets). See docs/your-data.md.
"""

from kdistill.data.arrays import Arrays
from kdistill.data.builtin import (
    BuiltinImages,
    FortuneClasses,
    GeneralText,
    Generated,
    GettextPairs,
    TextCorpus,
)
from kdistill.data.chat import ChatRows
from kdistill.data.datasets import DATASETS, RawData, load_dataset
from kdistill.data.image_folder import ImageFiles, ImageFolder
from kdistill.data.pairs import TranslationPairs
from kdistill.data.source import LoadContext, Source
from kdistill.data.text_files import TextClassification, TextFiles
from kdistill.types import DataSplits

_SOURCE_TYPES: tuple[type[Source], ...] = (
    BuiltinImages, FortuneClasses, TextCorpus, Generated, GeneralText, GettextPairs,
    ImageFolder, Arrays, TextClassification, TextFiles, ChatRows, TranslationPairs,
)
# data.name -> its config type (several names may share one type: mnist, digits, ...)
SOURCES: dict[str, type[Source]] = {
    name: cls for cls in _SOURCE_TYPES for name in cls.model_fields["name"].annotation.__args__
}

__all__ = ["DATASETS", "SOURCES", "Arrays", "ChatRows", "DataSplits", "ImageFiles",
           "ImageFolder", "LoadContext", "RawData", "Source", "TextClassification", "TextFiles",
           "TranslationPairs", "load_dataset"]
