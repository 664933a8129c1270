"""The Markdown report: teacher vs baseline vs distilled student, mean ± std over seeds."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from kdistill.config import RunConfig, dump_config
from kdistill.io import atomic_write_text

# (key, header, format of one value, scale)
COLUMNS: list[tuple[str, str, str, float]] = [
    ("accuracy", "test acc %", "{:.2f}", 100.0),
    ("errors", "test errors", "{:.1f}", 1.0),
    ("agreement", "agree w/ teacher %", "{:.2f}", 100.0),
    ("ece", "ECE", "{:.4f}", 1.0),
    ("params", "params", "{:,.0f}", 1.0),
    ("bytes", "size KiB", "{:,.1f}", 1 / 1024),
    ("latency_ms", "latency b1 ms", "{:.3f}", 1.0),
    ("throughput", "throughput /s", "{:,.0f}", 1.0),
]
# Causal LMs: per-token figures on the held-out test blocks.
LM_COLUMNS: list[tuple[str, str, str, float]] = [
    ("perplexity", "test perplexity", "{:.2f}", 1.0),
    ("bits_per_byte", "bits/byte", "{:.3f}", 1.0),
    ("accuracy", "next-token acc %", "{:.2f}", 100.0),
    ("agreement", "agree w/ teacher %", "{:.2f}", 100.0),
    ("params", "params", "{:,.0f}", 1.0),
    ("bytes", "size KiB", "{:,.1f}", 1 / 1024),
    ("latency_ms", "latency 1 block ms", "{:.1f}", 1.0),
    ("throughput", "tokens/s", "{:,.0f}", 1.0),
]
# Translation: corpus BLEU / chrF (sacrebleu) of beam and greedy outputs on the test split.
SEQ2SEQ_COLUMNS: list[tuple[str, str, str, float]] = [
    ("bleu", "BLEU (beam)", "{:.2f}", 1.0),
    ("chrf", "chrF (beam)", "{:.2f}", 1.0),
    ("bleu_greedy", "BLEU (greedy)", "{:.2f}", 1.0),
    ("chrf_greedy", "chrF (greedy)", "{:.2f}", 1.0),
    ("perplexity", "test perplexity", "{:.2f}", 1.0),
    ("agreement", "agree w/ teacher %", "{:.2f}", 100.0),
    ("params", "params", "{:,.0f}", 1.0),
    ("bytes", "size KiB", "{:,.1f}", 1 / 1024),
    ("latency_ms", "greedy ms/sentence b1", "{:.1f}", 1.0),
    ("throughput", "greedy sentences/s", "{:,.1f}", 1.0),
    ("beam_throughput", "beam sentences/s", "{:,.1f}", 1.0),
]
# General distillation (`kdistill.tasks.embedding`): agreement on held-out unlabelled text, a linear
# probe on frozen embeddings and the accuracy after fine-tuning on the labelled task.
EMBED_COLUMNS: list[tuple[str, str, str, float]] = [
    ("cosine", "cos w/ teacher (held-out)", "{:.4f}", 1.0),
    ("probe_accuracy", "linear probe acc %", "{:.2f}", 100.0),
    ("finetune_accuracy", "fine-tuned acc %", "{:.2f}", 100.0),
    ("params", "params", "{:,.0f}", 1.0),
    ("bytes", "size KiB", "{:,.1f}", 1 / 1024),
    ("latency_ms", "latency b1 ms", "{:.3f}", 1.0),
    ("throughput", "throughput /s", "{:,.0f}", 1.0),
]
ROLES = {"teacher": "teacher", "baseline": "student alone (baseline)",
         "student": "distilled student",
         "untrained": "student before distillation (its initialisation)"}


def _label(role: str) -> str:
    if role in ROLES:
        return ROLES[role]
    if role.startswith("teacher-"):
        return f"teacher {role.removeprefix('teacher-')}"
    return f"distilled student, generation {role.removeprefix('student-gen')}"


def _cell(values: list[float], fmt: str, scale: float) -> str:
    scaled = [v * scale for v in values]
    if len(set(scaled)) == 1:  # one seed, or a value seeds cannot change (parameters, size)
        return fmt.format(scaled[0])
    return f"{fmt.format(statistics.mean(scaled))} ± {fmt.format(statistics.stdev(scaled))}"


def _is_lm(rows: dict[str, list[dict[str, Any]]]) -> bool:
    return any("perplexity" in r for runs in rows.values() for r in runs)


def _is_seq2seq(rows: dict[str, list[dict[str, Any]]]) -> bool:
    return any("bleu" in r for runs in rows.values() for r in runs)


def _is_embedding(rows: dict[str, list[dict[str, Any]]]) -> bool:
    return "untrained" in rows or any("probe_accuracy" in r for runs in rows.values()
                                      for r in runs)


def summary_table(rows: dict[str, list[dict[str, Any]]]) -> list[list[str]]:
    """Header + one line per role; cells are 'mean ± std' when several seeds ran."""
    columns = (SEQ2SEQ_COLUMNS if _is_seq2seq(rows) else LM_COLUMNS if _is_lm(rows)
               else EMBED_COLUMNS if _is_embedding(rows)
               else COLUMNS)
    table = [["model", "seeds", *(header for _, header, _, _ in columns)]]
    for role in rows:
        label = _label(role)
        runs = rows.get(role) or []
        if not runs:
            continue
        line = [label, str(len(runs))]
        for key, _, fmt, scale in columns:
            values = [r[key] for r in runs if r.get(key) is not None]
            line.append(_cell(values, fmt, scale) if values else "–")
        table.append(line)
    return table


def to_markdown(table: list[list[str]]) -> str:
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def _verdict(rows: dict[str, list[dict[str, Any]]]) -> str:
    last = [role for role in rows if role.startswith("student")][-1:] or ["student"]
    base, student = rows.get("baseline") or [], rows.get(last[0]) or []
    if _is_embedding(rows):
        return _embedding_verdict(rows)
    if not base or not student:
        return ""
    if _is_seq2seq(rows):
        b = statistics.mean(r["bleu"] for r in base)
        s = statistics.mean(r["bleu"] for r in student)
        return (f"The {_label(last[0])} reaches a test BLEU of {s:.2f} against {b:.2f} for "
                f"the same student trained alone (beam search, mean over {len(student)} "
                f"seed(s)).")
    if _is_lm(rows):
        b = statistics.mean(r["perplexity"] for r in base)
        s = statistics.mean(r["perplexity"] for r in student)
        return (f"The {_label(last[0])} reaches a test perplexity of {s:.2f} against {b:.2f} "
                f"for the same student trained alone (mean over {len(student)} seed(s)).")
    b = statistics.mean(r["errors"] for r in base)
    s = statistics.mean(r["errors"] for r in student)
    word = "fewer" if s < b else "more" if s > b else "as many"
    who = _label(last[0])
    return (f"The {who} makes {abs(b - s):.1f} {word} test errors than the same "
            f"student trained alone ({s:.1f} vs {b:.1f}, mean over {len(student)} seed(s)).")


def _embedding_verdict(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Distilled vs undistilled student (same initialisation), on what both rows hold."""
    student, untrained = rows.get("student") or [], rows.get("untrained") or []
    parts = []
    for key, what in (("probe_accuracy", "linear-probe"), ("finetune_accuracy", "fine-tuned")):
        s = [r[key] for r in student if r.get(key) is not None]
        u = [r[key] for r in untrained if r.get(key) is not None]
        if s and u:
            parts.append(f"{what} test accuracy {100 * statistics.mean(s):.2f} % against "
                         f"{100 * statistics.mean(u):.2f} % before distillation")
    if not parts:
        return ""
    return (f"The distilled student reaches a {'; a '.join(parts)} (same initialisation, "
            f"mean over {len(student)} seed(s)).")


