"""DDP on CPU: one process vs `torchrun --nproc_per_node N`, same recipe and global batch.

Runs a recipe (default: the built-in MNIST-1D default, baseline off) as `kdistill run` in one
process and under torchrun with N gloo ranks, each process one intra-op thread, into separate
run directories; times each whole run from outside (start-up, teacher training, distillation;
evaluation runs on rank 0 alone); then compares the students: test accuracy, and the largest
difference between their weights (DDP with the same global batch should give the same student
up to float reduction order). Needs N free cores to show a speed-up.

Run:  .venv/bin/python benchmarks/bench_ddp.py --nproc 2 [--recipe R] [key=value ...]
The last line reads `ddp_speedup=<t1/tN> train_speedup=<samples/s ratio> max_weight_diff=<x>
accuracy_1=<a> accuracy_N=<b>`. Per-step losses of the two agree to ~1e-7; over thousands of
Adam steps such differences grow, as with any change of summation order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

BIN = Path(sys.executable).parent


def _run(cmd: list[str], out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([*cmd, f"output_dir={out}", "threads=1"], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _train_speed(metrics: Path) -> float:
    """Median global samples/s over the stage's logged training windows (rank 0 logs them)."""
    values = [r["samples_per_s"] for r in map(json.loads, metrics.read_text().splitlines())
              if r.get("split") == "train" and r.get("samples_per_s")]
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--recipe", default=None, help="recipe file; default: built-in")
    parser.add_argument("overrides", nargs="*", default=["baseline=false"])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kdistill-ddp-"))
    recipe = [args.recipe] if args.recipe else []
    single = _run([str(BIN / "kdistill"), "run", *recipe, *args.overrides], base / "one")
    multi = _run([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}",
                  "-m", "kdistill", "run", *recipe, *args.overrides], base / "many")
    (one,) = (base / "one").iterdir()
    (many,) = (base / "many").iterdir()
    diff = 0.0
    a = load_file(one / "seed-0" / "student" / "model.safetensors")
    b = load_file(many / "seed-0" / "student" / "model.safetensors")
    for key in a:
        diff = max(diff, float((a[key] - b[key]).abs().max()))
    acc = [json.loads((d / "eval.json").read_text())["student"][0]["accuracy"] * 100
           for d in (one, many)]
    speed = [_train_speed(d / "seed-0" / "student" / "metrics.jsonl") for d in (one, many)]
    print("| processes | wall s (whole run) | distillation samples/s (median of logged "
          "windows) | student test acc % |\n|---|---|---|---|\n"
          f"| 1 | {single:.1f} | {speed[0]:,.0f} | {acc[0]:.2f} |\n"
          f"| {args.nproc} (torchrun, gloo) | {multi:.1f} | {speed[1]:,.0f} | {acc[1]:.2f} |")
    print(f"ddp_speedup={single / multi:.2f} train_speedup={speed[1] / speed[0]:.2f} "
          f"max_weight_diff={diff:.2e} "
          f"accuracy_1={acc[0]:.2f} accuracy_{args.nproc}={acc[1]:.2f}")


if __name__ == "__main__":
    main()
