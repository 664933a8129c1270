"""Setting one `train()` call up: what it holds (`Run`), the pieces checked and placed on the
device, the shards under fsdp, DDP, and the checkpoint it resumes from and writes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdistill import distributed
from kdistill.data.loader import BatchLoader
from kdistill.engine import placement, resume
from kdistill.engine.auxiliary import AuxiliaryNetwork
from kdistill.engine.inputs import (
    Batches,
    LoopSettings,
    Settings,
    as_batches,
    as_teacher,
    check_arguments,
)
from kdistill.engine.precision import Amp
from kdistill.engine.resume import Resumable, Scheduler, TrainState
from kdistill.engine.sharding import Sharding
from kdistill.engine.sharding import check as check_sharding
from kdistill.engine.step import RankCollectives, StepModule
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger
from kdistill.methods.base import Method
from kdistill.teachers import Teacher


@dataclass
class Run:
    """What one call of `train` holds, so that its parts below are plain functions."""

    student: nn.Module  # the caller's; `model` is the module trained (a sharded copy in fsdp)
    teacher: Teacher | None
    method: Method
    batches: Batches
    optimizer: torch.optim.Optimizer  # the one stepped (over the shards in fsdp)
    cfg: Settings
    scheduler: Scheduler | None
    evaluate: Callable[[], dict[str, float]] | None  # None on every rank but 0
    evaluates: bool  # an evaluation is due at epoch ends (on every rank: fsdp gathers for it)
    logger: MetricsLogger
    echo: Callable[[str], None] | None
    checkpoints: Path | None  # the same on every rank; rank 0 alone writes
    dist: distributed.DistInfo
    device: torch.device
    amp: Amp
    aux: AuxiliaryNetwork | None
    total_steps: int
    steps_per_epoch: int
    shard: Sharding | None = None
    state: TrainState = field(default_factory=TrainState)
    window_samples: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    advance: Callable[[str | None], None] = lambda _description: None  # the progress bar

    @property
    def model(self) -> nn.Module:
        return self.shard.work if self.shard is not None else self.student

    def trainer(self) -> Resumable:
        """What a checkpoint carries besides the weights."""
        shard, opt = self.shard, self.optimizer
        return Resumable(
            optimizer_state=shard.optimizer_state if shard else opt.state_dict,
            load_optimizer=shard.load_optimizer_state if shard else opt.load_state_dict,
            layout="fsdp" if shard else "plain", scheduler=self.scheduler,
            aux_optimizer=self.aux.optimizer if self.aux else None,
            amps={"student": self.amp, **({"auxiliary": self.aux.amp} if self.aux else {})},
            device=self.device)


def wrap_ddp(run: Run, step_module: StepModule) -> DistributedDataParallel | None:
    """DDP over the step module when several ranks train without sharding. It broadcasts rank
    0's weights at construction; unused parameters are allowed because a method may leave an
    adapter or a head out of some steps."""
    if not run.dist.enabled or run.shard is not None:
        return None
    ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(step_module, device_ids=ids, find_unused_parameters=True)


# -- setup and checkpoints ----------------------------------------------------------------------


def setup(
    student: nn.Module, teacher: Teacher | nn.Module | None, method: Method,
    loader: BatchLoader | Iterable[Any], optimizer: torch.optim.Optimizer,
    cfg: Settings | None, *, seed: int, scheduler: Scheduler | None,
    evaluate: Callable[[], dict[str, float]] | None, logger: MetricsLogger | None,
    checkpoint_dir: Path | str | None, echo: Callable[[str], None] | None,
) -> Run:
    """Check the pieces fit, place them on the device, build the auxiliary optimiser (and the
    shards under fsdp), then resume or start afresh."""
    check_arguments(student, method, optimizer, cfg, checkpoint_dir)
    cfg = LoopSettings() if cfg is None else cfg
    source = as_teacher(teacher)
    if method.uses_teacher and source is None:
        raise ConfigError("method", f"method '{method.cfg.name}' needs a teacher")
    batches = as_batches(loader, source, seed)
    if batches.length is None and cfg.max_steps is None:
        raise TypeError("loader: has no len(), so the run's length is unknown; set "
                        "cfg.max_steps (e.g. LoopSettings(max_steps=1000))")
    dist = distributed.info()
    sharded = dist.enabled and cfg.strategy == "fsdp"
    if sharded:
        check_sharding(method, cfg.precision)
    device = placement.resolve(cfg, student)
    # Under fsdp the student stays where it is: a copy of it is sharded onto the device.
    for module in (method, *([] if sharded else [student])):
        module.to(device)
    placement.move_optimizer_state(optimizer)
    steps_per_epoch = (math.ceil(batches.length / cfg.grad_accum)
                       if batches.length is not None else cfg.max_steps or 1)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    aux = AuxiliaryNetwork.of(method, optimizer, Amp.of(device, cfg.precision))
    for opt in (optimizer, *([aux.optimizer] if aux else [])):
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    if dist.enabled:
        method.collectives = RankCollectives(dist.world)
    run = Run(student, source, method, batches, optimizer, cfg, scheduler,
               evaluate if dist.main else None, evaluate is not None,
               (logger if dist.main else None) or MetricsLogger(), echo if dist.main else None,
               Path(checkpoint_dir) if checkpoint_dir is not None else None, dist, device,
               Amp.of(device, cfg.precision), aux, total_steps, steps_per_epoch)
    _start(run, seed, sharded)
    return run


def _start(run: Run, seed: int, sharded: bool) -> None:
    """Resume from the latest checkpoint (weights into the caller's models first, then the
    shards are cut from them), or start afresh."""
    restored = resume.restore(run.checkpoints, student=run.student, method=run.method,
                              logger=run.logger)
    if sharded:
        run.shard = Sharding.build(run.student, run.method, run.optimizer, run.device)
        run.optimizer = run.shard.optimizer
        run.teacher = run.shard.shard_teacher(run.teacher)
    if restored is None:
        resume.truncate_metrics(run.logger, 0)  # a crashed attempt with no checkpoint restarts
        torch.manual_seed(seed)  # dropout and any other in-training randomness
        return
    run.state, trainer_state, path = restored
    try:
        resume.load_trainer(trainer_state, path, run.trainer())
    except BaseException:
        if run.shard is not None:  # the caller's networks back where they were
            run.shard.restore_homes()
        raise
    if run.echo:
        run.echo(f"resumed from step {run.state.step} (epoch {run.state.epoch}, "
                 f"batch {run.state.batch})")


def checkpoint(run: Run) -> None:
    """A checkpoint when the run has a directory (under fsdp every rank gathers, rank 0
    writes)."""
    if run.checkpoints is None or not (run.dist.main or run.shard is not None):
        return
    trainer = run.trainer()
    if run.shard is not None:
        run.shard.publish(run.state.step)
    optimizer_state = trainer.optimizer_state()
    if run.dist.main:
        resume.save(run.checkpoints, run.state, student=run.student, method=run.method,
                    trainer=trainer, optimizer_state=optimizer_state)
