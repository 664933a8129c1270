"""KD fine-tuning for the compression chain, through the one engine (`kdistill.engine.train`)
and the `kd` method, and the evaluation row every chain stage gets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.build import build_optimizer, build_train_loader
from kdistill.config import EvalConfig, TrainSettings
from kdistill.data import DataSplits
from kdistill.engine import train
from kdistill.evaluate import classification_scores, measure_speed, per_class_accuracy, predict
from kdistill.logger import MetricsLogger
from kdistill.methods import build_method
from kdistill.methods.kd import KDConfig
from kdistill.teachers import OnlineTeacher, Teacher
from kdistill.types import Batch, Echo


class LogitsTeacher:
    """A teacher whose logits over the training set were computed once, read by the batch's
    sample indices: every fine-tuning round of a chain reuses them (the same idea as the run's
    teacher cache, kept in memory because a chain's teachers are small or already cached)."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self.forwards = 0

    def __call__(self, batch: Batch, layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        if layers:
            raise ValueError("chain fine-tuning uses the kd method, which reads logits only")
        return self.logits[batch["index"]], {}


def chain_teacher(model: nn.Module, splits: DataSplits, train_cfg: TrainSettings, *,
                   batch_size: int = 1000) -> Teacher:
    """Precomputed logits when inputs are deterministic, else the live model (jitter)."""
    if train_cfg.augment != "none":
        return OnlineTeacher(model)
    return LogitsTeacher(predict(model, splits.train_x, batch_size=batch_size))


def finetune_config(train_cfg: TrainSettings, *, epochs: int, lr: float | None) -> TrainSettings:
    """The run's training settings with this stage's epochs (and learning rate), evaluated
    once at the end; `max_steps` (smoke tests) is kept."""
    optimizer = train_cfg.optimizer
    if lr is not None:
        optimizer = optimizer.model_copy(update={"lr": lr})
    # On the CPU in fp32, one process: pruned and quantized models are CPU work.
    return train_cfg.model_copy(update={"epochs": epochs, "optimizer": optimizer,
                                        "eval_every_epochs": epochs,
                                        "checkpoint_every_steps": None, "device": "cpu",
                                        "precision": "fp32", "compile": False,
                                        "strategy": "ddp"})


def kd_finetune(model: nn.Module, teacher: Teacher, splits: DataSplits, cfg: TrainSettings,
                kd: KDConfig, *, stage_dir: Path, echo: Echo, seed: int = 0,
                where: str = "compress") -> float:
    """Train `model` in place with the kd method's loss from `teacher` for `cfg.epochs`;
    logs every loss term into `stage_dir/metrics.jsonl`; returns the final val accuracy."""
    method = build_method(kd)
    loader = build_train_loader(splits, cfg, seed=seed, where=where)
    method.setup(model, None, splits.train_x[:2], num_samples=len(splits.train_x))
    optimizer = build_optimizer([*model.parameters(), *method.parameters()], cfg.optimizer)
    last: dict[str, float] = {}

    def evaluate() -> dict[str, float]:
        scores = classification_scores(predict(model, splits.val_x), splits.val_y)
        last.update(accuracy=scores["accuracy"], nll=scores["nll"])
        return dict(last)

    stage_dir.mkdir(parents=True, exist_ok=True)
    with MetricsLogger(stage_dir / "metrics.jsonl") as logger:
        # No checkpoints: a chain stage is minutes long and is redone as a whole.
        train(model, teacher, method, loader, optimizer, cfg, seed=seed, evaluate=evaluate,
              logger=logger, echo=lambda line: echo(f"  {stage_dir.name} {line}"))
    return last.get("accuracy", float("nan"))


def nonzero_parameters(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def stage_row(model: nn.Module, splits: DataSplits, *, params: int, nonzero: int,
              size_bytes: int, teacher_logits: Tensor | None, eval_cfg: EvalConfig,
              runtime: str) -> dict[str, Any]:
    """The report's columns for one chain stage, measured on the model that actually runs
    (an int8 torch model, or an ONNX file in onnxruntime): test accuracy, errors, nll, ece,
    agreement with the teacher, per-class accuracy, parameters (of the fp32 architecture;
    quantization keeps the count), non-zero parameters, bytes on disk, latency at batch 1
    (ms, median) and throughput (samples/s at `eval.throughput_batch`)."""
    logits = predict(model, splits.test_x, batch_size=eval_cfg.batch_size)
    row: dict[str, Any] = classification_scores(logits, splits.test_y,
                                                teacher_logits=teacher_logits,
                                                ece_bins=eval_cfg.ece_bins)
    row["per_class_accuracy"] = per_class_accuracy(logits, splits.test_y)
    row.update(params=params, nonzero_params=nonzero, bytes=size_bytes, runtime=runtime)
    with torch.no_grad():
        row.update(measure_speed(model, splits.test_x, throughput_batch=eval_cfg.throughput_batch,
                                 repeats=eval_cfg.latency_repeats))
    return row


def chain_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of chain rows (as `run_chain` returns them, optionally preceded by a
    row for the chain's input): each stage's accuracy and the size and speed it buys."""
    lines = ["| stage | what | runs in | accuracy | params | non-zero | bytes | latency ms "
             "(batch 1) | samples/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.get('stage', '')} | {row.get('what', '')} | {row.get('runtime', '')} "
            f"| {row['accuracy'] * 100:.2f} % | {row['params']:,} "
            f"| {row.get('nonzero_params', row['params']):,} | {row['bytes']:,} "
            f"| {row['latency_ms']:.4f} | {row['throughput']:,.0f} |")
    return "\n".join(lines) + "\n"
