"""The recipe schema: pydantic models with extra="forbid", one section a class.

`RunConfig()` with no arguments *is* the built-in default recipe (`kdistill run` with no
arguments); `recipes/default.yaml` spells the same values out and a test keeps them equal.
Checks that need only the recipe live here as validators (a method on the wrong kind of data,
compression of a language model, duplicate seeds); checks that need files or models are made
when the run builds them (`kdistill.build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from kdistill.config.compress import CompressStage, check_order
from kdistill.config.sections import CacheConfig, EvalConfig, _Strict
from kdistill.data import SOURCES, BuiltinImages
from kdistill.data.transfer_config import TransferSetConfig
from kdistill.data.unlabelled_texts import UnlabelledTexts
from kdistill.devices import DEVICE_PATTERN
from kdistill.errors import ConfigError
from kdistill.methods import METHODS
from kdistill.rundir import MAX_NAME, check_run_name
from kdistill.schedules import Schedule, check_range
from kdistill.tasks import TASKS

# Causal-LM sources of plain text: every token is scored (no masked prompts).
PLAIN_TEXT_SOURCES = ("stdlib_docs", "fortunes", "text_files")
# Archs that are pretrained by construction (their weights come with them).
PRETRAINED_ARCHS = ("hf_causal_lm", "projected_lm", "hf_seq2seq", "hf_sentence_encoder")


class ModelSpec(_Strict):
    """A model by registry name (`kdistill.models.MODELS`), or `custom` with an import target."""

    arch: str
    args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="state dict to load (.safetensors or .pt)")
    target: str | None = Field(None, description="'package.module:Class' for arch: custom")


# One discriminated union over every data source's own config (`kdistill.data.SOURCES`): a
# field that a source does not use is an unknown key.
DataConfig = Annotated[
    Union[tuple(dict.fromkeys(SOURCES.values()))],  # noqa: UP007 - built at run time
    Field(discriminator="name"),
]


# `transfer_set.unlabelled`: any data source, or the user's texts without labels.
UnlabelledConfig = Annotated[
    Union[tuple(dict.fromkeys([*SOURCES.values(), UnlabelledTexts]))],  # noqa: UP007
    Field(discriminator="name"),
]


class RunTransferSet(TransferSetConfig):
    """`transfer_set:` of a run: the views, and optionally another source's inputs."""

    unlabelled: UnlabelledConfig | None = Field(
        None, description="another source's inputs (its labels unused), or the user's texts "
        "(`name: texts`), added to the distilled student's transfer set, labelled by the "
        "teacher only; inputs equal to a training, validation or test input of `data` are "
        "dropped (Tang et al. 2019)")

    def _has_other_inputs(self) -> bool:
        return self.unlabelled is not None


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    # Past 10 no optimiser here trains: such a value is a typo (1e6 for 1e-6), refused.
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class TrainSettings(_Strict):
    """How a network is trained: the engine's settings (`kdistill.engine.train`)."""

    epochs: Annotated[int, Field(ge=1)] = 200
    batch_size: Annotated[int, Field(ge=1)] = 100
    grad_accum: Annotated[int, Field(ge=1)] = 1
    optimizer: OptimizerConfig = OptimizerConfig(lr=0.002)
    lr_schedule: Schedule = Field(
        {"kind": "cosine", "start": 1.0, "end": 0.05},
        description="multiplier on optimizer.lr, e.g. {kind: cosine, start: 1, end: 0}",
    )

    @field_validator("lr_schedule")
    @classmethod
    def _lr_non_negative(cls, v: Schedule) -> Schedule:
        return check_range(v, "lr_schedule", low=0.0)
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = None
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the networks' forward (loss math stays fp32); fp16 "
        "adds a gradient scaler and needs a GPU")
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN, description="auto (CUDA when present, then MPS, else "
        "the CPU), cpu, cuda, cuda:N or mps; under torchrun each rank takes its LOCAL_RANK GPU")
    compile: bool = Field(
        False, description="torch.compile the student's forward and the loss (same values "
        "as eager; the first steps pay the compilation)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp (every rank a full copy) or fsdp (student and "
        "teacher sharded with FSDP2); one process ignores it")
    augment: Literal["none", "jitter"] = Field(
        "none", description="jitter: random shifts of up to jitter_pixels (images only)"
    )
    jitter_pixels: Annotated[int, Field(ge=1)] = 2
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="stop after this many optimizer steps (smoke tests)"
    )
    log_every: Annotated[int, Field(ge=1)] = 50
    eval_every_epochs: Annotated[int, Field(ge=1)] = 10
    checkpoint_every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="also checkpoint mid-epoch; always at each epoch end"
    )




