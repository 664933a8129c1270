"""Does every family of kdistill train on this accelerator? A few steps each, in each precision.

Families (tiny random models and synthetic data, built here: nothing is downloaded):
  classify/cached     CNN -> CNN, KD from a teacher cache built on the device
  classify/online     CNN -> CNN, KD with the teacher run on every batch
  classify/cpu-teach  the student on the device, the teacher on the CPU (teacher.device: cpu)
  classify/compiled   classify/online with train.compile (one precision: bf16 on CUDA)
  feature/fitnet      a hint layer through an adapter (placed with kdistill.engine.place)
  text/bert           a 2-layer random BERT (from a local config) -> a 1-layer one, KD
  translate/seq2seq   encoder-decoders, word-level KD + decoder cross-attention (cross_attn)
  llm/token_kd        tiny Llamas, token-level KD with the chunked (fused) loss
  llm/gkd             on-policy GKD: the student samples, the teacher scores
  datafree/dafl       a generator trained against the teacher, the student on its samples
  resume/to-cpu       3 steps with a checkpoint on the device, resumed on the CPU
  pipeline/compress   `kdistill run` on digits with train.device set, then the compression
                      chain (prune, KD, int8 quantization, ONNX + safetensors export), which
                      runs on the CPU by design: it must accept the students trained here
  torchrun/ddp, /fsdp `torchrun --nproc_per_node 2 -m kdistill run` (2+ GPUs; on the CPU
                      with --device cpu: 2 gloo processes)
Precisions fp32, bf16 and fp16 on CUDA; fp32 and bf16 with --device cpu (the smoke mode: tiny
sizes, proves the script end to end without a GPU). A family that fails prints its error in
the table and the others go on. Then the LLM token-KD throughput at V = 49,152 (a random tiny
Llama with that vocabulary): tokens/s and peak GPU memory, naive loss against the chunked one.

Run:  python benchmarks/gpu_check.py                  (CUDA; about 2-4 minutes on one H100)
      python benchmarks/gpu_check.py --device cpu     (smoke mode, ~2 min on 2 cores)
      options: --families classify/online,llm/gkd  --precisions bf16  --steps 20
The last line reads `gpu_check=pass` or `gpu_check=fail`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill import (
    METHODS,
    BatchLoader,
    CachedTeacher,
    CacheKey,
    LoopSettings,
    MetricsLogger,
    OnlineTeacher,
    build_cache,
    build_method,
    load_config,
    run,
    train,
)
from kdistill.engine import place
from kdistill.models import build_model


@dataclass
class Ctx:
    device: torch.device
    precision: str
    steps: int
    tmp: Path
    smoke: bool  # --device cpu: tiny sizes


@dataclass
class Row:
    family: str
    precision: str
    ok: bool
    steps_per_s: float | None = None
    peak_mib: float | None = None
    note: str = ""


Result = tuple[int, float]  # (optimiser steps taken, seconds in train())


def settings(ctx: Ctx, **kw: Any) -> LoopSettings:
    return LoopSettings(device=str(ctx.device), precision=ctx.precision, max_steps=ctx.steps,
                        epochs=1000, log_every=1, **kw)


def fit(ctx: Ctx, student: nn.Module, teacher: Any, method: Any, x: torch.Tensor,
        y: torch.Tensor, *, batch_size: int = 16, **kw: Any) -> Result:
    """Train through the engine; check the student ended on the device with finite losses."""
    opt = torch.optim.AdamW([*student.parameters(), *method.optimizer_parameters()], lr=1e-3)
    logger = MetricsLogger()
    start = time.perf_counter()
    state = train(student, teacher, method, BatchLoader(x, y, batch_size=batch_size, seed=0),
                  opt, settings(ctx, **kw), logger=logger)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - start
    where = next(student.parameters()).device
    assert where.type == ctx.device.type, f"the student ended on {where}, not {ctx.device}"
    losses = [r["loss"] for r in logger.records]
    assert losses and all(torch.isfinite(torch.tensor(losses))), f"losses {losses[-3:]}"
    return state.step, seconds


# -- models and data ------------------------------------------------------------------------------


def cnn(seed: int, widths: tuple[int, int]) -> nn.Module:
    torch.manual_seed(seed)
    a, b = widths
    return nn.Sequential(nn.Conv2d(1, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(),
                         nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(b * 64, 10))


def images(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def llama(seed: int, hidden: int, vocab: int = 64, length: int = 16, layers: int = 2
          ) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("llama", input_shape=(length,), num_classes=vocab,
                       args={"hidden": hidden, "layers": layers, "heads": 2})


def tokens(n: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return ids, ids.clone()


def kd() -> Any:
    return build_method(METHODS["kd"].config_type(temperature=4.0, alpha=0.9))


# -- families -------------------------------------------------------------------------------------


def classify_cached(ctx: Ctx) -> Result:
    x, y = images()
    teacher = cnn(1, (8, 16)).to(ctx.device).eval()  # the pipeline places it on its device
    cache = build_cache(ctx.tmp / f"cache-{ctx.precision}", teacher, x, CacheKey("t", "d"))
    return fit(ctx, cnn(0, (4, 8)), CachedTeacher(cache), kd(), x, y)


def classify_online(ctx: Ctx, *, teacher_device: torch.device | None = None,
                    compile: bool = False) -> Result:
    x, y = images()
    teacher = cnn(1, (8, 16)).to(teacher_device or ctx.device)
    return fit(ctx, cnn(0, (4, 8)), OnlineTeacher(teacher), kd(), x, y, compile=compile)


def feature_fitnet(ctx: Ctx) -> Result:
    x, y = images()
    method = build_method(METHODS["fitnet"].config_type(student_layer="3", teacher_layer="3"))
    student, teacher = cnn(0, (4, 8)), cnn(1, (8, 16)).to(ctx.device)
    # Placed first, so adapters are probed and created on the device (the pipeline's order).
    place(student, None, settings(ctx))
    method.setup(student, teacher, x[:2].to(ctx.device), num_samples=len(x))
    return fit(ctx, student, OnlineTeacher(teacher), method, x, y)


def text_bert(ctx: Ctx) -> Result:
    from transformers import BertConfig, BertModel

    path = ctx.tmp / "bert"
    if not path.is_dir():
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=64, pad_token_id=0)).save_pretrained(path)
    teacher = build_model("hf_encoder_classifier", input_shape=(12,), num_classes=10,
                          args={"path": str(path)})
    torch.manual_seed(0)
    student = build_model("hf_encoder_student", input_shape=(12,), num_classes=10,
                          args={"init_from": str(path), "layers": 1, "random_init": True})
    ids = torch.randint(1, 100, (128, 12), generator=torch.Generator().manual_seed(0))
    ids[::2, 8:] = 0  # padding
    labels = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
    return fit(ctx, student, OnlineTeacher(teacher.to(ctx.device)), kd(), ids, labels)


def translate_seq2seq(ctx: Ctx) -> Result:
    from kdistill.data.translation import pack
    from kdistill.models.seq2seq import seq2seq_transformer

    g = torch.Generator().manual_seed(0)
    src = [torch.randint(4, 40, (int(n),), generator=g).tolist()
           for n in torch.randint(2, 10, (128,), generator=g)]
    tgt = [torch.randint(4, 40, (int(n),), generator=g).tolist()
           for n in torch.randint(2, 10, (128,), generator=g)]
    x, y = pack(src, tgt, 12)

    def net(seed: int, dim: int, layers: int) -> nn.Module:
        torch.manual_seed(seed)
        return seq2seq_transformer((2, 12), 40, d_model=dim, heads=2, enc_layers=layers,
                                   dec_layers=layers, ff=2 * dim)

    method = build_method(METHODS["cross_attn"].config_type(
        pairs=[["decoder.0.cross_attn.probs", "decoder.1.cross_attn.probs"]]))
    return fit(ctx, net(0, 16, 1), OnlineTeacher(net(1, 32, 2).to(ctx.device)), method, x, y)


def llm_token_kd(ctx: Ctx) -> Result:
    x, y = tokens(64, 16, 64)
    method = build_method(METHODS["token_kd"].config_type(alpha=0.5, chunk_size=128))
    return fit(ctx, llama(0, 16), OnlineTeacher(llama(1, 32).to(ctx.device)), method, x, y)


def llm_gkd(ctx: Ctx) -> Result:
    x, y = tokens(64, 16, 64)
    method = build_method(METHODS["gkd"].config_type(**METHODS["gkd"].example.config))
    return fit(ctx, llama(0, 16), OnlineTeacher(llama(1, 32).to(ctx.device)), method, x, y)


def datafree_dafl(ctx: Ctx) -> Result:
    x, y = images()
    method = build_method(METHODS["dafl"].config_type(**METHODS["dafl"].example.config))
    student, teacher = cnn(0, (4, 8)), cnn(1, (8, 16)).to(ctx.device).eval()
    place(student, None, settings(ctx))
    method.setup(student, teacher, x[:2].to(ctx.device))
    return fit(ctx, student, OnlineTeacher(teacher), method, x, y)


def resume_to_cpu(ctx: Ctx) -> Result:
    x, y = images()
    ckpt = ctx.tmp / f"resume-{ctx.precision}"
    shutil.rmtree(ckpt, ignore_errors=True)
    student, teacher, method = cnn(0, (4, 8)), cnn(1, (8, 16)), kd()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loader = BatchLoader(x, y, batch_size=16, seed=0)
    start = time.perf_counter()
    train(student, teacher.to(ctx.device), method, loader, opt,
          settings(ctx).model_copy(update={"max_steps": 3}), checkpoint_dir=ckpt)
    seconds = time.perf_counter() - start
    # A fresh process's view: new objects on the CPU, resumed from the device's checkpoint.
    student, method = cnn(0, (4, 8)), kd()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    state = train(student, teacher.cpu(), method, loader, opt,
                  LoopSettings(device="cpu", max_steps=6, epochs=1000), checkpoint_dir=ckpt)
    assert state.step == 6 and next(student.parameters()).device.type == "cpu"
    return 3, seconds


DIGITS = """\
name: gpu-check
threads: 1
data: {name: digits, val_size: 200}
teacher:
  model: {arch: mlp, args: {hidden: [64]}}
  train: {epochs: 2, batch_size: 64, optimizer: {name: adam, lr: 0.01}}
