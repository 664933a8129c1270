"""The task contract: what one kind of data means for models, the cache and evaluation.

A task answers the questions the run and the engine would otherwise answer by comparing a
task name: what a model must output for this data, the shape of one sample's teacher output
(what the cache stores), the validation scores logged during training, the test row of the
report, samples of what a model produces, and (seq2seq) decoding. `DataSplits.task` names
the task; `kdistill.tasks.task_of(splits)` returns it. Adding a task: one file in `tasks/`,
its data source in `data/`, and a recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.types import DataSplits, Echo

if TYPE_CHECKING:  # type hints only: the config imports the tasks (their checks)
    from kdistill.config import RunConfig

Rows = dict[str, list[dict[str, Any]]]  # role -> one row per seed (teachers: one row)


@dataclass
class Evaluation:
    """What the evaluate stage hands a task: the trained models and how to find their files.

    Args:
        models: role -> models ("teacher", "teacher-2", "baseline", "student", ...); a
            teacher role holds one model, the others one per seed in `seeds` order.
        teacher_roles: the roles that are teachers (evaluated without a teacher reference).
        weights: (role, index) -> the stage's weights file (its size on disk is reported).
        initial_student: seed -> the student exactly as initialised for that seed.
        finetune: (role, encoder, seed, task data) -> the encoder fine-tuned with a new head
            on a labelled task, as a resumable stage; None when the recipe asks for none.
    """

    cfg: RunConfig
    splits: DataSplits
    models: dict[str, list[nn.Module]]
    teacher_roles: list[str]
    seeds: list[int]
    weights: Callable[[str, int], Path]
    initial_student: Callable[[int], nn.Module]
    finetune: Callable[[str, nn.Module, int, DataSplits], nn.Module] | None = None
    echo: Echo = print


@dataclass
class Evaluated:
    """The evaluate stage's result: report rows and samples (what models produce, as text)."""

    rows: Rows
    samples: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the run's, added after evaluation


class Task:
    """Base of the four tasks; a subclass overrides what differs from classification."""

    name: ClassVar[str]
    token_level: ClassVar[bool] = False  # labels (N, T), shifted; IGNORE_INDEX positions skipped
    output_name: ClassVar[str] = "logits"  # what the teacher cache holds, for the log
    title: ClassVar[str]  # how `kdistill methods` names the data a method is for
    compressible: ClassVar[bool] = False  # the `compress:` chain (prune, quantize) applies

    def check_config(self, cfg: RunConfig) -> None:
        """Recipe rules of this kind of data, checked when the recipe is read: a ValueError
        whose message starts with the field (the schema's validator raises it)."""
        if cfg.compress and not self.compressible:
            raise ValueError(f"compress: the compression chain needs class labels; "
                             f"'{cfg.data.name}' is {self.name} data")
        if cfg.transfer is not None:
            raise ValueError(f"transfer: evaluates a general encoder; it needs unlabelled text "
                             f"(data.name: general_text), not '{cfg.data.name}'")

    def describe(self, splits: DataSplits) -> str:
        """The data line the run prints first."""
        return (f"{splits.name}: {len(splits.train_x)} train / {len(splits.val_x)} val / "
                f"{len(splits.test_x)} test, {splits.num_classes} classes")

    def check_outputs(self, out: Any, splits: DataSplits, *, where: str) -> None:
        """Raise a ConfigError naming `where` unless `out` (a model's output on two training
        samples) is what this task needs."""
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ConfigError(where, "the model must return logits of shape (batch, classes)")
        if out.shape[1] != splits.num_classes:
            raise ConfigError(where, f"outputs {out.shape[1]} classes but data "
                                     f"'{splits.name}' has {splits.num_classes}")

    def check_recipe(self, cfg: RunConfig) -> None:
        """Checks that need files (a tokenizer) but no model; none by default."""

    def output_shape(self, teacher: nn.Module, splits: DataSplits) -> tuple[int, ...]:
        """One sample's teacher output shape (*P, C): what the teacher cache stores per row."""
        return (splits.num_classes,)

    def validation_scores(self, model: nn.Module, splits: DataSplits, *,
                          batch_size: int) -> dict[str, float]:
        """The scalars logged with `split: "val"` at epoch ends."""
        raise NotImplementedError

    def save_artifacts(self, splits: DataSplits, write: Callable[[str, str], None]) -> None:
        """Files the run directory needs to read the data back (`write(name, text)`)."""

    def prepare_evaluation(self, splits: DataSplits, teacher: nn.Module, *,
                           batch_size: int) -> DataSplits:
        """The splits evaluation scores against (the teacher's targets where there are no
        labels); the data as it is by default."""
        return splits

    def reference(self, teacher: nn.Module, ev: Evaluation) -> Tensor | None:
        """What the other models' agreement with the teacher is computed from."""
        return None

    def test_row(self, model: nn.Module, weights: Path, reference: Tensor | None,
                 ev: Evaluation) -> tuple[dict[str, Any], Any]:
        """One model's report row on the test split, and what it produced (for samples)."""
        raise NotImplementedError

    def at_chance(self, row: dict[str, Any], splits: DataSplits) -> str | None:
        """Why a model's test row is no better than guessing (for the run's warnings), or
        None; tasks without a notion of chance say None."""
        return None

    def samples(self, ev: Evaluation, produced: dict[str, Any]) -> list[dict[str, str]]:
        """What models produce as text, for the report; none by default."""
        return []

    def evaluate(self, ev: Evaluation) -> Evaluated:
        """Every model's test row (teachers without a reference), then the samples."""
        reference = self.reference(ev.models["teacher"][0], ev)
        rows: Rows = {}
        produced: dict[str, Any] = {}
        for role, trained in ev.models.items():
            is_teacher = role in ev.teacher_roles
            for i, model in enumerate(trained):
                row, out = self.test_row(model, ev.weights(role, i),
                                         None if is_teacher else reference, ev)
                row["seed"] = None if is_teacher else ev.seeds[i]
                rows.setdefault(role, []).append(row)
                produced.setdefault(role, out)  # the first seed's
        return Evaluated(rows, self.samples(ev, produced))

    # Decoding: only tasks whose models generate sequences (seq2seq) have it.
    def decode(self, model: nn.Module, inputs: Tensor, *, beam: int, length_penalty: float,
               batch_size: int) -> Tensor:
        raise ConfigError("method", f"{self.name} data has no decoding (a method that decodes "
                                    "the teacher's outputs needs translation data)")

    def with_decoded_targets(self, splits: DataSplits, ids: Tensor, key: str) -> DataSplits:
        raise ConfigError("method", f"{self.name} data has no decoded targets")


@torch.no_grad()
def forward_eval(model: nn.Module, x: Any) -> Any:
    """`model(x)` in eval mode without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)