Seed = Annotated[int, Field(ge=0, lt=2**63)]


class TrainConfig(TrainSettings):
    """The students' training (baseline and distilled), once per seed."""

    seeds: list[Seed] = Field([0], min_length=1, description="one baseline and one distilled "
                              "student per seed (mean ± std in the report)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:  # two identical runs would be reported as two seeds
            raise ValueError(f"seed {repeated[0]} appears twice; each seed is one run")
        return seeds


class TeacherTrainConfig(TrainSettings):
    """A teacher trained from the data first: one network, one seed."""

    seed: Seed = Field(0, description="the teacher's initial weights and batch order")
    device: str | None = Field(  # type: ignore[assignment]
        None, pattern=DEVICE_PATTERN, description="where the teacher trains; null: "
        "teacher.device, else train.device")


class FinetuneConfig(TrainSettings):
    """Fine-tuning each encoder on the transfer task; it runs once per `train.seeds` seed, in
    one process (the evaluate stage's)."""

    device: str | None = Field(  # type: ignore[assignment]
        None, pattern=DEVICE_PATTERN, description="null: train.device")
    strategy: Literal["ddp"] = Field(
        "ddp", description="fine-tuning runs in one process: no sharding")


# The built-in default (the demo): on MNIST-1D a 1-D CNN teacher is trained in seconds, then a
# 40-64-64-10 MLP with a sixth of its parameters learns from it for a long, "patient" schedule
# (Beyer et al. 2022, arXiv:2106.05237): KD students need more steps than label training to
# pay off. Three seeds, so the report's gain can be read against the seeds' spread.
DEFAULT_TEACHER_TRAIN = {
    "epochs": 40, "batch_size": 100, "optimizer": {"name": "adam", "lr": 0.005},
    "lr_schedule": {"kind": "cosine", "start": 1.0, "end": 0.05},
}


class TeacherConfig(_Strict):
    model: ModelSpec
    train: TeacherTrainConfig | None = Field(
        None, description="train the teacher from the data first; null: use it as loaded"
    )
    device: str | None = Field(
        None, pattern=DEVICE_PATTERN, description="where the frozen teacher runs (its cache "
        "pass and online outputs): another GPU, or cpu to spare the students' GPU; null: "
        "train.device")


DEFAULT_TEACHER = TeacherConfig(
    model=ModelSpec(arch="cnn1d", args={"channels": [64, 64, 64]}),
    train=TeacherTrainConfig(**DEFAULT_TEACHER_TRAIN),
)


class StudentConfig(_Strict):
    model: ModelSpec = ModelSpec(arch="mlp", args={"hidden": [64, 64]})


class TransferConfig(_Strict):
    """How a general (task-agnostic) encoder is evaluated on a labelled task (`data.name:
    general_text`): a linear probe on frozen embeddings, then optionally fine-tuning.

    The task is split with `data.split_seed` and `data.seq_len`; its validation and test texts
    are removed from the unlabelled training text (no leakage)."""

    task: Literal["fortunes5", "fortunes43"] = "fortunes5"
    val_size: Annotated[float, Field(gt=0)] = Field(
        0.1, description="the task's validation split: a fraction (< 1) or a count")
    test_size: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="the task's test split (stratified fraction of its texts)")
    probe_c: Annotated[float, Field(gt=0)] = Field(
        1.0, description="inverse L2 strength of the logistic-regression probe (sklearn C) "
        "on the L2-normalised, frozen embeddings")
    finetune: FinetuneConfig | None = Field(
        None, description="fine-tune each encoder (distilled, and its undistilled "
        "initialisation) + a linear head with CE on the task, this budget; null: probe only")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="dropout before the fine-tuning head")


class LoggingConfig(_Strict):
    """Metric sinks besides `metrics.jsonl`, which every stage always writes."""

    tensorboard: bool = Field(
        False, description="also write TensorBoard event files into each stage's "
        "`tensorboard/` directory (needs the `tensorboard` extra)")


