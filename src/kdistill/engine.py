"""The one training loop. Every method, the baseline and the teacher go through `train()`.

Read it top to bottom: `train` sets the run up (resuming if a checkpoint is there), then each
epoch takes optimiser steps; a step (`_optimizer_step`) takes `grad_accum` micro-batches, lets
the method prepare them (and steps its auxiliary network first, if it declares one), runs
student (and teacher, or reads its cache), asks the method for its named loss terms, weights
each micro-batch by its share of the step's items (so the accumulated gradient equals the
gradient of one big batch), checks, clips and steps; the step's terms go to the logging
window; at epoch ends the run evaluates and checkpoints.

Under torchrun (see `kdistill.distributed`) the same loop runs on every rank: each takes its
rows of every global batch, DDP averages the gradients, the step's item count and loss terms
are summed over ranks (so weights and logs are those of the global batch), and rank 0 alone
evaluates, logs and checkpoints. Methods reach the other ranks only through the collectives
set here (`Method.collectives`).
"""

from __future__ import annotations

import contextlib
import json
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
from kdistill.methods.base import SINGLE_PROCESS, Auxiliary, Batch, Collectives, Method, Outputs
from kdistill.schedules import Progress, value_at
from kdistill.teachers import Teacher, TopK

Scheduler = torch.optim.lr_scheduler.LRScheduler


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # current epoch
    batch: int = 0  # micro-batches already consumed in the current epoch
    samples: int = 0  # training samples seen
    # Loss sums of the current logging window: checkpointed so a resumed run logs the same.
    log_sums: dict[str, float] = field(default_factory=dict)
    # The auxiliary network's last terms ("<name>/<term>"), logged with every record.
    aux_terms: dict[str, float] = field(default_factory=dict)


