"""Peak memory and time of the token distillation loss: naive vs chunked vs lm_head-fused.

The setting of SmolLM2-135M distilled on 8 × 512 tokens: vocabulary V = 49,152, hidden size
H = 576 for student and teacher. Each variant goes from the final hidden states to a scalar
loss and back (forward + backward), with the teacher projected under `torch.no_grad()`:

1. `naive`: logits = hidden @ lm_head.T for both models, then `token_distill_loss`;
2. `chunked`: the same (N, V) logits, then `chunked_token_distill_loss` (intermediates for one
   chunk of tokens at a time; the logits themselves and their gradient still exist whole);
3. `fused`: `fused_linear_token_distill_loss` on hidden states and lm_head weights (no (N, V)
   tensor at all: one chunk of logits at a time, gradients w.r.t. hidden and weight).

The loss is α·KD + (1 − α)·CE (default forward KL, α = 0.5) on next-token labels from
`shift_labels` (the last position of each row is ignored), in float32.

Peak memory, measured honestly: each variant runs in a fresh subprocess (DESIGN.md, "Measuring
on these machines") with glibc told to serve every allocation above 64 KiB by its own mmap and
to hand it back on free (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the resident set
follows live torch CPU tensors and freed memory cannot hide a later allocation. After building
the inputs and a small untimed warm-up of the same variant (lazy kernel initialisation), the
worker records the current RSS, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` ← 5;
falls back to `ru_maxrss`, which then includes the setup), runs once and reports peak − baseline
(VmHWM from /proc/self/status). Everything allocated by the step counts: logits, intermediates,
the weight gradient (V × H) and hidden-state gradient. The table also gives the peak in units of
one float32 (N, V) tensor, a sanity check against hand counting (naive keeps several alive).
With `--device cuda`: `torch.cuda.max_memory_allocated()` minus the allocation before the step.

Time: one process, `torch.set_num_threads(1)` (2-vCPU VMs stall with 2 intra-op threads), one
warm-up step per variant, then `--repeats` rounds running every variant back to back in a
rotating order; median and minimum per variant, ratios to naive. The warm-up round also checks
that the three variants agree (loss and weight gradient).

Run:  .venv/bin/python benchmarks/bench_llm_loss.py --repeats 3   (`--quick`: 2 × 128 tokens)
The last line reads `peak_ratio=<best memory-bounded / naive> best=<variant> ...`.
Target: peak_ratio <= 0.20.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses import (
    chunked_token_distill_loss,
    fused_linear_token_distill_loss,
    shift_labels,
    token_distill_loss,
)

VARIANTS = ("naive", "chunked", "fused")
MIB = 2**20


@dataclass
class Inputs:
    s_h: Tensor  # (B, T, H), requires grad: the student's final hidden states
    s_w: Tensor  # (V, H), requires grad: the student's lm_head
    t_h: Tensor  # (B, T, H): the teacher's hidden states (no grad)
    t_w: Tensor  # (V, H)
    labels: Tensor  # (B, T), shifted next-token ids


def make_inputs(args: argparse.Namespace, batch: int | None = None) -> Inputs:
    g = torch.Generator().manual_seed(0)
    b, t, h, v = batch or args.batch, args.seq, args.hidden, args.vocab
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)

    def rand(*shape: int, scale: float) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

    ids = torch.randint(0, v, (b, t), generator=g).to(dev)
    return Inputs(
        rand(b, t, h, scale=1.0).requires_grad_(), rand(v, h, scale=h**-0.5).requires_grad_(),
        rand(b, t, h, scale=1.0), rand(v, h, scale=h**-0.5), shift_labels(ids),
    )


def step(name: str, x: Inputs, args: argparse.Namespace) -> float:
    """One forward + backward of variant `name`; returns the loss value."""
    kw = {"alpha": args.alpha, "kind": args.kind}
    if name == "fused":
        out = fused_linear_token_distill_loss(
            x.s_h, x.s_w, x.t_h, x.t_w, x.labels, chunk_size=args.chunk_size, **kw
        )
    else:
        s_logits = F.linear(x.s_h, x.s_w)
        with torch.no_grad():
            t_logits = F.linear(x.t_h, x.t_w)
        if name == "naive":
            out = token_distill_loss(s_logits, t_logits, x.labels, **kw)
        else:
            out = chunked_token_distill_loss(
                s_logits, t_logits, x.labels, chunk_size=args.chunk_size, **kw
            )
        del s_logits, t_logits
    out.loss.backward()
    return float(out.loss.detach())


def clear_grads(x: Inputs) -> None:
    x.s_h.grad = None
    x.s_w.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(name: str, args: argparse.Namespace) -> None:
    """Runs in a fresh subprocess: one measured step of variant `name`; prints a JSON line."""
    torch.set_num_threads(1)
    warm = make_inputs(args, batch=1)  # lazy kernel/allocator initialisation, not measured
    step(name, warm, args)
    del warm
    x = make_inputs(args)
    gc.collect()
    _sync(args.device)
    if args.device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "cuda.max_memory_allocated"
    else:
        base = _rss()
        method = "VmHWM after clear_refs" if _reset_hwm() else "ru_maxrss (includes setup)"
    start = time.perf_counter()
    loss = step(name, x, args)
    _sync(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _hwm()
    print("RESULT " + json.dumps({"peak": peak - base, "seconds": seconds, "loss": loss,
                                  "method": method}))


def measure_memory(name: str, args: argparse.Namespace) -> dict[str, float | str]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure_time(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, str]]:
    x = make_inputs(args)
    checks: dict[str, str] = {}
    ref_loss, ref_grad = 0.0, None
    for name in VARIANTS:  # warm-up round, and the agreement check
        loss = step(name, x, args)
        grad = x.s_w.grad
        assert grad is not None
        if ref_grad is None:
            ref_loss, ref_grad = loss, grad.clone()
        diff = (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item()
        checks[name] = f"loss {loss:.6f} (Δ {loss - ref_loss:+.1e}), max rel Δ grad_W {diff:.1e}"
        clear_grads(x)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for name in order:
            gc.collect()
            _sync(args.device)
            start = time.perf_counter()
            step(name, x, args)
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
            clear_grads(x)
        print(f"round {r + 1}/{args.repeats}: "
              + "  ".join(f"{k} {times[k][-1]:.2f}s" for k in order), flush=True)
    return times, checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk")
    p.add_argument("--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd",
                                                            "tv"])
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight; CE gets 1 - alpha")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="2 x 128 tokens, 1 round (smoke check)")
    p.add_argument("--skip-time", action="store_true", help="memory only")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 128, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.worker:
        worker(args.worker, args)
        return

    torch.set_num_threads(1)
    n, v = args.batch * args.seq, args.vocab
    nv_bytes = n * v * 4
    print(f"torch {torch.__version__}, device {args.device}, {args.dtype}; one intra-op thread; "
          f"N = {args.batch} x {args.seq} = {n} tokens, V = {v}, H = {args.hidden}, "
          f"chunk {args.chunk_size}; loss {args.alpha} * {args.kind} + {1 - args.alpha:g} * CE; "
          f"one float32 (N, V) tensor = {nv_bytes / MIB:.0f} MiB")
    mem = {name: measure_memory(name, args) for name in VARIANTS}
    print(f"peak memory: fresh subprocess per variant, {mem['naive']['method']}")
    times, checks = ({k: [float(mem[k]["seconds"])] for k in VARIANTS}, {}) if args.skip_time \
        else measure_time(args)

    med = {k: statistics.median(t) for k, t in times.items()}
    low = {k: min(t) for k, t in times.items()}
    peak = {k: float(mem[k]["peak"]) for k in VARIANTS}
    print(f"\n{'variant':<8} {'peak MiB':>9} {'x (N,V) fp32':>13} {'peak/naive':>11} "
          f"{'median s':>9} {'min s':>7} {'time/naive':>11}")
    for k in VARIANTS:
        print(f"{k:<8} {peak[k] / MIB:>9.0f} {peak[k] / nv_bytes:>13.2f} "
              f"{peak[k] / peak['naive']:>11.3f} {med[k]:>9.2f} {low[k]:>7.2f} "
              f"{med[k] / med['naive']:>11.2f}")
    for k, line in checks.items():
        print(f"check {k}: {line}")
    best = min(("chunked", "fused"), key=lambda k: peak[k])
    print(f"peak_ratio={peak[best] / peak['naive']:.3f} best={best} "
          f"chunked_peak_ratio={peak['chunked'] / peak['naive']:.3f} "
          f"time_ratio={med[best] / med['naive']:.2f}")


if __name__ == "__main__":
    main()
