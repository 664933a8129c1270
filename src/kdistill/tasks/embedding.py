"""Sentence embeddings (general, task-agnostic distillation of an encoder): ids (N, T) ->
embeddings (N, D); no labels: held-out texts are scored against the teacher's embeddings.

Data of task "embedding" (`kdistill.data.general_text`) has no labels, so the evaluate stage
asks other questions than accuracy on its test split (`evaluate_encoders`), for the teacher,
the distilled student of each seed, and that seed's student before distillation ("untrained":
its initialisation, the same weights the student stage started from):

- cosine agreement: the mean cosine similarity between a model's embedding and the teacher's
  on the held-out unlabelled texts (the test split; 1 for the teacher by definition);
- linear probe: scikit-learn's LogisticRegression (lbfgs, `transfer.probe_c`, a fixed seed) on
  the frozen, L2-normalised embeddings of the labelled task's training texts, scored on its
  test texts; the encoder is never trained here;
- fine-tuning (`transfer.finetune`): each student encoder, distilled and untrained, gets a new
  linear head and is trained with CE on the task, same budget and head initialisation,
  through the pipeline's stage machinery (a `Finetune` callback: fingerprinted, resumable);
  its test accuracy shows whether the general step pays off once the task's labels are used.
  The teacher is not fine-tuned (its row shows the probe only).

Rows (`{role: [row per seed]}`, roles "teacher", "untrained", "student") hold `cosine`,
`probe_accuracy`, `finetune_accuracy`, `params`, `bytes`, `latency_ms`, `throughput`; the
Markdown and HTML reports show them with mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from kdistill.data.fortune_classes import fortune_splits
from kdistill.errors import ConfigError
from kdistill.evaluate import classification_scores, measure_speed, predict
from kdistill.losses.embedding import mean_cosine
from kdistill.models import count_parameters
from kdistill.tasks.base import Evaluated, Evaluation, Task
from kdistill.types import DataSplits, Echo

if TYPE_CHECKING:  # type hints only: the config imports the tasks (their checks)
    from kdistill.config import EvalConfig, RunConfig, TransferConfig

# (role, encoder, seed) -> the fine-tuned classifier (`EncoderWithHead`)
Finetune = Callable[[str, nn.Module, int], nn.Module]
Rows = dict[str, list[dict[str, Any]]]


def with_teacher_targets(splits: DataSplits, teacher: nn.Module, *, batch_size: int
                         ) -> DataSplits:
    """`splits` whose held-out "labels" are the teacher's embeddings (N, D) of those texts:
    what a student is scored against on unlabelled text (the training split keeps -1; the
    teacher cache provides its targets)."""
    return dataclasses.replace(splits,
                               val_y=predict(teacher, splits.val_x, batch_size=batch_size),
                               test_y=predict(teacher, splits.test_x, batch_size=batch_size))


def embedding_scores(model: nn.Module, x: Tensor, targets: Tensor, *, batch_size: int = 1000
                     ) -> dict[str, float]:
    """`cosine`: the mean cosine between the model's embeddings of x (N, T) and targets (N, D)
    (the teacher's); the widths must be equal (an unprojected narrower student has no score)."""
    out = predict(model, x, batch_size=batch_size)
    if out.shape != targets.shape:
        return {}
    return {"cosine": mean_cosine(out, targets)}


class EncoderWithHead(nn.Module):
    """A sentence encoder (ids -> (B, D)) + dropout + a linear head: ids -> logits (B, C)."""

    def __init__(self, encoder: nn.Module, width: int, num_classes: int, *, dropout: float
                 ) -> None:
        super().__init__()
        self.encoder = encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.drop(self.encoder(ids)))


def with_head(encoder: nn.Module, num_classes: int, example: Tensor, *, dropout: float
              ) -> EncoderWithHead:
    """`encoder` (the module itself, not a copy) with a new head of its probed width."""
    width = predict(encoder, example[:1]).shape[1]
    return EncoderWithHead(encoder, width, num_classes, dropout=dropout)


