"""Sequence-level knowledge distillation (Kim & Rush 2016, arXiv:1606.07947).

The student is trained on the teacher's beam-search translations of the training sources in
place of the human references: it learns the teacher's mode (one consistent output per
source) rather than every variation in the data, which is easier for a small model. Made once
per teacher by `prepare_data` (the engine and the pipeline know nothing about it) through the
task's decoding and the run's storage (`DataTools`); optionally mixed with word-level KD on
the new targets (Kim & Rush's "Seq-KD + Word-KD")."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from kdistill.losses import (
    hard_cross_entropy,
    shift_labels,
    token_distill_loss,
    topk_distill_loss,
)
from kdistill.methods.base import Batch, DataTools, Example, Method, MethodConfig, Outputs
from kdistill.schedules import Progress, Temperature, UnitWeight, value_at
from kdistill.types import IGNORE_INDEX, DataSplits


class SeqKDConfig(MethodConfig):
    """Train on the teacher's beam outputs: loss = (1 − α)·CE(teacher's sequence)
    + α·T²·KL(teacher_T ‖ student_T) per token of that sequence (α = 0: pure Seq-KD, the
    teacher is then not read during training). Beam `beam`, final choice by summed
    log-probability / length^length_penalty (`kdistill.tasks.decode.beam_search`)."""

    name: Literal["seq_kd"] = "seq_kd"
    beam: int = Field(4, ge=1, description="beam size for the teacher's training targets")
    length_penalty: float = Field(1.0, ge=0.0)
    decode_batch: int = Field(128, ge=1, description="sentences decoded at once")
    alpha: UnitWeight = 0.0
    temperature: Temperature = 1.0


class SeqKD(Method):
    """Cross-entropy on the teacher's beam-search translations (+ optional word-level KD)."""

    config_type = SeqKDConfig
    tasks = ("seq2seq",)
    reads_topk = True
    paper = "Kim & Rush 2016, Sequence-Level Knowledge Distillation (arXiv:1606.07947)"
    # Word-level KD on the teacher's targets too (alpha 0: CE only).
    example = Example({"alpha": 0.5}, nets="seq2seq")
    cfg: SeqKDConfig

    @property
    def uses_teacher(self) -> bool:  # type: ignore[override]
        # Pure Seq-KD reads the teacher only through its decoded targets (prepare_data).
        return not (isinstance(self.cfg.alpha, int | float) and self.cfg.alpha == 0)

    def prepare_data(self, splits: DataSplits, teacher: nn.Module,
                     tools: DataTools) -> DataSplits:
        settings = {"beam": self.cfg.beam, "length_penalty": self.cfg.length_penalty}
        key = hashlib.sha256(json.dumps([tools.fingerprint(teacher), splits.fingerprint,
                                         settings]).encode()).hexdigest()[:16]

        def decode() -> dict[str, Tensor]:
            tools.echo(f"seq_kd: beam-{self.cfg.beam} translations of {len(splits.train_x)} "
                       "training sources by the teacher (once)")
            return {"targets": tools.decode(teacher, splits.train_x, beam=self.cfg.beam,
                                            length_penalty=self.cfg.length_penalty,
                                            batch_size=self.cfg.decode_batch)}

        ids = tools.cached_tensors(f"seq_kd-{key}", decode)["targets"]
        return tools.with_decoded_targets(splits, ids, f"seq_kd|{key}")

    def batch_items(self, batch: Batch) -> int:
        return int((batch["label"][:, 1:] != IGNORE_INDEX).sum())

    def scalars(self, progress: Progress) -> dict[str, float]:
        return {"temperature": value_at(self.cfg.temperature, progress),
                "alpha": value_at(self.cfg.alpha, progress)}

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        s = self.scalars(progress)
        labels = shift_labels(batch["label"], ignore_index=IGNORE_INDEX)
        if not self.uses_teacher:
            return {"ce": hard_cross_entropy(out.student_logits, labels,
                                             ignore_index=IGNORE_INDEX)}
        kwargs = {"alpha": s["alpha"], "temperature": s["temperature"], "kind": "forward_kl"}
        if out.teacher_topk is not None:
            res = topk_distill_loss(out.student_logits, *out.teacher_topk, labels,
                                    missing="renormalize", **kwargs)
        else:
            assert out.teacher_logits is not None, "seq_kd with alpha > 0 reads the teacher"
            res = token_distill_loss(out.student_logits, out.teacher_logits, labels, **kwargs)
        return {"kd": s["alpha"] * res.kd, "ce": (1 - s["alpha"]) * res.ce}

