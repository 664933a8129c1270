"""torch.distributed for `torchrun --nproc_per_node N -m kdistill run <recipe>`.

One process per rank, launched by torchrun (never by kdistill itself). Every rank builds the
same data, models and teacher, trains the student on its share of every global batch through
the one engine (DDP averages gradients; the engine reduces item counts and loss terms), and
rank 0 alone writes files (stage markers, checkpoints, the teacher cache, metrics, reports)
while the others wait at a barrier. Without torchrun's environment nothing here does anything,
so a single-process run is unchanged.

Backend: from the training device (`devices.ddp_backend`): gloo on the CPU; on CUDA, nccl for
CUDA tensors with gloo beside it for CPU ones, each rank on its `LOCAL_RANK` GPU.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from kdistill import devices

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    """This process's rank and the world size (0 and 1 without an initialised group)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def init_from_env(device: str = "auto", *, where: str = "train.device") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise.

    `device`: the recipe's `train.device`; it picks the backend, and on CUDA this rank's GPU
    (`cuda` and `auto` mean `cuda:LOCAL_RANK`) becomes the current one, which nccl's object
    collectives use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        target = devices.resolve(device, where=where)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend=devices.ddp_backend(target))
    return info()


def shutdown(*, barrier: bool = True) -> None:
    """Leave the process group (after the others when `barrier`). Collect garbage first: DDP
    wrappers and optimizers still alive at `destroy_process_group` make about a third of gloo
    runs abort at exit (shared/DATA.md), after all their work is done."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every rank its (picklable) result.

    For anything that writes shared files: a stage marker, the teacher cache, a model. The
    other ranks wait in the broadcast, so they read the files only once they are complete.
    An exception on rank 0 is sent to the others too, so every rank stops with the same error
    instead of waiting forever.
    """
    d = info()
    if not d.enabled:
        return fn()
    box: list[object] = [None]
    if d.main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]  # type: ignore[misc]
    if status == "error":
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum `x` over ranks (in place when distributed); returned for chaining."""
    if info().enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order (ranks may hold
    different row counts: `shard` sizes differ by one). For per-sample state that every rank
    must update alike, such as CRD's memory banks. Unchanged without a process group."""
    d = info()
    if not d.enabled:
        return tensors
    gathered: list[object] = [None] * d.world
    dist.all_gather_object(gathered, [t.detach().cpu() for t in tensors])
    return tuple(torch.cat([parts[i] for parts in gathered], dim=0).to(t.device)  # type: ignore[index]
                 for i, t in enumerate(tensors))


def shard(batch: dict[str, Tensor], d: DistInfo) -> dict[str, Tensor]:
    """This rank's rows of a global batch: contiguous, sizes differing by at most one."""
    if not d.enabled:
        return batch
    return {k: v.tensor_split(d.world)[d.rank] for k, v in batch.items()}
