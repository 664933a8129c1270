"""GKD (arXiv:2306.13649): on-policy batches from the student, JSD on its samples, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdistill.build import build_optimizer
from kdistill.config import TrainConfig
from kdistill.data.loader import BatchLoader
from kdistill.engine import train
from kdistill.errors import ConfigError
from kdistill.logger import MetricsLogger
from kdistill.losses import hard_cross_entropy, token_kd
from kdistill.methods import Outputs, build_method
from kdistill.methods.gkd import GKD, GKDConfig, _filter_logits, sample_continuation
from kdistill.models import build_model
from kdistill.schedules import Progress
from kdistill.teachers import OnlineTeacher

P = Progress(0, 0, 10, 10)
V, T = 20, 10


def _llama(seed: int, hidden: int = 8, vocab: int = V) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("llama", input_shape=(T,), num_classes=vocab,
                       args={"hidden": hidden, "layers": 1, "heads": 2})


def _contextual(seed: int) -> nn.Module:
    """A tiny llama whose next token depends on the whole prefix: at the default init (std
    0.02) attention barely moves the residual stream, so only the last token would matter."""
    model = _llama(seed, hidden=16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


def _batch(n: int = 4) -> dict[str, Tensor]:
    ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(3))
    return {"index": torch.arange(n), "input": ids, "label": ids.clone()}


def _gkd(**kw: object) -> GKD:
    method = build_method(GKDConfig(**kw))
    assert isinstance(method, GKD)
    return method


class _Plain(nn.Module):
    """The same network behind a plain ids -> logits forward (no key/value cache path)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: Tensor) -> Tensor:
        return self.inner(ids)


def test_lambda_one_replaces_the_continuation_and_masks_the_prompt() -> None:
    student, batch = _llama(0), _batch()
    student.train()
    torch.manual_seed(0)
    new = _gkd(lmbda=1.0, prompt_tokens=4).prepare_batch(batch, student, P)
    assert student.training  # train mode restored after sampling in eval mode
    assert bool(new["on_policy"]) and new["input"].shape == (4, T)
    assert torch.equal(new["input"][:, :4], batch["input"][:, :4])
    assert not torch.equal(new["input"][:, 4:], batch["input"][:, 4:])
    assert torch.equal(new["index"], batch["index"])
    assert (new["label"][:, :4] == -100).all()
    assert torch.equal(new["label"][:, 4:], new["input"][:, 4:])
    assert _gkd().batch_items(new) == 4 * (T - 4)  # next-token targets: the sampled tokens
    student.eval()
    _gkd(lmbda=1.0).prepare_batch(batch, student, P)
    assert not student.training  # eval stays eval


def test_lambda_zero_keeps_the_data_and_the_default_prompt_is_half_the_block() -> None:
    batch = _batch()
    same = _gkd(lmbda=0.0).prepare_batch(batch, _llama(0), P)
    assert not bool(same["on_policy"])
    for key in ("index", "input", "label"):
        assert same[key] is batch[key]
    assert _gkd().prompt_length(T) == T // 2 and _gkd().prompt_length(3) == 1
    with pytest.raises(ConfigError, match="prompt_tokens"):
        _gkd(prompt_tokens=T).prompt_length(T)


def test_lambda_follows_its_schedule() -> None:
    method = _gkd(lmbda={"kind": "step", "values": [1.0, 0.0], "milestones": [0.5]})
    student, batch = _llama(0), _batch()
    assert bool(method.prepare_batch(batch, student, Progress(0, 0, 10, 10))["on_policy"])
    assert not bool(method.prepare_batch(batch, student, Progress(9, 0, 10, 10))["on_policy"])
    assert method.scalars(Progress(9, 0, 10, 10))["lmbda"] == 0.0


def test_sampling_is_reproducible_and_the_cache_equals_rerunning_the_prefix() -> None:
    student, prompt = _contextual(0), _batch()["input"][:, :3]
    student.eval()
    runs = []
    for model in (student, student, _Plain(student)):
        torch.manual_seed(7)
        runs.append(sample_continuation(model, prompt, T, temperature=1.5))
    assert torch.equal(runs[0], runs[1])  # same seed, same samples
    assert torch.equal(runs[0], runs[2])  # the key/value cache path = the full re-run
    torch.manual_seed(8)
    assert not torch.equal(sample_continuation(student, prompt, T, temperature=1.5), runs[0])
    # top_k = 1 and a tiny top_p are greedy: each token is the argmax after its prefix.
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        ids = sample_continuation(student, prompt, T, **kw)  # type: ignore[arg-type]
        greedy = student(ids).argmax(-1)
        assert torch.equal(ids[:, 3:], greedy[:, 2:-1])


