"""`train.strategy: fsdp`: 2 CPU processes (gloo) shard the student and the teacher with FSDP2
and train to the weights of one process with the same global batch; clipping over shards,
gradient accumulation, a method's adapters (kept whole, averaged), evaluation of the gathered
weights, and a resume of the sharded optimiser state."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

from kdistill import distributed
from kdistill.build import build_optimizer
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import sharding, train
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger
from kdistill.methods import build_method
from kdistill.methods.datafree import DAFLConfig
from kdistill.methods.fitnet import FitNetConfig
from kdistill.methods.token_kd import TokenKDConfig
from kdistill.teachers import OnlineTeacher

from .conftest import TINY_RECIPE
from .test_distributed import _data, _llama, _torchrun

COSINE = {"kind": "cosine", "start": 1.0, "end": 0.1}


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(epochs=2, log_every=1, eval_every_epochs=1, clip_grad_norm=0.05,
                       strategy="fsdp", optimizer={"name": "adam", "lr": 0.01}, **kw)


def _fit_llama(accum: int, *, ckpt: Path | None = None, max_steps: int | None = None,
               lr_schedule: Any = COSINE) -> tuple[list[torch.Tensor], list[dict], nn.Module]:
    """Token KD between 2-layer Llamas (each decoder layer an FSDP unit), online teacher."""
    ids, labels = _data()
    student, teacher = _llama(0), _llama(1)
    cfg = _cfg(batch_size=4 // accum, grad_accum=accum, max_steps=max_steps,
               lr_schedule=lr_schedule)
    loader = BatchLoader(ids, labels, batch_size=4 // accum, shuffle=False, seed=0)
    opt = build_optimizer(student.parameters(), cfg.optimizer)
    logger = MetricsLogger()

    def evaluate() -> dict[str, float]:  # reads the caller's student: the gathered weights
        return {"weight_sum": float(sum(p.detach().double().sum() for p in student.parameters()))}

    train(student, OnlineTeacher(teacher), build_method(TokenKDConfig(alpha=0.5)), loader, opt,
          cfg, logger=logger, evaluate=evaluate, checkpoint_dir=ckpt)
    return [p.detach().clone() for p in student.parameters()], logger.records, teacher


def _fit_fitnet() -> list[torch.Tensor]:
    """FitNet on MLPs (no ModuleList: the whole student is one unit) with its adapter."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 12), torch.randint(0, 3, (24,))
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    method = build_method(FitNetConfig(student_layer="1", teacher_layer="1"))
    method.setup(student, teacher, x[:2])
    cfg = _cfg(lr_schedule=1.0)
    opt = build_optimizer([*student.parameters(), *method.optimizer_parameters()],
                          cfg.optimizer)
    train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=8, seed=0),
          opt, cfg)
    return [p.detach().clone() for p in [*student.parameters(), *method.parameters()]]


def _worker(rank: int, world: int, init_file: str, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            timeout=timedelta(seconds=300),  # a deadlock fails, never hangs
                            world_size=world)
    torch.set_num_threads(1)
    seen: list[tuple[bool, bool]] = []  # the teacher copies: (all DTensor, none trainable)
    shard_teacher = sharding.Sharding.shard_teacher

    def spy(self: sharding.Sharding, teacher: Any) -> Any:
        out = shard_teacher(self, teacher)
        params = list(out.model.parameters())
        seen.append((all(isinstance(p, DTensor) for p in params),
                     not any(p.requires_grad for p in params)))
        return out

    sharding.Sharding.shard_teacher = spy  # type: ignore[method-assign]
    llama = {accum: _fit_llama(accum) for accum in (1, 2)}
    teacher = llama[1][2]
    # A resume: 3 steps with a checkpoint (Adam's state sharded), then the rest.
    ckpt = Path(tmp) / "ck"
    _fit_llama(1, ckpt=ckpt, max_steps=3, lr_schedule=1.0)
    resumed, resumed_records, _ = _fit_llama(1, ckpt=ckpt, lr_schedule=1.0)
    fitnet = _fit_fitnet()
    if rank == 0:
        torch.save({"llama": {a: (w, r) for a, (w, r, _) in llama.items()}, "resumed": resumed,
                    "resumed_from": resumed_records[0]["step"] - 1, "fitnet": fitnet, "seen": seen,
                    "teacher_plain": all(type(p) is nn.Parameter and not p.requires_grad
                                         for p in teacher.parameters())},
                   Path(tmp) / "fsdp.pt")
    distributed.shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_sharded_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert saved["seen"] and all(tuple(s) == (True, True) for s in saved["seen"])
    assert saved["teacher_plain"]  # the caller's teacher is left a plain, frozen module
    single, single_records, _ = _fit_llama(1)
    for accum in (1, 2):
        weights, records = saved["llama"][accum]
        for a, b in zip(single, weights, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for r_one, r_two in zip(single_records, records, strict=True):
            assert r_one["split"] == r_two["split"]
            for key in ("loss/kd", "loss/ce", "weight_sum"):
                if key in r_one:
                    assert r_two[key] == pytest.approx(r_one[key], rel=1e-4), key
    assert saved["resumed_from"] == 3
    straight = _fit_llama(1, lr_schedule=1.0)[0]
    for a, b in zip(straight, saved["resumed"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(_fit_fitnet(), saved["fitnet"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_what_fsdp_refuses() -> None:
    dafl = build_method(DAFLConfig(latent_dim=4, generator_width=4))
    dafl.setup(nn.Linear(6, 3), nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)),
               torch.zeros(2, 6))
    with pytest.raises(ConfigError, match=r"^train.strategy: fsdp: method 'dafl'"):
        sharding.check(dafl, "fp32")
    with pytest.raises(ConfigError, match=r"^train.precision: fp16 with strategy fsdp"):
        sharding.check(build_method(TokenKDConfig()), "fp16")


def test_blocks_of_the_outermost_module_lists_are_the_units() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(2, 2)
            inner = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)]))
            self.layers = nn.ModuleList([inner, nn.Linear(2, 2), nn.ReLU()])

    sharded: list[str] = []
    net = Net()
    names = {id(m): n for n, m in net.named_modules()}
    original = sharding.fully_shard
    try:
        sharding.fully_shard = lambda m, mesh: sharded.append(names[id(m)])  # type: ignore
        sharding.shard_module(net, None)  # type: ignore[arg-type]
    finally:
        sharding.fully_shard = original
    # Children first, the root last; the ModuleList inside layers.0 is not split again, and a
    # block without parameters (the ReLU) is no unit.
    assert sharded == ["layers.1", "layers.0", ""]


@pytest.mark.skipif(_torchrun() is None, reason="torchrun is not installed")
def test_torchrun_fsdp_run_matches_one_process(tmp_path: Path) -> None:
    # The pipeline under torchrun with strategy fsdp and the online teacher (no cache):
    # teacher, baseline and student sharded in turn; the saved models are the gathered ones.
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE + "threads: 1\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(recipe), "cache.enabled=false"]
    multi = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2", "-m",
                            "kdistill", "run", *args, f"output_dir={tmp_path / 'two'}",
                            "train.strategy=fsdp"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "kdistill", "run", *args,
                             f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for stage in ("teacher", "seed-0/baseline", "seed-0/student"):
        a = load_file(tmp_path / "one" / "tiny" / stage / "model.safetensors")
        b = load_file(tmp_path / "two" / "tiny" / stage / "model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=stage)
