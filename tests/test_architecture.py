"""The package's layers: which module may import which (docs/architecture.md draws them).

An `ast` scan of every import in src/kdistill, function-level imports included: a module may
import its own package and the modules listed for it below, nothing else. A new arrow is a
design decision: add it here and to docs/architecture.md in the same change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "kdistill"

FOUNDATION = ("errors", "types")
# Package (or top-level module) -> the kdistill modules it may import, as dotted prefixes
# below `kdistill.` ("models.generator" allows that module only). Imports under
# `if TYPE_CHECKING:` are type hints, not arrows (the tasks name RunConfig in signatures while
# the config imports the tasks for their recipe checks).
ALLOWED: dict[str, tuple[str, ...]] = {
    "errors": (),
    "types": (),
    "devices": FOUNDATION,
    "io": FOUNDATION,
    "rundir": (*FOUNDATION, "io"),
    "weights": FOUNDATION,
    "schedules": FOUNDATION,
    "distributed": (*FOUNDATION, "devices"),
    "logger": (*FOUNDATION, "io"),
    "losses": FOUNDATION,
    "capture": FOUNDATION,
    "adapters": (*FOUNDATION, "capture"),
    "models": (*FOUNDATION, "weights"),
    # Sources read files and tokenizers (models.hf loads them); they save what evaluation
    # needs through io.
    "data": (*FOUNDATION, "io", "models"),
    # A method composes losses; it owns its adapters and, for data-free methods, a generator.
    "methods": (*FOUNDATION, "losses", "capture", "adapters", "schedules", "models.generator"),
    "config": (*FOUNDATION, "data", "devices", "io", "methods", "rundir", "schedules",
               "tasks"),
    # The cache stores what the losses read: the sparse targets come from losses.topk.
    "cache_key": FOUNDATION,
    "cache": (*FOUNDATION, "cache_key", "devices", "io", "capture", "losses.topk"),
    # Sizes before a cache exists (the memory plan, the cache budget) and of one that does.
    "cache_size": (*FOUNDATION, "cache", "capture", "devices"),
    "teachers": (*FOUNDATION, "devices", "cache", "capture"),
    # The cache as Parquet shards for other tools: it reads a cache and writes files.
    "cache_export": (*FOUNDATION, "cache", "io"),
    "checkpoint": (*FOUNDATION, "io", "weights"),
    "evaluate": (*FOUNDATION, "devices", "models"),
    "tasks": (*FOUNDATION, "devices", "config", "data", "evaluate", "losses", "models"),
    "engine": (*FOUNDATION, "capture", "checkpoint", "config", "data.loader", "devices",
               "distributed", "logger", "methods", "schedules", "teachers"),
    "build": (*FOUNDATION, "capture", "config", "data", "devices", "logger", "methods",
              "models", "tasks"),
    "compress": (*FOUNDATION, "build", "config", "data", "devices", "distributed", "engine",
                 "evaluate", "io", "logger", "methods", "models", "teachers"),
    "report": (*FOUNDATION, "compress", "config", "data", "io", "logger", "methods", "schedules",
               "tasks"),
    # The memory plan builds data and models as the run does and probes them.
    "planning": (*FOUNDATION, "build", "cache", "cache_size", "capture", "config", "devices",
                 "evaluate", "methods", "schedules", "tasks", "teachers"),
    "pipeline": (*FOUNDATION, "build", "cache", "cache_key", "cache_size", "compress", "config",
                 "data", "devices", "distributed", "engine", "io", "logger", "methods", "models",
                 "planning", "report", "rundir", "tasks", "teachers", "weights"),
    "cli": ("*",),
    "__init__": ("*",),
    "__main__": ("*",),
}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: type hints, no import at run time."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If)
              and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"]
    return {id(m) for b in blocks for s in b.body for m in ast.walk(s)}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module below `kdistill.`) for every kdistill import the file makes at run time."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kdistill":  # `from kdistill import distributed`
                out += [(node.lineno, a.name) for a in node.names]
            elif node.module.startswith("kdistill."):
                out.append((node.lineno, node.module.removeprefix("kdistill.")))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.removeprefix("kdistill."))
                    for a in node.names if a.name.startswith("kdistill.")]
    return out


def _allowed(package: str, target: str) -> bool:
    if target == package or target.startswith(package + "."):
        return True
    rules = ALLOWED[package]
    return "*" in rules or any(target == r or target.startswith(r + ".") for r in rules)


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(SRC)) for p in FILES])
def test_imports_follow_the_layers(path: Path) -> None:
    package = _package(path)
    assert package in ALLOWED, f"{package}: a new package; give it its arrows in ALLOWED"
    wrong = [f"{path.relative_to(SRC)}:{line} imports kdistill.{target}"
             for line, target in _imports(path) if not _allowed(package, target)]
    assert not wrong, "; ".join(wrong)


def test_the_scan_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The check itself can fail: a method importing the pipeline is caught, at its line.
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                   "    from kdistill.config import RunConfig\n\n"
                   "def f():\n    from kdistill.pipeline import run\n")
    assert _imports(bad) == [(8, "pipeline")]  # the type-only import makes no arrow
    assert not _allowed("methods", "pipeline") and not _allowed("methods", "models.hf")
    assert _allowed("methods", "models.generator") and _allowed("engine", "data.loader")


def test_docs_draw_the_same_arrows() -> None:
    # docs/architecture.md's table says the same as ALLOWED (a new arrow updates both).
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    table = doc.split("<!-- arrows:")[1].split("<!-- /arrows -->")[0]
    documented: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        targets = set() if cells[1].startswith("nothing") else (
            {"*"} if cells[1] == "anything" else
            {t.split(" (")[0].strip() for t in cells[1].split(",")})
        for part in cells[0].split(","):
            documented[part.strip().strip("`")] = targets
    assert documented == {part: set(rules) for part, rules in ALLOWED.items()}
