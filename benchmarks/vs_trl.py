"""kdistill against TRL's GKDTrainer on the same LLM distillation: tokens/s, peak memory, loss.

Same teacher (SmolLM2-135M-Instruct, the packaged GGUF de-quantised to float32), same student
(a Hugging Face `LlamaForCausalLM` of the teacher's width with its embeddings, final norm and
`--layers` evenly spaced decoder layers: kdistill's `llama_student(init_from="smollm2")`), both
saved once with `save_pretrained` and loaded by every variant; same blocks of stdlib docstrings
(`--seq-len` tokens), batch, steps, AdamW at a constant learning rate; one intra-op thread.

Variants, each in a fresh subprocess (so `ru_maxrss` is its own peak):

| variant | what | loss |
|---|---|---|
| `trl_off` | TRL `GKDTrainer`, λ = 0 (the data's blocks) | JSD(β) |
| `trl_on` | TRL `GKDTrainer`, λ = 1 (the student continues the first half, sampled) | JSD(β) |
| `kd_dense` | kdistill `token_kd` through `train()`, online teacher, full logits | JSD(β) |
| `kd_fused` | kdistill `fused_linear_token_distill_loss` (hidden states and lm_head in, the (N, V) logits never whole), online teacher, a plain loop | JSD(β) |
| `kd_topk` | kdistill `token_kd` through `train()` from a top-32 cache built first (its build time reported apart); forward KL, the cache's sparse path | forward KL |
| `kd_gkd_on` | kdistill `gkd` through `train()`, λ = 1, the same prompt half | JSD(β) |

TRL runs in its own virtual environment (`--trl-python`; it is never a dependency of kdistill);
kdistill variants run here. Timing: the wall time between consecutive optimiser steps (a post-
step hook on the optimiser, so loading, the first `--warmup` steps and the end are left out),
median over `--steps`; tokens/s = batch × seq_len / that median (on-policy: the whole block,
prompt and sampled half, as both libraries train on it). Memory: `ru_maxrss` of the variant's
process (models, data, optimiser state and the steps), and the same minus the RSS after
loading (what the training steps add).

Loss values: one block through the teacher and the student (float32 logits), TRL's
`GKDTrainer.generalized_jsd_loss` (run in TRL's environment on the saved logits) against
kdistill's `token_kd(kind="jsd")` for several β; the largest absolute difference is printed
(goal ≤ 1e-6).

Run:  PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py \\
          --trl-python /work/trl-venv/bin/python --steps 5 --warmup 2 --batch 4 --seq-len 256
Last line: `name=value` pairs (tokens/s and peak MB per variant, the ratios, loss_max_diff).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("trl_off", "trl_on", "kd_dense", "kd_fused", "kd_topk", "kd_gkd_on")
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
LR = 1e-4


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _StepClock:
    """Timestamps after every optimiser step (a post-step hook); step times between them."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.times: list[float] = []
        optimizer.register_step_post_hook(lambda *_: self.times.append(time.perf_counter()))

    def step_seconds(self, warmup: int) -> list[float]:
        ticks = self.times[max(warmup - 1, 0):]
        return [b - a for a, b in zip(ticks, ticks[1:], strict=False)]


# --- preparation (kdistill's environment) ----------------------------------------------------

