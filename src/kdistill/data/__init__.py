"""Data: the sources a recipe can name under `data:` (`SOURCES`), their loaders and batching.

`SOURCES` maps each `data.name` to its typed config (`kdistill.data.source.Source`); the
recipe's `data` section is a discriminated union over them, so a field that a source does
not use is refused. Adding a source: one file here, one line in `SOURCES`, one recipe.
"""

from kdistill.data.builtin import (
    BuiltinImages,
    FortuneClasses,
    GeneralText,
    Generated,
    GettextPairs,
    TextCorpus,
)
from kdistill.data.datasets import DATASETS, RawData, load_dataset
from kdistill.data.source import LoadContext, Source
from kdistill.types import DataSplits

_SOURCE_TYPES: tuple[type[Source], ...] = (
    BuiltinImages, FortuneClasses, TextCorpus, Generated, GeneralText, GettextPairs,
)
# data.name -> its config type (several names may share one type: mnist, digits, ...)
SOURCES: dict[str, type[Source]] = {
    name: cls for cls in _SOURCE_TYPES for name in cls.model_fields["name"].annotation.__args__
}

__all__ = ["DATASETS", "SOURCES", "DataSplits", "LoadContext", "RawData", "Source",
           "load_dataset"]
