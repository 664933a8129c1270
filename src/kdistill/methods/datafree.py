"""Data-free distillation: a generator synthesises the inputs from the teacher alone.

Two methods: `dafl` (Chen et al. 2019, arXiv:1904.01186), whose generator makes inputs the
teacher classifies confidently, with active features and balanced classes; and `dfad` (Fang et
al. 2019, arXiv:1912.11006), whose generator seeks the inputs where student and teacher disagree
most while the student closes the gap. Both can add DeepInversion's batch-norm statistics prior
(arXiv:1912.08795) and a prioritised replay of the generated samples the student got most wrong.

Both are on-policy: `prepare_batch` replaces the real batch by generated inputs (only its size
is read; no real image reaches the student), so the pipeline runs the teacher online. The
generator belongs to the method, so checkpoints carry it, and `auxiliary()` declares it with
its Adam and loss: the engine steps it (clipping, non-finite checks, LR schedule and optimiser
state in its checkpoints, like the student's). Shared machinery lives in `Synthesizer`
(composition, not inheritance); the two methods differ in their generator loss and student
loss only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill.capture import capture
from kdistill.errors import ConfigError
from kdistill.losses import (
    activation_loss,
    bn_statistics_loss,
    class_balance_loss,
    hard_cross_entropy,
    kd_kl,
    l1_discrepancy,
    one_hot_loss,
)
from kdistill.methods.base import Auxiliary, Batch, Example, Method, MethodConfig, Outputs
from kdistill.models.generator import Generator, save_sample_grid
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at

# (teacher logits, features or None, BN-statistics loss or None) for generated inputs.
TeacherPass = tuple[Tensor, Tensor | None, Tensor | None]


class _DataFreeConfig(MethodConfig):
    """Settings both data-free methods share: the generator, its optimiser, replay, KD."""

    latent_dim: int = Field(100, ge=1, description="size of the generator's noise vector z")
    generator_width: int = Field(128, ge=2, description="channels of the generator's first "
                                 "conv (images) or hidden units (flat inputs)")
    generator_lr: float = Field(0.2, gt=0, description="Adam learning rate of the generator")
    generator_betas: tuple[float, float] = Field((0.5, 0.999), description="Adam's betas "
                                                 "for the generator (DCGAN's 0.5)")
    generator_steps: int = Field(1, ge=0, description="generator updates per student step "
                                 "(0: a fixed generator)")
    generator_every: int = Field(1, ge=1, description="update the generator on every n-th "
                                 "student step only (DFAD: 5)")
    bn_weight: float = Field(0.0, ge=0, description="DeepInversion's BN-statistics prior on "
                             "the teacher's BatchNorm layers; 0: off")
    replay_size: int = Field(0, ge=0, description="generated samples kept, those where teacher "
                             "and student disagree most; 0: no replay")
    replay_fraction: float = Field(0.25, ge=0, le=1, description="share of each student batch "
                                   "drawn from the replay buffer (by priority)")
    temperature: Temperature = Field(1.0, description="KD temperature on generated batches")
    alpha: UnitWeight = Field(1.0, description="weight of KD; 1 − α on CE to the teacher's "
                              "argmax")


class DAFLConfig(_DataFreeConfig):
    """Generator loss = w_oh·one-hot + w_a·activation + w_ie·class-balance (+ w_bn·BN prior);
    student loss = α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE(teacher argmax) on its samples.

    Defaults are the paper's MNIST settings: lr_G 0.2, w_a 0.1, w_ie 5 on a log10 entropy, which
    is 5/ln 10 ≈ 2.17 on the natural-log entropy used here, KD at T = 1."""

    name: Literal["dafl"] = "dafl"
    one_hot_weight: float = Field(1.0, ge=0, description="the teacher-confidence term")
    activation_weight: float = Field(0.1, ge=0, description="the feature-activation term")
    balance_weight: float = Field(round(5 / math.log(10), 4), ge=0,
                                  description="the information-entropy (class balance) term")
    feature_layer: str | None = Field(None, description="teacher module whose output the "
                                      "activation loss reads; null: the input of its last "
                                      "nn.Linear")


class DFADConfig(_DataFreeConfig):
    """Generator loss = −L1(student, teacher logits) (+ w_bn·BN prior): it seeks disagreement;
    student loss = L1(student, teacher logits), or KD as in dafl with `student_loss: kd`.

    The paper updates the generator once per 5 student steps, lr_G 1e-3."""

    name: Literal["dfad"] = "dfad"
    generator_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the generator")
    generator_every: int = Field(5, ge=1, description="update the generator on every n-th "
                                 "student step only")
    student_loss: Literal["l1", "kd"] = Field("l1", description="l1: the paper's logit L1; "
                                              "kd: temperature/alpha as in dafl")


class Synthesizer(nn.Module):
    """The generator, the teacher's hooks, the replay buffer and the last generator samples.

    Built by `build` once the teacher and the input shape are known. The teacher is held in a
    tuple, not as a submodule: its weights must stay out of `state_dict()` and `parameters()`.
    """

    def __init__(self, cfg: _DataFreeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._teacher: tuple[nn.Module, ...] = ()
        self._bn: list[nn.modules.batchnorm._BatchNorm] = []
        # The last generator step's samples and teacher logits, reused as the next batch (as
        # DAFL does) so the teacher is not run once more; consumed by `synthesize`.
        self._fresh: tuple[Tensor, Tensor] | None = None

    def build(self, teacher: nn.Module | None, example: Tensor, method: str) -> None:
        if teacher is None:
            raise ConfigError("method", f"method '{method}' synthesises its data from a teacher")
        self._teacher = (teacher,)
        self._bn = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.running_mean is not None and m.running_var is not None]
        if self.cfg.bn_weight > 0 and not self._bn:
            raise ConfigError("method.bn_weight", "the teacher has no BatchNorm layers with "
                              "running statistics to match; set bn_weight: 0")
        self.generator = Generator(example.shape[1:], latent_dim=self.cfg.latent_dim,
                                   width=self.cfg.generator_width).to(example.device)
        size = self.cfg.replay_size
        self.register_buffer("replay_x", example.new_zeros(size, *example.shape[1:]))
        self.register_buffer("replay_label", torch.zeros(size, dtype=torch.long))
        # -inf marks an empty slot: any real sample outranks it.
        self.register_buffer("replay_score", torch.full((size,), -math.inf))

    def auxiliary(self, loss: Callable[[Tensor, nn.Module], tuple[dict[str, Tensor], Tensor]]
                  ) -> Auxiliary:
        """The generator as the engine's auxiliary network: Adam at `generator_lr`, trained on
        `loss(x, student) -> (weighted terms, teacher logits)` for samples x as many as the
        batch has; the samples of its last step are kept for `synthesize`."""
        if not hasattr(self, "generator"):
            raise RuntimeError("call the method's setup() before training")
        c = self.cfg

        def loss_terms(batch: Batch, student: nn.Module, progress: Progress
                       ) -> dict[str, Tensor]:
            x = self.generator.sample(len(batch["label"]))
            terms, logits = loss(x, student)
            self._fresh = (x.detach(), logits.detach())
            return terms

        return Auxiliary(
            name="gen", parameters=list(self.generator.parameters()),
            optimizer=lambda params: torch.optim.Adam(params, lr=c.generator_lr,
                                                      betas=c.generator_betas),
            loss_terms=loss_terms, steps=c.generator_steps, every=c.generator_every)

    @property
    def teacher(self) -> nn.Module:
        if not self._teacher:
            raise RuntimeError("call the method's setup() before training")
        return self._teacher[0]

    @contextmanager
    def _bn_inputs(self) -> Iterator[list[Tensor]]:
        """Records what enters each of the teacher's BN layers (forward pre-hooks)."""
        seen: list[Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
                 for m in self._bn] if self.cfg.bn_weight > 0 else []
        try:
            yield seen
        finally:
            for h in hooks:
                h.remove()

    def teacher_pass(self, x: Tensor, feature_layer: str | None, *,
                     features: bool) -> TeacherPass:
        """The teacher on generated `x`, with gradients to `x` (not to the teacher's weights:
        the caller differentiates w.r.t. the generator only), its features when asked for
        (module `feature_layer`'s output, else the input of its last nn.Linear) and the BN
        prior when `bn_weight` > 0."""
        teacher = self.teacher
        teacher.eval()  # BN running statistics are the prior; never updated here
        feats: Tensor | None = None
        # The teacher may sit on another device (teacher.device): there and back, keeping
        # the gradient path to the generator.
        home = x.device
        x = x.to(next((p.device for p in teacher.parameters()), home))
        with self._bn_inputs() as bn_in:
            if features and feature_layer is not None:
                with capture(teacher, [feature_layer], where="method.feature_layer") as got:
                    logits = teacher(x)
                    feats = got[feature_layer]
            elif features:
                linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
                if not linears:
                    raise ConfigError("method.feature_layer", "the teacher has no nn.Linear "
                                      "whose input to read; name a module")
                kept: list[Tensor] = []
                hook = linears[-1].register_forward_pre_hook(lambda _m, a: kept.append(a[0]))
                try:
                    logits = teacher(x)
                finally:
                    hook.remove()
                feats = kept[-1]
            else:
                logits = teacher(x)
        bn = (sum((bn_statistics_loss(i, m.running_mean, m.running_var)  # type: ignore[arg-type]
                   for i, m in zip(bn_in, self._bn, strict=True)), torch.zeros(()))
              if self.cfg.bn_weight > 0 else None)
        return (logits.to(home), None if feats is None else feats.to(home),
                None if bn is None else bn.to(home))

    def synthesize(self, batch: Batch) -> Batch:
        """A batch of generated samples, as many as `batch` has, labelled with the teacher's
        argmax: those of the generator's last step when it just stepped (the engine runs it
        before `prepare_batch`), else fresh ones; a replay share replaces the tail."""
        n = len(batch["label"])
        if self._fresh is not None and len(self._fresh[0]) == n:
            x, logits = self._fresh
        else:
            with torch.no_grad():
                x = self.generator.sample(n)
                # The teacher may sit on another device (teacher.device): there and back.
                device = next((p.device for p in self.teacher.parameters()), x.device)
                logits = self.teacher(x.to(device)).to(x.device)
        self._fresh = None
        x, labels = x.detach(), logits.detach().argmax(dim=1)
        slots = torch.full((n,), -1, dtype=torch.long, device=x.device)
        filled = torch.isfinite(self.replay_score).nonzero().flatten()
        m = round(self.cfg.replay_fraction * n) if self.cfg.replay_size else 0
        if 0 < m <= len(filled):
            # Prioritised: slots drawn in proportion to their disagreement score.
            weights = self.replay_score[filled].clamp_min(1e-8)
            picked = filled[torch.multinomial(weights, m, replacement=False)]
            x, labels = x.clone(), labels.clone()
            x[n - m:], labels[n - m:], slots[n - m:] = (self.replay_x[picked],
                                                        self.replay_label[picked], picked)
        return {"index": batch["index"], "input": x, "label": labels, "replay_slot": slots}

    @torch.no_grad()
    def remember(self, out: Outputs, batch: Batch) -> None:
        """Score the batch by KL(teacher ‖ student) per sample and keep the `replay_size`
        highest-scoring samples seen (replayed ones get their score refreshed)."""
        if not self.cfg.replay_size or "replay_slot" not in batch:
            return
        assert out.teacher_logits is not None
        t = out.teacher_logits.float().log_softmax(dim=1)
        s = out.student_logits.float().log_softmax(dim=1)
        score = (t.exp() * (t - s)).sum(dim=1)
        slots = batch["replay_slot"]
        again = slots >= 0
        self.replay_score[slots[again]] = score[again]
        fresh = ~again
        scores = torch.cat([self.replay_score, score[fresh]])
        keep = scores.topk(self.cfg.replay_size).indices
        self.replay_x.copy_(torch.cat([self.replay_x, batch["input"][fresh]])[keep])
        self.replay_label.copy_(torch.cat([self.replay_label, batch["label"][fresh]])[keep])
        self.replay_score.copy_(scores[keep])


