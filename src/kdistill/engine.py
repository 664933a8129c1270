"""The one training loop. Every method, the baseline and the teacher go through `train()`.

Read it top to bottom: resume if a checkpoint is there, then for each optimiser step take
`grad_accum` micro-batches, run student (and teacher, or read its cache), ask the method for
its named loss terms, weight each micro-batch by its share of the step's samples (so the
accumulated gradient equals the gradient of one big batch), clip, step, log, and at epoch
ends evaluate and checkpoint.

Under torchrun (see `kdistill.distributed`) the same loop runs on every rank: each takes its
rows of every global batch, DDP averages the gradients, the step's item count and loss terms
are summed over ranks (so weights and logs are those of the global batch), and rank 0 alone
evaluates, logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import rich.progress as rp
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdistill import distributed
from kdistill.capture import capture
from kdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdistill.config import TrainSettings
from kdistill.data.loader import BatchLoader
from kdistill.errors import ConfigError, TrainingError
from kdistill.logger import MetricsLogger
from kdistill.methods.base import Batch, Method, Outputs
from kdistill.schedules import Progress, value_at
from kdistill.teachers import Teacher, TopK


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # current epoch
    batch: int = 0  # micro-batches already consumed in the current epoch
    samples: int = 0  # training samples seen
    # Loss sums of the current logging window: checkpointed so a resumed run logs the same.
    log_sums: dict[str, float] = field(default_factory=dict)


def _forward(
    student: nn.Module,
    teacher: Teacher | None,
    method: Method,
    batch: Batch,
    student_feats: dict[str, Tensor],
) -> Outputs:
    logits = student(batch["input"])
    t_logits, t_feats, t_topk = None, {}, None
    if teacher is not None:
        t_out, t_feats = teacher(batch, method.teacher_layers)
        if isinstance(t_out, TopK):  # a top-k cache: sparse targets, no dense logits
            t_topk = t_out
        else:
            t_logits = t_out
    return Outputs(logits, t_logits, dict(student_feats), t_feats, teacher_topk=t_topk)


class _Step(nn.Module):
    """Student and method (its adapters) as one module whose forward returns the loss terms:
    DDP synchronises the gradients of exactly the module it wraps and whose forward it runs,
    so both must be inside. Holds references only; the models are not changed."""

    def __init__(self, student: nn.Module, method: Method, teacher: Teacher | None,
                 student_feats: dict[str, Tensor], precision: str) -> None:
        super().__init__()
        self.student, self.method = student, method
        self.teacher, self.student_feats, self.precision = teacher, student_feats, precision

    def forward(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        # Autocast covers the networks only; the loss math stays in fp32.
        with torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
            out = _forward(self.student, self.teacher, self.method, batch, self.student_feats)
        return self.method.loss_terms(out, batch, progress)


def _restore(
    checkpoint_dir: Path | None,
    student: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    logger: MetricsLogger | None,
) -> TrainState | None:
    path = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if path is None:
        return None
    trainer_state, state = load_checkpoint(path, student=student, method=method)
    optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["rng"])
    resumed = TrainState(**state["train_state"])
    _truncate_metrics(logger, resumed.step)
    return resumed


def _truncate_metrics(logger: MetricsLogger | None, step: int) -> None:
    """Drop records after `step` (they will be written again) and any torn last line."""
    if logger is not None:
        logger.truncate_after(step)  # never through a link planted at metrics.jsonl


def train(
    student: nn.Module,
    teacher: Teacher | None,
    method: Method,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    cfg: TrainSettings,
    *,
    seed: int = 0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    logger: MetricsLogger | None = None,
    checkpoint_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> TrainState:
    """Train `student` (and `method`'s adapters) with `method`'s loss terms.

    Args:
        teacher: an `OnlineTeacher`, a `CachedTeacher`, or None for methods without a teacher.
        optimizer: over `student.parameters()` and `method.parameters()`.
        scheduler: a torch LR scheduler stepped once per optimiser step; when None,
            `cfg.lr_schedule` multiplies each group's initial learning rate.
        evaluate: called at epoch ends (every `cfg.eval_every_epochs`); its scalars are logged
            with `split: "val"`.
        checkpoint_dir: where to checkpoint; a checkpoint already there is resumed from.
        echo: receives one human-readable line per epoch.
        progress_bar: show a rich progress bar with loss and throughput (terminals only, so
            CI logs stay quiet).
    """
    if method.uses_teacher and teacher is None:
        raise ConfigError("method", f"method '{method.cfg.name}' needs a teacher")
    dist = distributed.info()
    # Every rank resumes from the checkpoint; rank 0 alone evaluates, logs and writes them.
    save_dir = checkpoint_dir if dist.main else None
    if not dist.main:
        evaluate, logger, echo, progress_bar = None, None, None, False
    logger = logger or MetricsLogger()
    accum = cfg.grad_accum
    steps_per_epoch = math.ceil(len(loader) / accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    state = _restore(checkpoint_dir, student, method, optimizer, scheduler, logger)
    if state is None:
        _truncate_metrics(logger, 0)  # a crashed attempt with no checkpoint starts over
        state = TrainState()
        torch.manual_seed(seed)  # dropout and any other in-training randomness
    elif echo:
        echo(f"resumed from step {state.step} (epoch {state.epoch}, batch {state.batch})")

    def checkpoint() -> None:
        if save_dir is None:  # also every rank but 0
            return
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "rng": torch.get_rng_state(),
        }
        save_checkpoint(save_dir, student=student, method=method,
                        trainer_state=trainer_state, state={"step": state.step,
                                                            "train_state": asdict(state)})

    sums = state.log_sums
    window_samples, window_start = 0, time.perf_counter()
    bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                      rp.MofNCompleteColumn(), rp.TimeRemainingColumn(), transient=True,
                      disable=not (progress_bar and sys.stdout.isatty()))
    task = bar.add_task("training", total=total_steps, completed=state.step)
    with bar, capture(student, method.student_layers,
                      where="method.student_layers") as s_feats:
        step_module = _Step(student, method, teacher, s_feats, cfg.precision)
        # DDP broadcasts rank 0's weights at construction; unused parameters are allowed
        # because a method may leave an adapter or a head out of some steps.
        ddp = (DistributedDataParallel(step_module, find_unused_parameters=True)
               if dist.enabled else None)
        run_step = ddp or step_module
        while state.epoch < cfg.epochs and state.step < total_steps:
            student.train()
            method.train()
            batches = loader.epoch(state.epoch, start=state.batch)
            while state.step < total_steps:
                group = [b for _, b in zip(range(accum), batches, strict=False)]
                if not group:
                    break
                progress = Progress(state.step, state.epoch, total_steps, steps_per_epoch)
                n_group = sum(len(b["label"]) for b in group)  # global samples, all ranks
                # This rank's rows; a global batch too small to give every rank a row (the
                # last of an epoch, at most) is left out of the step on every rank alike.
                local = [distributed.shard(b, dist) for b in group
                         if len(b["label"]) >= dist.world]
                # On-policy methods may replace a batch by the student's own samples.
                local = [method.prepare_batch(b, student, progress) for b in local]
                # Micro-batch weights: the method's item counts (samples; valid tokens for
                # token-level losses) over the whole step on all ranks, so the summed
                # micro-batch means are the global batch's mean. DDP averages gradients over
                # ranks, hence the factor `world` in the backward weight.
                items = [method.batch_items(b) for b in local]
                n_items = float(sum(items))
                if dist.enabled:
                    n_items = float(distributed.all_reduce_sum(torch.tensor([n_items])).item())
                optimizer.zero_grad(set_to_none=True)
                term_sums: dict[str, Tensor] = {}
                for i, (batch, n_batch) in enumerate(zip(local, items, strict=True)):
                    share = n_batch / max(n_items, 1.0)  # micro-batch mean -> step mean
                    # Gradients are all-reduced once, in the step's last backward.
                    sync = ddp.no_sync() if ddp and i < len(local) - 1 else contextlib.nullcontext()
                    with sync:
                        terms = run_step(batch, progress)
                        loss = sum(terms.values()) * (share * dist.world)
                        loss.backward()  # type: ignore[union-attr]
                    for name, value in terms.items():
                        term_sums[name] = term_sums.get(name, 0.0) + value.detach() * share
                # A finite loss can still give inf/NaN gradients (a sqrt or a norm at 0, an
                # overflow in bf16): stepping on them would poison the weights silently, so
                # the gradient norm (identical on every rank after DDP's reduction) is checked.
                params = [p for g in optimizer.param_groups for p in g["params"]]
                grads = [p.grad.detach().float() for p in params if p.grad is not None]
                norm = (torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads])) if grads
                    else torch.zeros(())) / dist.world  # summed over ranks below
                # One host sync (and one reduction over ranks) per step for all terms.
                stacked = distributed.all_reduce_sum(
                    torch.stack([*(v.float() for v in term_sums.values()), norm]))
                *values, grad_norm = stacked.tolist()
                step_terms = dict(zip(term_sums, values, strict=True))
                bad = [k for k, v in step_terms.items() if not math.isfinite(v)]
                if bad:
                    raise TrainingError(
                        f"non-finite loss at step {state.step}, epoch {state.epoch}: term "
                        f"'{bad[0]}' = {step_terms[bad[0]]}; the last good checkpoint is kept"
                    )
                if not math.isfinite(grad_norm):
                    raise TrainingError(
                        f"non-finite gradient at step {state.step}, epoch {state.epoch} (loss "
                        f"terms finite: {', '.join(f'{k}={v:.4g}' for k, v in step_terms.items())}"
                        "); not stepping on it; the last good checkpoint is kept")
                if cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                if scheduler is None:
                    factor = value_at(cfg.lr_schedule, progress)
                    for g in optimizer.param_groups:
                        g["lr"] = g["initial_lr"] * factor
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                state.step += 1
                state.batch += len(group)
                state.samples += n_group
                window_samples += n_group
                bar.advance(task)
                for name, value in step_terms.items():
                    sums[name] = sums.get(name, 0.0) + value
                sums["_n"] = sums.get("_n", 0.0) + 1
                if state.step % cfg.log_every == 0 or state.batch >= len(loader):
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    n = sums.pop("_n")
                    record = {f"loss/{k}": v / n for k, v in sums.items()}
                    record["loss"] = sum(record.values())
                    logger.log({"step": state.step, "epoch": state.epoch, "split": "train",
                                **record, "lr": optimizer.param_groups[0]["lr"],
                                **method.scalars(progress),
                                "samples_per_s": window_samples / elapsed})
                    bar.update(task, description=f"epoch {state.epoch + 1} loss "
                               f"{record['loss']:.4f} {window_samples / elapsed:,.0f} samples/s")
                    sums.clear()
                    window_samples, window_start = 0, time.perf_counter()
                # Mid-epoch checkpoints only: at an epoch's (or the run's) end the checkpoint
                # comes after the evaluation, so every checkpoint at step S follows all of
                # step S's records and a resume never repeats or loses one.
                if (cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0
                        and state.batch < len(loader) and state.step < total_steps):
                    checkpoint()
            epoch_done = state.batch >= len(loader)
            last = state.step >= total_steps  # the run ends here, maybe mid-epoch (max_steps)
            if epoch_done or last:
                if evaluate is not None and ((state.epoch + 1) % cfg.eval_every_epochs == 0
                                             or last):
                    scores = evaluate()
                    logger.log({"step": state.step, "epoch": state.epoch, "split": "val",
                                **scores})
                    if echo:
                        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                        echo(f"epoch {state.epoch + 1}/{cfg.epochs}: {shown}")
                if epoch_done:
                    state.epoch += 1
                    state.batch = 0
            checkpoint()
    del ddp, run_step, step_module  # before the process group goes (see distributed.shutdown)
    return state
