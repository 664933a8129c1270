"""The token_kd method: next-token alignment, chunked = naive, token-weighted accumulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.build import build_optimizer
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.logger import MetricsLogger
from kdistill.losses import token_kd
from kdistill.methods import Outputs, build_method
from kdistill.methods.ce import CEConfig
from kdistill.methods.token_kd import TokenKDConfig
from kdistill.models import build_model
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher

P = Progress(0, 0, 1, 1)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 6))
    labels = ids.clone()
    labels[1, 3:] = -100  # a padded tail
    return {"index": torch.arange(3), "input": ids, "label": labels}


def test_terms_score_position_t_against_token_t_plus_1() -> None:
    batch = _batch()
    s, t = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    method = build_method(TokenKDConfig(kind="reverse_kl", temperature=2.0, alpha=0.25))
    terms = method.loss_terms(Outputs(s, t), batch, P)
    target = batch["label"][:, 1:]
    valid = target != -100
    ce = F.cross_entropy(s[:, :-1][valid], target[valid])
    kd = token_kd(s[:, :-1][valid], t[:, :-1][valid], kind="reverse_kl", temperature=2.0)
    torch.testing.assert_close(terms["ce"], 0.75 * ce)
    torch.testing.assert_close(terms["kd"], 0.25 * kd)
    assert method.batch_items(batch) == 15 - 3  # 3 x 5 next-token targets, 3 padded
    ce_terms = build_method(CEConfig()).loss_terms(Outputs(s, None), batch, P)
    torch.testing.assert_close(ce_terms["ce"], ce)  # the baseline's LM loss is the same CE


def test_chunked_equals_naive_in_value_and_gradient() -> None:
    batch = _batch()
    t = torch.randn(3, 6, 11)
    grads = []
    for chunk in (None, 4):
        s = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(1)).requires_grad_()
        method = build_method(TokenKDConfig(kind="jsd", beta=0.3, chunk_size=chunk))
        terms = method.loss_terms(Outputs(s, t), batch, P)
        sum(terms.values()).backward()
        grads.append((s.grad, {k: float(v.detach()) for k, v in terms.items()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for key in ("kd", "ce"):
        assert abs(grads[0][1][key] - grads[1][1][key]) < 1e-5


def _llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("llama", input_shape=(6,), num_classes=11,
                       args={"hidden": 8, "layers": 1, "heads": 2})


def test_accumulation_weights_micro_batches_by_valid_tokens() -> None:
    # Two micro-batches with very different valid-token counts must give the same update as
    # one batch holding both: the mean over all tokens, not the mean of two means.
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (4, 6))
    labels = ids.clone()
    labels[2:, 2:] = -100  # the second half has 1 valid target per row, the first 5
    finals = []
    for batch_size, accum in ((4, 1), (2, 2)):
        student, teacher = _llama(0), _llama(1)
        method = build_method(TokenKDConfig(alpha=0.5))
        cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, log_every=1,
                          optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
                          lr_schedule=1.0)
        loader = BatchLoader(ids, labels, batch_size=batch_size, shuffle=False, seed=0)
        opt = build_optimizer(student.parameters(), cfg.optimizer)
        train(student, OnlineTeacher(teacher), method, loader, opt, cfg, logger=MetricsLogger())
        finals.append([p.detach().clone() for p in student.parameters()])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_padded_vocabularies_are_aligned_on_the_shared_prefix() -> None:
    # One tokenizer of 11 tokens; the teacher's embedding table is padded to 16 rows.
    batch = _batch()
    s, t = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    padded = torch.cat([t, torch.randn(3, 6, 5)], dim=-1)
    method = build_method(TokenKDConfig(kind="forward_kl", alpha=0.5))
    exact = method.loss_terms(Outputs(s, t), batch, P)
    aligned = method.loss_terms(Outputs(s, padded), batch, P)
    torch.testing.assert_close(aligned["kd"], exact["kd"])