def _kd_terms(out: Outputs, batch: Batch, temperature: float, alpha: float) -> dict[str, Tensor]:
    assert out.teacher_logits is not None, "data-free methods need the online teacher's logits"
    kd = kd_kl(out.student_logits, out.teacher_logits, temperature=temperature)
    ce = hard_cross_entropy(out.student_logits, batch["label"])
    return {"kd": alpha * kd, "ce": (1.0 - alpha) * ce}


class _DataFree(Method):
    """What both data-free methods share: the synthesizer (generator, replay), set up from the
    teacher; the generator as the auxiliary network; the sample grid as the stage's artifact."""

    on_policy = True
    cfg: _DataFreeConfig

    def __init__(self, cfg: _DataFreeConfig) -> None:
        super().__init__(cfg)
        self.synth = Synthesizer(cfg)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        self.synth.build(teacher, example, self.cfg.name)

    def generator_loss(self, x: Tensor, student: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
        """The generator's weighted terms on its samples `x`, and the teacher's logits."""
        raise NotImplementedError

    def auxiliary(self) -> Auxiliary:
        return self.synth.auxiliary(self.generator_loss)

    def prepare_batch(self, batch: Batch, student: nn.Module, progress: Progress) -> Batch:
        return self.synth.synthesize(batch)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def save_artifacts(self, stage_dir: Path) -> list[Path]:
        """The generator's samples, one row per teacher class: what the student learned from."""
        return [save_sample_grid(self.synth.generator, self.synth.teacher,
                                 stage_dir / "generated-samples.png")]


class DAFL(_DataFree):
    """Data-free learning: a generator trained for confident, active, class-balanced teacher
    outputs; the student learns the teacher's outputs on its samples."""

    config_type = DAFLConfig
    paper = "Chen et al. 2019, Data-Free Learning of Student Networks (arXiv:1904.01186)"
    example = Example({"generator_width": 8, "latent_dim": 4, "alpha": 0.9, "replay_size": 8})
    cfg: DAFLConfig

    def generator_loss(self, x: Tensor, student: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
        c = self.cfg
        logits, feats, bn = self.synth.teacher_pass(x, c.feature_layer,
                                                    features=c.activation_weight > 0)
        terms = {"one_hot": c.one_hot_weight * one_hot_loss(logits),
                 "balance": c.balance_weight * class_balance_loss(logits)}
        if feats is not None:
            terms["activation"] = c.activation_weight * activation_loss(feats)
        if bn is not None:
            terms["bn"] = c.bn_weight * bn
        return terms, logits

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        self.synth.remember(out, batch)
        return _kd_terms(out, batch, value_at(self.cfg.temperature, progress),
                         value_at(self.cfg.alpha, progress))


class DFAD(_DataFree):
    """Data-free adversarial distillation: the generator maximises the teacher-student L1
    discrepancy on its samples, the student minimises it."""

    config_type = DFADConfig
    paper = "Fang et al. 2019, Data-Free Adversarial Distillation (arXiv:1912.11006)"
    example = Example({"generator_width": 8, "latent_dim": 4, "generator_every": 1})
    cfg: DFADConfig

    def generator_loss(self, x: Tensor, student: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
        logits, _, bn = self.synth.teacher_pass(x, None, features=False)
        terms = {"discrepancy": -l1_discrepancy(student(x), logits)}
        if bn is not None:
            terms["bn"] = self.cfg.bn_weight * bn
        return terms, logits

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        self.synth.remember(out, batch)
        if self.cfg.student_loss == "kd":
            return _kd_terms(out, batch, value_at(self.cfg.temperature, progress),
                             value_at(self.cfg.alpha, progress))
        assert out.teacher_logits is not None, "dfad needs the online teacher's logits"
        return {"l1": l1_discrepancy(out.student_logits, out.teacher_logits)}