class _RankCollectives(Collectives):
    """The process group's collectives, given to the method under torchrun."""

    def __init__(self, world: int) -> None:
        self.world = world

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        return distributed.all_reduce_sum(x)

    def all_gather_rows(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return distributed.all_gather_rows(*tensors)


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


@dataclass
class _Aux:
    """A method's auxiliary network (`Method.auxiliary`) and the optimiser built for it here."""

    spec: Auxiliary
    optimizer: torch.optim.Optimizer


@dataclass
class _Run:
    """What one call of `train` holds, so that its parts below are plain functions."""

    student: nn.Module
    teacher: Teacher | None
    method: Method
    loader: BatchLoader
    optimizer: torch.optim.Optimizer
    cfg: TrainSettings
    scheduler: Scheduler | None
    evaluate: Callable[[], dict[str, float]] | None
    logger: MetricsLogger
    echo: Callable[[str], None] | None
    save_dir: Path | None  # None on every rank but 0
    dist: distributed.DistInfo
    aux: _Aux | None
    total_steps: int
    steps_per_epoch: int
    state: TrainState = field(default_factory=TrainState)
    window_samples: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    advance: Callable[[str | None], None] = lambda _description: None  # the progress bar


def train(
    student: nn.Module,
    teacher: Teacher | None,
    method: Method,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    cfg: TrainSettings,
    *,
    seed: int = 0,
    scheduler: Scheduler | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    logger: MetricsLogger | None = None,
    checkpoint_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> TrainState:
    """Train `student` (and `method`'s adapters) with `method`'s loss terms.

    Args:
        teacher: an `OnlineTeacher`, a `CachedTeacher`, or None for methods without a teacher.
        optimizer: over `student.parameters()` and `method.optimizer_parameters()`.
        scheduler: a torch LR scheduler stepped once per optimiser step; when None,
            `cfg.lr_schedule` multiplies each group's initial learning rate.
        evaluate: called at epoch ends (every `cfg.eval_every_epochs`); its scalars are logged
            with `split: "val"`.
        checkpoint_dir: where to checkpoint; a checkpoint already there is resumed from.
        echo: receives one human-readable line per epoch.
        progress_bar: show a rich progress bar with loss and throughput (terminals only, so
            CI logs stay quiet).
    """
    run = _setup(student, teacher, method, loader, optimizer, cfg, seed=seed,
                 scheduler=scheduler, evaluate=evaluate, logger=logger,
                 checkpoint_dir=checkpoint_dir, echo=echo)
    bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                      rp.MofNCompleteColumn(), rp.TimeRemainingColumn(), transient=True,
                      disable=not (progress_bar and run.dist.main and sys.stdout.isatty()))
    task = bar.add_task("training", total=run.total_steps, completed=run.state.step)
    run.advance = lambda text: (bar.advance(task) if text is None
                                else bar.update(task, description=text))
    try:
        with bar, capture(student, method.student_layers,
                          where="method.student_layers") as s_feats:
            step_module = _Step(student, method, teacher, s_feats, cfg.precision)
            # DDP broadcasts rank 0's weights at construction; unused parameters are allowed
            # because a method may leave an adapter or a head out of some steps.
            ddp = (DistributedDataParallel(step_module, find_unused_parameters=True)
                   if run.dist.enabled else None)
            while run.state.epoch < cfg.epochs and run.state.step < run.total_steps:
                _train_epoch(run, step_module, ddp)
                _end_epoch(run)
            del ddp, step_module  # before the process group goes (see distributed.shutdown)
    finally:
        method.collectives = SINGLE_PROCESS
    return run.state


# -- setup and resume ----------------------------------------------------------------------------


def _setup(
    student: nn.Module, teacher: Teacher | None, method: Method, loader: BatchLoader,
    optimizer: torch.optim.Optimizer, cfg: TrainSettings, *, seed: int,
    scheduler: Scheduler | None, evaluate: Callable[[], dict[str, float]] | None,
    logger: MetricsLogger | None, checkpoint_dir: Path | None,
    echo: Callable[[str], None] | None,
) -> _Run:
    """Check the pieces fit, build the auxiliary optimiser, then resume or start afresh."""
    if method.uses_teacher and teacher is None:
        raise ConfigError("method", f"method '{method.cfg.name}' needs a teacher")
    dist = distributed.info()
    if not dist.main:  # every rank resumes; rank 0 alone evaluates, logs and checkpoints
        evaluate, logger, echo = None, None, None
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    aux = _auxiliary(method, optimizer)
    for opt in (optimizer, *([aux.optimizer] if aux else [])):
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    if dist.enabled:
        method.collectives = _RankCollectives(dist.world)
    run = _Run(student, teacher, method, loader, optimizer, cfg, scheduler, evaluate,
               logger or MetricsLogger(), echo, checkpoint_dir if dist.main else None, dist,
               aux, total_steps, steps_per_epoch)
    if not _restore(run, checkpoint_dir):
        _truncate_metrics(run.logger, 0)  # a crashed attempt with no checkpoint starts over
        torch.manual_seed(seed)  # dropout and any other in-training randomness
    elif echo:
        s = run.state
        echo(f"resumed from step {s.step} (epoch {s.epoch}, batch {s.batch})")
    return run


def _auxiliary(method: Method, optimizer: torch.optim.Optimizer) -> _Aux | None:
    """The method's auxiliary network with its optimiser, kept out of the student's."""
    spec = method.auxiliary()
    if spec is None:
        return None
    own = {id(p) for p in spec.parameters}
    if any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError("optimizer", f"it holds the parameters of method "
                          f"'{method.cfg.name}'s auxiliary network '{spec.name}', which the "
                          "engine steps on its own; build it over method.optimizer_parameters()")
    return _Aux(spec, spec.optimizer(spec.parameters))


def _restore(run: _Run, checkpoint_dir: Path | None) -> bool:
    """Load the latest checkpoint in `checkpoint_dir` into the run; False when there is none."""
    path = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if path is None:
        return False
    trainer_state, state = load_checkpoint(path, student=run.student, method=run.method)
    run.optimizer.load_state_dict(trainer_state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(trainer_state["scheduler"])
    if run.aux is not None:
        if "auxiliary" not in trainer_state:
            raise ConfigError(str(path / "trainer.pt"), "no state of the method's auxiliary "
                              f"optimiser; delete {path.parent} to restart this stage")
        run.aux.optimizer.load_state_dict(trainer_state["auxiliary"])
    torch.set_rng_state(trainer_state["rng"])
    run.state = TrainState(**state["train_state"])
    _truncate_metrics(run.logger, run.state.step)
    return True


def _truncate_metrics(logger: MetricsLogger | None, step: int) -> None:
    """Drop records after `step` (they will be written again) and any torn last line."""
    if logger is None or logger.path is None or not logger.path.is_file():
        return
    kept = []
    for line in logger.path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    logger.path.write_text("".join(line + "\n" for line in kept))


def _checkpoint(run: _Run) -> None:
    if run.save_dir is None:  # also every rank but 0
        return
    trainer_state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else {},
        "rng": torch.get_rng_state(),
    }
    if run.aux is not None:
        trainer_state["auxiliary"] = run.aux.optimizer.state_dict()
    save_checkpoint(run.save_dir, student=run.student, method=run.method,
                    trainer_state=trainer_state,
                    state={"step": run.state.step, "train_state": asdict(run.state)})


# -- an epoch, one optimiser step --------------------------------------------------------------


def _train_epoch(run: _Run, step_module: _Step, ddp: DistributedDataParallel | None) -> None:
    """Optimiser steps until the epoch's batches (or the run's steps) run out."""
    state, n_batches = run.state, len(run.loader)
    run.student.train()
    run.method.train()
    batches = run.loader.epoch(state.epoch, start=state.batch)
    while state.step < run.total_steps:
        group = [b for _, b in zip(range(run.cfg.grad_accum), batches, strict=False)]
        if not group:
            break
        progress = Progress(state.step, state.epoch, run.total_steps, run.steps_per_epoch)
        step_terms = _optimizer_step(run, step_module, ddp, group, progress)
        n_group = sum(len(b["label"]) for b in group)  # global samples, all ranks
        state.step += 1
        state.batch += len(group)
        state.samples += n_group
        run.window_samples += n_group
        run.advance(None)
        _log_step(run, step_terms, progress)
        # Mid-epoch checkpoints only: at an epoch's (or the run's) end the checkpoint comes
        # after the evaluation, so every checkpoint at step S follows all of step S's records
        # and a resume never repeats or loses one.
        every = run.cfg.checkpoint_every_steps
        if (every and state.step % every == 0 and state.batch < n_batches
                and state.step < run.total_steps):
            _checkpoint(run)


def _optimizer_step(run: _Run, step_module: _Step, ddp: DistributedDataParallel | None,
                    group: list[Batch], progress: Progress) -> dict[str, float]:
    """One optimiser step over the micro-batches `group`; returns the step's loss terms."""
    dist = run.dist
    local = _prepare_batches(run, group, progress)
    # Micro-batch weights: the method's item counts (samples; valid tokens for token-level
    # losses) over the whole step on all ranks, so the summed micro-batch means are the global
    # batch's mean. DDP averages gradients over ranks, hence the factor `world` below.
    items = [run.method.batch_items(b) for b in local]
    n_items = float(sum(items))
    if dist.enabled:
        n_items = float(distributed.all_reduce_sum(torch.tensor([n_items])).item())
    run.optimizer.zero_grad(set_to_none=True)
    term_sums: dict[str, Tensor] = {}
    for i, (batch, n_batch) in enumerate(zip(local, items, strict=True)):
        share = n_batch / max(n_items, 1.0)  # micro-batch mean -> step mean
        # Gradients are all-reduced once, in the step's last backward.
        sync = ddp.no_sync() if ddp and i < len(local) - 1 else contextlib.nullcontext()
        with sync:
            terms = (ddp or step_module)(batch, progress)
            loss = sum(terms.values()) * (share * dist.world)
            loss.backward()  # type: ignore[union-attr]
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value.detach() * share
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    # One host sync (and one reduction over ranks) per step for all terms and the gradient
    # norm (identical on every rank after DDP's reduction, hence the division by `world`).
    stacked = distributed.all_reduce_sum(torch.stack(
        [*(v.float() for v in term_sums.values()), _grad_norm(params) / dist.world]))
    *values, grad_norm = stacked.tolist()
    step_terms = dict(zip(term_sums, values, strict=True))
    _check_finite(run, step_terms, grad_norm, "")
    factor = _clip_and_schedule(run, params, progress)
    if run.scheduler is None:
        for g in run.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
    run.optimizer.step()
    if run.scheduler is not None:
        run.scheduler.step()
    return step_terms


def _prepare_batches(run: _Run, group: list[Batch], progress: Progress) -> list[Batch]:
    """This rank's rows of each micro-batch, as the method trains on them: the auxiliary
    network (if any) steps first, then `prepare_batch` may replace the batch (on-policy)."""
    kept = [b for b in group if len(b["label"]) >= run.dist.world]
    # A global batch too small to give every rank a row (the last of an epoch, at most) is
    # left out of the step on every rank alike.
    local = [distributed.shard(b, run.dist) for b in kept]
    out = []
    for whole, batch in zip(kept, local, strict=True):
        if run.aux is not None:
            _auxiliary_steps(run, run.aux, batch, len(batch["label"]) / len(whole["label"]),
                             progress)
        out.append(run.method.prepare_batch(batch, run.student, progress))
    return out


def _auxiliary_steps(run: _Run, aux: _Aux, batch: Batch, share: float,
                     progress: Progress) -> None:
    """The auxiliary network's updates before one micro-batch (see `Auxiliary`): gradients of
    its terms w.r.t. its own parameters only, averaged over ranks by their rows (`share`)."""
    spec = aux.spec
    if spec.steps == 0 or progress.step % spec.every:
        return
    for _ in range(spec.steps):
        terms = spec.loss_terms(batch, run.student, progress)
        loss = sum(terms.values())
        if run.dist.enabled:
            loss = loss * share
        # autograd.grad, not backward(): no gradient lands on the teacher or the student.
        grads = torch.autograd.grad(loss, spec.parameters, allow_unused=True)
        for p, g in zip(spec.parameters, grads, strict=True):
            p.grad = g
            if run.dist.enabled:  # every rank applies the same summed gradient
                p.grad = distributed.all_reduce_sum(torch.zeros_like(p) if g is None else g)
        values = torch.stack([v.detach().float() * (share if run.dist.enabled else 1.0)
                              for v in terms.values()])
        step_terms = dict(zip(terms, distributed.all_reduce_sum(values).tolist(), strict=True))
        _check_finite(run, step_terms, float(_grad_norm(spec.parameters)), spec.name)
        factor = _clip_and_schedule(run, spec.parameters, progress)
        for g in aux.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        aux.optimizer.step()
        for p in spec.parameters:
            p.grad = None
        run.state.aux_terms = {f"{spec.name}/{k}": v for k, v in step_terms.items()}


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _check_finite(run: _Run, terms: dict[str, float], grad_norm: float, aux: str) -> None:
    """A finite loss can still give inf/NaN gradients (a sqrt or a norm at 0, an overflow in
    bf16): stepping on them would poison the weights silently, so both are checked."""
    state = run.state
    where = f" in the auxiliary network '{aux}'" if aux else ""
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(
            f"non-finite loss{where} at step {state.step}, epoch {state.epoch}: term "
            f"'{bad[0]}' = {terms[bad[0]]}; the last good checkpoint is kept")
    if not math.isfinite(grad_norm):
        raise TrainingError(
            f"non-finite gradient{where} at step {state.step}, epoch {state.epoch} (loss terms "
            f"finite: {', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); not stepping on "
            "it; the last good checkpoint is kept")


def _clip_and_schedule(run: _Run, params: list[nn.Parameter], progress: Progress) -> float:
    """Clip `params`' gradients (`cfg.clip_grad_norm`); return this step's LR multiplier:
    `cfg.lr_schedule`, or the torch scheduler's current ratio when one is given."""
    if run.cfg.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, run.cfg.clip_grad_norm)
    if run.scheduler is None:
        return value_at(run.cfg.lr_schedule, progress)
    group = run.optimizer.param_groups[0]
    return group["lr"] / group["initial_lr"] if group["initial_lr"] else 1.0


