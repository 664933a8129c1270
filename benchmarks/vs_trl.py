"""kdistill against TRL's GKDTrainer on the same LLM distillation: tokens/s, peak memory, loss.

Same teacher (SmolLM2-135M-Instruct, the packaged GGUF de-quantised to float32), same student
(a Hugging Face `LlamaForCausalLM` of the teacher's width with its embeddings, final norm and
`--layers` evenly spaced decoder layers: kdistill's `llama_student(init_from="smollm2")`), both
saved once with `save_pretrained` and loaded by every variant; same blocks of stdlib docstrings
(`--seq-len` tokens), batch, steps, AdamW at a constant learning rate, gradients clipped at
norm 1 (TRL's default), float32 throughout (TRL's config defaults to bf16 autocast, even on CPU;
it is set to False here), one intra-op thread (checked at every step).

Variants, each in a fresh subprocess (so its peak is its own); loss JSD(β) unless said:
- `trl_off`: TRL `GKDTrainer`, λ = 0 (the data's blocks, every position scored).
- `trl_on`: TRL `GKDTrainer`, λ = 1 (the student continues the first half, sampled).
- `kd_dense`: kdistill `token_kd` through `train()`, online teacher, full logits.
- `kd_fused`: kdistill `fused_linear_token_distill_loss` in a plain loop (hidden states and
  lm_head in, the (N, V) logits never whole), online teacher.
- `kd_topk`: kdistill `token_kd` through `train()` from a top-32 cache built beforehand in a
  process of its own (build time and peak reported apart; the training process holds no
  teacher); forward KL, the cache's sparse path (not the same loss as `trl_off`).
- `kd_gkd_on`: kdistill `gkd` through `train()`, λ = 1, the same prompt half.

TRL runs in its own virtual environment (`--trl-python`; never a dependency of kdistill).
Timing: wall time between optimiser steps (a post-step hook: loading, the first `--warmup` steps
and the end left out); tokens/s per step = its tokens / its time, median (and best). On-policy
the tokens are the whole block, prompt and sampled half, as both libraries train on it; TRL's
`generate` stops when every row has sampled EOS, so its tokens are counted from the batch it
trained on (kdistill always fills the block). Memory: the process's peak resident set (VmHWM;
`from_pretrained` memory-maps the weights, paged in by the first forward) and its RSS after the
imports. Not `ru_maxrss`: a child's starts at its parent's peak (it survives fork + exec).

Loss values: one block's float32 logits (teacher, student); TRL's `generalized_jsd_loss` (in
TRL's environment) against kdistill's `token_kd(kind="jsd")` for several β; the largest
absolute difference is printed (goal <= 1e-6).

Not measured: TRL's `DistillationTrainer` (with a chunked loss, the counterpart of `kd_fused`).

Run (TRL_PYTHON: a Python with trl installed, e.g. a separate virtual environment's):
      PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py \\
          --trl-python "$TRL_PYTHON" --steps 5 --warmup 2 --batch 4 --seq-len 256
Last line: `name=value` pairs (tokens/s and peak MiB `_peak_mb` per variant, ratios, loss_max_diff).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("trl_off", "trl_on", "kd_dense", "kd_fused", "kd_topk", "kd_gkd_on")
WORKERS = (*VARIANTS, "trl_losses", "kd_cache")
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
LR = 1e-4
CLIP = 1.0  # TRL's (transformers') default max_grad_norm, applied by every variant
TOPK = 32


def _status_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (VmRSS: now; VmHWM: this process's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _StepClock:
    """Timestamps and intra-op thread counts after every optimiser step (a post-step hook)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.times: list[float] = []
        self.threads: set[int] = set()
        optimizer.register_step_post_hook(lambda *_: self._tick())

    def _tick(self) -> None:
        self.times.append(time.perf_counter())
        self.threads.add(torch.get_num_threads())

    def result(self, warmup: int, tokens: list[int]) -> dict[str, Any]:
        """Durations of steps warmup, warmup + 1, ... (0-based; warmup >= 1), their tokens."""
        seconds = [b - a for a, b in itertools.pairwise(self.times[warmup - 1:])]
        return {"step_s": seconds, "tokens": tokens[warmup:warmup + len(seconds)],
                "threads": sorted(self.threads)}


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
    if len(splits.train_x) < n:
        sys.exit(f"only {len(splits.train_x)} training blocks of {args.seq_len}; need {n}")
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


