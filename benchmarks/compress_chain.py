"""The compression chain end to end on a real recipe: distill (kdistill.run), then
prune -> distill -> quantize -> export (kdistill.compress.run_chain), one row per stage.

The YAML is a recipe plus `compress:` (the stage list) and, for this benchmark only,
`compress_variants: {name: {from: <stage of the main chain, or "input">, stages: [...]}}`:
further chains forked from a stage's model (e.g. static instead of dynamic int8), so the
shared prefix is trained once. Timings use one intra-op thread (the recipe's `threads: 1`).

Run:  .venv/bin/python benchmarks/compress_chain.py benchmarks/compress-mnist.yaml [key=value]
Prints the Markdown table; the last line reads `name=value` pairs of the main chain's end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from kdistill import load_config, run
from kdistill.build import build_data, build_network
from kdistill.compress import chain_table, parse_stages, run_chain
from kdistill.compress.finetune import nonzero_parameters, stage_row
from kdistill.errors import ConfigError
from kdistill.evaluate import predict
from kdistill.models import count_parameters
from kdistill.weights import load_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=5")
    args = parser.parse_args()
    tree = yaml.safe_load(args.recipe.read_text())
    stages = parse_stages(tree.pop("compress", []), where="compress")
    variants = tree.pop("compress_variants", {}) or {}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(tree, f)
    cfg = load_config(f.name, args.overrides)
    Path(f.name).unlink()

    start = time.perf_counter()
    result = run(cfg)
    distill_s = time.perf_counter() - start
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    splits = build_data(cfg.data, transfer=cfg.transfer)
    teacher = build_network(cfg.teacher.model, splits, where="teacher.model")
    load_weights(teacher, result.run_dir / "teacher" / "model.safetensors")
    seed = cfg.train.seeds[0]
    student = build_network(cfg.student.model, splits, where="student.model")
    load_weights(student, result.run_dir / f"seed-{seed}" / "student" / "model.safetensors")

    # The chain's starting point, measured like every stage (fp32 in torch).
    start_row = stage_row(student, splits, params=count_parameters(student),
                          nonzero=nonzero_parameters(student),
                          size_bytes=(result.run_dir / f"seed-{seed}" / "student" /
                                      "model.safetensors").stat().st_size,
                          teacher_logits=predict(teacher, splits.test_x), eval_cfg=cfg.eval,
                          runtime="torch")
    start_row.update(stage="input", what="distilled student (kdistill run)")
    common = dict(teacher=teacher, splits=splits, train_cfg=cfg.train, eval_cfg=cfg.eval,
                  seed=seed)
    models: dict[str, torch.nn.Module] = {"input": student}
    start = time.perf_counter()
    rows = run_chain(stages, student=student, run_dir=result.run_dir, models=models, **common)
    times = {"main": time.perf_counter() - start}
    all_rows = [start_row, *rows]
    for name, variant in variants.items():
        source = variant.get("from", "input")
        if source not in models:
            raise ConfigError(f"compress_variants.{name}.from",
                              f"no stage '{source}' (stages: {', '.join(models)})")
        start = time.perf_counter()
        all_rows += run_chain(parse_stages(variant["stages"], where=f"compress_variants.{name}"),
                              student=models[source], run_dir=result.run_dir / name,
                              row_prefix=f"{name}/{source}+", **common)
        times[name] = time.perf_counter() - start

    print(chain_table(all_rows))
    out = result.run_dir / "compress" / "chain.json"
    out.write_text(json.dumps({"rows": all_rows, "seconds": {"distill": distill_s, **times}},
                              indent=2))
    print(f"rows: {out}; seconds: distill {distill_s:.0f}, "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    first, last = start_row, rows[-1]
    print(f"accuracy_input={first['accuracy']:.4f} accuracy_final={last['accuracy']:.4f} "
          f"params_ratio={last['params'] / first['params']:.3f} "
          f"bytes_ratio={last['bytes'] / first['bytes']:.3f} "
          f"latency_ratio={last['latency_ms'] / first['latency_ms']:.3f}")


if __name__ == "__main__":
    main()
