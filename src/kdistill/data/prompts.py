"""Real prompt sets, available offline, for sequence-level distillation (`kdistill generate`).

Prompt sets (`PROMPT_SETS`, read by `load_prompts`):
- "stdlib_functions": one question per documented public function or class of a fixed list of
  well-known standard-library modules (`STDLIB_MODULES`), e.g. "What does the Python function
  `json.dumps` do? Answer in two sentences.". Public means listed in the module's `__all__`, or,
  without one, defined by the module itself (so `shutil.os` and other re-exports are skipped).
  The reference answer is the first paragraph of the object's own docstring (a C function's
  leading signature line, e.g. "chain(*iterables) --> chain object", is skipped): a real,
  human-written answer for evaluating the teacher and the student later.
- "fortunes": "Explain the following saying in one or two sentences: ..." over the short
  (<= 200 characters) entries of the Debian `fortunes` package; no reference answer.

A file of the user's prompts (`read_prompt_file`, `prompts: {name: file, path: ...}` in a
generate recipe): a table (JSON Lines, CSV, TSV, Parquet, a saved HF dataset) whose rows hold a
`prompt` string or a `messages` conversation ending before the assistant's turn, and
optionally an `id` (else the row number: give ids if the file will change and a generation
must resume) and a `reference` answer.

Order: the prompts are collected in a fixed order (modules as listed, names sorted), then
shuffled once by `seed`, so a small `limit` samples across all modules and a larger limit with
the same seed extends a smaller one (its prompts are a prefix): a resumed generation can grow.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from kdistill.errors import ConfigError

STDLIB_MODULES = (
    "json", "os.path", "re", "itertools", "functools", "collections", "math", "string",
    "textwrap", "shutil", "pathlib", "random", "statistics", "datetime", "heapq", "bisect",
    "fnmatch", "glob", "csv", "base64", "operator", "copy", "difflib", "html", "urllib.parse",
    "tempfile", "contextlib", "dataclasses", "enum", "uuid", "hashlib", "zipfile",
)
MIN_REFERENCE_CHARS = 10
# Docstrings that Python writes itself (every undocumented Enum gets "An enumeration.").
GENERATED_DOCS = frozenset({"An enumeration."})
MAX_FORTUNE_CHARS = 200


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable `id` (resume and train/val/test splits key on it), the question,
    and a reference answer when the prompt set has one."""

    id: str
    prompt: str | list[dict[str, str]]  # the user's text, or a conversation (messages)
    reference: str | None = None


def _public_names(module: object) -> list[str]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return sorted(set(exported))
    # C modules (math, itertools) have no __all__: keep what the module defines itself.
    own = getattr(module, "__name__", None)
    return sorted(name for name, obj in vars(module).items()
                  if not name.startswith("_") and getattr(obj, "__module__", None) == own)


def _first_paragraph(doc: str, name: str) -> str:
    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    # C functions document their signature first ("reduce(function, iterable) -> value").
    if paragraphs and paragraphs[0].startswith(f"{name}("):
        paragraphs = paragraphs[1:]
    return paragraphs[0] if paragraphs else ""


def stdlib_functions(where: str = "prompts.name") -> list[Prompt]:
    """One prompt per documented public function/class of `STDLIB_MODULES`, in a fixed order."""
    prompts: list[Prompt] = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            if name.startswith("_"):
                continue
            obj = getattr(module, name, None)
            if not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue  # constants (math.pi, string.ascii_letters) have no docstring of their own
            # The object's own __doc__, never an inherited one (inspect.getdoc would return a
            # base class's docstring for an undocumented subclass).
            doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            if not isinstance(doc, str):
                continue
            reference = _first_paragraph(doc, name)
            if len(reference) < MIN_REFERENCE_CHARS or reference in GENERATED_DOCS:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            qualified = f"{module_name}.{name}"
            prompts.append(Prompt(
                id=qualified,
                prompt=f"What does the Python {kind} `{qualified}` do? Answer in two sentences.",
                reference=reference,
            ))
    return prompts