# One discriminated union over every registered method's own config: adding a method to
# METHODS is enough for recipes to accept it.
MethodConfigUnion = Annotated[
    Union[tuple(m.config_type for m in METHODS.values())],  # noqa: UP007 - built at run time
    Field(discriminator="name"),
]


class RunConfig(_Strict):
    """A whole run: teach -> cache -> baseline -> distill -> evaluate -> report."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$", max_length=MAX_NAME,
                      description="the run directory's name, inside output_dir")

    @field_validator("name")
    @classmethod
    def _one_directory(cls, name: str) -> str:
        check_run_name(name)  # `.` and `..` pass the pattern but leave output_dir
        return name

    @field_validator("transfer_set", mode="before")
    @classmethod
    def _views_only(cls, value: Any) -> Any:
        # The Python API may pass the views' own config (`kdistill.data.transfer`).
        if isinstance(value, TransferSetConfig) and not isinstance(value, RunTransferSet):
            return value.model_dump()
        return value
    output_dir: str = "runs"
    memory_plan: bool = Field(
        True, description="print the memory plan's line before the run (it builds the data and "
        "the models once more: about 4 s on the demo, a minute on the SmolLM2 recipes)")
    threads: Annotated[int, Field(ge=0)] = Field(
        1, description="torch intra-op threads; 0 keeps torch's default (see docs on 2-vCPU VMs)"
    )
    data: DataConfig = BuiltinImages()
    teacher: TeacherConfig = DEFAULT_TEACHER
    student: StudentConfig = StudentConfig()
    method: MethodConfigUnion = Field(default_factory=lambda: METHODS["kd"].config_type())
    train: TrainConfig = Field(
        TrainConfig(seeds=[0, 1, 2]), description="the default recipe's students train on 3 "
        "seeds; a `train:` section without `seeds` trains on seed 0")
    baseline: bool = Field(True, description="also train the student alone (method ce)")
    more_teachers: list[TeacherConfig] = Field(
        [], description="further teachers for a multi-teacher method (each trained or loaded, "
        "cached and evaluated like `teacher`)",
    )
    generations: Annotated[int, Field(ge=1)] = Field(
        1, description="born-again networks (arXiv:1805.04770): generation k+1 is distilled "
        "from generation k's student with the same method; 1 = plain distillation",
    )
    cache: CacheConfig = CacheConfig()
    eval: EvalConfig = EvalConfig()
    transfer: TransferConfig | None = Field(
        None, description="general distillation (data.name: general_text): the labelled task "
        "that evaluates the encoder without and with fine-tuning (`kdistill.tasks.embedding`)")
    transfer_set: RunTransferSet | None = Field(
        None, description="the students' training inputs as augmented views (jitter, flip, "
        "mixup, CutMix; token masking, n-grams) that the teacher labels consistently: cached "
        "over K views per sample, or online; the student alone trains on the same views; "
        "`unlabelled` adds another source's inputs (kdistill.data.transfer)")
    logging: LoggingConfig = LoggingConfig()
    compress: list[CompressStage] = Field(
        [], description="stages after distillation, run on the first seed's distilled student "
        "and evaluated into the report: prune, distill, quantize, export (kdistill.compress)")

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, data: Any) -> Any:
        # `method.temperature=8` alone (no recipe, or a recipe without method.name) means kd;
        # a data section without a name means the default data set.
        if isinstance(data, dict):
            for section, name in (("method", "kd"), ("data", "mnist1d")):
                if isinstance(data.get(section), dict):
                    data[section].setdefault("name", name)
        return data

    @model_validator(mode="after")
    def _teachers_have_knowledge(self) -> RunConfig:
        named = [("teacher", self.teacher)] + [
            (f"more_teachers.{i}", t) for i, t in enumerate(self.more_teachers)]
        for where, teacher in named:
            spec = teacher.model
            pretrained = spec.args.get("pretrained") or spec.arch in PRETRAINED_ARCHS
            if (teacher.train is None and spec.weights is None and spec.arch != "custom"
                    and not pretrained):
                raise ValueError(
                    f"{where}.train: the teacher would be an untrained network; give "
                    f"{where}.train, {where}.model.weights, or a pretrained arch"
                )
        if self.teacher.model.arch == "projected_lm":
            self._check_projected_teacher()
        if self.cache.topk is not None and (not METHODS[self.method.name].reads_topk
                                            or self.more_teachers):
            readers = ", ".join(n for n, m in METHODS.items() if m.reads_topk)
            raise ValueError(f"cache.topk: a top-k teacher cache feeds methods that read it "
                             f"({readers}) with one teacher; set cache.topk: null otherwise")
        if (self.cache.topk is not None and getattr(self.method, "kind", "") == "reverse_kl"
                and getattr(self.method, "topk_missing", "") == "renormalize"):
            raise ValueError("method.topk_missing: reverse KL against a renormalised top-k "
                             "teacher is infinite (0 outside its top-k); use uniform")
        # Fields of a token-level method that one kind of teacher target leaves unread.
        if self.cache.topk is not None and getattr(self.method, "chunk_size", None) is not None:
            raise ValueError("method.chunk_size: chunks the dense teacher's logits; a top-k "
                             "cache (cache.topk) is sparse already; remove one of them")
        if self.cache.topk is None and getattr(self.method, "topk_missing",
                                               "renormalize") != "renormalize":
            raise ValueError("method.topk_missing: applies to a top-k teacher cache only; set "
                             "cache.topk or remove it")
        try:
            check_order(self.compress)
        except ConfigError as e:
            raise ValueError(f"{e.where}: {e.message}") from None
        if self.more_teachers and not METHODS[self.method.name].multi_teacher:
            raise ValueError(f"more_teachers: method '{self.method.name}' learns from one "
                             "teacher; use a multi-teacher method such as multi_kd")
        return self

    @model_validator(mode="after")
    def _fits_the_data(self) -> RunConfig:
        task = self.data.task
        method = METHODS[self.method.name]
        if self.method.name == "ce":
            raise ValueError("method: 'ce' is the baseline, trained anyway (baseline: true)")
        if task not in method.tasks:
            fitting = ", ".join(sorted(n for n, m in METHODS.items() if task in m.tasks))
            raise ValueError(f"method: '{self.method.name}' is for {', '.join(method.tasks)} "
                             f"data; '{self.data.name}' is {task} data (methods for it: "
                             f"{fitting})")
        TASKS[task].check_config(self)  # what this kind of data allows (compress, baseline)
        self._check_transfer_set()
        return self

    def _check_transfer_set(self) -> None:
        ts = self.transfer_set
        if ts is None:
            return
        if self.data.task != "classification":
            raise ValueError(f"transfer_set: augmented views are made of images or signals "
                             f"(classification data); '{self.data.name}' is {self.data.task} "
                             "data")
        if self.train.augment != "none":
            raise ValueError("train.augment: the transfer set makes the students' views "
                             "(transfer_set.jitter); set train.augment: none")
        if ts.unlabelled is not None and (self.method.name != "kd" or ts.mixes):
            raise ValueError("transfer_set.unlabelled: inputs with no label are scored by the "
                             "teacher's term alone: method kd (labels' CE skips them), "
                             "without mix")
        if ts.mixes and not METHODS[self.method.name].mixed_inputs:
            fitting = ", ".join(n for n, m in METHODS.items() if m.mixed_inputs and n != "ce")
            raise ValueError(f"transfer_set.mix: method '{self.method.name}' reads plain "
                             f"labels; mixed views need a method that scores them ({fitting})"
                             " or mix: none")

    def _check_projected_teacher(self) -> None:
        # Its fallback targets read the next ids: fixed, fully scored text and no training.
        if self.teacher.train is not None:
            raise ValueError("teacher.train: a projected_lm teacher is used as loaded (its "
                             "outputs carry no gradient); remove teacher.train")
        if self.data.name not in PLAIN_TEXT_SOURCES:
            raise ValueError(f"teacher.model.arch: projected_lm needs plain text data "
                             f"({', '.join(PLAIN_TEXT_SOURCES)}); '{self.data.name}' masks "
                             "tokens its own-token evaluation could not match")
        if METHODS[self.method.name].on_policy:
            raise ValueError(f"teacher.model.arch: projected_lm teaches on fixed text; the "
                             f"on-policy method '{self.method.name}' would have it score the "
                             "student's own samples; use token_kd")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


