"""kdistill's JSD(β) against the GKD paper's formula (Agarwal et al., arXiv:2306.13649, eq. 1),
written out here in numpy float64 with plain probabilities (not imported from TRL):

    JSD(β)(P ‖ Q) = β · KL(P ‖ M) + (1 − β) · KL(Q ‖ M),   M = β·P + (1 − β)·Q,

P the teacher's and Q the student's next-token distribution at temperature T, averaged over
the tokens whose label is not -100 (TRL's `generalized_jsd_loss`, reduction "batchmean",
divides the masked sum by the number of valid tokens the same way). At the ends the formula
vanishes (M = Q at β = 0); GKD's implementation in TRL, and kdistill, return the limits'
losses instead: forward KL(P ‖ Q) at β = 0, reverse KL(Q ‖ P) at β = 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdistill.losses import chunked_token_distill_loss, token_kd

B, T, V = 3, 7, 29


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * (np.log(a) - np.log(b))).sum(axis=-1)


def paper_jsd(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, beta: float,
              temperature: float) -> float:
    p, q = _softmax(teacher / temperature), _softmax(student / temperature)
    if beta == 0.0:
        per_token = _kl(p, q)
    elif beta == 1.0:
        per_token = _kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        per_token = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    valid = labels != -100
    return float(per_token[valid].sum() / valid.sum())


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[:, -1] = -100  # the last position has no next token
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_the_gkd_paper(beta: float, temperature: float) -> None:
    student, teacher, labels = _inputs(seed=int(beta * 10 + temperature))
    expected = paper_jsd(student.numpy(), teacher.numpy(), labels.numpy(), beta, temperature)
    got = token_kd(student, teacher, kind="jsd", beta=beta, temperature=temperature,
                   labels=labels, scale_by_t2=False)
    assert abs(got.item() - expected) < 1e-6 * max(1.0, abs(expected))
    # The memory-bounded form that long vocabularies use computes the same number.
    chunked = chunked_token_distill_loss(student, teacher, labels, alpha=1.0, kind="jsd",
                                         beta=beta, temperature=temperature, scale_by_t2=False,
                                         chunk_size=4)
    assert abs(chunked.loss.item() - expected) < 1e-6 * max(1.0, abs(expected))


def test_the_interior_is_the_symmetric_jsd_and_differs_from_the_ends() -> None:
    # The comparison can fail: β = 0.5 is the ordinary JSD (≤ log 2), far from either KL here.
    student, teacher, labels = _inputs(seed=3)
    s, t, y = student.numpy(), teacher.numpy(), labels.numpy()
    mid = token_kd(student, teacher, kind="jsd", beta=0.5, labels=labels).item()
    assert 0 < mid <= np.log(2)
    assert abs(mid - paper_jsd(s, t, y, 0.0, 1.0)) > 0.1
    assert abs(mid - paper_jsd(s, t, y, 1.0, 1.0)) > 0.1
    # Swapping the roles of teacher and student is JSD(1 − β), not JSD(β).
    swapped = token_kd(teacher, student, kind="jsd", beta=0.3, labels=labels).item()
    assert abs(swapped - paper_jsd(s, t, y, 0.7, 1.0)) < 1e-9
