"""`run_chain`: the recipe's `compress:` stages in order, each written and evaluated.

    distill -> prune -> distill -> quantize -> export

The chain works on a copy of the distilled student. Stage i writes `run_dir/compress/<i>-<kind>/`
(the model as it stands after the stage, `stage.json` with what was done, fine-tuning
`metrics.jsonl`) and yields one evaluation row measured on what actually runs after it: the
smaller fp32 model, the int8 torch model, or the ONNX file in onnxruntime. So the report shows
accuracy against parameters, bytes and latency at every step.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from kdistill import distributed
from kdistill.compress import prune
from kdistill.compress.export import (
    FP32_RTOL,
    INT8_RTOL,
    check_onnx,
    export_onnx,
    save_safetensors,
)
from kdistill.compress.finetune import (
    chain_teacher,
    finetune_config,
    kd_finetune,
    nonzero_parameters,
    stage_row,
)
from kdistill.compress.quantize import (
    convert_qat,
    prepare_qat,
    quantize_dynamic,
    quantize_static,
)
from kdistill.config import EvalConfig, TrainSettings
from kdistill.config.compress import (
    DistillStage,
    ExportStage,
    PruneStage,
    QuantizeStage,
    check_order,
    parse_stages,
)
from kdistill.data import DataSplits
from kdistill.errors import ConfigError
from kdistill.evaluate import predict
from kdistill.io import atomic_write_text
from kdistill.methods.kd import KDConfig
from kdistill.models import count_parameters
from kdistill.teachers import Teacher
from kdistill.types import Echo

Stage = PruneStage | DistillStage | QuantizeStage | ExportStage


@dataclass
class _Chain:
    """What the chain holds between stages."""

    model: nn.Module  # what runs now: fp32, or int8 after quantize
    float_model: nn.Module  # the fp32 model (the same object until quantization)
    quantized: str | None = None  # "dynamic" | "static" | "qat"
    masks: dict[str, Tensor] = field(default_factory=dict)  # magnitude pruning, kept after


@dataclass
class _Context:
    splits: DataSplits
    train_cfg: TrainSettings
    eval_cfg: EvalConfig
    seed: int
    echo: Echo
    teachers: dict[str, nn.Module]
    sources: dict[str, Teacher] = field(default_factory=dict)

    def teacher(self, which: str) -> Teacher:
        """The stage's teacher; its training-set logits are computed once per chain."""
        if which not in self.sources:
            self.sources[which] = chain_teacher(self.teachers[which], self.splits,
                                                 self.train_cfg,
                                                 batch_size=self.eval_cfg.batch_size)
        return self.sources[which]

    def calibration(self, n: int) -> Tensor:
        """`n` training samples, a seeded draw (the same for every run of the recipe)."""
        order = torch.randperm(len(self.splits.train_x),
                               generator=torch.Generator().manual_seed(self.seed))
        return self.splits.train_x[order[:n]]


