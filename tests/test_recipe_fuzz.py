"""Property: every shipped recipe, mutated (types, values, deletions, overrides, garbage bytes),
either loads or fails with a KDistillError (exit 2 or 1 through the CLI), never another
exception. What `kdistill validate` does before it builds anything: `load_config` (or
`load_generate_config`). A few hundred examples in the default suite (a few seconds); many more
with `-m slow`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdistill.config import load_config
from kdistill.config.generate import load_generate_config
from kdistill.errors import KDistillError
from kdistill.io import read_yaml

from .conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TREES = {p.name: read_yaml(p) for p in RECIPES}
QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
DEFAULT = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                   suppress_health_check=QUIET)
SLOW = settings(max_examples=3000, deadline=None, database=None, suppress_health_check=QUIET)

# The tests reuse one tmp_path per test function: each example overwrites its recipe file.
# Values a recipe field might wrongly hold: other types, edge numbers, hostile strings.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-320, 1e308, -0.0]),
    st.text(max_size=20),
    st.sampled_from(["..", "../..", "/", "/etc/passwd", "x" * 300, "os:system", "custom",
                     "kd", "mnist1d", "float16", "\0", "é", "~", "$HOME", "null", "{}"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path (dict keys and list indices) in the tree."""
    out: list[tuple[Any, ...]] = []
    items = (tree.items() if isinstance(tree, dict) else enumerate(tree)
             if isinstance(tree, list) else [])
    for key, child in items:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


def _mutated(tree: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    """A copy of `tree` with the node at `path` deleted, replaced, or given a new sibling."""
    if not path:
        return value if action == "replace" else tree
    head, *rest = path
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    if rest:
        copy[head] = _mutated(copy[head], tuple(rest), action, value)
    elif action == "delete":
        del copy[head]
    elif action == "replace":
        copy[head] = value
    elif isinstance(copy, dict):
        copy[f"{head}_extra"] = value
    else:
        copy.append(value)
    return copy


def _load(name: str, path: Path, overrides: list[str] | None = None) -> None:
    """kdistill validate's parsing: success or a KDistillError, nothing else."""
    loader = load_generate_config if name.startswith("generate") else load_config
    with contextlib.suppress(KDistillError):
        loader(path, overrides)


@st.composite
def tree_mutation(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(TREES)))
    tree = TREES[name]
    mutated = tree
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(mutated) or [()]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
        mutated = _mutated(mutated, path, action, draw(values))
    return name, mutated


def _check_tree(tmp_path: Path, case: tuple[str, Any]) -> None:
    name, tree = case
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    _load(name, path)


@st.composite
def override(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(TREES)))
    paths = [".".join(map(str, p)) for p in _paths(TREES[name]) if all(
        isinstance(k, str) for k in p)]
    key = draw(st.sampled_from(paths or ["name"]))
    raw = draw(st.one_of(st.text(max_size=20), values.map(
        lambda v: yaml.safe_dump(v, default_flow_style=True).strip())))
    return name, f"{key}={raw}"


@st.composite
def byte_mutation(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(TREES)))
    data = bytearray((REPO / "recipes" / name).read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "truncate", "garbage"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "truncate":
            del data[at:]
        else:
            data = bytearray(draw(st.binary(max_size=64)))
    return name, bytes(data)


def _check_bytes(tmp_path: Path, case: tuple[str, bytes]) -> None:
    # The recipe loaders themselves, through the bounded reader (kdistill.io.read_yaml).
    name, data = case
    path = tmp_path / name
    path.write_bytes(data)
    _load(name, path)


@DEFAULT
@given(case=tree_mutation())
def test_mutated_recipes_load_or_fail_cleanly(tmp_path: Path, case: tuple[str, Any]) -> None:
    _check_tree(tmp_path, case)


@DEFAULT
@given(case=override())
def test_random_overrides_load_or_fail_cleanly(case: tuple[str, str]) -> None:
    name, text = case
    _load(name, REPO / "recipes" / name, [text])


@DEFAULT
@given(case=byte_mutation())
def test_garbage_bytes_load_or_fail_cleanly(tmp_path: Path, case: tuple[str, bytes]) -> None:
    _check_bytes(tmp_path, case)


@pytest.mark.slow
@SLOW
@given(case=tree_mutation())
def test_mutated_recipes_many(tmp_path: Path, case: tuple[str, Any]) -> None:
    _check_tree(tmp_path, case)


@pytest.mark.slow
@SLOW
@given(case=override())
def test_random_overrides_many(case: tuple[str, str]) -> None:
    _load(case[0], REPO / "recipes" / case[0], [case[1]])


@pytest.mark.slow
@SLOW
@given(case=byte_mutation())
def test_garbage_bytes_many(tmp_path: Path, case: tuple[str, bytes]) -> None:
    _check_bytes(tmp_path, case)
