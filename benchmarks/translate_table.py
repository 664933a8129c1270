"""One table over translation runs (docs/translation.md): teacher, student alone, and the
distilled student of each run labelled by its method; mean ± std over seeds.

Reads only `eval.json` and `config.yaml` of finished runs. The teacher and the baseline rows
come from the first run that has them (the later runs load the same teacher weights and skip
the baseline, `baseline=false`). Speed columns are medians measured during each run's evaluate
stage with one intra-op thread; compare them as ratios, and only within one run, since other
processes shared the machine.

Run:  .venv/bin/python benchmarks/translate_table.py runs/translate-en-de runs/...-seqkd ...
The last line holds `<row>_bleu=<mean>` pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

COLUMNS = [("bleu", "BLEU beam"), ("chrf", "chrF beam"), ("bleu_greedy", "BLEU greedy"),
           ("chrf_greedy", "chrF greedy"), ("perplexity", "test ppl"),
           ("agreement", "agree %"), ("params", "params"),
           ("throughput", "greedy sent/s"), ("beam_throughput", "beam sent/s")]


def cell(values: list[float], key: str) -> str:
    scale = 100.0 if key == "agreement" else 1.0
    v = [x * scale for x in values]
    fmt = "{:,.0f}" if key == "params" else "{:.2f}"
    if len(v) == 1 or len(set(v)) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.mean(v))} ± {fmt.format(statistics.stdev(v))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    table: list[tuple[str, list[dict]]] = []
    for run in args.runs:
        rows = json.loads((run / "eval.json").read_text())
        method = yaml.safe_load((run / "config.yaml").read_text())["method"]["name"]
        for role, label in (("teacher", "teacher"), ("baseline", "student alone")):
            if rows.get(role) and all(name != label for name, _ in table):
                table.append((label, rows[role]))
        if rows.get("student"):
            table.append((f"student, {method}", rows["student"]))
    header = ["model", "seeds", *(h for _, h in COLUMNS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, seeds in table:
        cells = [cell([r[k] for r in seeds if k in r], k) if any(k in r for r in seeds)
                 else "–" for k, _ in COLUMNS]
        print(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
    print(" ".join(f"{label.replace('student, ', '').replace(' ', '_')}_bleu="
                   f"{statistics.mean(r['bleu'] for r in seeds):.2f}" for label, seeds in table))


if __name__ == "__main__":
    main()
