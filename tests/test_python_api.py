"""`train()` from Python (issue #14): any iterable of batches, a plain teacher network, no
schedule the caller did not ask for, a TypeError naming the misused argument; the examples in
docs/python-api.md run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import kdistill
from kdistill import (
    METHODS,
    BatchLoader,
    CachedTeacher,
    CacheKey,
    LoopSettings,
    MetricsLogger,
    OnlineTeacher,
    TrainSettings,
    build_cache,
    build_method,
    train,
)
from kdistill.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "python-api.md"


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()


def _net(seed: int, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, 2))


def _kd() -> kdistill.Method:
    return build_method(METHODS["kd"].config_type(temperature=2.0, alpha=0.5))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_readme_shows_the_same_loop() -> None:
    # The README's "Your own loop" is docs/python-api.md's first example, run there.
    readme = (REPO / "README.md").read_text()
    loop = readme.split("## Your own loop")[1]
    shown = re.findall(r"```python\n(.*?)```", loop, re.S)[0]
    assert shown == re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    assert "DataLoader(" in shown and "train(" in shown


@pytest.mark.parametrize("block", range(2))
def test_the_examples_in_docs_python_api_run_as_written(block: int, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    code = blocks[block]
    assert "train(" in code
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if block == 0:  # "your own loop": a DataLoader, a teacher trained first, then KD
        assert "DataLoader(" in code
        steps, _loss, accuracy = re.findall(r"[\d.]+", proc.stdout)
        assert int(steps) == 160 and float(accuracy) > 0.8, proc.stdout
    else:  # the cache: no teacher forward during training
        assert proc.stdout.strip().endswith("0 teacher forwards"), proc.stdout
        assert (tmp_path / "teacher-cache" / "manifest.json").is_file()


def test_a_dataloader_of_pairs_trains_like_kdistills_own_loader() -> None:
    x, y = _data()
    results = []
    for loader in (DataLoader(TensorDataset(x, y), batch_size=16),
                   BatchLoader(x, y, batch_size=16, shuffle=False)):
        student = _net(0)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        train(student, _net(1, 16), _kd(), loader, opt, LoopSettings(epochs=2), seed=3)
        results.append(_weights(student))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_plain_teacher_is_frozen_run_in_eval_mode_and_equals_an_online_teacher() -> None:
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    results = []
    for wrap in (False, True):
        teacher, student = _net(1, 16), _net(0)
        teacher.train()
        source = OnlineTeacher(teacher) if wrap else teacher
        train(student, source, _kd(), loader, torch.optim.SGD(student.parameters(), lr=0.1))
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        results.append(_weights(student))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_no_cfg_is_one_epoch_at_the_callers_lr_without_clipping() -> None:
    x, y = _data()
    student = _net(0)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    logger = MetricsLogger()
    state = train(student, _net(1, 16), _kd(), DataLoader(TensorDataset(x, y), batch_size=16),
                  opt, logger=logger)
    assert state.step == 6 and state.epoch == 1
    assert [r["lr"] for r in logger.records] == [0.5]
    assert opt.param_groups[0]["lr"] == 0.5
    # Without clipping, one plain SGD step moves the weights by lr · gradient, however large.
    student, teacher = _net(0), _net(1, 16).eval()
    student[2].p = 0.0  # no dropout: the gradient below is the one the step uses
    terms = _kd().loss_terms(kdistill.Outputs(student(x[:16]), teacher(x[:16])),
                             {"label": y[:16]}, kdistill.Progress(0, 0, 1, 1))
    grads = torch.autograd.grad(sum(terms.values()), list(student.parameters()))
    expected = [p.detach() - 1e4 * g for p, g in zip(student.parameters(), grads, strict=True)]
    train(student, teacher, _kd(), [(x[:16], y[:16])],
          torch.optim.SGD(student.parameters(), lr=1e4))
    for want, got in zip(expected, student.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-3)


def test_a_train_settings_object_brings_its_schedule_a_loop_settings_object_only_its_own(
) -> None:
    x, y = _data()
    lrs = {}
    for name, cfg in (("train", TrainSettings(epochs=2, log_every=1)),
                      ("loop", LoopSettings(epochs=2, log_every=1)),
                      ("cosine", LoopSettings(epochs=2, log_every=1, lr_schedule={
                          "kind": "cosine", "start": 1.0, "end": 0.1}))):
        student, logger = _net(0), MetricsLogger()
        train(student, _net(1, 16), _kd(), DataLoader(TensorDataset(x, y), batch_size=32),
              torch.optim.SGD(student.parameters(), lr=1.0), cfg, logger=logger)
        lrs[name] = [r["lr"] for r in logger.records]
    assert lrs["loop"] == [1.0] * 6
    assert lrs["train"][0] == 1.0 and lrs["train"][-1] == pytest.approx(0.05)  # its default
    assert lrs["cosine"][-1] == pytest.approx(0.1)


@pytest.mark.parametrize(("change", "message"), [
    ({"student": "net"}, "student: expected an nn.Module; got str"),
    ({"method": "kd"}, "method: expected a kdistill Method"),
    ({"optimizer": 0.1}, "optimizer: expected a torch.optim.Optimizer; got float"),
    ({"cfg": {"epochs": 2}}, "cfg: expected a kdistill.LoopSettings"),
    ({"teacher": "teacher.pt"}, "teacher: expected an nn.Module"),
    ({"loader": "data.csv"}, "loader: expected a BatchLoader or an iterable"),
    ({"loader": ["abc", "def"]}, "loader: yields str; expected (inputs, labels)"),
    ({"loader": [{"input": torch.zeros(2, 12)}]}, "loader: a batch's 'label' is nothing"),
    ({"loader": [(torch.zeros(2, 12), [0, 1])]}, "loader: a batch's 'label' is list"),
    ({"checkpoint_dir": 3}, "checkpoint_dir: expected a path or None; got int"),
])
def test_misuse_is_a_type_error_naming_the_argument(change: dict, message: str) -> None:
    x, y = _data()
    student = _net(0)
    args = {"student": student, "teacher": _net(1, 16), "method": _kd(),
            "loader": DataLoader(TensorDataset(x, y), batch_size=16),
            "optimizer": torch.optim.SGD(student.parameters(), lr=0.1), "cfg": None,
            "checkpoint_dir": None}
    args.update(change)
    before = _weights(student)
    with pytest.raises(TypeError, match=re.escape(message)):
        train(args["student"], args["teacher"], args["method"], args["loader"],
              args["optimizer"], args["cfg"], checkpoint_dir=args["checkpoint_dir"])
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_a_cached_teacher_reads_the_ids_of_dict_batches_and_refuses_batches_without(
        tmp_path: Path) -> None:
    x, y = _data()
    teacher = _net(1, 16)
    cache = build_cache(tmp_path / "cache", teacher, x, CacheKey("t", "d"))
    ids = torch.arange(len(x))
    dicts = [{"input": x[i:i + 16], "label": y[i:i + 16], "index": ids[i:i + 16]}
             for i in range(0, len(x), 16)]
    results = []
    for source, loader in ((CachedTeacher(cache), dicts), (teacher, dicts)):
        student = _net(0)
        train(student, source, _kd(), loader, torch.optim.SGD(student.parameters(), lr=0.1))
        results.append(_weights(student))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    student = _net(0)
    with pytest.raises(TypeError, match=r"loader: its batches carry no 'index'"):
        train(student, CachedTeacher(cache), _kd(), DataLoader(TensorDataset(x, y),
              batch_size=16), torch.optim.SGD(student.parameters(), lr=0.1))


def test_an_iterable_without_len_needs_max_steps() -> None:
    x, y = _data()

    class Stream:  # an iterable with no len(), iterated afresh each epoch
        def __iter__(self):  # type: ignore[no-untyped-def]
            return ((x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16))

    student = _net(0)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"loader: has no len\(\).*max_steps"):
        train(student, _net(1, 16), _kd(), Stream(), opt)
    state = train(student, _net(1, 16), _kd(), Stream(), opt,
                  LoopSettings(epochs=5, max_steps=10))
    assert (state.step, state.epoch, state.batch) == (10, 1, 4)  # 6 batches an epoch


class _Samples(torch.utils.data.Dataset):
    """Dict samples with their ids: the DataLoader's batches carry "index"."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.x[i], "label": self.y[i], "index": torch.tensor(i)}


