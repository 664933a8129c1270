"""What a resume needs: the loop's state, the checkpoint written at a step and read back (its
files: `kdistill.checkpoint`), and the metrics file cut back to the checkpoint's step."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
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


def save(directory: Path, state: TrainState, *, student: nn.Module, method: nn.Module,
         optimizer: torch.optim.Optimizer, scheduler: Scheduler | None,
         aux_optimizer: torch.optim.Optimizer | None) -> None:
    """One checkpoint at `state.step`: weights, optimiser(s), scheduler, torch's RNG, state."""
    trainer_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "rng": torch.get_rng_state(),
    }
    if aux_optimizer is not None:
        trainer_state["auxiliary"] = aux_optimizer.state_dict()
    save_checkpoint(directory, student=student, method=method, trainer_state=trainer_state,
                    state={"step": state.step, "train_state": asdict(state)})


def restore(directory: Path | None, *, student: nn.Module, method: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Scheduler | None,
            aux_optimizer: torch.optim.Optimizer | None,
            logger: MetricsLogger | None) -> TrainState | None:
    """Load the latest checkpoint in `directory` into the models, optimiser(s), scheduler and
    torch's RNG and return its state; None when there is none."""
    path = latest_checkpoint(directory) if directory else None
    if path is None:
        return None
    trainer_state, state = load_checkpoint(path, student=student, method=method)
    optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    if aux_optimizer is not None:
        if "auxiliary" not in trainer_state:
            raise ConfigError(str(path / "trainer.pt"), "no state of the method's auxiliary "
                              f"optimiser; delete {path.parent} to restart this stage")
        aux_optimizer.load_state_dict(trainer_state["auxiliary"])
    torch.set_rng_state(trainer_state["rng"])
    resumed = TrainState(**state["train_state"])
    truncate_metrics(logger, resumed.step)
    return resumed


def truncate_metrics(logger: MetricsLogger | None, step: int) -> None:
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
