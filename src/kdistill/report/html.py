"""The HTML report: one self-contained page (inline CSS, plots as PNG data URIs, no script, no
external URL) for one run directory, or a comparison of several.

It reads only what `kdistill run` leaves on disk (config.yaml, eval.json, the metrics.jsonl of
every stage, samples.json), so it works on old runs and on runs from another machine; reading
and checking those files is `kdistill.report.rundata`.
"""

from __future__ import annotations

import base64
import html
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdistill.errors import ConfigError
from kdistill.io import atomic_write_text
from kdistill.report import plots
from kdistill.report.markdown import _label, summary_table
from kdistill.report.rundata import Rows, RunData, artifact_pngs, compress_rows, curves, load_run

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 2em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td { white-space: nowrap; }
.wide { overflow-x: auto; } .label, .text { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
td.text { white-space: pre-wrap; min-width: 40em; font-family: ui-monospace, monospace;
          font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
.warn { background: #fff4e5; border-left: 4px solid #e67e22; padding: 0.4em 1em; }
"""


def _mean_per_class(seeds: list[dict[str, Any]]) -> list[float | None] | None:
    lists = [r["per_class_accuracy"] for r in seeds if r.get("per_class_accuracy")]
    if not lists:
        return None
    means: list[float | None] = []
    for values in zip(*lists, strict=False):
        present = [v for v in values if v is not None]
        means.append(statistics.mean(present) if present else None)
    return means


def class_gaps(rows: Rows) -> dict[str, list[float | None]]:
    """`student − baseline` and `student − teacher` per class (means over seeds); the last
    student generation is the one compared."""
    students = [role for role in rows if role.startswith("student")]
    student = _mean_per_class(rows.get(students[-1], [])) if students else None
    if student is None:
        return {}
    gaps: dict[str, list[float | None]] = {}
    for other in ("baseline", "teacher"):
        theirs = _mean_per_class(rows.get(other, []))
        if theirs is not None and len(theirs) == len(student):
            gaps[f"student − {other}"] = [None if s is None or t is None else s - t
                                          for s, t in zip(student, theirs, strict=True)]
    return gaps


# ---------------------------------------------------------------- HTML pieces


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table(table: list[list[str]], *, labels: int = 1, mono: bool = False) -> str:
    """A table whose first `labels` columns are names (left-aligned); `mono` shows the other
    cells as preformatted text (model outputs) instead of right-aligned numbers."""
    head, *body = table

    def cls(i: int) -> str:
        return ' class="label"' if i < labels else ' class="text"' if mono else ""

    lines = ["<tr>" + "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head)) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(line)) + "</tr>"
              for line in body]
    return '<div class="wide"><table>\n' + "\n".join(lines) + "\n</table></div>"


def _img(uri: str | None, alt: str, missing: str) -> str:
    if uri is None:
        return f'<p class="note">{_e(missing)}</p>'
    return f'<img src="{uri}" alt="{_e(alt)}">'


def comparison_table(runs: list[RunData]) -> list[list[str]]:
    """One table for every run: a `run` column, then the union of the runs' columns (an LM run
    and a classifier have different ones; a cell a run lacks reads '–')."""
    tables = [summary_table(run.rows) for run in runs]
    if len(runs) == 1:
        return tables[0]
    header: list[str] = []
    for table in tables:
        header += [h for h in table[0] if h not in header]
    out = [["run", *header]]
    for run, (head, *body) in zip(runs, tables, strict=True):
        for line in body:
            cells = dict(zip(head, line, strict=True))
            out.append([run.name, *(cells.get(h, "–") for h in header)])
    return out


def _per_run(runs: list[RunData], body: Callable[[RunData], str]) -> str:
    """A section's content for each run, under the run's name when there are several."""
    parts = []
    for run in runs:
        content = body(run)
        parts.append(content if len(runs) == 1 else f"<h3>{_e(run.name)}</h3>\n{content}")
    return "\n".join(parts)


def _loss_section(run: RunData) -> str:
    uri = plots.loss_curves(curves(run, "train"))
    return _img(uri, f"training loss terms of {run.name}",
                "No training records (metrics.jsonl) for the students of this run.")


def _val_section(run: RunData) -> str:
    metric = run.val_metric
    teacher = [r[metric] for r in run.rows.get("teacher", []) if r.get(metric) is not None]
    reference = {"teacher (test set)": statistics.mean(teacher)} if teacher else None
    uri = plots.val_curves(curves(run, "val"), metric, reference=reference)
    return _img(uri, f"validation {metric} per epoch of {run.name}",
                "No validation records: the run evaluated no epoch (train.eval_every_epochs).")


def _gap_section(run: RunData) -> str:
    if run.lm:
        return '<p class="note">A language model: no classes to compare.</p>'
    if run.embedding:
        return '<p class="note">A sentence encoder: no classes to compare.</p>'
    gaps = class_gaps(run.rows)
    if not gaps:
        return ('<p class="note">No per-class accuracy to compare: eval.json has no '
                "per_class_accuracy (a run from an older kdistill), or no student with a "
                "baseline or teacher beside it.</p>")
    n = len(next(iter(gaps.values())))
    # The user's class names (labels.json of a data source with named classes), else ids.
    names = run.class_names if len(run.class_names) == n else [str(c) for c in range(n)]
    uri = plots.class_gaps(gaps, names)
    table = [["class", *gaps]] + [
        [names[c], *("–" if v[c] is None else f"{100 * v[c]:+.2f}" for v in gaps.values())]
        for c in range(n)]
    return (_img(uri, f"per-class accuracy gaps of {run.name}", "")
            + f"<details><summary>as a table</summary>{_table(table)}</details>")


def _shown_text(text: str) -> str:
    """A model's output with its line breaks kept, but a run of empty lines (an untrained
    student's favourite output) counted instead of drawn as a screen of white."""
    return re.sub(r"\n{3,}", lambda m: f"\n[{len(m.group()) - 1} empty lines]\n", text)


def _samples_section(run: RunData) -> str:
    parts = []
    for i, sample in enumerate(run.samples, 1):
        table = [["model", "continuation"]] + [
            [_label(role), _shown_text(text)] for role, text in sample.items() if role != "prompt"]
        parts.append(f"<h4>Prompt {i}</h4><pre>{_e(sample.get('prompt', ''))}</pre>"
                     + _table(table, mono=True))
    return "\n".join(parts)


def _artifact_section(run: RunData) -> str:
    parts = []
    for png in artifact_pngs(run):
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<h4>{_e(png.relative_to(run.path))}</h4>" + _img(uri, png.stem, ""))
    return "\n".join(parts) or '<p class="note">None.</p>'


def _fmt(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else fmt.format(value * scale)


def _compress_section(run: RunData) -> str:
    """The compression chain's rows (`compress/eval.json`, one per stage), if it ran."""
    path = run.path / "compress" / "eval.json"
    if not path.is_file():
        return '<p class="note">No compression chain in this run.</p>'
    table = [["stage", "what", "runs in", "test acc %", "params", "non-zero", "bytes",
              "latency ms (batch 1)", "samples/s"]]
    for r in compress_rows(path):
        nonzero = r.get("nonzero_params", r.get("params"))
        table.append([str(r.get("stage", "")), str(r.get("what", "")), str(r.get("runtime", "")),
                      _fmt(r.get("accuracy"), "{:.2f}", 100), _fmt(r.get("params"), "{:,}"),
                      _fmt(nonzero, "{:,}"), _fmt(r.get("bytes"), "{:,}"),
                      _fmt(r.get("latency_ms"), "{:.4f}"), _fmt(r.get("throughput"), "{:,.0f}")])
    return _table(table, labels=3)


def _get(config: dict[str, Any], *keys: str) -> str:
    """A nested recipe value for the page's header, '?' where the recipe lacks it."""
    value: Any = config
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return "?" if value is None else str(value)


def render(runs: list[RunData]) -> str:
    """The whole page."""
    title = ("kdistill report: " + runs[0].name if len(runs) == 1
             else f"kdistill comparison of {len(runs)} runs")
    described = []
    for run in runs:
        arch = {part: _get(run.config, part, "model", "arch") for part in ("teacher", "student")}
        method, data = _get(run.config, "method", "name"), _get(run.config, "data", "name")
        described.append(f"<li><b>{_e(run.name)}</b> (<code>{_e(run.path)}</code>): data "
                         f"<code>{_e(data)}</code>, teacher <code>{_e(arch['teacher'])}</code>, "
                         f"student <code>{_e(arch['student'])}</code>, method "
                         f"<code>{_e(method)}</code></li>")
    metric_name = " or ".join(sorted({r.val_metric for r in runs}))
    test_metric = " or ".join(sorted({r.metric for r in runs}))
    # One Pareto figure per quality metric: accuracy and perplexity share no axis.
    paretos = [plots.pareto({r.name: r.rows for r in runs if r.metric == m}, m)
               for m in sorted({r.metric for r in runs})]
    warned = [f"<li><b>{_e(run.name)}</b>: {_e(w)}</li>" if len(runs) > 1 else
              f"<li>{_e(w)}</li>" for run in runs for w in run.warnings]
    sections = [
        f"<h1>{_e(title)}</h1>",
        f"<ul>{''.join(described)}</ul>",
        *([f'<div class="warn"><b>Warnings</b><ul>{"".join(warned)}</ul></div>']
          if warned else []),
        "<h2>Summary</h2>",
        '<p class="note">Test-set figures, mean ± std over seeds; latency and throughput are '
        "medians on the machine that ran the evaluation.</p>",
        _table(comparison_table(runs), labels=2 if len(runs) > 1 else 1),
        "<h2>Loss terms (training)</h2>",
        '<p class="note">Each weighted term the method logged, per optimiser step; one line per '
        "seed.</p>",
        _per_run(runs, _loss_section),
        f"<h2>Validation {_e(metric_name)} per epoch</h2>",
        _per_run(runs, _val_section),
        f"<h2>Pareto view: test {_e(test_metric)} vs parameters and latency</h2>",
        '<p class="note">Mean ± std over seeds; the dashed line joins the models that no other '
        "is both smaller (faster) and better than.</p>",
        *(_img(uri, "quality against size and latency", "No size or latency in eval.json.")
          for uri in paretos),
        "<h2>Per-class accuracy gaps</h2>",
        '<p class="note">Test accuracy difference in percentage points, per class; above zero '
        "the distilled student does better.</p>",
        _per_run(runs, _gap_section),
    ]
    if any(run.samples for run in runs):
        title = ("Beam translations" if all(r.metric == "bleu" for r in runs if r.samples)
                 else "Greedy continuations")
        sections += [f"<h2>{title} (test split)</h2>",
                     _per_run([r for r in runs if r.samples], _samples_section)]
    if any(artifact_pngs(r) for r in runs):
        sections += ["<h2>What the method made</h2>",
                     '<p class="note">Images a method saved in its finished stage, such as the '
                     "samples a data-free generator produced, one row per teacher class.</p>",
                     _per_run(runs, _artifact_section)]
    if any((r.path / "compress" / "eval.json").is_file() for r in runs):
        sections += ["<h2>Compression chain (test set)</h2>",
                     '<p class="note">Each stage applied to the first seed\'s distilled student '
                     "(the summary's row), measured as it runs (torch or onnxruntime).</p>",
                     _per_run(runs, _compress_section)]
    sections += ["<h2>Recipe (resolved)</h2>",
                 _per_run(runs, lambda run: f"<pre>{_e(run.config_text)}</pre>")]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
            "</body>\n</html>\n")


def write_html_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write report.html for one run (default `<run_dir>/report.html`) or one page comparing
    several (then `out` is required); returns the path written."""
    if not run_dirs:
        raise ConfigError("report", "no run directory given")
    runs = [load_run(Path(p)) for p in run_dirs]
    names = [run.name for run in runs]
    for run in runs:  # two runs of the same name (different output dirs): tell them apart
        if names.count(run.name) > 1:
            run.name = str(run.path)
    if out is None:
        if len(runs) > 1:
            raise ConfigError("--out", "comparing several runs needs an output path "
                              "(`kdistill report RUN_A RUN_B --out compare.html`)")
        out = runs[0].path / "report.html"
    out = Path(out)
    if out.is_dir():  # `--out reports/`: the usual file name inside it
        out = out / "report.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(str(out), f"cannot create its folder ({exc.strerror or exc})") from None
    # Non-ASCII (±, −, a recipe's text) as character references: the page reads the same
    # whatever the locale that writes it or the charset a viewer assumes.
    atomic_write_text(out, render(runs).encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return out
