"""CRD (arXiv:1910.10699): the NCE loss against its formula, the memory bank, Z, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kdistill.build import build_optimizer
from kdistill.capture import capture
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger
from kdistill.losses.contrastive import crd_nce, info_nce, nce_normalizer
from kdistill.methods import Outputs
from kdistill.methods.crd import CRD, CRDConfig
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher

N, K, D = 24, 5, 4  # training-set size, negatives, embedding width for the method tests
PROGRESS = Progress(0, 0, 10, 10)


def _nets() -> tuple[nn.Module, nn.Module]:
    """An MLP student ("1": 6 units) and a conv teacher ("1": a (4, 12) map, flattened)."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    teacher = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(48, 3)).requires_grad_(False)
    return student, teacher


def _method(n: int = N, **cfg: object) -> tuple[CRD, nn.Module, nn.Module]:
    student, teacher = _nets()
    method = CRD(CRDConfig(student_layer="1", teacher_layer="1", feat_dim=D, num_negatives=K,
                           **cfg))  # type: ignore[arg-type]
    method.setup(student, teacher, torch.randn(2, 1, 12), num_samples=n)
    return method, student, teacher


def _outputs(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> Outputs:
    with capture(teacher, ["1"]) as tf, torch.no_grad():
        t_logits = teacher(x)
    with capture(student, ["1"]) as sf:
        s_logits = student(x)
    return Outputs(s_logits, t_logits, dict(sf), {"1": tf["1"]})


def _batch(index: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(index))
    return {"index": torch.tensor(index), "input": torch.randn(len(index), 1, 12, generator=g),
            "label": torch.randint(0, 3, (len(index),), generator=g)}


def _naive_nce(s: torch.Tensor, t: float, z: float, n: int, eps: float = 1e-7) -> torch.Tensor:
    """The authors' ContrastLoss written out: P = exp(s / T) / Z, noise ratio c = K / N."""
    b, k = s.shape[0], s.shape[1] - 1
    c = k / n
    total = 0.0
    for i in range(b):
        p = [torch.exp(s[i, j] / t) / z for j in range(k + 1)]
        total = total + torch.log(p[0] / (p[0] + c + eps))
        for j in range(1, k + 1):
            total = total + torch.log(c / (p[j] + c + eps))
    return -total / b


@pytest.mark.parametrize(("tau", "seed"), [(0.07, 0), (0.5, 1)])
def test_losses_equal_the_naive_formulas_in_value_and_gradient(tau: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(3, 6, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    n = 10
    z = float(n * torch.exp(scores.detach() / tau).mean())
    assert_close(nce_normalizer(scores.detach(), temperature=tau, num_samples=n),
                 torch.tensor(z, dtype=torch.float64))
    ours, ref = crd_nce(scores, temperature=tau, z=z, num_samples=n), _naive_nce(scores, tau, z, n)
    assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert_close(torch.autograd.grad(ours, scores)[0], torch.autograd.grad(ref, scores)[0])
    f32 = crd_nce(scores.detach().float(), temperature=tau, z=z, num_samples=n)
    assert f32.dtype == torch.float32
    assert_close(f32.double(), ref.detach(), rtol=1e-4, atol=0)
    # InfoNCE: −log of the positive's softmax probability among the 1 + K candidates
    ref_soft = -sum(torch.log(torch.exp(scores[i, 0] / tau) / torch.exp(scores[i] / tau).sum())
                    for i in range(3)) / 3
    ours_soft = info_nce(scores, temperature=tau)
    assert_close(ours_soft, ref_soft)
    assert_close(torch.autograd.grad(ours_soft, scores)[0],
                 torch.autograd.grad(ref_soft, scores)[0])


def test_nce_is_finite_on_extreme_scores_and_rewards_a_closer_positive() -> None:
    s = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]], requires_grad=True)
    loss = crd_nce(s, temperature=0.01, z=1e9, num_samples=1000)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # a positive scored higher, or negatives scored lower, gives a lower loss
    base = torch.zeros(1, 3)
    args = {"temperature": 0.07, "z": 50.0, "num_samples": 100}
    assert crd_nce(base + torch.tensor([[0.5, 0, 0]]), **args) < crd_nce(base, **args)
    assert crd_nce(base - torch.tensor([[0, 0.5, 0.5]]), **args) < crd_nce(base, **args)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ K\)"):
        crd_nce(torch.zeros(2, 1), temperature=0.07, z=1.0, num_samples=5)


