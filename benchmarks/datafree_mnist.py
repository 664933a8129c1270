"""Data-free distillation on MNIST (issue #7): student accuracy data-free vs with real data vs
alone, and a grid of the generator's samples per teacher class.

Runs `recipes/datafree-mnist.yaml` (teacher: the pretrained ccexam CNN; rows: the student
alone on real data = the recipe's baseline, and the data-free student), then the same student
and budget distilled with `kd` on the real training images. The pipeline deletes a stage's
checkpoints when it finishes, so to draw the generator's samples this script keeps a handle on
the method object the pipeline builds (it wraps `kdistill.pipeline.order.build_method`) and calls
`save_sample_grid` on its generator. One intra-op thread (the recipe's `threads: 1`).

Run:  .venv/bin/python benchmarks/datafree_mnist.py [--out DIR] [key=value overrides]
Prints a Markdown table; the last line reads `name=value` pairs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from kdistill import load_config, run
from kdistill import pipeline as pipeline_module
from kdistill.methods import Method
from kdistill.methods.datafree import DAFL, DFAD
from kdistill.models.generator import save_sample_grid

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "datafree-mnist.yaml"


def _accuracy(rows: dict[str, list[dict[str, Any]]], role: str) -> float:
    return 100.0 * float(rows[role][0]["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--skip-real", action="store_true", help="no kd-on-real-data run")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=2")
    args = parser.parse_args()

    built: list[Method] = []
    original = pipeline_module.build_method

    def recording(cfg: Any) -> Method:
        method = original(cfg)
        built.append(method)
        return method

    pipeline_module.build_method = recording  # type: ignore[assignment]
    base = [f"output_dir={args.out}", *args.overrides]
    cfg = load_config(args.recipe, base)
    start = time.perf_counter()
    result = run(cfg)
    datafree_s = time.perf_counter() - start
    pipeline_module.build_method = original  # type: ignore[assignment]

    synth = next((m.synth for m in reversed(built) if isinstance(m, DAFL | DFAD)
                  and m.synth._teacher), None)
    grid = None
    if synth is not None:  # None when the stage was loaded from an earlier run
        grid = save_sample_grid(synth.generator, synth.teacher,
                                result.run_dir / "generated-samples.png")

    rows = [("teacher (ccexam CNN)", _accuracy(result.rows, "teacher")),
            ("student alone (real data, CE)", _accuracy(result.rows, "baseline")),
            (f"student data-free ({cfg.method.name})", _accuracy(result.rows, "student"))]
    real_s = 0.0
    if not args.skip_real:
        real = load_config(args.recipe, [*base, f"name={cfg.name}-kd-real", "baseline=false",
                                         "method={name: kd, temperature: 20.0, alpha: 0.9}"])
        start = time.perf_counter()
        real_rows = run(real).rows
        real_s = time.perf_counter() - start
        rows.append(("student distilled with real data (kd, T=20)",
                     _accuracy(real_rows, "student")))

    print("| model | test accuracy (%) |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.2f} |")
    if grid is not None:
        print(f"samples: {grid}")
    values = {"teacher": rows[0][1], "alone": rows[1][1], "datafree": rows[2][1]}
    if len(rows) > 3:
        values["kd_real"] = rows[3][1]
    values |= {"datafree_run_s": round(datafree_s), "kd_real_run_s": round(real_s)}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in values.items()))


if __name__ == "__main__":
    main()
