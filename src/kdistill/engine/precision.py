"""Mixed precision for one optimiser: autocast of the networks' forward, and for fp16 a
gradient scaler.

fp16's exponent range is narrow: small gradients underflow to zero, so the loss is multiplied
by a large scale before backward and the gradients divided by it before they are checked,
clipped and applied (`unscale`). A step whose gradients overflowed (inf/NaN) is skipped by the
scaler, which then halves its scale: in fp16 that is the scaler's normal work, not a failure,
so it is counted (logged as `amp/skipped_steps` with `amp/scale`) rather than raised; only
`MAX_SKIPS_IN_A_ROW` skipped steps in a row (no scale gives finite gradients: the weights or
the loss are broken) stop the run. A non-finite loss term is an error in every precision.
bf16 and fp32 need no scaler: a non-finite gradient stops the run there, as it always did.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdistill import devices
from kdistill.engine.step import check_finite
from kdistill.errors import TrainingError
from kdistill.schedules import Progress

MAX_SKIPS_IN_A_ROW = 64


@dataclass
class Amp:
    """Autocast and the optional scaler of one optimiser (the student's, or a method's
    auxiliary network's: each has its own scale)."""

    device: torch.device
    precision: str
    scaler: torch.amp.GradScaler | None = None
    skipped: int = 0  # steps skipped since the last log record
    in_a_row: int = 0

    @classmethod
    def of(cls, device: torch.device, precision: str) -> Amp:
        return cls(device, precision, devices.grad_scaler(device, precision))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return devices.autocast(self.device, self.precision)

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to differentiate: scaled in fp16, unchanged otherwise."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size, before they are measured and clipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def should_step(self, terms: dict[str, float], norm: float, progress: Progress,
                    aux: str = "") -> bool:
        """False when the scaler will skip this step for non-finite gradients (counted);
        raises `TrainingError` on a non-finite loss, on non-finite gradients without a scaler,
        and after `MAX_SKIPS_IN_A_ROW` skipped steps."""
        if self.scaler is None or math.isfinite(norm):
            check_finite(terms, norm, progress, aux)
            self.in_a_row = 0
            return True
        check_finite(terms, 0.0, progress, aux)  # the loss itself must still be finite
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise TrainingError(
                f"fp16: {self.in_a_row} steps in a row skipped for inf/NaN gradients up to "
                f"step {progress.step} (scale now {self.scaler.get_scale():.3g}); the model or "
                "the loss overflows at any scale: try bf16 or a lower learning rate; the last "
                "good checkpoint is kept")
        return False

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the gradients (the scaler skips the step itself when they are not finite)
        and let the scaler adjust its scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def logged(self) -> dict[str, float]:
        """The scaler's scalars for a log record (none without a scaler); resets the count."""
        if self.scaler is None:
            return {}
        record = {"amp/scale": float(self.scaler.get_scale()),
                  "amp/skipped_steps": float(self.skipped)}
        self.skipped = 0
        return record

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {**self.scaler.state_dict(),
                                                "skipped": self.skipped,
                                                "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A scaler's saved state (a checkpoint without one leaves the fresh scaler)."""
        if self.scaler is None or not state:
            return
        state = dict(state)
        self.skipped = int(state.pop("skipped", 0))
        self.in_a_row = int(state.pop("in_a_row", 0))
        self.scaler.load_state_dict(state)