def probe_accuracy(model: nn.Module, task: DataSplits, *, c: float, batch_size: int,
                   seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe on the frozen, L2-normalised embeddings
    of `task`'s training texts (N, D); the model itself is not changed."""
    from sklearn.linear_model import LogisticRegression  # sklearn: ~1 s to import

    def features(x: Tensor) -> Any:
        return nn.functional.normalize(predict(model, x, batch_size=batch_size), dim=1).numpy()

    probe = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    probe.fit(features(task.train_x), task.train_y.numpy())
    predicted = probe.predict(features(task.test_x))
    return float((torch.from_numpy(predicted) == task.test_y).float().mean())


def _row(model: nn.Module, weights: Path | None, splits: DataSplits, task: DataSplits | None,
         transfer: TransferConfig | None, eval_cfg: EvalConfig) -> dict[str, Any]:
    row: dict[str, Any] = embedding_scores(model, splits.test_x, splits.test_y,
                                           batch_size=eval_cfg.batch_size)
    if task is not None and transfer is not None:
        row["probe_accuracy"] = probe_accuracy(model, task, c=transfer.probe_c,
                                               batch_size=eval_cfg.batch_size)
    row["params"] = count_parameters(model)
    row["bytes"] = weights.stat().st_size if weights is not None and weights.is_file() else None
    row.update(measure_speed(model, splits.test_x, throughput_batch=eval_cfg.throughput_batch,
                             repeats=eval_cfg.latency_repeats))
    return row


def evaluate_encoders(
    *,
    splits: DataSplits,
    task: DataSplits | None,
    transfer: TransferConfig | None,
    eval_cfg: EvalConfig,
    teacher: nn.Module,
    teacher_weights: Path,
    students: Sequence[nn.Module],
    seeds: Sequence[int],
    student_weights: Callable[[int], Path],
    untrained: Callable[[int], nn.Module],
    finetune: Finetune | None,
    echo: Echo = print,
) -> Rows:
    """The evaluate stage's rows for general distillation (see the module docstring).

    Args:
        splits: the unlabelled data, `test_y` the teacher's embeddings (`with_teacher_targets`).
        task: the labelled transfer task, or None (then cosine agreement only).
        students: the distilled student of each seed in `seeds`.
        student_weights: seed -> the student stage's weights file (its size on disk).
        untrained: seed -> the student as initialised for that seed, before distillation.
        finetune: (role, encoder, seed) -> the encoder fine-tuned on `task` with a new head;
            None skips fine-tuning.
    """
    echo("evaluate: cosine agreement on held-out text" + (
        f", linear probe on '{task.name}'" if task is not None else "")
         + (", fine-tuning" if finetune is not None else ""))
    rows: Rows = {"teacher": [{**_row(teacher, teacher_weights, splits, task, transfer,
                                      eval_cfg), "seed": None}],
                  "untrained": [], "student": []}
    for seed, student in zip(seeds, students, strict=True):
        for role, model, weights in (("untrained", untrained(seed), None),
                                     ("student", student, student_weights(seed))):
            row = _row(model, weights, splits, task, transfer, eval_cfg)
            if finetune is not None and task is not None:
                tuned = finetune(role, model, seed)
                logits = predict(tuned, task.test_x, batch_size=eval_cfg.batch_size)
                row["finetune_accuracy"] = classification_scores(logits, task.test_y)["accuracy"]
            rows[role].append({**row, "seed": seed})
    return rows


def transfer_data(cfg: RunConfig) -> DataSplits | None:
    """The labelled task that evaluates a general encoder (`transfer`), tokenised like the
    unlabelled text; None without `transfer`."""
    if cfg.transfer is None:
        return None
    from kdistill.models.hf import load_tokenizer

    t, data = cfg.transfer, cfg.data
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("data.tokenizer", "transfer needs the tokenizer of the unlabelled text")
    return fortune_splits(t.task, load_tokenizer(tokenizer), seq_len=data.seq_len,
                          val_size=t.val_size, test_size=t.test_size,
                          split_seed=data.split_seed, where="transfer")


class Embedding(Task):
    name: ClassVar[str] = "embedding"
    output_name: ClassVar[str] = "sentence embeddings"
    title: ClassVar[str] = "sentence embeddings"

    def check_config(self, cfg: RunConfig) -> None:
        if cfg.compress:
            raise ValueError("compress: the compression chain needs class labels; general "
                             "distillation has none")
        if cfg.baseline:
            raise ValueError("baseline: unlabelled text has no labels to train a baseline on; "
                             "the reference is the same student before distillation (its "
                             "initialisation, evaluated anyway): set baseline: false")
        for field, used in (("generations", cfg.generations > 1),
                            ("more_teachers", cfg.more_teachers)):
            if used:
                raise ValueError(f"{field}: general distillation runs one teacher and one "
                                 "generation")

    def describe(self, splits: DataSplits) -> str:
        return (f"{splits.name}: {len(splits.train_x)} train / {len(splits.val_x)} val / "
                f"{len(splits.test_x)} test, unlabelled texts")

    def check_outputs(self, out: Any, splits: DataSplits, *, where: str) -> None:
        # No classes: any width (the method projects the student's).
        if not isinstance(out, Tensor) or out.dim() != 2 or not out.is_floating_point():
            raise ConfigError(where, "a sentence encoder must return embeddings of shape "
                                     "(batch, width), e.g. arch: hf_sentence_student")

    def check_recipe(self, cfg: RunConfig) -> None:
        transfer_data(cfg)  # the evaluation task's split must exist too

    def output_shape(self, teacher: nn.Module, splits: DataSplits) -> tuple[int, ...]:
        return tuple(predict(teacher, splits.train_x[:1]).shape[1:])

    def validation_scores(self, model: nn.Module, splits: DataSplits, *,
                          batch_size: int) -> dict[str, float]:
        # Held-out "labels": the teacher's embeddings (`prepare_evaluation`).
        return embedding_scores(model, splits.val_x, splits.val_y, batch_size=batch_size)

    def prepare_evaluation(self, splits: DataSplits, teacher: nn.Module, *,
                           batch_size: int) -> DataSplits:
        return with_teacher_targets(splits, teacher, batch_size=batch_size)

    def evaluate(self, ev: Evaluation) -> Evaluated:
        """Cosine agreement, the linear probe and (with `transfer.finetune`) fine-tuning, for
        the teacher, each seed's student and that student before distillation."""
        cfg, task = ev.cfg, transfer_data(ev.cfg)
        finetune = None
        if task is not None and cfg.transfer is not None and cfg.transfer.finetune is not None \
                and ev.finetune is not None:
            tune = ev.finetune

            def finetune(role: str, model: nn.Module, seed: int) -> nn.Module:
                return tune(role, model, seed, task)

        rows = evaluate_encoders(
            splits=ev.splits, task=task, transfer=cfg.transfer, eval_cfg=cfg.eval,
            teacher=ev.models["teacher"][0], teacher_weights=ev.weights("teacher", 0),
            students=ev.models["student"], seeds=ev.seeds,
            student_weights=lambda seed: ev.weights("student", ev.seeds.index(seed)),
            untrained=ev.initial_student, finetune=finetune, echo=ev.echo)
        return Evaluated(rows)
