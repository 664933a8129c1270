"""The one training loop. Every method, the baseline and the teacher go through `train()`.

Read it top to bottom: `train` sets the run up (resuming if a checkpoint is there), then each
epoch takes optimiser steps; a step (`_optimizer_step`) takes `grad_accum` micro-batches, lets
the method prepare them (and steps its auxiliary network first, if it declares one), runs
student (and teacher, or reads its cache), asks the method for its named loss terms, weights
each micro-batch by its share of the step's items (so the accumulated gradient equals the
gradient of one big batch), checks, clips and steps; the step's terms go to the logging
window; at epoch ends the run evaluates and checkpoints.

Devices (`placement`): the settings' device is resolved once, student and method are moved
there, batches follow (pinned, non-blocking) and teacher outputs are brought there; the
networks' forward runs under the device's autocast (`precision`; fp16 with a gradient scaler)
and the loss math in fp32. `compile` runs the student's forward and the loss through
torch.compile.

Under torchrun (see `kdistill.distributed`) the same loop runs on every rank: each takes its
rows of every global batch, DDP averages the gradients (or, with `strategy: fsdp`, FSDP2
reduce-scatters them over the shards: `sharding`), the step's item count and loss terms are
summed over ranks (so weights and logs are those of the global batch), and rank 0 alone
evaluates, logs and checkpoints. Methods reach the other ranks only through the collectives
set here (`Method.collectives`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import rich.progress as rp
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdistill import devices, distributed
from kdistill.capture import capture
from kdistill.data.loader import BatchLoader
from kdistill.engine.inputs import Settings, groups
from kdistill.engine.resume import Scheduler, TrainState
from kdistill.engine.setup import Run, checkpoint, setup, wrap_ddp
from kdistill.engine.step import StepModule, grad_norm
from kdistill.logger import MetricsLogger
from kdistill.methods.base import SINGLE_PROCESS, Batch, Method
from kdistill.schedules import Progress, value_at
from kdistill.teachers import Teacher


def train(
    student: nn.Module,
    teacher: Teacher | nn.Module | None,
    method: Method,
    loader: BatchLoader | Iterable[Any],
    optimizer: torch.optim.Optimizer,
    cfg: Settings | None = None,
    *,
    seed: int = 0,
    scheduler: Scheduler | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    logger: MetricsLogger | None = None,
    checkpoint_dir: Path | str | None = None,
    echo: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> TrainState:
    """Train `student` (and `method`'s adapters) with `method`'s loss terms.

    Args:
        teacher: an `OnlineTeacher`, a `CachedTeacher`, a plain network (run as an
            `OnlineTeacher`: frozen, in eval mode, without gradients), or None for methods
            without a teacher.
        loader: kdistill's `BatchLoader`, or any iterable of `(inputs, labels)` pairs or
            dicts with "input", "label" and optionally "index" (e.g. a torch `DataLoader`),
            iterated once per epoch; see `kdistill.engine.inputs.IterableBatches` for sample
            ids and what a resume means there.
        optimizer: over `student.parameters()` and `method.optimizer_parameters()`.
        cfg: a `LoopSettings` (None: `LoopSettings()`, one epoch at the optimizer's own
            learning rate, no clipping, on the student's device), or a recipe's
            `TrainSettings`, whose `lr_schedule` (cosine decay unless the recipe says
            otherwise) and `device` (auto) then apply. Student and method are moved to the
            device (`placement.place`; the optimiser's state follows), the teacher runs where
            it is and its outputs are brought to the student.
        seed: seeds torch's RNG at a fresh start (dropout, a method's sampling).
        scheduler: a torch LR scheduler stepped once per optimiser step; when None,
            `cfg.lr_schedule` multiplies each group's initial learning rate.
        evaluate: called at epoch ends (every `cfg.eval_every_epochs`); its scalars are logged
            with `split: "val"`.
        checkpoint_dir: where to checkpoint; a checkpoint already there is resumed from.
        echo: receives one human-readable line per epoch.
        progress_bar: show a rich progress bar with loss and throughput (terminals only, so
            CI logs stay quiet).

    Raises:
        TypeError: an argument of the wrong kind, named (`loader: yields str; ...`).
        ConfigError: a device or precision this machine lacks (`train.device: ...`).
    """
    run = setup(student, teacher, method, loader, optimizer, cfg, seed=seed,
                 scheduler=scheduler, evaluate=evaluate, logger=logger,
                 checkpoint_dir=checkpoint_dir, echo=echo)
    bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                      rp.MofNCompleteColumn(), rp.TimeRemainingColumn(), transient=True,
                      disable=not (progress_bar and run.dist.main and sys.stdout.isatty()))
    task = bar.add_task("training", total=run.total_steps, completed=run.state.step)
    run.advance = lambda text: (bar.advance(task) if text is None
                                else bar.update(task, description=text))
    try:
        with bar, capture(run.model, method.student_layers,
                          where="method.student_layers") as s_feats:
            step_module = StepModule(run.model, method, run.teacher, s_feats, run.amp,
                                     compile=run.cfg.compile)
            ddp = wrap_ddp(run, step_module)
            while run.state.epoch < run.cfg.epochs and run.state.step < run.total_steps:
                epoch_done = _train_epoch(run, step_module, ddp)
                _end_epoch(run, epoch_done)
            if run.shard is not None:
                run.shard.publish(run.state.step)  # the caller's student gets the weights
            del ddp, step_module  # before the process group goes (see distributed.shutdown)
        if run.dist.enabled:
            # Rank 0 wrote the last checkpoint: no rank leaves before it is complete, so a
            # following train() on the same directory resumes from it on every rank.
            distributed.barrier()
    finally:
        method.collectives = SINGLE_PROCESS
        if run.shard is not None:
            run.shard.restore_homes()
    return run.state


# -- an epoch, one optimiser step --------------------------------------------------------------


def _train_epoch(run: Run, step_module: StepModule, ddp: DistributedDataParallel | None) -> bool:
    """Optimiser steps until the epoch's batches (or the run's steps) run out; True when the
    epoch's batches ran out."""
    state = run.state
    run.model.train()
    run.method.train()
    epoch = groups(run.batches.epoch(state.epoch, start=state.batch), run.cfg.grad_accum)
    for group, last in epoch:
        progress = Progress(state.step, state.epoch, run.total_steps, run.steps_per_epoch)
        step_terms = _optimizer_step(run, step_module, ddp, group, progress)
        n_group = sum(len(b["label"]) for b in group)  # global samples, all ranks
        state.step += 1
        state.batch += len(group)
        state.samples += n_group
        run.window_samples += n_group
        run.advance(None)
        _log_step(run, step_terms, progress, last)
        if last:
            return True
        if state.step >= run.total_steps:
            return False
        # Mid-epoch checkpoints only: at an epoch's (or the run's) end the checkpoint comes
        # after the evaluation, so every checkpoint at step S follows all of step S's records
        # and a resume never repeats or loses one.
        every = run.cfg.checkpoint_every_steps
        if every and state.step % every == 0:
            checkpoint(run)
    return True


def _optimizer_step(run: Run, step_module: StepModule, ddp: DistributedDataParallel | None,
                    group: list[Batch], progress: Progress) -> dict[str, float]:
    """One optimiser step over the micro-batches `group`; returns the step's loss terms."""
    lr_factor = _lr_factor(run, progress)
    local, items = _prepare_batches(run, group, progress, lr_factor)
    # Micro-batch weights: the method's item counts (samples; valid tokens for token-level
    # losses) over the whole step on all ranks, so the summed micro-batch means are the global
    # batch's mean. DDP (and FSDP) average gradients over ranks, hence the factor `world`.
    n_items = float(sum(items))
    if run.dist.enabled:
        n_items = float(distributed.all_reduce_sum(
            torch.tensor([n_items], device=run.device)).item())
    run.optimizer.zero_grad(set_to_none=True)
    term_sums: dict[str, Tensor] = {}
    for i, (batch, n_batch) in enumerate(zip(local, items, strict=True)):
        share = n_batch / max(n_items, 1.0)  # micro-batch mean -> step mean
        # Gradients are reduced over ranks once, in the step's last backward.
        last = i == len(local) - 1
        sync = ddp.no_sync() if ddp and not last else contextlib.nullcontext()
        if run.shard is not None:
            run.shard.sync(last)
        with sync:
            terms = (ddp or step_module)(batch, progress)
            loss = sum(terms.values()) * (share * run.dist.world)
            run.amp.scale(loss).backward()  # type: ignore[arg-type]
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value.detach() * share
    return _apply_gradients(run, term_sums, progress, lr_factor)


def _apply_gradients(run: Run, term_sums: dict[str, Tensor], progress: Progress,
                     lr_factor: float) -> dict[str, float]:
    """Check, clip and apply the step's gradients (in fp16 the scaler may skip the step);
    returns the step's loss terms, summed over ranks."""
    if run.shard is not None:
        run.shard.average_method_gradients(run.dist.world)
    run.amp.unscale(run.optimizer)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    # One host sync (and one reduction over ranks) per step for all terms and the gradient
    # norm (`grad_norm`: this rank's share of its square).
    norm_sq = grad_norm(params, run.dist.world)
    stacked = distributed.all_reduce_sum(torch.stack(
        [*(v.to(norm_sq) for v in term_sums.values()), norm_sq.to(run.device)]))
    *values, total = stacked.tolist()
    step_terms = dict(zip(term_sums, values, strict=True))
    norm = math.sqrt(total) if total >= 0 else math.nan
    if run.scheduler is None:
        for g in run.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor
    if run.amp.should_step(step_terms, norm, progress) and run.cfg.clip_grad_norm is not None:
        if run.shard is not None:
            run.shard.clip(norm, run.cfg.clip_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, run.cfg.clip_grad_norm)
    run.amp.step(run.optimizer)
    if run.scheduler is not None:
        run.scheduler.step()
        if run.shard is not None:  # the scheduler drives the caller's optimiser's groups
            run.shard.follow_learning_rates()
    return step_terms


def _lr_factor(run: Run, progress: Progress) -> float:
    """This step's LR multiplier: `cfg.lr_schedule`, or the torch scheduler's current ratio
    (for the auxiliary network; the scheduler sets the student's learning rates itself)."""
    if run.scheduler is None:
        return value_at(run.cfg.lr_schedule, progress)
    group = run.optimizer.param_groups[0]
    return group["lr"] / group["initial_lr"] if group["initial_lr"] else 1.0


def _prepare_batches(run: Run, group: list[Batch], progress: Progress,
                     lr_factor: float) -> tuple[list[Batch], list[int]]:
    """This rank's rows of each micro-batch on the device, as the method trains on them (the
    auxiliary network, if any, steps first, then `prepare_batch` may replace the batch:
    on-policy), and the method's item count of each."""
    kept = [b for b in group if len(b["label"]) >= run.dist.world]
    # A global batch too small to give every rank a row (the last of an epoch, at most) is
    # left out of the step on every rank alike.
    host = [distributed.shard(b, run.dist) for b in kept]
    # Counted on the host where the batch stays what it is (a count on a GPU is a sync);
    # an on-policy method's batch is only known after `prepare_batch`.
    counts = None if run.method.on_policy else [run.method.batch_items(b) for b in host]
    local = [devices.to(b, run.device) for b in host]
    out = []
    for whole, batch in zip(kept, local, strict=True):
        if run.aux is not None:
            logged = run.aux.updates(batch, len(batch["label"]) / len(whole["label"]),
                                     progress, student=run.model, dist=run.dist,
                                     clip=run.cfg.clip_grad_norm, lr_factor=lr_factor)
            run.state.aux_terms = logged if logged is not None else run.state.aux_terms
        out.append(run.method.prepare_batch(batch, run.model, progress))
    return out, counts if counts is not None else [run.method.batch_items(b) for b in out]


# -- logging and epoch ends ------------------------------------------------------------------------


def _log_step(run: Run, step_terms: dict[str, float], progress: Progress,
              last: bool) -> None:
    """Add the step to the logging window; write the window's means every `log_every` steps
    and at the epoch's end."""
    state, sums = run.state, run.state.log_sums
    for name, value in step_terms.items():
        sums[name] = sums.get(name, 0.0) + value
    sums["_n"] = sums.get("_n", 0.0) + 1
    if state.step % run.cfg.log_every != 0 and not last:
        return
    elapsed = max(time.perf_counter() - run.window_start, 1e-9)
    n = sums.pop("_n")
    record = {f"loss/{k}": v / n for k, v in sums.items()}
    record["loss"] = sum(record.values())
    scalers = {**run.amp.logged(), **({f"{run.aux.spec.name}/{k}": v for k, v in
                                       run.aux.amp.logged().items()} if run.aux else {})}
    run.logger.log({"step": state.step, "epoch": state.epoch, "split": "train", **record,
                    "lr": run.optimizer.param_groups[0]["lr"], **run.method.scalars(progress),
                    **state.aux_terms, **scalers,
                    "samples_per_s": run.window_samples / elapsed})
    run.advance(f"epoch {state.epoch + 1} loss {record['loss']:.4f} "
                f"{run.window_samples / elapsed:,.0f} samples/s")
    sums.clear()
    run.window_samples, run.window_start = 0, time.perf_counter()


def _end_epoch(run: Run, epoch_done: bool) -> None:
    """At an epoch's end (or the run's, maybe mid-epoch with max_steps): evaluate when due,
    move to the next epoch, checkpoint."""
    state, cfg = run.state, run.cfg
    last = state.step >= run.total_steps
    if epoch_done or last:
        if run.evaluates and ((state.epoch + 1) % cfg.eval_every_epochs == 0 or last):
            _evaluate(run)
        if epoch_done:
            state.epoch += 1
            state.batch = 0
    checkpoint(run)


def _evaluate(run: Run) -> None:
    """The caller's evaluation on rank 0 (under fsdp: of the gathered weights, on the
    device)."""
    placed: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if run.shard is not None:
        run.shard.publish(run.state.step)  # every rank: a collective
        placed = devices.on(run.student, run.device)
    if run.evaluate is None:
        return
    with placed:
        scores = run.evaluate()
    state = run.state
    run.logger.log({"step": state.step, "epoch": state.epoch, "split": "val", **scores})
    if run.echo:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        run.echo(f"epoch {state.epoch + 1}/{run.cfg.epochs}: {shown}")
