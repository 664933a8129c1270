"""`train.strategy: fsdp` under torchrun: the student and the teacher sharded with FSDP2
(`torch.distributed.fsdp.fully_shard`), so each rank holds 1/world of their weights, of the
student's gradients and of its optimiser state.

The models the caller gave stay plain modules: the engine shards copies. Each network is copied
on the CPU (the original is parked there while the copy trains), and the copy is split over the
ranks onto the training device: every block of a model's outermost `nn.ModuleList`s (a
transformer's layers) is one FSDP unit, the rest of the model the root unit. The teacher's copy
is frozen (no gradients, so no optimiser state). The method's adapters are small: they stay
whole on every rank, and their gradients are averaged over ranks like DDP's.

The engine trains the sharded student with an optimiser of the caller's class and parameter
groups over the shards (`optimizer`); before every evaluation and checkpoint `publish` gathers
the shards into the caller's student, so evaluation, checkpoints (`state_dict`-based files, the
same as DDP's) and the model the run finishes with are those of a plain module. The optimiser
state is checkpointed whole (`optimizer_state`: gathered on rank 0, keyed by parameter name)
and re-split on resume, so a run can resume on another number of ranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from kdistill import distributed
from kdistill.errors import ConfigError
from kdistill.methods.base import Method
from kdistill.teachers import EnsembleTeacher, OnlineTeacher, Teacher, freeze_teacher

CPU = torch.device("cpu")


def check(method: Method, precision: str) -> None:
    """What FSDP does not take here, refused before any training."""
    if method.auxiliary() is not None:
        raise ConfigError("train.strategy", f"fsdp: method '{method.cfg.name}' trains an "
                          "auxiliary network (a generator) against the student; use ddp")
    if precision == "fp16":
        raise ConfigError("train.precision", "fp16 with strategy fsdp: a gradient scaler over "
                          "shards is not supported; use bf16 (or strategy ddp)")


def shard_module(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """`model` sharded in place: one FSDP unit per block of its outermost ModuleLists, then
    the root (children first, as FSDP requires)."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(b + ".") for b in blocks)
        if isinstance(module, nn.ModuleList) and not inside:
            blocks += [f"{name}.{i}" if name else str(i) for i, block in enumerate(module)
                       if any(True for _ in block.parameters())]
    for name in reversed(blocks):
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _working_copy(model: nn.Module, mesh: DeviceMesh) -> tuple[nn.Module, torch.device]:
    """A sharded copy of `model`; the original moves to the CPU (returned: where it was)."""
    home = next((p.device for p in model.parameters()), CPU)
    model.to(CPU)
    return shard_module(copy.deepcopy(model), mesh), home


@dataclass
class Sharding:
    """The sharded copies of one `train()` call and the originals they stand for."""

    student: nn.Module  # the caller's (parked on the CPU while the copy trains)
    method: Method
    work: nn.Module  # the sharded student copy the engine trains
    optimizer: torch.optim.Optimizer  # over `work`'s shards and the method's parameters
    given: torch.optim.Optimizer  # the caller's (a torch LR scheduler drives its groups)
    mesh: DeviceMesh
    homes: list[tuple[nn.Module, torch.device]] = field(default_factory=list)
    published: int = -1  # the step whose weights the caller's student holds
    names: nn.Module = field(init=False)  # student and method under one root, for names

    def __post_init__(self) -> None:
        self.names = nn.ModuleDict({"student": self.work, "method": self.method})

    @classmethod
    def build(cls, student: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
              device: torch.device) -> Sharding:
        mesh = init_device_mesh(device.type, (distributed.info().world,))
        work, home = _working_copy(student, mesh)
        by_id = {id(p): name for name, p in student.named_parameters()}
        shards = dict(work.named_parameters())
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [shards[by_id[id(p)]] if id(p) in by_id else p
                              for p in g["params"]]} for g in optimizer.param_groups]
        return cls(student, method, work, type(optimizer)(groups), optimizer, mesh,
                   [(student, home)])

    def shard_teacher(self, teacher: Teacher | None) -> Teacher | None:
        """The teacher with each online network replaced by a sharded, frozen copy."""
        if isinstance(teacher, EnsembleTeacher):
            return EnsembleTeacher([self.shard_teacher(t) for t in teacher.sources])
        if not isinstance(teacher, OnlineTeacher):
            return teacher  # a cache: nothing to shard
        work, home = _working_copy(teacher.model, self.mesh)
        self.homes.append((teacher.model, home))
        return OnlineTeacher(freeze_teacher(work))

    def sync(self, last: bool) -> None:
        """Before a micro-batch's backward: reduce the shards' gradients in the step's last
        one only (the others accumulate locally)."""
        assert isinstance(self.work, FSDPModule)
        self.work.set_requires_gradient_sync(last)

    def average_method_gradients(self, world: int) -> None:
        """The method's (unsharded) gradients averaged over ranks, as DDP would."""
        for p in self.method.parameters():
            if p.requires_grad:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = distributed.all_reduce_sum(grad) / world

    def clip(self, norm: float, max_norm: float) -> None:
        """Clip by the global norm (over every rank's shards), as clip_grad_norm_ would."""
        coef = min(max_norm / (norm + 1e-6), 1.0)
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def follow_learning_rates(self) -> None:
        """The learning rates a torch scheduler set on the caller's optimiser, copied."""
        for ours, theirs in zip(self.optimizer.param_groups, self.given.param_groups,
                                strict=True):
            ours["lr"] = theirs["lr"]

    @torch.no_grad()
    def publish(self, step: int) -> None:
        """The shards gathered into the caller's student after `step` (every rank: a
        collective; once per step)."""
        if step == self.published:
            return
        self.published = step
        originals = dict(self.student.named_parameters())
        for name, p in self.work.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            originals[name].copy_(full.detach())
        buffers = dict(self.student.named_buffers())
        for name, b in self.work.named_buffers():
            buffers[name].copy_(b)

    def optimizer_state(self) -> dict[str, Any]:
        """The whole optimiser state by parameter name, on rank 0 (a collective)."""
        return get_optimizer_state_dict(self.names, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.names, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def restore_homes(self) -> None:
        """The caller's networks back where they were (the student with the last published
        weights)."""
        for model, home in self.homes:
            model.to(home)