def run_chain(stages: Sequence[Stage | dict[str, Any]], *, student: nn.Module,
              teacher: nn.Module, splits: DataSplits, run_dir: Path, train_cfg: TrainSettings,
              echo: Echo = print, eval_cfg: EvalConfig | None = None, seed: int = 0,
              models: dict[str, nn.Module] | None = None,
              row_prefix: str = "") -> list[dict[str, Any]]:
    """Run `stages` on a copy of `student`; one evaluation row per stage, in order.

    Args:
        stages: parsed stages (`compress.config`) or their mappings (validated here).
        teacher: the run's teacher (stages with `teacher: teacher`); `student` itself is the
            `teacher: input` of stages that recover from compression.
        train_cfg: the run's training settings; stages set epochs and maybe the learning rate,
            and their own KD temperature and α.
        seed: data order and calibration draw (the run passes its first seed).
        models: when given, receives a copy of the model after each stage, by stage name
            (`"2-prune"`), e.g. to fork another chain from it.
        row_prefix: prepended to each row's `stage` (several chains in one table).
    """
    if distributed.info().enabled:
        raise ConfigError("compress", "the compression chain runs in one process; run it "
                                      "without torchrun (the distilled student is reloaded)")
    if splits.task != "classification":  # the recipe refuses it; the Python API too
        raise ConfigError("compress", f"compression stages support classification data; "
                                      f"'{splits.name}' is {splits.task} data")
    parsed = [s if isinstance(s, Stage) else parse_stages([s], where="compress")[0]
              for s in stages]
    check_order(parsed)
    frozen_input = copy.deepcopy(student).eval()
    for p in frozen_input.parameters():
        p.requires_grad_(False)
    ctx = _Context(splits=splits, train_cfg=train_cfg, eval_cfg=eval_cfg or EvalConfig(),
                   echo=echo, seed=seed,
                   teachers={"teacher": teacher, "input": frozen_input})
    model = copy.deepcopy(student)
    for p in model.parameters():
        p.requires_grad_(True)
    chain = _Chain(model=model, float_model=model)
    teacher_logits = predict(teacher, splits.test_x, batch_size=ctx.eval_cfg.batch_size)
    rows = []
    for i, stage in enumerate(parsed):
        stage_dir = run_dir / "compress" / f"{i}-{stage.kind}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        for old in stage_dir.rglob("metrics.jsonl"):  # a re-run redoes the stage
            old.unlink()
        echo(f"compress {i}-{stage.kind}: {_describe(stage)}")
        info: dict[str, Any] = {"stage": stage.model_dump(mode="json")}
        if isinstance(stage, PruneStage):
            info.update(_prune(chain, stage, ctx, stage_dir))
        elif isinstance(stage, DistillStage):
            info.update(_distill(chain, stage, ctx, stage_dir))
        elif isinstance(stage, QuantizeStage):
            info.update(_quantize(chain, stage, ctx, stage_dir))
        if isinstance(stage, ExportStage):
            row = _export(chain, stage, ctx, stage_dir, teacher_logits, info)
        else:
            path = save_safetensors(chain.model, stage_dir / "model.safetensors",
                                    quantized=chain.quantized is not None)
            row = _row(chain, ctx, chain.model, path.stat().st_size, teacher_logits, "torch")
        if models is not None:
            models[f"{i}-{stage.kind}"] = copy.deepcopy(chain.model)
        row.update(stage=f"{row_prefix}{i}-{stage.kind}", kind=stage.kind, what=_describe(stage),
                   sparsity=prune.sparsity(chain.float_model), **info.get("row", {}))
        info.pop("row", None)
        atomic_write_text(stage_dir / "stage.json", json.dumps(info, indent=2))
        echo(f"compress {i}-{stage.kind}: accuracy {row['accuracy']:.4f}, {row['params']:,} "
             f"params, {row['bytes']:,} bytes, {row['latency_ms']:.3f} ms at batch 1")
        rows.append(row)
    atomic_write_text(run_dir / "compress" / "eval.json", json.dumps(rows, indent=2))
    return rows


def _describe(stage: Stage) -> str:
    if isinstance(stage, PruneStage):
        return (f"{stage.method} pruning {stage.amount:.0%} in {stage.rounds} round(s), "
                f"{stage.finetune_epochs} KD epoch(s) each from the {stage.teacher}")
    if isinstance(stage, DistillStage):
        return f"KD fine-tuning {stage.epochs} epoch(s) from the {stage.teacher}"
    if isinstance(stage, QuantizeStage):
        extra = {"dynamic": "", "static": f", {stage.calibration_samples} calibration samples",
                 "qat": f", QAT + KD {stage.epochs} epoch(s) from the {stage.teacher}"}
        return f"int8 {stage.method} ({stage.backend}{extra[stage.method]})"
    return f"export {', '.join(stage.formats)}"


def _row(chain: _Chain, ctx: _Context, model: nn.Module, size: int,
         teacher_logits: Tensor, runtime: str) -> dict[str, Any]:
    return stage_row(model, ctx.splits, params=count_parameters(chain.float_model),
                     nonzero=nonzero_parameters(chain.float_model), size_bytes=size,
                     teacher_logits=teacher_logits, eval_cfg=ctx.eval_cfg, runtime=runtime)


def _finetune(chain: _Chain, ctx: _Context, stage: PruneStage | DistillStage | QuantizeStage, *,
              epochs: int, lr: float | None, stage_dir: Path) -> float:
    cfg = finetune_config(ctx.train_cfg, epochs=epochs, lr=lr)
    kd = KDConfig(temperature=stage.temperature, alpha=stage.alpha)
    return kd_finetune(chain.model, ctx.teacher(stage.teacher), ctx.splits, cfg, kd,
                       stage_dir=stage_dir, echo=ctx.echo, seed=ctx.seed)