def test_a_shuffling_dataloader_resumes_exactly_with_a_new_order_each_epoch(
        tmp_path: Path) -> None:
    x, y = _data()
    cfg = LoopSettings(epochs=3, checkpoint_every_steps=4, log_every=1)
    orders: list[list[int]] = []

    class Recording(type(_kd())):  # kd, noting the order the samples came in
        def loss_terms(self, out, batch, progress):  # type: ignore[no-untyped-def]
            orders.append(batch["index"].tolist())
            return super().loss_terms(out, batch, progress)

    class CrashAt(MetricsLogger):
        def log(self, record: dict) -> None:
            if record["step"] == 9:
                raise KeyboardInterrupt("simulated crash")
            super().log(record)

    def go(ckpt: Path | None, logger: MetricsLogger | None = None) -> list[torch.Tensor]:
        student = _net(0)  # with dropout: the random stream must match too
        loader = DataLoader(_Samples(x, y), batch_size=16, shuffle=True)
        method = Recording(METHODS["kd"].config_type(temperature=2.0, alpha=0.5))
        train(student, _net(1, 16), method, loader,
              torch.optim.Adam(student.parameters(), lr=0.01), cfg, seed=2,
              checkpoint_dir=ckpt, logger=logger)
        return _weights(student)

    straight = go(None)
    epochs = [[i for batch in orders[e * 6:(e + 1) * 6] for i in batch] for e in range(3)]
    assert all(sorted(e) == list(range(96)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # shuffled anew every epoch
    orders.clear()
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path, CrashAt())
    assert latest_checkpoint(tmp_path).name == "step-00000008"  # mid-epoch 2 (6 per epoch)
    orders.clear()
    resumed = go(tmp_path)
    seen = [i for batch in orders for i in batch]
    assert seen == [i for epoch in epochs for i in epoch][8 * 16:]  # after the checkpoint
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
