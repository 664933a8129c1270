"""The contract of a data source: a typed config that loads `DataSplits`.

Every kind of data a recipe can name under `data:` is a `Source` subclass: a pydantic model
with `extra="forbid"` whose `name` field is a `Literal` of the names it answers to (the key of
the recipe's discriminated union), holding exactly the fields it uses, so a field a source
would ignore is refused at load ("data.path: unknown key" on `mnist`). `task` says what the
data is for (a key of `kdistill.tasks.TASKS`); `load` returns the splits. Adding a source: one
file in `data/` with its config and loader, one line in `data.SOURCES`, one recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from kdistill.types import DataSplits


@dataclass(frozen=True)
class LoadContext:
    """What a source may need beyond its own fields.

    Args:
        where: the recipe section being loaded (`data`), to name fields in errors.
        exclude_texts: texts to drop before splitting (general distillation: the held-out texts
            of the task that evaluates the encoder must never be trained on).
        run_dir: the run directory, where a source saves what evaluation and export need
            (a label map, normalisation statistics); None when only validating.
    """

    where: str = "data"
    exclude_texts: frozenset[str] = field(default_factory=frozenset)
    run_dir: Path | None = None


class Source(BaseModel):
    """Base of every data source's config; subclasses narrow `name` to a Literal."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)

    name: str
    task: ClassVar[str] = "classification"

    def load(self, ctx: LoadContext) -> DataSplits:
        """The train / validation / test splits this config describes."""
        raise NotImplementedError
