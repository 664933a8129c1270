"""Reading a run directory for the HTML report: what `kdistill run` leaves on disk, checked.

Every file is decoded and type-checked as it is read: config.yaml (bounded YAML, a mapping),
eval.json ({role: [row per seed]}, numbers), samples.json ([{model: text}]), compress/eval.json
(a row per stage) are each one `ConfigError` naming the file when they are not what
`kdistill run` writes, never a traceback; a metrics.jsonl line that is not a record (a torn last
line, undecodable bytes, another type) is skipped, and a record keeps only numbers. A run file
that is a symbolic link is refused (a linked config.yaml would put the file it names into the
page); a linked image or metrics file is left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError
from kdistill.io import parse_yaml_value, read_json, read_text, refuse_symlink
from kdistill.logger import read_metrics
from kdistill.report.markdown import _is_embedding

Rows = dict[str, list[dict[str, Any]]]


@dataclass
class RunData:
    """What one run directory holds, as the report needs it."""

    path: Path
    name: str
    config_text: str
    config: dict[str, Any]
    rows: Rows
    samples: list[dict[str, str]]
    warnings: list[str] = field(default_factory=list)  # the run's: a model at chance, ...
    class_names: list[str] = field(default_factory=list)  # labels.json: the name of each id

    @property
    def lm(self) -> bool:
        return any("perplexity" in r for seeds in self.rows.values() for r in seeds)

    @property
    def embedding(self) -> bool:
        """General distillation: encoders scored by agreement, probe and fine-tuning."""
        return _is_embedding(self.rows)

    @property
    def metric(self) -> str:
        """The test quality figure plotted: accuracy, perplexity for a causal LM, BLEU for
        translation, the cosine agreement with the teacher for a sentence encoder."""
        if any("bleu" in r for seeds in self.rows.values() for r in seeds):
            return "bleu"
        return self.val_metric

    @property
    def val_metric(self) -> str:
        """The figure logged per validation epoch (translation: teacher-forced perplexity)."""
        return "perplexity" if self.lm else "cosine" if self.embedding else "accuracy"


MAX_IMAGE_BYTES = 20 << 20  # a method's sample grid is a few hundred KB


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_rows(rows: dict[str, Any], path: Path) -> Rows:
    """eval.json as {role: [row per seed]}, each value a number, null, or a list of them."""
    for role, seeds in rows.items():
        if not isinstance(seeds, list) or not all(isinstance(r, dict) for r in seeds):
            raise ConfigError(str(path), f"expected {{role: [row per seed]}}; {role!r} is not a "
                              "list of rows")
        for row in seeds:
            for key, value in row.items():
                ok = value is None or _number(value) or (isinstance(value, list) and all(
                    v is None or _number(v) for v in value))
                if not ok:
                    raise ConfigError(str(path), f"{role}.{key}: expected a number, null or a "
                                      f"list of numbers, got {value!r:.40}")
    return rows


def _check_samples(samples: list[Any], path: Path) -> list[dict[str, str]]:
    if not all(isinstance(s, dict) and all(isinstance(v, str) for v in s.values())
               for s in samples):
        raise ConfigError(str(path), "expected a list of {model: text} objects")
    return samples


def load_run(path: Path) -> RunData:
    """Read a run directory; ConfigError naming the path (or the file) when it is not one."""
    path = Path(path)
    expected = "expected a run directory written by `kdistill run` (config.yaml and eval.json)"
    if not path.is_dir():
        raise ConfigError(str(path), f"not a directory; {expected}")
    missing = [f for f in ("config.yaml", "eval.json") if not (path / f).is_file()]
    if missing:
        raise ConfigError(str(path), f"missing {' and '.join(missing)}; {expected}; "
                          "a run stopped before its evaluate stage has no eval.json")
    for name in ("config.yaml", "eval.json", "samples.json", "warnings.json", "labels.json",
                 "compress/eval.json"):
        # A linked config.yaml would put whatever file it names into the page.
        refuse_symlink(path / name, "a run file")
    config_text = read_text(path / "config.yaml", what="the resolved recipe")
    config = parse_yaml_value(config_text, where=str(path / "config.yaml"))
    if not isinstance(config, dict):
        raise ConfigError(str(path / "config.yaml"), "expected the resolved recipe (a mapping)")
    rows = _check_rows(read_json(path / "eval.json", what="the evaluation rows"),
                       path / "eval.json")
    samples_path = path / "samples.json"
    samples = (_check_samples(read_json(samples_path, expect=list, what="the samples"),
                              samples_path) if samples_path.is_file() else [])
    warnings_path = path / "warnings.json"  # runs before this file existed have none
    warnings = read_json(warnings_path, expect=list, what="the run's warnings") \
        if warnings_path.is_file() else []
    if not all(isinstance(w, str) for w in warnings):
        raise ConfigError(str(warnings_path), "expected a list of strings")
    return RunData(path, str(config.get("name") or path.name), config_text, config, rows,
                   samples, warnings, _class_names(path / "labels.json"))


def _class_names(path: Path) -> list[str]:
    """labels.json's {"classes": [name of id 0, ...]}; none when there is no such file."""
    if not path.is_file():
        return []
    labels = read_json(path, what="the class names")
    names = labels.get("classes")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ConfigError(str(path), 'expected {"classes": [name of class 0, ...]}')
    return names


