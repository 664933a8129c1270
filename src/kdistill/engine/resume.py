"""What a resume needs: the loop's state, the checkpoint written at a step and read back (its
files: `kdistill.checkpoint`), and the metrics file cut back to the checkpoint's step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdistill.engine.precision import Amp
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger

Scheduler = torch.optim.lr_scheduler.LRScheduler


@dataclass
class TrainState:
    """Where the loop stands; a checkpoint's `state.json` holds it."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # current epoch
    batch: int = 0  # micro-batches already consumed in the current epoch
    samples: int = 0  # training samples seen
    # Loss sums of the current logging window: checkpointed so a resumed run logs the same.
    log_sums: dict[str, float] = field(default_factory=dict)
    # The auxiliary network's last terms ("<name>/<term>"), logged with every record.
    aux_terms: dict[str, float] = field(default_factory=dict)


@dataclass
class Resumable:
    """Everything of a run's trainer that a checkpoint carries besides the weights: the
    student's optimiser state (`optimizer_state()`, or the load function for it), the LR
    scheduler, the auxiliary network's optimiser, the gradient scalers' states, and the device
    (on CUDA its RNG state is saved too, so dropout and sampling there resume exactly)."""

    optimizer_state: Callable[[], dict[str, Any]]
    load_optimizer: Callable[[dict[str, Any]], None]
    layout: str  # "plain" (optimizer.state_dict) or "fsdp" (whole state by parameter name)
    scheduler: Scheduler | None
    aux_optimizer: torch.optim.Optimizer | None
    amps: dict[str, Amp]
    device: torch.device


def save(directory: Path, state: TrainState, *, student: nn.Module, method: nn.Module,
         trainer: Resumable, optimizer_state: dict[str, Any]) -> None:
    """One checkpoint at `state.step`: weights, optimiser(s), scheduler, scalers, RNG, state.
    Weights are written from wherever the models are and read back onto wherever the models
    are then, so a checkpoint moves between devices."""
    trainer_state: dict[str, Any] = {
        "optimizer": optimizer_state,
        "optimizer_layout": trainer.layout,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else {},
        "rng": torch.get_rng_state(),
        "amp": {name: amp.state_dict() for name, amp in trainer.amps.items()},
    }
    if trainer.device.type == "cuda":
        trainer_state["cuda_rng"] = torch.cuda.get_rng_state(trainer.device)
    if trainer.aux_optimizer is not None:
        trainer_state["auxiliary"] = trainer.aux_optimizer.state_dict()
    save_checkpoint(directory, student=student, method=method, trainer_state=trainer_state,
                    state={"step": state.step, "train_state": asdict(state)})


def restore(directory: Path | None, *, student: nn.Module, method: nn.Module,
            logger: MetricsLogger | None) -> tuple[TrainState, dict[str, Any], Path] | None:
    """Load the latest checkpoint in `directory` into the models and torch's CPU RNG; return
    its loop state, the trainer's state (for `load_trainer`) and its path; None when there is
    none."""
    path = latest_checkpoint(directory) if directory else None
    if path is None:
        return None
    trainer_state, state = load_checkpoint(path, student=student, method=method)
    torch.set_rng_state(trainer_state["rng"])
    resumed = TrainState(**state["train_state"])
    truncate_metrics(logger, resumed.step)
    return resumed, trainer_state, path


def load_trainer(trainer_state: dict[str, Any], path: Path, trainer: Resumable) -> None:
    """The optimiser(s), scheduler, scalers and CUDA RNG of a checkpoint read by `restore`."""
    layout = trainer_state.get("optimizer_layout", "plain")
    if layout != trainer.layout:
        raise ConfigError(str(path / "trainer.pt"), f"written with strategy "
                          f"{'fsdp' if layout == 'fsdp' else 'ddp (or one process)'}; resume "
                          f"with the same train.strategy, or delete {path.parent} to restart")
    trainer.load_optimizer(trainer_state["optimizer"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(trainer_state["scheduler"])
    if trainer.aux_optimizer is not None:
        if "auxiliary" not in trainer_state:
            raise ConfigError(str(path / "trainer.pt"), "no state of the method's auxiliary "
                              f"optimiser; delete {path.parent} to restart this stage")
        trainer.aux_optimizer.load_state_dict(trainer_state["auxiliary"])
    for name, amp in trainer.amps.items():
        amp.load_state_dict(trainer_state.get("amp", {}).get(name, {}))
    if trainer.device.type == "cuda" and "cuda_rng" in trainer_state:
        torch.cuda.set_rng_state(trainer_state["cuda_rng"], trainer.device)


def truncate_metrics(logger: MetricsLogger | None, step: int) -> None:
    """Drop records after `step` (they will be written again) and any torn last line."""
    if logger is not None:
        logger.truncate_after(step)  # atomic, never through a link planted at metrics.jsonl
