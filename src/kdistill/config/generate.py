"""The recipe of `kdistill generate`: a teacher, a prompt set, sampling and an output file."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kdistill.config.loading import apply_overrides, read_tree, validated
from kdistill.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TeacherSource(_Strict):
    path: str = "smollm2"  # "smollm2", a model directory or a .gguf file


class PromptSource(_Strict):
    name: str = "stdlib_functions"
    limit: int | None = Field(None, ge=1)
    seed: int = 0


class OutputSpec(_Strict):
    path: str


class Sampling(_Strict):
    max_new_tokens: int = Field(128, ge=1)
    do_sample: bool = False  # greedy by default
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off (transformers would otherwise apply its own default)
    seed: int = 0


class GenerateConfig(_Strict):
    """A `kdistill generate` recipe."""

    teacher: TeacherSource = TeacherSource()
    prompts: PromptSource = PromptSource()
    output: OutputSpec
    sampling: Sampling = Sampling()
    batch_size: int = Field(8, ge=1)
    system: str | None = None  # None: the chat template's own default system message
    threads: int | None = Field(None, ge=1)


def is_generate_recipe(tree: dict[str, object]) -> bool:
    """A `kdistill generate` recipe names an `output` (and `prompts`), keys that a run recipe
    does not have: how `kdistill validate` tells the two kinds apart."""
    return "output" in tree or "prompts" in tree


def load_generate_config(path: str | Path | None,
                         overrides: list[str] | None = None) -> GenerateConfig:
    """Read a generate recipe (YAML) and apply `key.path=value` overrides."""
    if path is None:
        raise ConfigError("generate", "a recipe is required: kdistill generate RECIPE.yaml "
                                      "[key.path=value ...]")
    tree = apply_overrides(read_tree(path), overrides or [])
    return validated(GenerateConfig, tree, str(path))
