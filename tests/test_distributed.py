"""DDP through torch.distributed: 2 CPU processes (gloo) equal 1 process with the same global
batch, in the engine (token-weighted, ranks holding different token counts) and end to end
under `torchrun -m kdistill run`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kdistill import distributed
from kdistill.build import build_optimizer
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.logger import MetricsLogger
from kdistill.methods import build_method
from kdistill.methods.token_kd import TokenKDConfig
from kdistill.models import build_model
from kdistill.teachers import OnlineTeacher

from .conftest import TINY_RECIPE


def _llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("llama", input_shape=(6,), num_classes=11,
                       args={"hidden": 8, "layers": 1, "heads": 2})


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (8, 6))
    labels = ids.clone()
    # Within every global batch of 4 the first two rows (rank 0's) keep 5 next-token targets
    # and the last two (rank 1's) only 1: a mean of per-rank means would be wrong.
    labels[2:4, 2:] = -100
    labels[6:8, 2:] = -100
    return ids, labels


def _fit(accum: int, out: Path | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    ids, labels = _data()
    student, teacher = _llama(0), _llama(1)
    cfg = TrainConfig(epochs=1, batch_size=4 // accum, grad_accum=accum, log_every=1,
                      optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0}, lr_schedule=1.0)
    loader = BatchLoader(ids, labels, batch_size=4 // accum, shuffle=False, seed=0)
    opt = build_optimizer(student.parameters(), cfg.optimizer)
    logger = MetricsLogger()
    train(student, OnlineTeacher(teacher), build_method(TokenKDConfig(alpha=0.5)), loader, opt,
          cfg, logger=logger)
    return [p.detach().clone() for p in student.parameters()], logger.records


def _fit_crd() -> dict[str, torch.Tensor]:
    """CRD with one set of negatives per batch (drawn alike on every rank): its memory banks
    are per-sample state that DDP does not synchronise by itself."""
    from .test_crd import _method

    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 12), torch.randint(0, 3, (40,))
    method, student, teacher = _method(n=40, shared_negatives=True)
    cfg = TrainConfig(epochs=1, lr_schedule=1.0)
    opt = build_optimizer([*student.parameters(), *method.parameters()], cfg.optimizer)
    train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=10, seed=0),
          opt, cfg)
    return {k: v.clone() for k, v in method.state_dict().items() if k.endswith("bank")}


def _fit_aux() -> list[torch.Tensor]:
    """A method with an auxiliary network the engine steps (a data-free generator's stand-in):
    its gradient is averaged over ranks, so every rank's copy takes the single process's step."""
    from .test_engine import ToyAux, _fit_aux

    method = ToyAux()  # plain SGD: a gradient of half the size would show (Adam would hide it)
    student = _fit_aux(method, TrainConfig(epochs=1, max_steps=4, lr_schedule=1.0))
    return [method.z.detach().clone(), *(p.detach().clone() for p in student.parameters())]


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            timeout=timedelta(seconds=300),  # a deadlock fails, never hangs
                            world_size=world)
    torch.set_num_threads(1)
    # Global batch 4 as one batch (each rank gets 2 rows), then as 2 accumulated batches of 2.
    results = {accum: _fit(accum) for accum in (1, 2)}
    banks = _fit_crd()
    aux = _fit_aux()
    if rank == 0:
        torch.save({"token": {a: (w, r) for a, (w, r) in results.items()}, "crd": banks,
                    "aux": aux}, out)
    distributed.shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_ranks_equal_one_process_token_weighting_crd_banks_auxiliary(tmp_path: Path
                                                                         ) -> None:
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    ddp = saved["token"]
    single, single_records = _fit(1)
    for key, bank in _fit_crd().items():  # every rank's rows reached rank 0's banks
        torch.testing.assert_close(saved["crd"][key], bank, atol=1e-5, rtol=1e-4, msg=key)
    for a, b in zip(saved["aux"], _fit_aux(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for accum in (1, 2):
        weights, records = ddp[accum]
        for a, b in zip(single, weights, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        # Logged terms are the global batch's, reduced over ranks, not rank 0's own.
        for r_single, r_ddp in zip(single_records, records, strict=True):
            for key in ("loss/kd", "loss/ce"):
                assert r_ddp[key] == pytest.approx(r_single[key], rel=1e-5), key


def test_shard_gives_each_rank_contiguous_rows() -> None:
    batch = {"index": torch.arange(5), "input": torch.arange(10).view(5, 2)}
    parts = [distributed.shard(batch, distributed.DistInfo(r, 2)) for r in range(2)]
    assert parts[0]["index"].tolist() == [0, 1, 2] and parts[1]["index"].tolist() == [3, 4]
    assert torch.equal(torch.cat([p["input"] for p in parts]), batch["input"])
    assert distributed.shard(batch, distributed.DistInfo()) is batch


def _torchrun() -> str | None:
    exe = Path(sys.executable).with_name("torchrun")
    return str(exe) if exe.is_file() else shutil.which("torchrun")


@pytest.mark.skipif(_torchrun() is None, reason="torchrun is not installed")
def test_torchrun_two_processes_match_one_process_end_to_end(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE + "threads: 1\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "kdistill", "run", str(recipe),
                             f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2",
                            "-m", "kdistill", "run", str(recipe), f"output_dir={tmp_path / 'two'}"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    # Only rank 0 speaks and writes: one report line, one table.
    assert multi.stdout.count("report:") == 1
    for stage in ("teacher", "seed-0/baseline", "seed-0/student"):
        a = load_file(tmp_path / "one" / "tiny" / stage / "model.safetensors")
        b = load_file(tmp_path / "two" / "tiny" / stage / "model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=stage)
    rows_one = json.loads((tmp_path / "one" / "tiny" / "eval.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "tiny" / "eval.json").read_text())
    assert rows_two["student"][0]["accuracy"] == pytest.approx(rows_one["student"][0]["accuracy"],
                                                               abs=0.01)


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line contains `marker` (Linux /proc)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc_dir.name), signal.SIGKILL)


@pytest.mark.skipif(_torchrun() is None or not Path("/proc/self/cmdline").is_file(),
                    reason="needs torchrun and Linux /proc")
def test_torchrun_killed_mid_training_resumes_from_rank_0s_checkpoint(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE + "threads: 1\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(recipe), f"output_dir={tmp_path / 'runs'}", "train.epochs=8",
            "train.checkpoint_every_steps=3", "baseline=false"]
    cmd = [_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "kdistill", "run", *args]
    ckpts = tmp_path / "runs" / "tiny" / "seed-0" / "student" / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(ckpts.glob("step-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before its first student checkpoint"
            time.sleep(0.05)
    finally:
        # torchrun puts its workers in their own process groups: SIGKILL every process of
        # this run (launcher and both ranks) at once, as a machine failure would.
        _kill_all(str(tmp_path / "runs"))
        proc.wait()
    assert any(ckpts.glob("step-*")), "no checkpoint within the time limit"
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "student: recipe changed" not in resumed.stdout
    assert "resumed from step" in resumed.stdout, resumed.stdout
    single = subprocess.run([sys.executable, "-m", "kdistill", "run", *args[:1],
                             f"output_dir={tmp_path / 'one'}", *args[2:]], capture_output=True,
                            text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    a = load_file(tmp_path / "one" / "tiny" / "seed-0" / "student" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "tiny" / "seed-0" / "student" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