def prepare(work: Path, args: argparse.Namespace) -> None:
    """Blocks of real text, the teacher and the student as HF directories, one block's logits."""
    from kdistill.data.text import lm_splits
    from kdistill.losses import shift_labels
    from kdistill.models.hf import llama_student, load_tokenizer, pretrained_causal_lm

    tok = load_tokenizer("smollm2")
    splits = lm_splits("stdlib_docs", tok, seq_len=args.seq_len, val_fraction=0.05,
                       test_fraction=0.05, split_seed=0, max_train_tokens=None,
                       max_eval_tokens=None, where="data")
    n = (args.warmup + args.steps) * args.batch
    torch.save(splits.train_x[:n].clone(), work / "blocks.pt")
    vocab = splits.num_classes
    teacher = pretrained_causal_lm((args.seq_len,), vocab)
    student = llama_student((args.seq_len,), vocab, layers=args.layers, init_from="smollm2")
    for name, model in (("teacher", teacher), ("student", student)):
        model.model.save_pretrained(work / name)
        # The weights are already de-quantised float32; the GGUF origin left a
        # quantization_config in the config, which makes transformers' Trainer refuse to train.
        config = json.loads((work / name / "config.json").read_text())
        config.pop("quantization_config", None)
        (work / name / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(work / "tokenizer")
    block = splits.train_x[:1]
    with torch.no_grad():
        logits = {"student": student(block), "teacher": teacher(block),
                  "labels": shift_labels(splits.train_y[:1], ignore_index=-100)}
    torch.save(logits, work / "logits.pt")


def _load_models(work: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32)
    teacher.requires_grad_(False)
    return teacher, student


# --- TRL (its own environment) ---------------------------------------------------------------

def run_trl(work: Path, args: argparse.Namespace, lmbda: float) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    blocks = torch.load(work / "blocks.pt", weights_only=True)
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    teacher, student = _load_models(work)
    half = args.seq_len // 2

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows])
        prompts = ids[:, :half]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)}

    config = GKDConfig(
        output_dir=str(work / f"trl-out-{lmbda}"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, lmbda=lmbda, beta=args.beta, temperature=1.0,
        max_new_tokens=args.seq_len - half, max_length=args.seq_len, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    clock = _StepClock(optimizer)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         data_collator=collate, processing_class=tok,
                         train_dataset=Dataset.from_dict({"input_ids": blocks.tolist()}),
                         optimizers=(optimizer, None))
    loaded = _rss_mb()
    trainer.train()
    return {"step_s": clock.step_seconds(args.warmup), "rss_loaded_mb": loaded}


def trl_losses(work: Path) -> dict[str, float]:
    from trl.experimental.gkd import GKDTrainer

    saved = torch.load(work / "logits.pt", weights_only=True)
    s, t, y = saved["student"], saved["teacher"], saved["labels"]
    # TRL's own causal shift (compute_loss): logits[:, :-1] against labels[:, 1:]; kdistill's
    # shifted labels are already aligned, so the last position (label -100) is dropped here.
    return {str(b): float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], y[:, :-1],
                                                          beta=b)) for b in BETAS}


# --- kdistill (this environment) -------------------------------------------------------------

