"""The method contract. A method reads named layers, owns its adapters and returns named terms.

A method is an `nn.Module` so that `method.parameters()` is exactly its extra trainable set
(adapters, projectors, a data-free generator); the engine optimises those and steps every
optimiser. It calls `loss_terms` once per micro-batch and sums the returned, already-weighted
terms. No method inherits from another: they compose the pure functions in `kdistill.losses`.

A method imports only `losses`, `capture`, `adapters`, `schedules`, `types`, `errors`, this
module and the models it owns: what it needs of the run (the other ranks, the data's decoding
and storage) comes in through `Collectives` and `DataTools`, defined here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from kdistill.losses import hard_cross_entropy, mixed_cross_entropy
from kdistill.schedules import Progress
from kdistill.types import Batch, DataSplits


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


def label_loss(logits: Tensor, batch: Batch, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of (N, C) logits with the batch's labels; a batch of mixed views (keys
    "label_b" and "mix", from a transfer set with mixup or CutMix) is scored against the same
    mix of its two labels (`mixed_cross_entropy`)."""
    if "mix" in batch:
        return mixed_cross_entropy(logits, batch["label"], batch["label_b"], batch["mix"],
                                   label_smoothing=label_smoothing)
    return hard_cross_entropy(logits, batch["label"], label_smoothing=label_smoothing)


