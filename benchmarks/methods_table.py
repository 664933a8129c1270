"""Every method on one task, same student and budget, several seeds: which beat plain KD?

Runs `recipes/mnist1d.yaml` (kd) and each `recipes/mnist1d-<method>.yaml` through the real
pipeline (teacher trained once per run directory, the student alone and distilled per seed),
then prints one Markdown table: test accuracy mean ± std over seeds for the distilled student
and its baseline, the gain over the baseline, and training throughput relative to kd (from
the logged samples/s, one intra-op thread; feature methods run the teacher online).

Run:  .venv/bin/python benchmarks/methods_table.py --seeds 0 1 2 [--methods kd dkd ...]
The last line reads `best=<method> best_gain=<points>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from kdistill import load_config, run
from kdistill.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"kd": "mnist1d", "dkd": "mnist1d-dkd", "dist": "mnist1d-dist",
           "fitnet": "mnist1d-fitnet", "at": "mnist1d-at", "sp": "mnist1d-sp",
           "rkd": "mnist1d-rkd", "pkt": "mnist1d-pkt", "self_distill": "mnist1d-self-distill",
           "multi_kd": "mnist1d-multi-teacher"}
METHODS = list(RECIPES)


def recipe_for(method: str) -> Path:
    return REPO / "recipes" / f"{RECIPES[method]}.yaml"


def throughput(run_dir: Path, seeds: list[int]) -> float:
    """Mean logged training samples/s of the distilled students."""
    rates = [r["samples_per_s"] for s in seeds
             for r in read_metrics(run_dir / f"seed-{s}" / "student" / "metrics.jsonl")
             if r.get("split") == "train" and r.get("samples_per_s")]
    return statistics.mean(rates) if rates else float("nan")


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--output-dir", default=None, help="runs go here (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="kdistill-methods-"))
    results: dict[str, dict[str, object]] = {}
    for method in args.methods:
        cfg = load_config(recipe_for(method), [f"train.seeds={args.seeds}",
                                               f"output_dir={out}"])
        res = run(cfg, echo=lambda line, m=method: print(f"[{m}] {line}", flush=True))
        student = [100 * r["accuracy"] for r in res.rows["student"]]
        baseline = [100 * r["accuracy"] for r in res.rows["baseline"]]
        results[method] = {"student": student, "baseline": baseline,
                           "rate": throughput(res.run_dir, args.seeds)}
    kd_rate = results["kd"]["rate"] if "kd" in results else float("nan")
    print(f"\nMNIST-1D, cnn1d teacher -> 40-100-100-10 MLP (at: a thin cnn1d student), "
          f"200 epochs, seeds {args.seeds}, test accuracy %")
    print("| method | distilled | student alone | gain (points) | throughput vs kd |")
    print("|---|---|---|---|---|")
    gains = {}
    for method, r in results.items():
        gain = statistics.mean(r["student"]) - statistics.mean(r["baseline"])  # type: ignore[arg-type]
        gains[method] = gain
        print(f"| {method} | {fmt(r['student'])} | {fmt(r['baseline'])} | {gain:+.2f} | "  # type: ignore[arg-type]
              f"{r['rate'] / kd_rate:.2f} |")
    best = max(gains, key=gains.__getitem__)
    print(f"best={best} best_gain={gains[best]:.2f}")


if __name__ == "__main__":
    main()
