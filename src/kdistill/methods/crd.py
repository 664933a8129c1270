"""Contrastive representation distillation (Tian, Krishnan & Isola 2019, arXiv:1910.10699)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from kdistill.adapters import probe_shapes
from kdistill.errors import ConfigError
from kdistill.losses import hard_cross_entropy, kd_kl
from kdistill.losses.contrastive import crd_nce, info_nce, nce_normalizer
from kdistill.methods.base import Batch, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Schedule, Temperature, bounds, check_range, value_at

Weight = Annotated[Schedule, AfterValidator(lambda v: check_range(v, "weight", low=0.0))]


class CRDConfig(MethodConfig):
    """loss = ce_weight·CE + weight·(L(S anchor; T bank) + L(T anchor; S bank)) + kd_weight·KD.

    Each side embeds its layer's output (flattened, like the authors' `Embed`; pick the
    penultimate, already pooled layer for the paper's exact setting) with a trained linear
    head to `feat_dim` and L2-normalises it. Each memory bank holds one unit row per training
    sample. Sample i's anchor is scored against the other side's bank at row i (the positive)
    and at `num_negatives` rows drawn uniformly with replacement (collisions, even with i,
    allowed: the noise distribution P_n = 1/N, as in the authors' memory). L is `crd_nce`
    (Eq. 18 with Z estimated from the first training batch, then fixed) or, with
    `objective: softmax`, `info_nce`. After the loss, under no_grad and in training mode only,
    the batch's bank rows become normalise(momentum·row + (1 − momentum)·embedding).
    Defaults are the paper's CIFAR-100 ones: CE + 0.8·CRD, K = 16384, τ = 0.07, m = 0.5.
    """

    name: Literal["crd"] = "crd"
    student_layer: str = Field(description="student module name (its output is embedded)")
    teacher_layer: str = Field(description="teacher module name (its output is embedded)")
    weight: Weight = Field(0.8, description="β, the weight of the contrastive term")
    ce_weight: Weight = 1.0
    kd_weight: Weight = Field(0.0, description="α, Hinton KD on the logits (0: CRD alone)")
    temperature: Temperature = Field(4.0, description="the KD temperature")
    feat_dim: int = Field(128, ge=1, description="embedding width")
    num_negatives: int = Field(16384, ge=1, description="K; at most num_samples − 1")
    nce_t: float = Field(0.07, gt=0, description="τ, the contrastive temperature")
    momentum: float = Field(0.5, ge=0, lt=1, description="memory bank momentum")
    objective: Literal["nce", "softmax"] = "nce"
    shared_negatives: bool = Field(
        False, description="draw one set of K negatives per batch for every anchor: a matrix "
        "product instead of a B·K·d gather (the per-anchor draws of the paper are the default)")


class _Embed(nn.Module):
    """Flatten, linear map to `out` features, L2-normalise (the authors' `Embed`)."""

    def __init__(self, dim_in: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, out)

    def forward(self, x: Tensor) -> Tensor:
        # Features may arrive in bf16 (autocast); the heads and the banks stay float32.
        return F.normalize(self.linear(x.flatten(1).to(self.linear.weight.dtype)), dim=1)


def _unit_rows(n: int, d: int) -> Tensor:
    """The authors' init, uniform in ±√(3/d) (expected norm 1), then normalised exactly."""
    stdv = math.sqrt(3.0 / d)
    return F.normalize(torch.rand(n, d).mul_(2 * stdv).sub_(stdv), dim=1)


class CRD(Method):
    """Contrast each sample's embedding against the other network's memory bank."""

    config_type = CRDConfig
    paper = "Tian, Krishnan & Isola 2019, Contrastive Representation Distillation " \
            "(arXiv:1910.10699)"
    example = Example({"student_layer": "3", "teacher_layer": "3", "feat_dim": 8,
                       "num_negatives": 16})
    cfg: CRDConfig

    def __init__(self, cfg: CRDConfig) -> None:
        super().__init__(cfg)
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()
        # Buffers, so checkpoints (method.state_dict()) carry them and a resume is exact.
        # z[0]: student anchor vs teacher bank, z[1]: teacher anchor vs student bank;
        # 0 means "not estimated yet".
        self.register_buffer("student_bank", torch.zeros(0, cfg.feat_dim))
        self.register_buffer("teacher_bank", torch.zeros(0, cfg.feat_dim))
        self.register_buffer("z", torch.zeros(2))

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.cfg.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.cfg.teacher_layer,)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        if teacher is None:
            raise ConfigError("method", "crd needs the teacher network to probe its layer")
        if num_samples is None:
            raise ConfigError("method", "crd keeps a memory bank row per training sample and "
                                        "needs the training-set size (num_samples)")
        if self.cfg.num_negatives >= num_samples:
            raise ConfigError("method.num_negatives",
                              f"{self.cfg.num_negatives} negatives need more than that many "
                              f"training samples; this training set has {num_samples}, so "
                              f"use at most {num_samples - 1}")
        s = probe_shapes(student, self.student_layers, example, where="method.student_layer")
        t = probe_shapes(teacher, self.teacher_layers, example, where="method.teacher_layer")
        d = self.cfg.feat_dim
        self.embed_s = _Embed(math.prod(s[self.cfg.student_layer]), d)
        self.embed_t = _Embed(math.prod(t[self.cfg.teacher_layer]), d)
        self.student_bank = _unit_rows(num_samples, d)
        self.teacher_bank = _unit_rows(num_samples, d)
        self.z = torch.zeros(2)

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"weight": value_at(self.cfg.weight, progress),
                "ce_weight": value_at(self.cfg.ce_weight, progress),
                "kd_weight": value_at(self.cfg.kd_weight, progress),
                "temperature": value_at(self.cfg.temperature, progress)}

    def contrast(self, scores: Tensor, side: int) -> Tensor:
        """The contrastive loss of one anchor side; side 0 = student anchor, 1 = teacher."""
        tau, n = self.cfg.nce_t, self.student_bank.shape[0]
        if self.cfg.objective == "softmax":
            return info_nce(scores, temperature=tau)
        # Z is estimated once, on the first training batch, and kept (the authors' code);
        # `where` instead of an `if` on the buffer avoids a host sync every step.
        with torch.no_grad():
            estimate = nce_normalizer(scores.detach(), temperature=tau, num_samples=n)
            ranks = self.collectives
            if ranks.distributed and not bool(self.z[side] > 0):
                # The first batch is split over ranks: average the ranks' estimates, so Z is
                # the global batch's (the sync happens once: Z is kept afterwards).
                estimate = ranks.all_reduce_sum(estimate.clone()) / ranks.world
            z = torch.where(self.z[side] > 0, self.z[side], estimate)
            if self.training:
                self.z[side] = z
        return crd_nce(scores, temperature=tau, z=z, num_samples=n)

    def scores(self, index: Tensor, emb_s: Tensor, emb_t: Tensor) -> tuple[Tensor, Tensor]:
        """(B, K + 1) scores of each anchor against the other side's bank: column 0 the
        sample's own row (the positive), then K uniform draws from all N rows."""
        n, k = self.student_bank.shape[0], self.cfg.num_negatives
        # The global RNG draws the negatives: the engine seeds it and checkpoints its state.
        # Indexing copies the rows, so the bank update after the loss cannot disturb autograd.
        if self.cfg.shared_negatives:
            neg = torch.randint(n, (k,), device=index.device)
            out = []
            for bank, emb in ((self.teacher_bank, emb_s), (self.student_bank, emb_t)):
                positive = (bank[index] * emb).sum(dim=1, keepdim=True)
                out.append(torch.cat([positive, emb @ bank[neg].T], dim=1))
            return out[0], out[1]
        idx = torch.randint(n, (len(index), k + 1), device=index.device)
        idx[:, 0] = index
        return (torch.einsum("bkd,bd->bk", self.teacher_bank[idx], emb_s),
                torch.einsum("bkd,bd->bk", self.student_bank[idx], emb_t))

    @torch.no_grad()
    def update_banks(self, index: Tensor, emb_s: Tensor, emb_t: Tensor) -> None:
        """Rows `index` <- normalise(m · row + (1 − m) · embedding), in both banks.

        Under DDP every rank applies every rank's rows, so the banks stay one global bank
        (as in a single process with the same global batch), not one stale bank per rank."""
        index, emb_s, emb_t = self.collectives.all_gather_rows(index, emb_s, emb_t)
        m = self.cfg.momentum
        for bank, emb in ((self.student_bank, emb_s), (self.teacher_bank, emb_t)):
            rows = bank.index_select(0, index).mul_(m).add_(emb.to(bank.dtype), alpha=1 - m)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        assert out.teacher_logits is not None, "crd needs teacher outputs"
        s = self.scalars(progress)
        emb_s = self.embed_s(out.student_feats[self.cfg.student_layer])
        emb_t = self.embed_t(out.teacher_feats[self.cfg.teacher_layer])
        index = batch["index"].to(self.student_bank.device)
        scores_s, scores_t = self.scores(index, emb_s, emb_t)
        contrast = self.contrast(scores_s, 0) + self.contrast(scores_t, 1)
        if self.training:  # never during a validation forward
            self.update_banks(index, emb_s.detach(), emb_t.detach())
        terms = {"crd": s["weight"] * contrast,
                 "ce": s["ce_weight"] * hard_cross_entropy(out.student_logits, batch["label"])}
        if bounds(self.cfg.kd_weight)[1] > 0:  # a fixed set of terms for the whole run
            terms["kd"] = s["kd_weight"] * kd_kl(out.student_logits, out.teacher_logits,
                                                 temperature=s["temperature"])
        return terms