def _samples_markdown(samples: list[dict[str, str]]) -> str:
    """One small table per prompt: each model's greedy continuation, side by side."""
    def cell(text: str) -> str:  # one table row: no newlines or pipes
        return " ".join(text.split()).replace("|", "\\|") or "(empty)"

    translation = any("→ reference:" in sample.get("prompt", "") for sample in samples)
    parts = ["## Beam translations (test split)" if translation
             else "## Greedy continuations (test split)"]
    for i, sample in enumerate(samples, 1):
        lines = [f"**Prompt {i}:** {cell(sample['prompt'])}", "",
                 "| model | continuation |", "|---|---|"]
        lines += [f"| {_label(role)} | {cell(text)} |" for role, text in sample.items()
                  if role != "prompt"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _chain_table(rows: list[dict[str, Any]]) -> str:
    from kdistill.compress import chain_table  # the chain's own table, one row per stage

    return chain_table(rows).rstrip()


def write_report(run_dir: Path, cfg: RunConfig, rows: dict[str, list[dict[str, Any]]], *,
                 samples: list[dict[str, str]] | None = None,
                 compress: list[dict[str, Any]] | None = None,
                 warnings: list[str] | None = None) -> Path:
    """`report.md`: the summary table, the verdict, per-seed rows, LM samples, the compression
    chain's rows (one per stage, the distilled student first) and the resolved recipe."""
    lm, seq2seq, embedding = _is_lm(rows), _is_seq2seq(rows), _is_embedding(rows)

    def pct(r: dict[str, Any], key: str) -> str:
        return "–" if r.get(key) is None else f"{100 * r[key]:.2f}"

    # Per task: the per-seed table's headers and one row's figures.
    header, cells = (
        (["BLEU", "chrF"], lambda r: f"{r['bleu']:.2f} | {r['chrf']:.2f}") if seq2seq else
        (["test perplexity", "next-token acc %"],
         lambda r: f"{r['perplexity']:.2f} | {100 * r['accuracy']:.2f}") if lm else
        (["cos w/ teacher", "probe acc %", "fine-tuned acc %"],
         lambda r: f"{r.get('cosine', float('nan')):.4f} | {pct(r, 'probe_accuracy')} | "
                   f"{pct(r, 'finetune_accuracy')}") if embedding else
        (["test acc %", "test errors"],
         lambda r: f"{100 * r['accuracy']:.2f} | {r['errors']:.0f}"))
    per_seed = ["| model | seed | " + " | ".join(header) + " |",
                "|---|---|" + "---|" * len(header)]
    for role in rows:
        for r in rows[role] if not role.startswith("teacher") else []:
            last = cells(r)
            per_seed.append(f"| {_label(role)} | {r['seed']} | {last} |")
    text = "\n\n".join([
        f"# kdistill report: {cfg.name}",
        f"Data `{cfg.data.name}`; teacher `{cfg.teacher.model.arch}`, student "
        f"`{cfg.student.model.arch}`; method `{cfg.method.name}`. Test-set figures; latency "
        f"and throughput are medians with {cfg.threads or 'default'} intra-op thread(s).",
        *(["**Warnings**\n\n" + "\n".join(f"- {w}" for w in warnings)] if warnings else []),
        to_markdown(summary_table(rows)),
        _verdict(rows),
        "## Per seed",
        "\n".join(per_seed),
        *([_samples_markdown(samples)] if samples else []),
        *(["## Compression chain (test set)", _chain_table(compress)] if compress else []),
        "## Recipe (resolved)",
        "```yaml\n" + dump_config(cfg).rstrip() + "\n```",
    ])
    path = run_dir / "report.md"
    atomic_write_text(path, text + "\n")
    return path