def test_terms_contrast_each_anchor_with_the_other_banks_rows() -> None:
    method, student, teacher = _method()
    batch = _batch([3, 7, 11])
    out = _outputs(student, teacher, batch["input"])
    banks = method.student_bank.clone(), method.teacher_bank.clone()
    torch.manual_seed(5)
    terms = method.loss_terms(out, batch, PROGRESS)
    torch.manual_seed(5)  # the same draws: column 0 the positive, then K uniform indices
    idx = torch.randint(N, (3, K + 1))
    idx[:, 0] = batch["index"]
    emb_s, emb_t = method.embed_s(out.student_feats["1"]), method.embed_t(out.teacher_feats["1"])
    scores_s = (banks[1][idx] * emb_s[:, None]).sum(-1)  # student anchor, teacher bank
    scores_t = (banks[0][idx] * emb_t[:, None]).sum(-1)  # teacher anchor, student bank
    z = [nce_normalizer(sc, temperature=0.07, num_samples=N) for sc in (scores_s, scores_t)]
    expected = 0.8 * (crd_nce(scores_s, temperature=0.07, z=z[0], num_samples=N)
                      + crd_nce(scores_t, temperature=0.07, z=z[1], num_samples=N))
    assert_close(terms["crd"], expected)
    assert_close(method.z, torch.stack(z).detach())  # Z estimated from this first batch
    assert set(terms) == {"crd", "ce"}  # kd_weight 0: no KD term
    terms["crd"].backward()  # the teacher's head is trained too; the teacher is not
    assert all(p.grad is not None for p in method.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_shared_negatives_score_every_anchor_against_one_draw() -> None:
    method, student, teacher = _method(shared_negatives=True)
    batch = _batch([3, 7, 11])
    out = _outputs(student, teacher, batch["input"])
    emb_s, emb_t = method.embed_s(out.student_feats["1"]), method.embed_t(out.teacher_feats["1"])
    torch.manual_seed(5)
    scores_s, scores_t = method.scores(batch["index"], emb_s, emb_t)
    torch.manual_seed(5)
    neg = torch.randint(N, (K,))
    idx = torch.cat([batch["index"][:, None], neg.expand(3, K)], dim=1)  # the per-anchor layout
    assert_close(scores_s, (method.teacher_bank[idx] * emb_s[:, None]).sum(-1))
    assert_close(scores_t, (method.student_bank[idx] * emb_t[:, None]).sum(-1))


def test_bank_update_moves_exactly_the_batch_rows_with_momentum() -> None:
    method, student, teacher = _method(momentum=0.3)
    batch = _batch([0, 5, 23])
    out = _outputs(student, teacher, batch["input"])
    before = method.student_bank.clone(), method.teacher_bank.clone()
    method.train()
    method.loss_terms(out, batch, PROGRESS)
    with torch.no_grad():
        embs = method.embed_s(out.student_feats["1"]), method.embed_t(out.teacher_feats["1"])
    rows = batch["index"]
    others = torch.tensor([i for i in range(N) if i not in rows.tolist()])
    for bank, old, emb in zip((method.student_bank, method.teacher_bank), before, embs,
                              strict=True):
        assert_close(bank[rows], F.normalize(0.3 * old[rows] + 0.7 * emb, dim=1))
        assert torch.equal(bank[others], old[others])
        assert_close(bank.norm(dim=1), torch.ones(N))  # every row stays on the unit sphere
    z = method.z.clone()
    second = _batch([1, 2])
    method.loss_terms(_outputs(student, teacher, second["input"]), second, PROGRESS)
    assert z.min() > 0 and torch.equal(method.z, z)  # Z is estimated once, then kept


def test_no_bank_or_z_update_in_eval_mode() -> None:
    method, student, teacher = _method()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.eval()
    batch = _batch([1, 2, 3])
    terms = method.loss_terms(_outputs(student, teacher, batch["input"]), batch, PROGRESS)
    assert torch.isfinite(terms["crd"]) and float(method.z.abs().sum()) == 0
    for key, value in method.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_config_errors_name_the_field() -> None:
    student, teacher = _nets()
    x = torch.randn(2, 1, 12)
    method = CRD(CRDConfig(student_layer="1", teacher_layer="1", num_negatives=K))
    with pytest.raises(ConfigError, match="num_samples"):
        method.setup(student, teacher, x, num_samples=None)
    with pytest.raises(ConfigError, match=r"method\.num_negatives: 5 .* has 5, .* at most 4"):
        method.setup(student, teacher, x, num_samples=K)
    method.setup(student, teacher, x, num_samples=K + 1)  # K = N − 1 is allowed
    assert method.student_bank.shape == (K + 1, 128)
    with pytest.raises(ConfigError, match="teacher"):
        method.setup(student, None, x, num_samples=N)


def test_resume_from_a_checkpoint_equals_the_straight_run(tmp_path: Path) -> None:
    # Banks and Z are buffers (in the checkpoint's method file), the negatives come from the
    # global RNG (in its trainer state): 4 steps + resume + 2 steps equals 6 straight steps.
    x, y = torch.randn(48, 1, 12), torch.randint(0, 3, (48,))

    def fit(max_steps: int | None, ckpt: Path | None) -> dict[str, torch.Tensor]:
        method, student, teacher = _method(n=48)
        opt = build_optimizer([*student.parameters(), *method.parameters()],
                              TrainConfig().optimizer)
        cfg = TrainConfig(epochs=2, lr_schedule=1.0, max_steps=max_steps)
        train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=16), opt,
              cfg, checkpoint_dir=ckpt)
        return {**method.state_dict(), **{f"student.{k}": v for k, v in
                                          student.state_dict().items()}}

    straight = fit(None, None)
    interrupted = fit(4, tmp_path)  # stops mid-epoch 1 with a checkpoint at step 4
    assert not torch.equal(interrupted["student_bank"], straight["student_bank"])
    resumed = fit(None, tmp_path)
    assert {"student_bank", "teacher_bank", "z"} <= set(resumed)
    assert float(resumed["z"].min()) > 0
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_end_to_end_training_lowers_the_contrastive_loss(objective: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(48, 1, 12), torch.randint(0, 3, (48,))
    method, student, teacher = _method(n=48, objective=objective, kd_weight=0.5)
    before = [p.detach().clone() for p in student.parameters()]
    opt = build_optimizer([*student.parameters(), *method.parameters()],
                          TrainConfig().optimizer.model_copy(update={"lr": 0.01}))
    logger = MetricsLogger()
    train(student, OnlineTeacher(teacher), method, BatchLoader(x, y, batch_size=16), opt,
          TrainConfig(epochs=12, log_every=3), logger=logger)
    crd = [r["loss/crd"] for r in logger.records]
    assert all(math.isfinite(v) for v in crd) and "loss/kd" in logger.records[0]
    assert sum(crd[-3:]) < 0.8 * sum(crd[:3])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert bool((method.z > 0).all()) == (objective == "nce")