# -- logging and epoch ends ------------------------------------------------------------------------


def _log_step(run: _Run, step_terms: dict[str, float], progress: Progress) -> None:
    """Add the step to the logging window; write the window's means every `log_every` steps
    and at the epoch's end."""
    state, sums = run.state, run.state.log_sums
    for name, value in step_terms.items():
        sums[name] = sums.get(name, 0.0) + value
    sums["_n"] = sums.get("_n", 0.0) + 1
    if state.step % run.cfg.log_every != 0 and state.batch < len(run.loader):
        return
    elapsed = max(time.perf_counter() - run.window_start, 1e-9)
    n = sums.pop("_n")
    record = {f"loss/{k}": v / n for k, v in sums.items()}
    record["loss"] = sum(record.values())
    run.logger.log({"step": state.step, "epoch": state.epoch, "split": "train", **record,
                    "lr": run.optimizer.param_groups[0]["lr"], **run.method.scalars(progress),
                    **state.aux_terms, "samples_per_s": run.window_samples / elapsed})
    run.advance(f"epoch {state.epoch + 1} loss {record['loss']:.4f} "
                f"{run.window_samples / elapsed:,.0f} samples/s")
    sums.clear()
    run.window_samples, run.window_start = 0, time.perf_counter()


def _end_epoch(run: _Run) -> None:
    """At an epoch's end (or the run's, maybe mid-epoch with max_steps): evaluate when due,
    move to the next epoch, checkpoint."""
    state, cfg = run.state, run.cfg
    epoch_done = state.batch >= len(run.loader)
    last = state.step >= run.total_steps
    if epoch_done or last:
        if run.evaluate is not None and ((state.epoch + 1) % cfg.eval_every_epochs == 0
                                         or last):
            scores = run.evaluate()
            run.logger.log({"step": state.step, "epoch": state.epoch, "split": "val",
                            **scores})
            if run.echo:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                run.echo(f"epoch {state.epoch + 1}/{cfg.epochs}: {shown}")
        if epoch_done:
            state.epoch += 1
            state.batch = 0
    _checkpoint(run)
