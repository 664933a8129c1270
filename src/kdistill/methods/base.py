"""The method contract. A method reads named layers, owns its adapters and returns named terms.

A method is an `nn.Module` so that `method.parameters()` is exactly its extra trainable set
(adapters, projectors); the engine optimises those together with the student. The engine calls
`loss_terms` once per micro-batch and sums the returned, already-weighted terms. No method
inherits from another: they compose the pure functions in `kdistill.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kdistill.schedules import Progress
from kdistill.types import Batch

if TYPE_CHECKING:  # data imports nothing from methods, but keep the method contract light
    from kdistill.types import DataSplits

"""A batch: `index` (B,) sample ids into the training set, `input` (B, ...), `label` (B,)."""


@dataclass
class Outputs:
    """What one forward produced: logits and captured features of student and teacher."""

    student_logits: Tensor
    teacher_logits: Tensor | None = None  # None when the method uses no teacher
    student_feats: dict[str, Tensor] = field(default_factory=dict)
    teacher_feats: dict[str, Tensor] = field(default_factory=dict)
    # From a top-k teacher cache, instead of `teacher_logits` (then None): the teacher's k
    # largest log-probabilities at T = 1 (B, T, k) float32 and their indices (B, T, k) int64.
    teacher_topk: tuple[Tensor, Tensor] | None = None


class DataTools(Protocol):
    """What `prepare_data` may use; the pipeline provides it (methods do no I/O and know no
    task)."""

    echo: Callable[[str], None]

    def fingerprint(self, model: nn.Module) -> str:
        """A hash of the model's weights."""
        ...

    def cached_tensors(self, name: str, make: Callable[[], dict[str, Tensor]]
                       ) -> dict[str, Tensor]:
        """`name` from the method's directory in the run, or `make()` stored atomically."""
        ...

    def decode(self, model: nn.Module, inputs: Tensor, *, beam: int, length_penalty: float,
               batch_size: int) -> Tensor:
        """The task's decoding of a split's inputs: (N, L - 1) ids y1 .. yn EOS, then PAD."""
        ...

    def with_decoded_targets(self, splits: DataSplits, ids: Tensor, key: str) -> DataSplits:
        """`splits` whose training targets are the decoded `ids`; fingerprint changed by `key`."""
        ...


class MethodConfig(BaseModel):
    """Base of every method's typed config; each method narrows `name` to a Literal."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


class Method(nn.Module):
    """Subclass, set `config_type`, and implement `loss_terms`."""

    config_type: ClassVar[type[MethodConfig]]
    uses_teacher: ClassVar[bool] = True
    # Multi-teacher methods get `Outputs.teacher_logits` stacked as (K, B, C), one per teacher.
    multi_teacher: ClassVar[bool] = False
    # Data tasks the method's loss is defined for (DataSplits.task).
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    paper: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def student_layers(self) -> tuple[str, ...]:
        """Student modules whose outputs `loss_terms` reads (via `Outputs.student_feats`)."""
        return ()

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """Teacher modules whose outputs `loss_terms` reads (via `Outputs.teacher_feats`)."""
        return ()

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: Tensor, *,
              num_samples: int | None = None) -> None:
        """Create adapters once the models are known (shapes probed on `example`, a batch of
        inputs; `num_samples`: the training-set size, for per-sample buffers such as a memory
        bank indexed by `batch["index"]`). Called before the optimizer is built, so adapters
        get trained; a no-op for methods without adapters."""

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        """Named, already-weighted scalar loss terms; the engine sums them."""
        raise NotImplementedError

    # True when `loss_terms` accepts `Outputs.teacher_topk` (a top-k teacher cache).
    reads_topk: ClassVar[bool] = False

    def prepare_data(self, splits: DataSplits, teacher: nn.Module, tools: DataTools
                     ) -> DataSplits:
        """The data the distilled student trains on, made once from the trained teacher before
        the teacher cache (which is then built on it) and every seed's distillation stage; the
        baseline keeps the original. Sequence-level KD (arXiv:1606.07947) replaces the training
        targets with the teacher's beam-search outputs here. `directory` is the method's own
        place in the run directory for what it computes (written atomically, keyed by teacher
        and data so a changed teacher redoes it). The default: the data as it is."""
        return splits

    # True when `prepare_batch` makes new inputs: the teacher must then run online.
    on_policy: ClassVar[bool] = False

    def prepare_batch(self, batch: Batch, student: nn.Module, progress: Progress) -> Batch:
        """The batch the step trains on. On-policy methods (GKD, arXiv:2306.13649) return the
        student's own continuations here (sampled without gradients, under the engine's
        seeded RNG); every other method returns `batch` unchanged."""
        return batch

    def save_artifacts(self, stage_dir: Path) -> list[Path]:
        """Files that show what the method learned, written into the finished stage's
        directory for the report (e.g. a data-free generator's samples); none by default."""
        return []

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """What the student's optimizer trains besides the student: the adapters, by default
        all of `parameters()`. A method with a network trained against the student (a
        data-free generator) leaves it out here and steps it with its own optimizer; it stays
        in `state_dict()`, so checkpoints still carry it."""
        return list(self.parameters())

    def batch_items(self, batch: Batch) -> int:
        """How many items `loss_terms`' means run over: the engine weights each micro-batch of
        an accumulation window by its share of the window's items, so the step's loss is the
        mean over the whole window. Samples here; valid tokens for token-level losses."""
        return len(batch["label"])

    def scalars(self, progress: Progress) -> dict[str, float]:
        """Scheduled hyper-parameter values at this point, for logging (e.g. temperature)."""
        return {}