def _read_records(path: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split, numbers only (plus their `step` and `epoch` counters); a
    half-written last line (a killed run) or a line of anything else is skipped, and so is a
    file that is a link."""
    if path.is_symlink():
        return []
    out = []
    for record in read_metrics(path):  # JSON objects only; torn or foreign lines skipped
        if record.get("split") != split:
            continue
        counters = ("step", "epoch") if split == "val" else ("step",)
        if not all(isinstance(record.get(c), int) and not isinstance(record.get(c), bool)
                   for c in counters):
            continue
        out.append({k: v for k, v in record.items()
                    if k == "split" or v is None or _number(v)
                    or (k == "per_class_accuracy" and isinstance(v, list))})
    return out


def _seed_dirs(run: RunData) -> list[Path]:
    def number(p: Path) -> int:
        return int(p.name.removeprefix("seed-"))
    return sorted((p for p in run.path.glob("seed-*") if re.fullmatch(r"seed-\d+", p.name)),
                  key=number)


def curves(run: RunData, split: str) -> dict[str, list[list[dict[str, Any]]]]:
    """role -> one record list per seed, for the trained students and the baseline."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for role in run.rows:
        if role.startswith("teacher"):
            continue  # trained on another budget (or not here at all): its own x axis
        seeds = [_read_records(d / role / "metrics.jsonl", split) for d in _seed_dirs(run)]
        if any(seeds):
            out[role] = [s for s in seeds if s]
    return out


def artifact_pngs(run: RunData) -> list[Path]:
    """Images the methods left in finished student stages (e.g. data-free samples); links and
    oversized files are left out (a link could point at any file of the machine)."""
    return sorted(p for p in run.path.glob("seed-*/student*/*.png")
                  if not p.is_symlink() and p.is_file() and p.stat().st_size <= MAX_IMAGE_BYTES)


_CHAIN_NUMBERS = ("accuracy", "params", "nonzero_params", "bytes", "latency_ms", "throughput")


def compress_rows(path: Path) -> list[dict[str, Any]]:
    """compress/eval.json: one object per stage with numbers (or null) where numbers go."""
    rows = read_json(path, expect=list, what="the compression chain's rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(
                r.get(k) is None or _number(r.get(k)) for k in _CHAIN_NUMBERS):
            raise ConfigError(str(path), f"row {i}: expected an object with numbers for "
                              f"{', '.join(_CHAIN_NUMBERS)}")
    return rows

