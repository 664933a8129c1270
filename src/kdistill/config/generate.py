"""The recipe of `kdistill generate`: a teacher, a prompt set, sampling and an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kdistill.config.loading import apply_overrides, read_tree, validated
from kdistill.data.prompts import Prompt, document_prompts, load_prompts, read_prompt_file
from kdistill.devices import DEVICE_PATTERN
from kdistill.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TeacherSource(_Strict):
    path: str = "smollm2"  # "smollm2", a model directory or a .gguf file
    device: str = Field("auto", pattern=DEVICE_PATTERN,
                        description="where the teacher generates: auto, cpu, cuda, cuda:N, mps")


class PromptSource(_Strict):
    """A built-in prompt set (`kdistill.data.prompts.PROMPT_SETS`), `name: file` with the
    `path` of the user's prompts (JSON Lines, CSV, ...; `read_prompt_file`), or `name:
    documents`: the first `prefix_words` words of each training document of a run `recipe`'s
    data (sequence-level KD on a corpus: the teacher continues them, `prompt_format: text`).
    Only the training split is read, so no validation or test text reaches the teacher."""

    name: str = "stdlib_functions"
    path: str | None = Field(None, validate_default=True,
                             description="name: file only: the file of prompts")
    recipe: str | None = Field(None, validate_default=True, description="name: documents "
                               "only: the run recipe whose training documents are prompted")
    prefix_words: int = Field(16, ge=1, description="name: documents only: the words of each "
                              "document kept as its prompt")
    limit: int | None = Field(None, ge=1)
    seed: int = 0

    @field_validator("path")
    @classmethod
    def _path_with_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("name") == "file" and v is None:
            raise ValueError("name: file reads the prompts from a file; give its path")
        if info.data.get("name") != "file" and v is not None:
            raise ValueError(f"only with name: file; '{info.data.get('name')}' is a built-in "
                             "prompt set")
        return v

    @field_validator("recipe")
    @classmethod
    def _recipe_with_documents(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("name") == "documents" and v is None:
            raise ValueError("name: documents prompts with a run recipe's training documents; "
                             "give the recipe's path")
        if info.data.get("name") != "documents" and v is not None:
            raise ValueError("only with name: documents")
        return v

    @model_validator(mode="after")
    def _prefix_with_documents(self) -> PromptSource:
        # By value: overrides re-validate a full dump, so fields_set cannot tell.
        if self.name != "documents" and self.prefix_words != 16:
            raise ValueError("prefix_words: only with name: documents")
        return self

    def load(self, *, where: str = "prompts") -> list[Prompt]:
        """The prompts, shuffled once by `seed`, the first `limit` kept."""
        if self.name == "file":
            assert self.path is not None  # checked above
            return read_prompt_file(self.path, limit=self.limit, seed=self.seed, where=where)
        if self.name == "documents":
            assert self.recipe is not None  # checked above
            return self._document_prompts(self.recipe, where)
        return load_prompts(self.name, limit=self.limit, seed=self.seed, where=where)

    def _document_prompts(self, recipe: str, where: str) -> list[Prompt]:
        from kdistill.config import load_config

        data = load_config(recipe).data
        documents = getattr(data, "training_documents", None)
        if documents is None:
            raise ConfigError(f"{where}.recipe", f"{recipe}: data {data.name!r} has no "
                              "documents to prompt with; use stdlib_docs, fortunes or text_files")
        return document_prompts(documents(), self.prefix_words, limit=self.limit,
                                seed=self.seed)


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
    prompt_format: Literal["chat", "text"] = Field(
        "chat", description="chat: each prompt is a user turn in the teacher's chat template; "
        "text: the prompt is plain text the teacher continues (base models, sequence-level KD "
        "on a corpus), each record then also holds text = prompt + response")
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _system_is_chat(self) -> GenerateConfig:
        if self.prompt_format == "text" and self.system is not None:
            raise ValueError("system: a chat system message; prompt_format: text uses no chat "
                             "template (remove system)")
        return self

    @model_validator(mode="after")
    def _documents_are_text(self) -> GenerateConfig:
        if self.prompts.name == "documents" and self.prompt_format != "text":
            raise ValueError("prompts.name: documents gives plain-text beginnings to continue; "
                             "set prompt_format: text")
        return self


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