def test_filter_logits_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = -math.inf
    assert _filter_logits(logits, 2, 1.0).isinf().tolist() == [[False, False, True, True]]
    # Nucleus 0.7: 0.5 < 0.7 so 0.3 stays; 0.8 >= 0.7 so the rest go.
    kept = _filter_logits(logits, 0, 0.7)
    assert kept[0, 2] == inf and kept[0, 3] == inf and torch.equal(kept[0, :2], logits[0, :2])
    kept = _filter_logits(logits, 0, 0.85)  # 0.8 < 0.85: the third stays, the last goes
    assert torch.equal(kept[0, :3], logits[0, :3]) and kept[0, 3] == inf


def test_samples_stay_inside_the_teachers_smaller_table() -> None:
    student, teacher = _llama(0, vocab=V), _llama(1, vocab=12)
    method = _gkd(lmbda=1.0, prompt_tokens=2, sample_temperature=5.0)
    method.setup(student, teacher, _batch()["input"][:2])
    assert method.vocab == 12
    batch = _batch(16)
    batch["input"] = batch["input"] % 12
    torch.manual_seed(0)
    assert int(method.prepare_batch(batch, student, P)["input"].max()) < 12


@pytest.mark.parametrize("on_policy", [True, False])
def test_terms_are_the_jsd_on_the_scored_tokens(on_policy: bool) -> None:
    torch.manual_seed(1)
    s, t = torch.randn(3, T, V), torch.randn(3, T, V)
    ids = torch.randint(0, V, (3, T))
    labels = ids.clone()
    if on_policy:
        labels[:, :4] = -100
    batch = {"index": torch.arange(3), "input": ids, "label": labels,
             "on_policy": torch.tensor(on_policy)}
    method = _gkd(beta=0.3, temperature=2.0, alpha=0.75)
    terms = method.loss_terms(Outputs(s, t), batch, P)
    first = 3 if on_policy else 0  # logits at t score token t + 1: from the last prompt token
    sel_s, sel_t = s[:, first:-1].reshape(-1, V), t[:, first:-1].reshape(-1, V)
    jsd = token_kd(sel_s, sel_t, kind="jsd", beta=0.3, temperature=2.0)
    torch.testing.assert_close(terms["kd"], 0.75 * jsd)
    ce = hard_cross_entropy(sel_s, ids[:, first + 1:].reshape(-1))
    torch.testing.assert_close(terms["ce"], 0.25 * (torch.tensor(0.0) if on_policy else ce))


def _fit(method: GKD, max_steps: int | None, ckpt: Path | None,
         logger: MetricsLogger | None = None) -> tuple[nn.Module, nn.Module]:
    student, teacher = _llama(0), _llama(1, hidden=16)
    ids = torch.randint(0, V, (24, T), generator=torch.Generator().manual_seed(5))
    method.setup(student, teacher, ids[:2], num_samples=len(ids))
    cfg = TrainConfig(epochs=2, batch_size=8, log_every=1, lr_schedule=1.0, max_steps=max_steps,
                      optimizer={"name": "adamw", "lr": 0.01})
    opt = build_optimizer(student.parameters(), cfg.optimizer)
    train(student, OnlineTeacher(teacher), method, BatchLoader(ids, ids.clone(), batch_size=8,
                                                                seed=0),
          opt, cfg, checkpoint_dir=ckpt, logger=logger)
    return student, teacher


def test_end_to_end_the_online_teacher_scores_the_students_samples() -> None:
    logger = MetricsLogger()
    before = _llama(0).state_dict()
    student, teacher = _fit(_gkd(lmbda=1.0, alpha=0.5), None, None, logger)
    assert len(logger.records) == 6
    assert all(math.isfinite(r["loss"]) and r["loss/kd"] > 0 for r in logger.records)
    assert all(r["loss/ce"] == 0 for r in logger.records)  # on-policy only: no CE
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_resume_from_a_checkpoint_equals_the_straight_run(tmp_path: Path) -> None:
    # The λ draws and the samples come from the global RNG, saved in the checkpoint: 2 steps
    # + resume + 4 steps equals 6 straight steps, on-policy and data batches mixed.
    straight, _ = _fit(_gkd(lmbda=0.5, alpha=0.5), None, None)
    _fit(_gkd(lmbda=0.5, alpha=0.5), 2, tmp_path)
    resumed, _ = _fit(_gkd(lmbda=0.5, alpha=0.5), None, tmp_path)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