student:
  model: {arch: mlp, args: {hidden: [32]}}
method: {name: kd, temperature: 4.0, alpha: 0.9}
train: {epochs: 2, batch_size: 64, optimizer: {name: adam, lr: 0.01}, seeds: [0]}
eval: {latency_repeats: 3, throughput_batch: 16}
"""
CHAIN = """\
compress:
  - {kind: prune, method: structured, amount: 0.5, rounds: 1, finetune_epochs: 1}
  - {kind: quantize, method: dynamic}
  - {kind: export, formats: [onnx, safetensors]}
"""


def pipeline_compress(ctx: Ctx) -> Result:
    recipe = ctx.tmp / "digits.yaml"
    recipe.write_text(DIGITS + CHAIN)
    cfg = load_config(recipe, [f"output_dir={ctx.tmp / 'runs' / ctx.precision}",
                               f"train.device={ctx.device}", f"train.precision={ctx.precision}",
                               f"teacher.device={ctx.device}"])
    start = time.perf_counter()
    result = run(cfg, echo=lambda _line: None)
    assert result.rows.get("student"), "no student row evaluated"
    assert (result.run_dir / "report.md").is_file()
    assert any(result.run_dir.rglob("*.onnx")), "the chain exported no ONNX file"
    return 0, time.perf_counter() - start


def torchrun(ctx: Ctx, strategy: str) -> Result:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = str(exe) if exe.is_file() else shutil.which("torchrun")
    assert launcher, "torchrun is not installed"
    recipe = ctx.tmp / "digits-ddp.yaml"
    recipe.write_text(DIGITS)
    out = ctx.tmp / "ddp" / f"{strategy}-{ctx.precision}"
    cmd = [launcher, "--standalone", "--nproc_per_node", "2", "-m", "kdistill", "run",
           str(recipe), f"output_dir={out}", f"train.device={ctx.device.type}",
           f"train.precision={ctx.precision}", f"train.strategy={strategy}",
           "cache.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = (proc.stderr + proc.stdout).strip().splitlines() or ["(no output)"]
    errors = [line for line in lines if "Error" in line] or lines
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}: {errors[-1].strip()}"
    return 0, time.perf_counter() - start


FAMILIES: dict[str, Callable[[Ctx], Result]] = {
    "classify/cached": classify_cached,
    "classify/online": classify_online,
    "classify/cpu-teach": lambda c: classify_online(c, teacher_device=torch.device("cpu")),
    "classify/compiled": lambda c: classify_online(c, compile=True),
    "feature/fitnet": feature_fitnet,
    "text/bert": text_bert,
    "translate/seq2seq": translate_seq2seq,
    "llm/token_kd": llm_token_kd,
    "llm/gkd": llm_gkd,
    "datafree/dafl": datafree_dafl,
    "resume/to-cpu": resume_to_cpu,
    "pipeline/compress": pipeline_compress,
    "torchrun/ddp": lambda c: torchrun(c, "ddp"),
    "torchrun/fsdp": lambda c: torchrun(c, "fsdp"),
}
ONE_PRECISION = {"classify/compiled", "resume/to-cpu", "torchrun/fsdp"}


# -- running and reporting ------------------------------------------------------------------------


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_one(name: str, ctx: Ctx) -> Row:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        steps, seconds = FAMILIES[name](ctx)
    except Exception as exc:  # one family's failure is a row, not the end of the check
        where = traceback.extract_tb(exc.__traceback__)[-1]
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return Row(name, ctx.precision, False, note=f"{type(exc).__name__}: {first} "
                   f"({Path(where.filename).name}:{where.lineno})")
    rate = steps / seconds if steps and seconds > 0 else None
    note = "" if steps else f"{seconds:.1f} s in all"
    if name == "classify/compiled":
        note = "steps/s include the compilation"
    return Row(name, ctx.precision, True, rate, peak_mib(ctx.device), note)


def throughput(device: torch.device, smoke: bool) -> list[str]:
    """Token-KD tokens/s and peak memory at V = 49,152: naive loss vs the chunked one."""
    vocab, (batch, length, steps) = 49_152, ((2, 32, 3) if smoke else (8, 512, 10))
    precision = "bf16"
    lines = [f"token KD at V = {vocab:,}: batch {batch} x {length} tokens, {steps} steps, "
             f"{precision}, Llama hidden 64 x 2 layers (student) / 128 x 2 (teacher)"]
    for label, chunk in (("naive", None), ("chunked", 1024)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            x, y = tokens(batch * (steps + 1), length, vocab)
            method = build_method(METHODS["token_kd"].config_type(alpha=0.5, chunk_size=chunk))
            teacher = llama(1, 128, vocab, length).to(device)
            student = llama(0, 64, vocab, length)
            fit(Ctx(device, precision, 1, Path("."), smoke), student, OnlineTeacher(teacher),
                method, x[:batch], y[:batch], batch_size=batch)  # warm-up: kernels, allocator
            taken, seconds = fit(Ctx(device, precision, steps, Path("."), smoke), student,
                                 OnlineTeacher(teacher), method, x, y, batch_size=batch)
            peak = peak_mib(device)
            shown = f"{peak:,.0f} MiB" if peak is not None else "n/a (CPU)"
            lines.append(f"  {label:<8} {taken * batch * length / seconds:>12,.0f} tokens/s   "
                         f"peak memory {shown}")
        except Exception as exc:
            lines.append(f"  {label:<8} failed: {type(exc).__name__}: {str(exc)[:160]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke mode)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--precisions", default=None, help="default: fp32,bf16,fp16 on CUDA, "
                        "fp32,bf16 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per family "
                        "(default 20 on CUDA, 4 on the CPU)")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible; run with --device cpu for the smoke mode")
    precisions = (args.precisions or ("fp32,bf16" if smoke else "fp32,bf16,fp16")).split(",")
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if not smoke and gpus < 2:
        names = [n for n in names if not n.startswith("torchrun/")]
    if smoke:
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke mode)"
    print(f"kdistill GPU check: torch {torch.__version__}, {name}, {gpus} GPU(s) visible")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kdistill-gpu-check-") as tmp:
        for family in names:
            ones = [p for p in precisions if p == ("fp32" if smoke else "bf16")] or precisions[:1]
            for precision in (ones if family in ONE_PRECISION else precisions):
                ctx = Ctx(device, precision, args.steps or (4 if smoke else 20), Path(tmp), smoke)
                row = run_one(family, ctx)
                rows.append(row)
                print(format_row(row), flush=True)
        lines = [] if args.no_throughput else throughput(device, smoke)
    print()
    print(f"{'family':<20} {'precision':<9} {'result':<6} {'steps/s':>8} {'peak MiB':>9}  note")
    for row in rows:
        print(format_row(row))
    print()
    print("\n".join(lines))
    failed = [r for r in rows if not r.ok] or [line for line in lines if "failed:" in line]
    print(f"gpu_check={'fail' if failed else 'pass'}")


def format_row(row: Row) -> str:
    rate = f"{row.steps_per_s:8.1f}" if row.steps_per_s else f"{'-':>8}"
    peak = f"{row.peak_mib:9.0f}" if row.peak_mib is not None else f"{'-':>9}"
    return (f"{row.family:<20} {row.precision:<9} {'ok' if row.ok else 'FAIL':<6} {rate} "
            f"{peak}  {row.note}")


if __name__ == "__main__":
    main()
