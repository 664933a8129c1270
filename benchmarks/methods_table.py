"""Every method on one task, same student and budget, several seeds: which beat plain KD?

Tasks:
  mnist1d  `recipes/mnist1d.yaml` (kd) and each `recipes/mnist1d-<method>.yaml`: a cnn1d teacher
           trained in each run -> 40-100-100-10 MLP, 200 epochs.
  mnist    `recipes/mnist-methods.yaml`: the pretrained ccexam CNN -> 784-128-128-10 MLP,
           10 epochs; `method` swapped per row.
  fashion  `recipes/fashion-methods.yaml`: a CNN teacher trained once (in the kd run; the other
           rows load its weights) -> the same MLP, 10 epochs.

On mnist and fashion the MLP baseline is trained once (kd row) and shared by every MLP row (it
does not depend on the method); `at` needs feature maps, so its student is a LeNet-5 with its
own baseline. Feature methods read teacher layers from the cache (`cache.max_mb`); the
"epoch time vs kd" column is the ratio of logged training samples/s (one intra-op thread).

Run:  .venv/bin/python benchmarks/methods_table.py --task mnist --seeds 0 1 2 [--methods ...]
The last line reads `best=<method> best_gain=<points over kd>`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from kdistill import load_config, run
from kdistill.logger import read_metrics

REPO = Path(__file__).resolve().parents[1]
MNIST1D_RECIPES = {
    "kd": "mnist1d", "dkd": "mnist1d-dkd", "dist": "mnist1d-dist", "fitnet": "mnist1d-fitnet",
    "at": "mnist1d-at", "sp": "mnist1d-sp", "rkd": "mnist1d-rkd", "pkt": "mnist1d-pkt",
    "crd": "mnist1d-crd", "self_distill": "mnist1d-self-distill",
    "multi_kd": "mnist1d-multi-teacher", "attn": "mnist1d-attn"}

# Per image task: the teacher's penultimate layer (128 units, like the MLP's `layers.1`), the
# 14x14 teacher map LeNet-5's `features.pool1` meets for attention transfer, and the base T.
IMAGE_TASKS = {
    "mnist": {"recipe": "mnist-methods", "pen": "classifier.1", "map14": "features.2",
              "temperature": 20.0, "title": "MNIST, pretrained ccexam CNN (99.05 %)"},
    "fashion": {"recipe": "fashion-methods", "pen": "fc.act", "map14": "features.0.pool",
                "temperature": 4.0, "title": "Fashion-MNIST, CNN teacher trained by kdistill"},
}
IMAGE_METHODS = ["kd", "dkd", "dist", "fitnet", "sp", "rkd", "pkt", "crd", "self_distill",
                 "multi_kd", "at"]
SECOND_TEACHER = ("{model: {arch: lenet5}, train: {epochs: 8, batch_size: 128, "
                  "optimizer: {name: adam, lr: 0.001}}}")


def image_overrides(task: str, method: str) -> list[str]:
    """The recipe changes that turn the task's kd base into `method`'s row."""
    t = IMAGE_TASKS[task]
    pen, temp = t["pen"], t["temperature"]
    pair = f"student_layer: layers.1, teacher_layer: {pen}"
    blocks = {
        "kd": None,
        "dkd": "{name: dkd}",
        "dist": "{name: dist}",
        "fitnet": f"{{name: fitnet, {pair}, temperature: {temp}, alpha: 0.9}}",
        "sp": f"{{name: sp, pairs: [[layers.1, {pen}]]}}",
        "rkd": f"{{name: rkd, {pair}}}",
        "pkt": f"{{name: pkt, {pair}}}",
        "crd": f"{{name: crd, {pair}, num_negatives: 4096, shared_negatives: true}}",
        "self_distill": "{name: self_distill, layers: [layers.0]}",
        "multi_kd": f"{{name: multi_kd, temperature: {temp}, alpha: 0.9, weights: [2, 1], "
                    f"temperatures: [{temp}, 4.0], confidence: true}}",
        "at": f"{{name: at, pairs: [[features.pool1, {t['map14']}]], beta: 1000.0}}",
    }
    out = [] if blocks[method] is None else [f"method={blocks[method]}"]
    if method == "multi_kd":
        out.append(f"more_teachers=[{SECOND_TEACHER}]")
    if method == "at":
        out.append("student.model={arch: lenet5}")
    return out


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


def run_method(task: str, method: str, seeds: list[int], out: Path,
               teacher_weights: Path | None) -> dict[str, object]:
    if task == "mnist1d":
        recipe = REPO / "recipes" / f"{MNIST1D_RECIPES[method]}.yaml"
        overrides = []
    else:
        recipe = REPO / "recipes" / f"{IMAGE_TASKS[task]['recipe']}.yaml"
        overrides = [f"name={task}-{method}", *image_overrides(task, method)]
        if method not in ("kd", "at"):
            overrides.append("baseline=false")  # the same MLP baseline as the kd row
        if teacher_weights is not None:  # the teacher trained in the kd run, loaded as is
            overrides += [f"teacher.model.weights={teacher_weights}", "teacher.train=null"]
    cfg = load_config(recipe, [f"train.seeds={seeds}", f"output_dir={out}", *overrides])
    # Stages finished by an earlier invocation with the same --output-dir are loaded, not
    # retrained: rows can be added one command at a time and the table printed again.
    res = run(cfg, echo=lambda line: print(f"[{task}/{method}] {line}", flush=True))
    return {"student": [100 * r["accuracy"] for r in res.rows["student"]],
            "baseline": [100 * r["accuracy"] for r in res.rows.get("baseline", [])],
            "teacher": 100 * res.rows["teacher"][0]["accuracy"],
            "rate": throughput(res.run_dir, seeds), "run_dir": res.run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d", choices=["mnist1d", *IMAGE_TASKS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: every method of the task; kd always runs first")
    parser.add_argument("--output-dir", default=None, help="runs go here (default: a temp dir)")
    args = parser.parse_args()
    available = list(MNIST1D_RECIPES) if args.task == "mnist1d" else IMAGE_METHODS
    methods = args.methods or available
    unknown = sorted(set(methods) - set(available))
    if unknown:
        parser.error(f"--methods: {unknown} not in task {args.task}: {available}")
    methods = ["kd", *[m for m in methods if m != "kd"]]
    out = Path(args.output_dir or tempfile.mkdtemp(prefix=f"kdistill-{args.task}-"))
    results: dict[str, dict[str, object]] = {}
    teacher_weights = None
    for method in methods:
        results[method] = run_method(args.task, method, args.seeds, out, teacher_weights)
        if method == "kd" and args.task == "fashion":
            teacher_weights = Path(results["kd"]["run_dir"]) / "teacher" / "model.safetensors"
    kd = results["kd"]
    kd_acc = statistics.mean(kd["student"])  # type: ignore[arg-type]
    print(f"\n{IMAGE_TASKS[args.task]['title'] if args.task != 'mnist1d' else 'MNIST-1D'}: "
          f"teacher {kd['teacher']:.2f} %; seeds {args.seeds}; test accuracy %")
    print("| method | distilled | student alone | gain over alone | vs kd | epoch time vs kd |")
    print("|---|---|---|---|---|---|")
    gains = {}
    for method, r in results.items():
        alone = r["baseline"] or kd["baseline"]
        student = r["student"]
        gain = statistics.mean(student) - statistics.mean(alone)  # type: ignore[arg-type]
        gains[method] = statistics.mean(student) - kd_acc  # type: ignore[arg-type]
        note = " (LeNet-5)" if method == "at" and args.task != "mnist1d" else ""
        print(f"| {method}{note} | {fmt(student)} | {fmt(alone)} | {gain:+.2f} | "  # type: ignore[arg-type]
              f"{gains[method]:+.2f} | {kd['rate'] / r['rate']:.2f} |")  # type: ignore[operator]
    best = max(gains, key=gains.__getitem__)
    print(f"best={best} best_gain={gains[best]:.2f}")


if __name__ == "__main__":
    main()