def _load(work: Path, name: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32)
    if name == "teacher":
        model.eval().requires_grad_(False)
    return model


# --- TRL (its own environment) ---------------------------------------------------------------

def run_trl(work: Path, args: argparse.Namespace, lmbda: float) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    base = _status_mb()
    blocks = torch.load(work / "blocks.pt", weights_only=True)
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    teacher, student = _load(work, "teacher"), _load(work, "student")
    half = args.seq_len // 2
    # Off-policy the prompt is one token, so every position is scored as kdistill does (TRL
    # scores labels != -100 and never uses the prompt at λ = 0); on-policy, the first half.
    prompt_len = half if lmbda > 0 else 1

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows])
        prompts = ids[:, :prompt_len]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)}

    tokens: list[int] = []

    class Counted(GKDTrainer):  # type: ignore[misc]
        """GKDTrainer recording the tokens of each batch it trains on (after sampling)."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
            tokens.append(int(inputs["input_ids"].numel()))
            return super().compute_loss(model, inputs, *a, **kw)

    config = GKDConfig(
        output_dir=str(work / f"trl-out-{lmbda}"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP, lmbda=lmbda, beta=args.beta,
        temperature=1.0, max_new_tokens=args.seq_len - half, max_length=args.seq_len,
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=10_000, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    clock = _StepClock(optimizer)
    trainer = Counted(model=student, teacher_model=teacher, args=config, data_collator=collate,
                      processing_class=tok, optimizers=(optimizer, None),
                      train_dataset=Dataset.from_dict({"input_ids": blocks.tolist()}))
    trainer.train()
    precision = str(getattr(trainer.accelerator, "mixed_precision", "?"))
    return {**clock.result(args.warmup, tokens), "rss_base_mb": base, "precision": precision}


def trl_losses(work: Path) -> dict[str, float]:
    from trl.experimental.gkd import GKDTrainer

    saved = torch.load(work / "logits.pt", weights_only=True)
    s, t, y = saved["student"], saved["teacher"], saved["labels"]
    # TRL's own causal shift (compute_loss): logits[:, :-1] against labels[:, 1:]; kdistill's
    # shifted labels are already aligned, so the last position (label -100) is dropped here.
    return {str(b): float(GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], y[:, :-1],
                                                          beta=b)) for b in BETAS}


# --- kdistill (this environment) -------------------------------------------------------------

def build_topk_cache(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The top-k cache over the benchmark's blocks, in a process of its own."""
    import transformers  # noqa: F401  (imported before the baseline, as the variants do)

    from kdistill import CacheKey, build_cache
    from kdistill.models.hf import CausalLM

    base = _status_mb()
    blocks = torch.load(work / "blocks.pt", weights_only=True)
    teacher = CausalLM(_load(work, "teacher"))
    start = time.perf_counter()
    build_cache(work / "cache", teacher, blocks,
                CacheKey(teacher="t", data="d", dtype="float16", topk=TOPK), batch_size=args.batch)
    return {"build_s": time.perf_counter() - start, "tokens": int(blocks.numel()),
            "rss_base_mb": base}