def fortune_prompts(where: str = "prompts.name") -> list[Prompt]:
    """Short entries of the Debian `fortunes` package, each to be explained; no reference."""
    from kdistill.data.text import read_corpus  # raises MissingDependencyError if absent

    texts = [t for t in read_corpus("fortunes", where=where) if len(t) <= MAX_FORTUNE_CHARS]
    return [
        Prompt(id=f"fortune-{i}",
               prompt=f"Explain the following saying in one or two sentences:\n\n{text}")
        for i, text in enumerate(texts)
    ]


PROMPT_SETS: dict[str, Callable[[str], list[Prompt]]] = {
    "stdlib_functions": stdlib_functions,
    "fortunes": fortune_prompts,
}


def load_prompts(name: str, *, limit: int | None, seed: int, where: str) -> list[Prompt]:
    """The prompts of a built-in set, shuffled once by `seed`, the first `limit` kept.

    Args:
        name: a key of `PROMPT_SETS`.
        limit: keep only the first `limit` prompts of the shuffled set; None keeps all.
        seed: seeds the shuffle (a larger limit with the same seed extends a smaller one).
        where: the recipe section naming fields in errors (`prompts` -> `prompts.limit`).
    """
    where = where.removesuffix(".name")
    if name not in PROMPT_SETS:
        close = difflib.get_close_matches(str(name), PROMPT_SETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}.name", f"unknown prompt set {name!r}{hint}; expected one "
                                           f"of: {', '.join(PROMPT_SETS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{where}.limit", f"expected a positive integer or null, got {limit!r}")
    prompts = PROMPT_SETS[name](f"{where}.name")
    random.Random(seed).shuffle(prompts)  # a private generator: the global one is untouched
    return prompts if limit is None else prompts[:limit]


_WORD = re.compile(r"\S+")


def document_prompts(documents: list[str], prefix_words: int, *, limit: int | None,
                     seed: int) -> list[Prompt]:
    """The first `prefix_words` words of each document (its own spacing kept), id `doc<i>` by
    the document's position, shuffled once by `seed` and cut to `limit` as `load_prompts`.
    A document of `prefix_words` words or fewer is skipped: nothing of it is left for the
    teacher to continue rather than start anew."""
    prompts = []
    for i, doc in enumerate(documents):
        ends = [m.end() for m in itertools.islice(_WORD.finditer(doc), prefix_words + 1)]
        if len(ends) > prefix_words:
            prompts.append(Prompt(id=f"doc{i}", prompt=doc[: ends[prefix_words - 1]]))
    random.Random(seed).shuffle(prompts)
    return prompts if limit is None else prompts[:limit]


def read_prompt_file(path: str, *, limit: int | None, seed: int, where: str) -> list[Prompt]:
    """The prompts of a file, shuffled once by `seed` and cut to `limit`, as `load_prompts`."""
    from kdistill.data.chat import read_conversation
    from kdistill.data.splitting import existing
    from kdistill.data.tables import read_table

    table = read_table(existing(path, f"{where}.path"), [], ("id", "prompt", "messages",
                                                              "reference"))
    if "prompt" not in table.columns and "messages" not in table.columns:
        raise ConfigError(path, f"needs a 'prompt' or a 'messages' column (columns: "
                                f"{', '.join(table.columns) or 'none'})")
    prompts, seen = [], {}
    for i in range(len(table)):
        row = {c: values[i] for c, values in table.columns.items()}
        text: str | list[dict[str, str]]
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            text = row["prompt"]
        elif row.get("messages") is not None:
            text = read_conversation(row["messages"], table.locate(i), prompt_only=True)
        else:
            raise ConfigError(table.locate(i), "has neither a 'prompt' text nor 'messages'")
        key = str(i + 1) if row.get("id") is None else str(row["id"])
        if key in seen:
            raise ConfigError(table.locate(i), f"id {key!r} is also row {seen[key] + 1}'s; ids "
                                               "must be unique (a resumed generation keys on "
                                               "them)")
        seen[key] = i
        reference = row.get("reference")
        prompts.append(Prompt(id=key, prompt=text,
                              reference=reference if isinstance(reference, str) else None))
    random.Random(seed).shuffle(prompts)
    return prompts if limit is None else prompts[:limit]
