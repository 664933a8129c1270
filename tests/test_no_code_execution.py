"""No code runs from data: weights through safetensors or `torch.load(weights_only=True)`,
YAML through `safe_load`, no pickles, no remote code, no eval/exec; checked over the source.

The behaviour itself (a pickled payload refused and not run; a module path imported only with
`arch: custom`) is tested through the CLI in tests/test_bad_input.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

SOURCES = sorted((REPO / "src" / "kdistill").rglob("*.py")) + sorted(
    (REPO / "benchmarks").rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def unsafe_calls(source: str) -> list[str]:
    """`line: what` for every call that could run code from a file or a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):  # a YAML loader of our own must be a SafeLoader
            bases = {b.attr for b in node.bases if isinstance(b, ast.Attribute)
                     and isinstance(b.value, ast.Name) and b.value.id == "yaml"}
            if bases - {"SafeLoader", "CSafeLoader", "SafeDumper", "CSafeDumper"}:
                found.append(f"{node.lineno}: class {node.name} extends an unsafe yaml loader")
            continue
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
            func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        bad = None
        if owner == "torch" and name == "load" and _keyword(node, "weights_only") is not True:
            bad = "torch.load without weights_only=True"
        elif owner == "yaml" and name in ("load", "load_all", "full_load", "unsafe_load"):
            bad = f"yaml.{name} (use yaml.safe_load)"
        elif owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
            bad = f"{owner}.{name}"
        elif owner in ("np", "numpy") and name == "load" and _keyword(node, "allow_pickle"):
            bad = "np.load with allow_pickle"
        elif _keyword(node, "trust_remote_code") not in (None, False):
            bad = "trust_remote_code not False"
        elif isinstance(func, ast.Name) and name in ("eval", "exec"):  # not model.eval()
            bad = f"{name}()"
        if bad:
            found.append(f"{node.lineno}: {bad}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_no_call_runs_code_from_data(path: Path) -> None:
    assert unsafe_calls(path.read_text()) == []


def test_the_checker_finds_each_unsafe_call() -> None:
    # The checker's inputs, not calls. The torch loader's name is filled in at run time so
    # that a plain grep of the repository for unguarded loads stays a clean signal.
    bad = """
{load}(f)
{load}(f, weights_only=False)
yaml.load(text, Loader=yaml.Loader)
pickle.loads(blob)
np.load(f, allow_pickle=True)
AutoModel.from_pretrained(d, trust_remote_code=True)
eval(text)
class L(yaml.FullLoader): pass
class U(yaml.UnsafeLoader): pass
""".replace("{load}", "torch." + "load")
    assert len(unsafe_calls(bad)) == 9
    good = "torch.load(f, weights_only=True)\nyaml.safe_load(t)\nnp.load(f, mmap_mode='r')\n"
    good += "m.eval()\nself.model.eval()\nX.from_pretrained(d, trust_remote_code=False)\n"
    good += "class B(yaml.SafeLoader): pass\n"
    assert unsafe_calls(good) == []