def run_kdistill(work: Path, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    from kdistill import BatchLoader, CachedTeacher, CacheKey, LoopSettings, build_cache, train
    from kdistill.methods import METHODS, build_method
    from kdistill.models.hf import CausalLM

    blocks = torch.load(work / "blocks.pt", weights_only=True)
    teacher_hf, student_hf = _load_models(work)
    teacher, student = CausalLM(teacher_hf), CausalLM(student_hf)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    clock = _StepClock(optimizer)
    out: dict[str, Any] = {"rss_loaded_mb": _rss_mb()}
    if variant == "kd_fused":
        _fused_loop(teacher_hf, student_hf, optimizer, blocks, args)
        return {**out, "step_s": clock.step_seconds(args.warmup)}
    settings = LoopSettings(max_steps=args.warmup + args.steps, log_every=10_000)
    loader = BatchLoader(blocks, blocks, batch_size=args.batch, shuffle=False)
    if variant == "kd_topk":
        start = time.perf_counter()
        cache = build_cache(work / "cache", teacher, blocks,
                            CacheKey(teacher="t", data="d", dtype="float16", topk=32),
                            batch_size=args.batch)
        out["cache_build_s"] = time.perf_counter() - start
        teacher_arg: Any = CachedTeacher(cache)
        cfg = METHODS["token_kd"].config_type(kind="forward_kl", alpha=1.0)
    elif variant == "kd_dense":
        teacher_arg = teacher
        cfg = METHODS["token_kd"].config_type(kind="jsd", beta=args.beta, alpha=1.0)
    else:  # kd_gkd_on
        teacher_arg = teacher
        cfg = METHODS["gkd"].config_type(lmbda=1.0, beta=args.beta, sample_temperature=1.0,
                                         prompt_tokens=args.seq_len // 2)
    train(student, teacher_arg, build_method(cfg), loader, optimizer, settings, seed=0)
    return {**out, "step_s": clock.step_seconds(args.warmup)}


def _fused_loop(teacher: Any, student: Any, optimizer: torch.optim.Optimizer,
                blocks: torch.Tensor, args: argparse.Namespace) -> None:
    """A training loop that owns the lm_head call: hidden states in, the loss chunk by chunk."""
    from kdistill.losses import fused_linear_token_distill_loss, shift_labels

    student.train()
    for start in range(0, (args.warmup + args.steps) * args.batch, args.batch):
        ids = blocks[start:start + args.batch]
        with torch.no_grad():
            t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        s_hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        res = fused_linear_token_distill_loss(
            s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight,
            shift_labels(ids, ignore_index=-100), alpha=1.0, kind="jsd", beta=args.beta,
            chunk_size=256)
        res.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def kdistill_losses(work: Path) -> dict[str, float]:
    from kdistill.losses import token_kd

    saved = torch.load(work / "logits.pt", weights_only=True)
    return {str(b): float(token_kd(saved["student"], saved["teacher"], kind="jsd", beta=b,
                                   labels=saved["labels"])) for b in BETAS}


# --- orchestration ---------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = Path(args.work)
    if args.worker == "trl_losses":
        result: dict[str, Any] = trl_losses(work)
    elif args.worker.startswith("trl_"):
        result = run_trl(work, args, lmbda=1.0 if args.worker == "trl_on" else 0.0)
    else:
        result = run_kdistill(work, args, args.worker)
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(python: str, variant: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, __file__, "--worker", variant, "--work", str(work),
           *(f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("steps", "warmup", "batch", "seq_len", "layers", "beta"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _versions(python: str) -> str:
    code = ("import importlib.metadata as m\n"
            "names = ('torch', 'transformers', 'trl', 'datasets', 'accelerate', 'kdistill')\n"
            "found = []\n"
            "for n in names:\n"
            "    try: found.append(f'{n} {m.version(n)}')\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(', '.join(found))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True,
                          check=False).stdout.strip()


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        prepare(work, args)
        print(f"prepared in {time.perf_counter() - start:.0f} s; TRL side: "
              f"{_versions(args.trl_python)}; kdistill side: {_versions(sys.executable)}")
        ours, theirs = kdistill_losses(work), _spawn(args.trl_python, "trl_losses", work, args)
        theirs.pop("ru_maxrss_mb")
        diff = max(abs(ours[b] - theirs[b]) for b in ours)
        for b in ours:
            print(f"JSD(beta={b}): kdistill {ours[b]:.9f}  TRL {theirs[b]:.9f}")
        rows: dict[str, dict[str, Any]] = {}
        for r in range(args.repeats):
            order = list(VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)])
            for v in order:
                python = args.trl_python if v.startswith("trl_") else sys.executable
                res = _spawn(python, v, work, args)
                row = rows.setdefault(v, {"step_s": [], "peak": [], "added": [], "cache": []})
                row["step_s"].append(statistics.median(res["step_s"]))
                row["peak"].append(res["ru_maxrss_mb"])
                row["added"].append(res["ru_maxrss_mb"] - res["rss_loaded_mb"])
                row["cache"].append(res.get("cache_build_s", float("nan")))
                print(f"  round {r} {v}: {res['step_s']}", flush=True)
    _table(rows, args, diff)


def _table(rows: dict[str, dict[str, Any]], args: argparse.Namespace, diff: float) -> None:
    tokens = args.batch * args.seq_len
    tps = {v: tokens / statistics.median(r["step_s"]) for v, r in rows.items()}
    peak = {v: statistics.median(r["peak"]) for v, r in rows.items()}
    print(f"\n{args.batch} x {args.seq_len} tokens a step, {args.steps} timed steps after "
          f"{args.warmup}, student {args.layers} layers, beta {args.beta}, 1 thread, "
          f"{args.repeats} round(s): median")
    print("| variant | tokens/s | vs trl_off | peak RSS MB | vs trl_off | added by training MB |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        base = "trl_on" if v.endswith("_on") else "trl_off"
        print(f"| {v} | {tps[v]:.1f} | {tps[v] / tps[base]:.2f} | {peak[v]:,.0f} | "
              f"{peak[v] / peak[base]:.2f} | {statistics.median(r['added']):,.0f} |")
    cache = statistics.median(rows["kd_topk"]["cache"])
    print(f"kd_topk cache build: {cache:.1f} s for {tokens * (args.warmup + args.steps)} tokens")
    pairs = [f"{v}_tps={tps[v]:.1f} {v}_peak_mb={peak[v]:.0f}" for v in rows]
    ratios = {f"{v}_speedup": tps[v] / tps["trl_on" if v.endswith("_on") else "trl_off"]
              for v in rows if v.startswith("kd_")}
    print(" ".join(pairs + [f"{k}={x:.2f}" for k, x in ratios.items()]
                   + [f"loss_max_diff={diff:.2e}"]))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", choices=(*VARIANTS, "trl_losses"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    parsed = _args()
    worker(parsed) if parsed.worker else main(parsed)