def run_kdistill(work: Path, args: argparse.Namespace, variant: str) -> dict[str, Any]:
    import transformers  # noqa: F401  (imported before the baseline, as TRL's side does)

    from kdistill import BatchLoader, CachedTeacher, LoopSettings, TeacherCache, train
    from kdistill.methods import METHODS, build_method
    from kdistill.models.hf import CausalLM

    base = _status_mb()
    blocks = torch.load(work / "blocks.pt", weights_only=True)
    student_hf = _load(work, "student")
    teacher_hf = None if variant == "kd_topk" else _load(work, "teacher")
    optimizer = torch.optim.AdamW(student_hf.parameters(), lr=LR, weight_decay=0.0)
    clock = _StepClock(optimizer)
    total = args.warmup + args.steps
    tokens = [args.batch * args.seq_len] * total  # kdistill always trains on whole blocks
    out: dict[str, Any] = {"rss_base_mb": base, "precision": "fp32"}
    if variant == "kd_fused":
        _fused_loop(teacher_hf, student_hf, optimizer, blocks, args)
        return {**out, **clock.result(args.warmup, tokens)}
    settings = LoopSettings(max_steps=total, log_every=10_000, clip_grad_norm=CLIP)
    loader = BatchLoader(blocks, blocks, batch_size=args.batch, shuffle=False)
    if variant == "kd_topk":
        teacher_arg: Any = CachedTeacher(TeacherCache(work / "cache"))
        cfg = METHODS["token_kd"].config_type(kind="forward_kl", alpha=1.0)
    elif variant == "kd_dense":
        teacher_arg = CausalLM(teacher_hf)
        cfg = METHODS["token_kd"].config_type(kind="jsd", beta=args.beta, alpha=1.0)
    else:  # kd_gkd_on
        teacher_arg = CausalLM(teacher_hf)
        cfg = METHODS["gkd"].config_type(lmbda=1.0, beta=args.beta, sample_temperature=1.0,
                                         prompt_tokens=args.seq_len // 2)
    train(CausalLM(student_hf), teacher_arg, build_method(cfg), loader, optimizer, settings,
          seed=0)
    return {**out, **clock.result(args.warmup, tokens)}


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
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
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
    elif args.worker == "kd_cache":
        result = build_topk_cache(work, args)
    elif args.worker.startswith("trl_"):
        result = run_trl(work, args, lmbda=1.0 if args.worker == "trl_on" else 0.0)
    else:
        result = run_kdistill(work, args, args.worker)
    result["peak_mb"] = _status_mb("VmHWM")
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(python: str, variant: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, __file__, "--worker", variant, "--work", str(work),
           *(f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("steps", "warmup", "batch", "seq_len", "layers", "beta"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(python), check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _env(python: str) -> dict[str, str]:
    """One intra-op thread, offline; TRL's interpreter without this side's PYTHONPATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if python != sys.executable:
        env.pop("PYTHONPATH", None)
    return env


def _versions(python: str) -> str:
    code = ("import importlib.metadata as m, importlib.util as u\n"
            "print(', '.join(f'{n} {m.version(n)}' for n in ('torch', 'transformers', 'trl', "
            "'datasets', 'accelerate', 'kdistill') if u.find_spec(n)))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=_env(python),
                          check=False).stdout.strip()


def main(args: argparse.Namespace) -> None:
    if not args.trl_python:
        sys.exit("vs_trl: give --trl-python or set TRL_PYTHON (a Python with trl installed)")
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        prepare(work, args)
        import kdistill

        print(f"prepared in {time.perf_counter() - start:.0f} s; TRL side: "
              f"{_versions(args.trl_python)}; kdistill side: {_versions(sys.executable)} "
              f"(kdistill from {Path(kdistill.__file__).parent})")
        ours, theirs = kdistill_losses(work), _spawn(args.trl_python, "trl_losses", work, args)
        theirs.pop("peak_mb")
        diff = max(abs(ours[b] - theirs[b]) for b in ours)
        for b in ours:
            print(f"JSD(beta={b}): kdistill {ours[b]:.9f}  TRL {theirs[b]:.9f}")
        cache = _spawn(sys.executable, "kd_cache", work, args)
        rows: dict[str, dict[str, list[float]]] = {}
        for r in range(args.repeats):
            for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                python = args.trl_python if v.startswith("trl_") else sys.executable
                res = _spawn(python, v, work, args)
                if res["threads"] != [1] or res["precision"] not in ("no", "fp32"):
                    sys.exit(f"{v}: threads {res['threads']}, precision {res['precision']}")
                rates = [n / s for n, s in zip(res["tokens"], res["step_s"], strict=True)]
                row = rows.setdefault(v, {"tps": [], "best": [], "peak": [], "imports": []})
                row["tps"].append(statistics.median(rates))
                row["best"].append(max(rates))
                row["peak"].append(res["peak_mb"])
                row["imports"].append(res["rss_base_mb"])
                print(f"  round {r} {v}: step s {[round(x, 3) for x in res['step_s']]}, "
                      f"tokens {res['tokens']}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    _table(rows, args, diff, cache)


def _table(rows: dict[str, dict[str, list[float]]], args: argparse.Namespace, diff: float,
           cache: dict[str, Any]) -> None:
    med = {k: {v: statistics.median(r[k]) for v, r in rows.items()}
           for k in ("tps", "best", "peak", "imports")}
    tps, peak = med["tps"], med["peak"]

    def vs(table: dict[str, float], v: str) -> float:
        return table[v] / table["trl_on" if v.endswith("_on") else "trl_off"]

    print(f"\n{args.batch} x {args.seq_len} tokens a step, {args.steps} timed steps after "
          f"{args.warmup}, student {args.layers} layers, beta {args.beta}, 1 thread, fp32, "
          f"{args.repeats} round(s); x TRL: against trl_off (trl_on for on-policy rows)")
    print("| variant | tokens/s (median) | best | x TRL | peak RSS MiB | x TRL | "
          "RSS after imports MiB |")
    print("|---|---|---|---|---|---|---|")
    for v in rows:
        print(f"| {v} | {tps[v]:.1f} | {med['best'][v]:.1f} | {vs(tps, v):.2f} | "
              f"{peak[v]:,.0f} | {vs(peak, v):.2f} | {med['imports'][v]:,.0f} |")
    build_tps = cache["tokens"] / cache["build_s"]
    epoch_tps = 1 / (1 / tps["kd_topk"] + 1 / build_tps)
    print(f"kd_topk cache (top-{TOPK}, float16): built in {cache['build_s']:.1f} s for "
          f"{cache['tokens']} tokens ({build_tps:.1f} tokens/s), process peak "
          f"{cache['peak_mb']:,.0f} MiB; kd_topk with the build counted (one epoch): "
          f"{epoch_tps:.1f} tokens/s ({epoch_tps / tps['trl_off']:.2f} x trl_off)")
    pairs = [f"{v}_tps={tps[v]:.1f} {v}_peak_mb={peak[v]:.0f}" for v in rows]
    kd = [v for v in rows if v.startswith("kd_")]
    ratios = {**{f"{v}_speedup": vs(tps, v) for v in kd},
              **{f"{v}_peak_ratio": vs(peak, v) for v in kd}}
    print(" ".join([*pairs, *(f"{k}={x:.2f}" for k, x in ratios.items()),
                    f"kd_topk_epoch_tps={epoch_tps:.1f}", f"cache_build_s={cache['build_s']:.1f}",
                    f"loss_max_diff={diff:.2e}"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"),
                   help="a Python with trl installed (default: $TRL_PYTHON)")
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="the student's decoder layers")
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all variants")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, low in (("steps", 1), ("warmup", 1), ("batch", 1), ("seq_len", 4), ("layers", 1),
                      ("repeats", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    if not 0.0 <= args.beta <= 1.0:
        p.error("--beta must be in [0, 1]")
    return args


if __name__ == "__main__":
    parsed = parse_args()
    worker(parsed) if parsed.worker else main(parsed)