class MethodConfig(BaseModel):
    """Base of every method's typed config; each method narrows `name` to a Literal."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


Nets = Literal["cnn", "transformer", "llama", "bert", "seq2seq", "embedding"]


@dataclass(frozen=True)
class Example:
    """The method's tiny training example: the contract test (tests/test_methods.py) builds the
    method from `config` (`name` left out) and trains it one epoch on the `nets` of a fixed menu:

    - "cnn": images (1, 8, 8), 10 classes; `nn.Sequential` CNNs (conv "0", relu "1", conv "2",
      relu "3", flatten "4", linear "5"), student channels (3, 6), teacher (4, 8).
    - "transformer": the same images; zoo `TinyTransformer`s (depth 2, student width 8 with 2
      heads, teacher 16 with 4), probabilities at `blocks.<i>.attn.probs`.
    - "llama": token blocks (B, 9) over 20 tokens (labels = ids); tiny Llama LMs.
    - "bert": padded ids (B, 12) over 100 tokens, 10 classes; a 1-layer text student and a
      2-layer random BERT teacher, token states at `tokens.<k>`.
    - "seq2seq": packed translation rows (B, 2, 9) over 20 tokens; tiny encoder-decoders
      (student 1 layer each side, teacher 2), `decoder.<i>.cross_attn.probs`.
    - "embedding": the "cnn" student; a teacher whose output is a (B, 12) "embedding".
    """

    config: dict[str, Any] = field(default_factory=dict)
    nets: Nets = "cnn"


class Collectives:
    """What a method may ask of the other training processes: per-sample state such as CRD's
    memory banks must see every rank's rows. This default is one process; under torchrun the
    engine sets `method.collectives` to one over the process group for the run's duration."""

    world: int = 1  # processes training together

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """`x` summed over ranks (in place when distributed); returned for chaining."""
        return x

    def all_gather_rows(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Each tensor's rows from every rank, concatenated in rank order."""
        return tensors


SINGLE_PROCESS = Collectives()


@dataclass(frozen=True)
class Auxiliary:
    """A second network a method trains against the student (a data-free generator), declared
    by `Method.auxiliary` and stepped by the engine with the student's `clip_grad_norm`, the same
    non-finite checks and the same LR-schedule multiplier; its optimiser state is checkpointed.

    On every `every`-th student step (steps 0, every, 2·every, ...) the engine takes `steps`
    updates before each micro-batch is prepared (`prepare_batch`): the gradient of the sum of
    `loss_terms(batch, student, progress)` (named, weighted scalars) w.r.t. `parameters` only,
    so none lands on student or teacher. Terms are logged as `<name>/<term>`.
    """

    name: str
    parameters: list[nn.Parameter]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    loss_terms: Callable[[Batch, nn.Module, Progress], dict[str, Tensor]]
    steps: int = 1
    every: int = 1


class DataTools(Protocol):
    """What `prepare_data` may use; the pipeline provides it (methods do no I/O and know no
    task)."""

    echo: Callable[[str], None]

    def fingerprint(self, model: nn.Module) -> str:
        """A hash of the model's weights."""
        ...

    def cached_tensors(self, name: str, make: Callable[[], dict[str, Tensor]]
                       ) -> dict[str, Tensor]:
        """Load `name` from the method's directory in the run, or call make() and store it
        atomically."""
        ...

    def decode(self, model: nn.Module, inputs: Tensor, *, beam: int, length_penalty: float,
               batch_size: int) -> Tensor:
        """The task's decoding of `inputs` (a split's x, e.g. `splits.train_x` of seq2seq data
        (N, 2, L)): (N, L-1) int64 ids y1..yn EOS then PAD (what
        `kdistill.tasks.decode.translate` returns)."""
        ...

    def with_decoded_targets(self, splits: DataSplits, ids: Tensor, key: str) -> DataSplits:
        """The same splits whose training targets are the decoded ids (EOS/PAD stripped by the
        task), fingerprint changed by `key`."""
        ...


class Method(nn.Module):
    """Subclass, set `config_type`, `paper` and `example`, and implement `loss_terms`.

    Every other member has a default; docs/methods.md lists the hooks and when to override.
    """

    # What the method is: read by the config checks, the pipeline and the contract test.
    config_type: ClassVar[type[MethodConfig]]
    paper: ClassVar[str] = ""
    example: ClassVar[Example] = Example()
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # the DataSplits.task it fits
    uses_teacher: ClassVar[bool] = True  # False: trained without teacher outputs
    multi_teacher: ClassVar[bool] = False  # teacher_logits stacked (K, B, C), one per teacher
    reads_topk: ClassVar[bool] = False  # loss_terms accepts Outputs.teacher_topk
    on_policy: ClassVar[bool] = False  # prepare_batch makes new inputs: the teacher runs online
    # loss_terms scores mixed inputs (a transfer set's mixup / CutMix views: batch "label_b",
    # "mix") through `label_loss`; other methods are refused such a transfer set
    mixed_inputs: ClassVar[bool] = False

    # The other training processes; the engine replaces it under torchrun.
    collectives: Collectives = SINGLE_PROCESS

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg

    # -- the layers it reads and the adapters it owns ------------------------------------------

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

    # -- every step ------------------------------------------------------------------------------

    def loss_terms(self, out: Outputs, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        """Named, already-weighted scalar loss terms; the engine sums them."""
        raise NotImplementedError

    def batch_items(self, batch: Batch) -> int:
        """How many items `loss_terms`' means run over: the engine weights each micro-batch of
        an accumulation window by its share of the window's items, so the step's loss is the
        mean over the whole window. Samples here; valid tokens for token-level losses."""
        return len(batch["label"])

    def scalars(self, progress: Progress) -> dict[str, float]:
        """Scheduled hyper-parameter values at this point, for logging (e.g. temperature)."""
        return {}

    # -- optional: other data, another optimiser, files ------------------------------------------

    def prepare_data(self, splits: DataSplits, teacher: nn.Module,
                     tools: DataTools) -> DataSplits:
        """The data the distilled student trains on, made once from the trained teacher before
        the teacher cache (which is then built on it) and every seed's distillation stage; the
        baseline keeps the original. Sequence-level KD (arXiv:1606.07947) replaces the training
        targets with the teacher's beam-search outputs here, through `tools` (decoding, a
        stored cache keyed by teacher and data). The default: the data as it is."""
        return splits

    def prepare_batch(self, batch: Batch, student: nn.Module, progress: Progress) -> Batch:
        """The batch the step trains on. On-policy methods (`on_policy = True`: GKD,
        arXiv:2306.13649; data-free generators) return new inputs here, made without gradients
        under the engine's seeded RNG; every other method returns `batch` unchanged."""
        return batch

    def auxiliary(self) -> Auxiliary | None:
        """A second network trained against the student with its own optimiser and loss, which
        the engine steps (see `Auxiliary`); None for almost every method."""
        return None

    def save_artifacts(self, stage_dir: Path) -> list[Path]:
        """Files that show what the method learned, written into the finished stage's
        directory for the report (e.g. a data-free generator's samples); none by default."""
        return []

    # -- derived (not a hook) ------------------------------------------------------------------

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """What the student's optimizer trains besides the student: the method's parameters
        except an auxiliary network's (the engine steps those with their own optimizer; they
        stay in `state_dict()`, so checkpoints carry them)."""
        aux = self.auxiliary()
        own = {id(p) for p in aux.parameters} if aux is not None else set()
        return [p for p in self.parameters() if id(p) not in own]