def _prune(chain: _Chain, stage: PruneStage, ctx: _Context, stage_dir: Path) -> dict[str, Any]:
    model = chain.model
    before = count_parameters(model)
    original = prune.layer_widths(model) if stage.method == "structured" else {}
    if stage.method == "structured" and not original:
        raise ConfigError("compress.prune", "no layer of this model can be pruned "
                                            "structurally; use method magnitude")
    rounds = []
    for r, amount in enumerate(prune.round_amounts(stage.amount, stage.rounds)):
        if stage.method == "structured":
            chain.masks = {}  # shapes change; earlier magnitude masks no longer apply
            widths = prune.prune_structured(model, prune.structured_targets(original, amount))
            done = {"widths": widths}
        else:
            chain.masks = {}  # the new round's masks replace (and contain) the old ones
            prune.apply_magnitude(model, amount)
            done = {"sparsity": prune.sparsity(model)}
        ctx.echo(f"  round {r + 1}/{stage.rounds}: {json.dumps(done)}, "
                 f"{count_parameters(model):,} params")
        if stage.finetune_epochs:
            # One directory per round: the engine starts a fresh run's metrics.jsonl over.
            done["val_accuracy"] = _finetune(chain, ctx, stage, epochs=stage.finetune_epochs,
                                             lr=stage.lr, stage_dir=stage_dir / f"round-{r + 1}")
        rounds.append(done)
    if stage.method == "magnitude":
        chain.masks = {name: m.weight_mask.clone() for name, m in model.named_modules()
                       if hasattr(m, "weight_mask")}
        prune.make_permanent(model)
    return {"params_before": before, "rounds": rounds}


def _distill(chain: _Chain, stage: DistillStage, ctx: _Context, stage_dir: Path
             ) -> dict[str, Any]:
    # Weights zeroed by an earlier magnitude pruning stay zero: the masks are put back for
    # the fine-tuning (the gradient reaches only the kept weights) and folded in after.
    for name, mask in chain.masks.items():
        torch_prune.custom_from_mask(chain.model.get_submodule(name), "weight", mask)
    accuracy = _finetune(chain, ctx, stage, epochs=stage.epochs, lr=stage.lr,
                         stage_dir=stage_dir)
    prune.make_permanent(chain.model)
    return {"val_accuracy": accuracy}


def _quantize(chain: _Chain, stage: QuantizeStage, ctx: _Context, stage_dir: Path
              ) -> dict[str, Any]:
    fp32 = chain.model.eval()
    info: dict[str, Any] = {}
    if stage.method == "dynamic":
        chain.model = quantize_dynamic(fp32)
    elif stage.method == "static":
        chain.model = quantize_static(fp32, ctx.calibration(stage.calibration_samples),
                                      backend=stage.backend)
    else:
        prepared = prepare_qat(fp32, ctx.calibration(stage.calibration_samples),
                               backend=stage.backend)
        # QAT is fine-tuning with fake quantization: the engine trains the prepared graph
        # with the KD loss, a tenth of the run's learning rate unless the stage gives one.
        lr = stage.lr if stage.lr is not None else ctx.train_cfg.optimizer.lr / 10
        saved, chain.model = chain.model, prepared
        info["val_accuracy_fake_quant"] = _finetune(chain, ctx, stage, epochs=stage.epochs,
                                                    lr=lr, stage_dir=stage_dir)
        chain.model = convert_qat(prepared, backend=stage.backend)
        del saved
    chain.float_model = fp32
    chain.quantized = stage.method
    info["row"] = {"max_abs_diff_vs_fp32": _max_diff(chain.model, fp32, ctx.splits.test_x)}
    return info


@torch.no_grad()
def _max_diff(model: nn.Module, reference: nn.Module, x: Tensor) -> float:
    """Largest |logit| difference from the fp32 model on test inputs (what int8 costs)."""
    return float((predict(model, x) - predict(reference, x)).abs().max())


def _export(chain: _Chain, stage: ExportStage, ctx: _Context, stage_dir: Path,
            teacher_logits: Tensor, info: dict[str, Any]) -> dict[str, Any]:
    files: dict[str, int] = {}
    if "safetensors" in stage.formats:
        path = save_safetensors(chain.model, stage_dir / "model.safetensors",
                                quantized=chain.quantized is not None,
                                class_names=ctx.splits.class_names)
        files[path.name] = path.stat().st_size
    if "onnx" not in stage.formats:  # the torch model stays what runs
        row = _row(chain, ctx, chain.model, sum(files.values()), teacher_logits, "torch")
        info["files"] = files
        return row
    x = ctx.splits.test_x
    (stage_dir / "model.onnx.data").unlink(missing_ok=True)  # an earlier run's side file
    path = export_onnx(chain.model, x[:2], stage_dir / "model.onnx", quantized=chain.quantized,
                       float_model=chain.float_model, opset=stage.opset,
                       class_names=ctx.splits.class_names)
    rtol = stage.rtol or (INT8_RTOL if chain.quantized else FP32_RTOL)
    runner, check = check_onnx(path, chain.model, x[: ctx.eval_cfg.batch_size], rtol=rtol)
    data = path.with_name(path.name + ".data")  # weights stored beside the graph, if any
    size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    files[path.name] = size
    info.update(files=files, check=check)
    row = _row(chain, ctx, runner, size, teacher_logits, "onnxruntime")
    row.update(check)
    return row
