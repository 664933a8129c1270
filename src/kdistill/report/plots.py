"""The report's plots, each returned as a PNG data URI so that report.html stands alone.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas directly, not pyplot:
no global backend switch, no figure registry to leak, safe from any thread or a headless box.
"""

from __future__ import annotations

import base64
import io
import math
import statistics
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Fixed colours per role, so that a role looks the same in every plot of the page.
ROLE_COLORS = {"teacher": "#444444", "baseline": "#1f77b4", "student": "#ff7f0e"}
_EXTRA_COLORS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

# One record of a metrics.jsonl file, and every seed's records of one role.
Records = list[dict[str, Any]]


def role_color(role: str) -> str:
    if role in ROLE_COLORS:
        return ROLE_COLORS[role]
    if role.startswith("teacher"):
        return "#888888"
    return _EXTRA_COLORS[sum(map(ord, role)) % len(_EXTRA_COLORS)]  # stable across runs


def to_data_uri(fig: Figure) -> str:
    """The figure as `data:image/png;base64,...`; no metadata, so the bytes depend on the data."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(panels: int, *, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def loss_curves(curves: dict[str, list[Records]]) -> str | None:
    """One panel per loss term (`loss/<term>` keys of the train records, then the total when
    there are several terms); one line per role and seed, x = optimiser step."""
    terms: list[str] = []
    for seeds in curves.values():
        for records in seeds:
            for r in records:
                terms += [k for k in r if k.startswith("loss/") and k not in terms]
    if not terms:
        return None
    if len(terms) > 1:
        terms.append("loss")
    fig, axes = _figure(len(terms), width=3.6)
    for ax, term in zip(axes, terms, strict=True):
        for role, seeds in curves.items():
            for i, records in enumerate(seeds):
                points = [(r["step"], r[term]) for r in records if r.get(term) is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, color=role_color(role), alpha=0.85 if i == 0 else 0.4,
                            lw=1.2, label=role if i == 0 else None)
        ax.set_title(term.removeprefix("loss/") if term != "loss" else "total")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return to_data_uri(fig)


def val_curves(curves: dict[str, list[Records]], metric: str, *,
               reference: dict[str, float] | None = None) -> str | None:
    """The validation metric after each evaluated epoch, one line per role and seed; `reference`
    draws horizontal lines (the teacher's test figure)."""
    fig, axes = _figure(1, width=6.0, height=3.6)
    ax = axes[0]
    drawn = False
    for role, seeds in curves.items():
        for i, records in enumerate(seeds):
            points = [(r["epoch"] + 1, r[metric]) for r in records if r.get(metric) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ys = [100 * y for y in ys] if metric == "accuracy" else list(ys)
                ax.plot(xs, ys, marker="o", ms=3, color=role_color(role),
                        alpha=0.9 if i == 0 else 0.45, label=role if i == 0 else None)
                drawn = True
    if not drawn:
        return None
    for label, value in (reference or {}).items():
        ax.axhline(100 * value if metric == "accuracy" else value, color=role_color("teacher"),
                   ls="--", lw=1, label=label)
    if metric == "perplexity":
        ax.set_yscale("log")  # early LM perplexities are orders of magnitude above the end
    ax.set_xlabel("epochs done")
    ax.set_ylabel("val accuracy %" if metric == "accuracy" else f"val {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool
                 ) -> list[tuple[float, float]]:
    """The points no other point beats on both axes: smaller x, better y."""
    best = -math.inf
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        score = y if higher_is_better else -y
        if score > best:
            front.append((x, y))
            best = score
    return front


def pareto(points: dict[str, dict[str, list[dict[str, Any]]]], metric: str) -> str | None:
    """Quality against parameters and against batch-1 latency, mean ± std over seeds, for every
    (run, role); the dashed line joins the points nothing beats on both axes."""
    higher = metric != "perplexity"
    axes_keys = [("params", "parameters"), ("latency_ms", "latency at batch 1 (ms)")]
    fig, axes = _figure(2, width=4.8, height=3.6)
    drawn = False
    for ax, (key, xlabel) in zip(axes, axes_keys, strict=True):
        all_points = []
        for run, rows in points.items():
            for role, seeds in rows.items():
                xs = [r[key] for r in seeds if r.get(key) is not None]
                ys = [r[metric] for r in seeds if r.get(metric) is not None]
                if not xs or not ys:
                    continue
                scale = 100.0 if metric == "accuracy" else 1.0
                (x, xe), (y, ye) = _mean_std(xs), _mean_std([scale * v for v in ys])
                ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt="o", color=role_color(role),
                            capsize=3, ms=6)
                name = role if len(points) == 1 else f"{run}: {role}"
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
                all_points.append((x, y))
        if not all_points:
            continue
        drawn = True
        front = pareto_front(all_points, higher_is_better=higher)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), ls="--", color="#999999", lw=1, zorder=0)
        xs = [x for x, _ in all_points]
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")  # a teacher 100x the student would squash the students
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy %" if metric == "accuracy" else f"test {metric}")
        ax.grid(alpha=0.3, which="both")
    return to_data_uri(fig) if drawn else None


def class_gaps(gaps: dict[str, list[float | None]], class_names: Sequence[str]) -> str:
    """Grouped bars: per class, the accuracy difference in percentage points for each
    comparison (`student − baseline`, `student − teacher`)."""
    # Wide enough to read ten classes, capped so that CIFAR-100 stays one screen wide.
    width_in = min(14.0, max(6.0, 0.45 * len(class_names) * max(1, len(gaps))))
    fig, axes = _figure(1, width=width_in, height=3.4)
    ax = axes[0]
    width = 0.8 / max(1, len(gaps))
    colors = ["#2ca02c", "#888888", *_EXTRA_COLORS]
    for k, (label, values) in enumerate(gaps.items()):
        xs = [i + (k - (len(gaps) - 1) / 2) * width for i in range(len(values))]
        heights = [0.0 if v is None else 100 * v for v in values]
        ax.bar(xs, heights, width=width, label=label, color=colors[k % len(colors)])
    ax.axhline(0, color="black", lw=0.8)
    every = max(1, len(class_names) // 30)  # at most ~30 tick labels
    ticks = range(0, len(class_names), every)
    ax.set_xticks(list(ticks), [class_names[i] for i in ticks])
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy difference (points)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return to_data_uri(fig)
