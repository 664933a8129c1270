"""A method's auxiliary network (`Method.auxiliary`, e.g. a data-free generator): the optimiser
the engine builds for it and its updates, under the run's clipping, non-finite checks, LR
multiplier and precision (autocast; in fp16 a gradient scaler of its own), like the
student's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdistill import distributed
from kdistill.engine.precision import Amp
from kdistill.engine.step import grad_norm
from kdistill.errors import ConfigError
from kdistill.methods.base import Auxiliary, Batch, Method
from kdistill.schedules import Progress


@dataclass
class AuxiliaryNetwork:
    spec: Auxiliary
    optimizer: torch.optim.Optimizer
    amp: Amp

    @classmethod
    def of(cls, method: Method, optimizer: torch.optim.Optimizer,
           amp: Amp) -> AuxiliaryNetwork | None:
        """The method's auxiliary network with its own optimiser, kept out of the student's."""
        spec = method.auxiliary()
        if spec is None:
            return None
        own = {id(p) for p in spec.parameters}
        if any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
            raise ConfigError("optimizer", f"it holds the parameters of method "
                              f"'{method.cfg.name}'s auxiliary network '{spec.name}', which the "
                              "engine steps on its own; build it over "
                              "method.optimizer_parameters()")
        return cls(spec, spec.optimizer(spec.parameters), amp)

    def updates(self, batch: Batch, share: float, progress: Progress, *, student: nn.Module,
                dist: distributed.DistInfo, clip: float | None,
                lr_factor: float) -> dict[str, float] | None:
        """Its updates before one micro-batch (see `Auxiliary`; none when not due): gradients
        of its terms w.r.t. its own parameters only, summed over ranks weighted by their rows
        (`share`). Returns the last update's terms ("<name>/<term>")."""
        spec = self.spec
        if spec.steps == 0 or progress.step % spec.every:
            return None
        logged = None
        for _ in range(spec.steps):
            with self.amp.autocast():
                terms = spec.loss_terms(batch, student, progress)
            loss = sum(terms.values())
            if dist.enabled:
                loss = loss * share
            # autograd.grad, not backward(): no gradient lands on the teacher or the student.
            grads = torch.autograd.grad(self.amp.scale(loss), spec.parameters, allow_unused=True)
            for p, g in zip(spec.parameters, grads, strict=True):
                p.grad = g
                if dist.enabled:  # every rank applies the same summed gradient
                    p.grad = distributed.all_reduce_sum(torch.zeros_like(p) if g is None else g)
            self.amp.unscale(self.optimizer)
            values = torch.stack([v.detach().float() * (share if dist.enabled else 1.0)
                                  for v in terms.values()])
            step_terms = dict(zip(terms, distributed.all_reduce_sum(values).tolist(),
                                  strict=True))
            # Identical gradients on every rank: this rank's squared norm is the norm's.
            norm = float(grad_norm(spec.parameters)) ** 0.5
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor
            if self.amp.should_step(step_terms, norm, progress, spec.name) and clip is not None:
                torch.nn.utils.clip_grad_norm_(spec.parameters, clip)
            self.amp.step(self.optimizer)
            for p in spec.parameters:
                p.grad = None
            logged = {f"{spec.name}/{k}": v for k, v in step_terms.items()}
        return logged
