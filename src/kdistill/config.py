"""Typed recipes: pydantic models with extra="forbid", loaded from plain YAML plus `key=value`.

`RunConfig()` with no arguments *is* the built-in default recipe (`kdistill run` with no
arguments); `recipes/default.yaml` spells the same values out and a test keeps them equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kdistill.compress.config import KINDS as COMPRESS_KINDS
from kdistill.compress.config import CompressStage, check_order
from kdistill.data.general_text import GENERAL_TEXT
from kdistill.errors import ConfigError, more_errors, pydantic_message
from kdistill.methods import METHODS
from kdistill.methods.kd import KDConfig
from kdistill.schedules import Schedule, check_range


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# Archs that are pretrained by construction (their weights come with them).
PRETRAINED_ARCHS = ("hf_causal_lm", "hf_seq2seq", "hf_sentence_encoder")


class ModelSpec(_Strict):
    """A model by registry name (`kdistill.models.MODELS`), or `custom` with an import target."""

    arch: str
    args: dict[str, Any] = {}
    weights: str | None = Field(None, description="state dict to load (.safetensors or .pt)")
    target: str | None = Field(None, description="'package.module:Class' for arch: custom")


class DataConfig(_Strict):
    name: str = "mnist1d"
    val_size: Annotated[float, Field(gt=0)] = Field(
        500, description="validation split: a count, or a fraction (< 1) of the training set; "
        "for text corpora a fraction of the documents")
    split_seed: int = 0
    train_limit: Annotated[int, Field(gt=0)] | None = None
    # Text corpora (causal-LM distillation): `name: stdlib_docs` or `fortunes`.
    # Text classification (fortune categories): `name: fortunes5` or `fortunes43`.
    # Unlabelled sentences for general distillation of an encoder: `name: general_text`.
    tokenizer: str | None = Field(
        None, description="text: the tokenizer of this model ('smollm2', 'minilm' or a path)")
    seq_len: Annotated[int, Field(ge=2)] = Field(
        128, description="text: tokens per block; text classification: tokens per text "
        "(truncated, padded)")
    test_size: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.05, description="text: the fraction of documents (classification: of texts, "
        "stratified) held out for the test split")
    max_train_tokens: Annotated[int, Field(gt=0)] | None = None
    max_eval_tokens: Annotated[int, Field(gt=0)] | None = Field(
        None, description="text: at most this many tokens in each of validation and test")
    # `name: generated`: a JSONL file written by `kdistill generate` (sequence-level KD).
    path: str | None = Field(None, description="generated: the JSONL file of teacher answers")
    system: str | None = Field(None, description="generated: system prompt of the chat format")
    # Translation (seq2seq): `name: gettext_en_de` or `gettext_en_fr`; `seq_len` is the
    # tokens per side, BOS and EOS included; `train_limit` caps the training pairs.
    vocab_size: Annotated[int, Field(ge=8)] = Field(
        8000, description="translation: size of the joint BPE trained on the training split")


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class TrainConfig(_Strict):
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
    precision: Literal["fp32", "bf16"] = "fp32"
    augment: Literal["none", "jitter"] = Field(
        "none", description="jitter: random shifts of up to jitter_pixels (images only)"
    )
    jitter_pixels: Annotated[int, Field(ge=1)] = 2
    seeds: list[int] = Field([0], min_length=1)
    max_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="stop after this many optimizer steps (smoke tests)"
    )
    log_every: Annotated[int, Field(ge=1)] = 50
    eval_every_epochs: Annotated[int, Field(ge=1)] = 10
    checkpoint_every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="also checkpoint mid-epoch; always at each epoch end"
    )


# The built-in default (the demo): on MNIST-1D a 1-D CNN teacher is trained in seconds, then a
# 40-100-100-10 MLP learns from it for a long, "patient" schedule (Beyer et al. 2022,
# arXiv:2106.05237): KD students need more steps than label training to pay off.
DEFAULT_TEACHER_TRAIN = {
    "epochs": 40, "batch_size": 100, "optimizer": {"name": "adam", "lr": 0.005},
    "lr_schedule": {"kind": "cosine", "start": 1.0, "end": 0.05},
}


class TeacherConfig(_Strict):
    model: ModelSpec
    train: TrainConfig | None = Field(
        None, description="train the teacher from the data first; null: use it as loaded"
    )


DEFAULT_TEACHER = TeacherConfig(
    model=ModelSpec(arch="cnn1d", args={"channels": [32, 32, 32]}),
    train=TrainConfig(**DEFAULT_TEACHER_TRAIN),
)


class StudentConfig(_Strict):
    model: ModelSpec = ModelSpec(arch="mlp", args={"hidden": [100, 100]})


class CacheConfig(_Strict):
    enabled: bool = Field(True, description="cache teacher outputs when inputs are deterministic")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: Annotated[int, Field(ge=1)] = 1000
    max_mb: Annotated[float, Field(gt=0)] = Field(
        2048, description="teacher layer outputs a method reads are cached with the logits "
        "when the whole cache stays under this many MB; otherwise the teacher runs online"
    )
    topk: Annotated[int, Field(ge=1)] | None = Field(
        None, description="causal LMs: store only the teacher's top-k log-probabilities and "
        "their indices per token (method token_kd, kind forward_kl); null: dense logits"
    )


class EvalConfig(_Strict):
    batch_size: Annotated[int, Field(ge=1)] = 1000
    ece_bins: Annotated[int, Field(ge=2)] = 15
    throughput_batch: Annotated[int, Field(ge=1)] = 256
    latency_repeats: Annotated[int, Field(ge=3)] = 30
    samples: Annotated[int, Field(ge=0)] = Field(
        3, description="causal LMs: greedy continuations of this many test prompts in the report")
    sample_tokens: Annotated[int, Field(ge=1)] = Field(
        24, description="causal LMs: prompt length and new tokens of each report sample")
    beam: Annotated[int, Field(ge=1)] = Field(
        4, description="translation: beam size of the test-set BLEU / chrF (greedy is also "
        "reported)")
    length_penalty: Annotated[float, Field(ge=0)] = Field(
        1.0, description="translation: beam score / length^length_penalty picks the output")


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
    finetune: TrainConfig | None = Field(
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

    name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = "runs"
    threads: Annotated[int, Field(ge=0)] = Field(
        1, description="torch intra-op threads; 0 keeps torch's default (see docs on 2-vCPU VMs)"
    )
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = DEFAULT_TEACHER
    student: StudentConfig = StudentConfig()
    method: MethodConfigUnion = KDConfig()
    train: TrainConfig = TrainConfig()
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
    logging: LoggingConfig = LoggingConfig()
    compress: list[CompressStage] = Field(
        [], description="stages after distillation, run on the first seed's distilled student "
        "and evaluated into the report: prune, distill, quantize, export (kdistill.compress)")

    @model_validator(mode="before")
    @classmethod
    def _default_method_name(cls, data: Any) -> Any:
        # `method.temperature=8` alone (no recipe, or a recipe without method.name) means kd.
        if isinstance(data, dict) and isinstance(data.get("method"), dict):
            data["method"].setdefault("name", "kd")
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
        if self.cache.topk is not None and (not METHODS[self.method.name].reads_topk
                                            or self.more_teachers):
            readers = ", ".join(n for n, m in METHODS.items() if m.reads_topk)
            raise ValueError(f"cache.topk: a top-k teacher cache feeds methods that read it "
                             f"({readers}) with one teacher; set cache.topk: null otherwise")
        if (self.cache.topk is not None and getattr(self.method, "kind", "") == "reverse_kl"
                and getattr(self.method, "topk_missing", "") == "renormalize"):
            raise ValueError("method.topk_missing: reverse KL against a renormalised top-k "
                             "teacher is infinite (0 outside its top-k); use uniform")
        try:
            check_order(self.compress)
        except ConfigError as e:
            raise ValueError(f"{e.where}: {e.message}") from None
        if self.more_teachers and not METHODS[self.method.name].multi_teacher:
            raise ValueError(f"more_teachers: method '{self.method.name}' learns from one "
                             "teacher; use a multi-teacher method such as multi_kd")
        return self

    @model_validator(mode="after")
    def _general_distillation(self) -> RunConfig:
        general = self.data.name == GENERAL_TEXT
        if self.transfer is not None and not general:
            raise ValueError(f"transfer: evaluates a general encoder; it needs data.name: "
                             f"{GENERAL_TEXT} (got {self.data.name})")
        if general and self.baseline:
            raise ValueError("baseline: unlabelled text has no labels to train a baseline on; "
                             "the reference is the same student before distillation (its "
                             "initialisation, evaluated anyway): set baseline: false")
        for field, used in (("compress", self.compress), ("generations", self.generations > 1),
                            ("more_teachers", self.more_teachers)):
            if general and used:
                raise ValueError(f"{field}: general distillation runs one teacher, one "
                                 "generation and no compression chain")
        return self

    @model_validator(mode="after")
    def _method_is_distillation(self) -> RunConfig:
        if self.method.name == "ce":
            raise ValueError("method: 'ce' is the baseline, trained anyway (baseline: true)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml value): `train.seeds=[0,1,2]`, `method.alpha=0.5`."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError("override", f"'{text}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse override value '{raw}': {exc}") from None
    return key.strip(), value


def _format_loc(loc: tuple[int | str, ...]) -> str:
    # Pydantic puts union tags in the location ("method.kd.temperature", "....float"):
    # drop them so the path matches what the user wrote in the recipe.
    tags = set(METHODS) | {"constant", "linear", "cosine", "step", "warmup", "float", "int",
                           *COMPRESS_KINDS}
    last = len(loc) - 1
    parts = [str(p) for i, p in enumerate(loc)
             if not (i > 0 and "[" in str(p))  # e.g. "tagged-union[...]"
             and not (i > 0 and str(p) in tags and (i < last or str(p) in {"float", "int"}))]
    return ".".join(parts) or "recipe"


def validation_error(exc: ValidationError, source: str) -> ConfigError:
    """The first pydantic error as one line naming the field, plus a count of the rest."""
    errors = exc.errors()
    # A schedule written as a mapping fails the plain-number branch too; report its own error.
    kinds = {"constant", "linear", "cosine", "step", "warmup"}
    first = next((e for e in errors if kinds & {str(p) for p in e["loc"]}), errors[0])
    where = _format_loc(first["loc"])
    msg = pydantic_message(first, {
        "union_tag_invalid": f"unknown method; expected one of: {', '.join(sorted(METHODS))}"})
    if not first["loc"] and ": " in msg:  # whole-recipe checks name their field first
        where, msg = msg.split(": ", 1)
    return ConfigError(f"{source}: {where}", msg + more_errors(errors))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the built-in default when `path` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = "default recipe"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, "recipe file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(source, f"invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, f"a recipe is a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
    try:
        cfg = RunConfig.model_validate(tree)
        if not overrides:
            return cfg
        # Overrides change the *effective* recipe, defaults included, so that
        # `teacher.model.weights=x` keeps the default teacher arch.
        tree = cfg.model_dump(mode="json")
        for text in overrides:
            key, value = parse_override(text)
            if key == "method.name" and value != tree["method"]["name"]:
                tree["method"] = {}  # another method: start from its own defaults
            _set_dotted(tree, key, value)
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise validation_error(exc, source) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved recipe as YAML (saved in the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
