"""Recipes from YAML: plain `yaml.safe_load` (no tags, no code), `key.path=value` overrides, and
one-line errors that name the field.

Every command reads its recipe here (`kdistill run`, `validate`, `generate`): `read_tree`
gives the mapping, `apply_overrides` the effective mapping, and `validated` the typed config.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from kdistill.config.compress import KINDS as COMPRESS_KINDS
from kdistill.config.schema import DataConfig, RunConfig
from kdistill.data import SOURCES, Source
from kdistill.data.unlabelled_texts import UnlabelledTexts
from kdistill.errors import ConfigError, more_errors, pydantic_message
from kdistill.io import parse_yaml_value, read_yaml
from kdistill.methods import METHODS

Config = TypeVar("Config", bound=BaseModel)
# Sections that are a union keyed by their `name`: another name starts from its own defaults.
UNION_SECTIONS = ("method", "data", "transfer_set.unlabelled")
_SCHEDULES = {"constant", "linear", "cosine", "step", "warmup"}
# Names only `transfer_set.unlabelled` takes (sources without labels).
UNLABELLED_ONLY: tuple[str, ...] = get_args(UnlabelledTexts.model_fields["name"].annotation)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml value): `train.seeds=[0,1,2]`, `method.alpha=0.5`."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError("override", f"'{text}' is not of the form key.path=value")
    value = parse_yaml_value(raw, where=key.strip()) if raw.strip() else None
    return key.strip(), value


def read_tree(path: str | Path | None) -> dict[str, Any]:
    """The recipe file as a mapping ({} for no file: the built-in default)."""
    if path is None:
        return {}
    source, p = str(path), Path(path)
    if not p.is_file():
        raise ConfigError(source, "recipe file not found")
    # Bounded: undecodable bytes, a huge file or an alias bomb is one line, before anything
    # is built or written.
    loaded = read_yaml(p)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(source, f"a recipe is a mapping of keys, got {type(loaded).__name__}")
    return loaded


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`tree` with each `key.path=value` set. A new `method.name` or `data.name` comes first and
    starts its section from that method's or source's own defaults (the old section's fields
    belong to another schema); the other overrides then apply on top, in order."""
    parsed = [parse_override(text) for text in overrides]
    names = [(k, v) for k, v in parsed if k in {f"{s}.name" for s in UNION_SECTIONS}]
    for key, value in names:
        *parents, section = key.split(".")[:-1]  # "transfer_set.unlabelled.name": a subsection
        node = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        current = node.get(section)
        if not isinstance(current, dict) or current.get("name") != value:
            node[section] = {}
    for key, value in [*names, *(kv for kv in parsed if kv not in names)]:
        _set_dotted(tree, key, value)
    return tree


def _format_loc(loc: tuple[int | str, ...]) -> str:
    # Pydantic puts union tags in the location ("method.kd.temperature", "data.mnist.path",
    # "....float"): drop them so the path matches what the user wrote in the recipe.
    tags = set(METHODS) | set(SOURCES) | _SCHEDULES | {"float", "int", *UNLABELLED_ONLY,
                                                       *COMPRESS_KINDS}
    last = len(loc) - 1
    parts = [str(p) for i, p in enumerate(loc)
             if not (i > 0 and "[" in str(p))  # e.g. "tagged-union[...]"
             and not (i > 0 and str(p) in tags and (i < last or str(p) in {"float", "int"}))
             # a stage-level error ends at the stage's tag: "compress.0.quantize" -> "compress.0"
             and not (i > 0 and isinstance(loc[i - 1], int) and str(p) in COMPRESS_KINDS)
             # a section-level error of a method or source ends at its tag: "method.token_kd"
             and not (i == 1 == last and str(loc[0]) in UNION_SECTIONS and str(p) in tags)]
    return ".".join(parts) or "recipe"


def _unknown_name(error: dict[str, Any]) -> str:
    """The message for an unknown `method.name` / `data.name` (or a data source's name
    elsewhere, as `transfer_set.unlabelled.name`), with the closest match."""
    ctx = error.get("ctx") or {}
    tags = re.findall(r"'([^']+)'", str(ctx.get("expected_tags", "")))
    is_method = bool(set(tags) & set(METHODS)) if tags else (
        not error["loc"] or str(error["loc"][0]) == "method")
    known = sorted(METHODS) if is_method else (tags or list(SOURCES))
    what = "method" if is_method else "data set"
    given = str(ctx.get("tag", ""))
    close = difflib.get_close_matches(given, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if not is_method and given in UNLABELLED_ONLY:  # no labels: no student alone to train
        hint = " (texts without labels: use them as transfer_set.unlabelled)"
    return f"unknown {what} {given!r}{hint}; expected one of: {', '.join(known)}"


def _expected_tags(error: dict[str, Any], key: str) -> str:
    """The names a union section takes (pydantic lists them only for an unknown one)."""
    loc = [str(p) for p in error["loc"]]
    if key == "kind":
        return ", ".join(COMPRESS_KINDS)
    if loc[:1] == ["method"]:
        return ", ".join(sorted(METHODS))
    return ", ".join([*SOURCES, *(UNLABELLED_ONLY if loc[-1:] == ["unlabelled"] else ())])


def validation_error(exc: ValidationError, source: str | None) -> ConfigError:
    """The first pydantic error as one line naming the field, plus a count of the rest."""
    errors = exc.errors()
    # A schedule written as a mapping fails the plain-number branch too; report its own error.
    first = next((e for e in errors if _SCHEDULES & {str(p) for p in e["loc"]}), errors[0])
    where = _format_loc(first["loc"])
    key = str((first.get("ctx") or {}).get("discriminator", "'name'")).strip("'")
    if first["type"] == "union_tag_invalid" and key == "kind":  # a compress stage
        where = f"{where}.kind"
        msg = f"unknown stage kind; expected one of: {', '.join(COMPRESS_KINDS)}"
    elif first["type"] == "union_tag_invalid":
        where, msg = f"{where}.name", _unknown_name(first)  # type: ignore[arg-type]
    elif first["type"] == "union_tag_not_found":
        where = f"{where}.{key}"
        msg = f"missing; expected {key}: one of {_expected_tags(first, key)}"
    else:
        msg = pydantic_message(first)
    if not first["loc"] and ": " in msg:  # whole-recipe checks name their field first
        where, msg = msg.split(": ", 1)
    return ConfigError(where if source is None else f"{source}: {where}",
                       msg + more_errors(errors))


def validated(schema: type[Config], tree: dict[str, Any], source: str) -> Config:
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise validation_error(exc, source) from None


_DATA: TypeAdapter[Any] = TypeAdapter(dict[Literal["data"], DataConfig])


def data_source(**fields: Any) -> Source:
    """A `data:` section from keyword arguments, checked as a recipe's is (the Python API):
    `data_source(name="mnist", val_size=5000)`."""
    try:
        return _DATA.validate_python({"data": fields})["data"]
    except ValidationError as exc:
        raise validation_error(exc, None) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the built-in default when `path` is None) and apply overrides."""
    source = "default recipe" if path is None else str(path)
    cfg = validated(RunConfig, read_tree(path), source)
    if not overrides:
        return cfg
    # Overrides change the *effective* recipe, defaults included, so that
    # `teacher.model.weights=x` keeps the default teacher arch.
    tree = apply_overrides(cfg.model_dump(mode="json"), overrides)
    return validated(RunConfig, tree, source)


def dump_config(cfg: BaseModel) -> str:
    """The resolved recipe as YAML (saved in the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
