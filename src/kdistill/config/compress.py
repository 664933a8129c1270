"""Typed compression stages: a recipe's `compress:` list, run in order by `run_chain`.

Each stage is a mapping tagged by `kind`:

    compress:
      - {kind: prune, method: structured, amount: 0.5, rounds: 3, finetune_epochs: 1}
      - {kind: distill, epochs: 2}
      - {kind: quantize, method: static, calibration_samples: 1000}
      - {kind: export, formats: [onnx, safetensors]}

Every training stage (prune fine-tuning, distill, QAT) is KD from a teacher through the one
engine: `teacher: teacher` is the run's teacher, `teacher: input` the chain's input (the
distilled, unpruned fp32 student), which is the usual choice to recover what compression lost.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from kdistill.errors import ConfigError, more_errors, pydantic_message

TeacherChoice = Literal["teacher", "input"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    def unused(self) -> tuple[str, ...]:
        """The fields this stage, as configured, does not read (none by default)."""
        return ()

    @model_validator(mode="after")
    def _refuse_unused(self) -> _Strict:
        # A field the stage would ignore is refused, never silently dropped. Judged by value,
        # not by `model_fields_set`: overrides re-validate the whole dumped recipe.
        fields = type(self).model_fields
        given = [name for name in self.unused() if getattr(self, name) != fields[name].default]
        if given:
            raise ValueError(f"{', '.join(given)}: not used by this stage ({self.why_unused()}); "
                             f"remove {'it' if len(given) == 1 else 'them'}")
        return self

    def why_unused(self) -> str:
        return ""


class _KD(_Strict):
    """The KD loss of a stage that trains (fine-tuning after pruning, distill, QAT): the kd
    method's α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE, with the stage's own T and α."""

    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        4.0, description="KD temperature of this stage's fine-tuning")
    alpha: Annotated[float, Field(ge=0, le=1)] = Field(
        0.9, description="weight of the KD term (1 − α on the labels' CE)")


class PruneStage(_KD):
    """Prune to `amount` in `rounds` equal steps, each followed by KD fine-tuning.

    magnitude: global unstructured L1 pruning of every Linear/Conv weight (a share `amount` of
    all those weights become zero; the tensors keep their shapes). structured: each prunable
    layer loses a share `amount` of its output units/channels (lowest L2 norm first) and the
    layers are rebuilt smaller, with the next layer's matching inputs (and BatchNorm) removed.
    """

    kind: Literal["prune"]
    method: Literal["magnitude", "structured"] = "structured"
    amount: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="magnitude: share of weights zeroed; structured: share of units removed")
    rounds: Annotated[int, Field(ge=1)] = Field(1, description="prune in this many equal steps")
    finetune_epochs: Annotated[int, Field(ge=0)] = Field(
        1, description="KD fine-tuning epochs after each round (0: none)")
    lr: Annotated[float, Field(gt=0)] | None = Field(
        None, description="fine-tuning learning rate; null: the run's train.optimizer.lr")
    teacher: TeacherChoice = "teacher"

    def unused(self) -> tuple[str, ...]:
        return ("temperature", "alpha", "lr", "teacher") if self.finetune_epochs == 0 else ()

    def why_unused(self) -> str:
        return "finetune_epochs: 0 trains nothing"


class DistillStage(_KD):
    """KD fine-tuning of the current model (e.g. after pruning)."""

    kind: Literal["distill"]
    epochs: Annotated[int, Field(ge=1)] = 1
    lr: Annotated[float, Field(gt=0)] | None = None
    teacher: TeacherChoice = "teacher"


class QuantizeStage(_KD):
    """int8 with torch.ao.quantization: dynamic (Linear weights int8, activations quantized on
    the fly), static (FX graph mode, activation ranges calibrated on `calibration_samples`
    training samples) or qat (fake-quant fine-tuning with the KD loss, then converted)."""

    kind: Literal["quantize"]
    method: Literal["dynamic", "static", "qat"] = "dynamic"
    calibration_samples: Annotated[int, Field(ge=1)] = Field(
        1000, description="static and qat: training samples run to calibrate the observers")
    epochs: Annotated[int, Field(ge=1)] = Field(1, description="qat: fine-tuning epochs")
    lr: Annotated[float, Field(gt=0)] | None = Field(
        None, description="qat: learning rate; null: a tenth of the run's train.optimizer.lr")
    teacher: TeacherChoice = "input"
    backend: Literal["x86", "qnnpack", "fbgemm", "onednn"] = Field(
        "x86", description="torch quantized engine (x86 for Intel/AMD servers)")

    def unused(self) -> tuple[str, ...]:
        training = ("temperature", "alpha", "epochs", "lr", "teacher")
        return {"dynamic": (*training, "calibration_samples"), "static": training}.get(
            self.method, ())

    def why_unused(self) -> str:
        return f"method {self.method} does not train"


class ExportStage(_Strict):
    """Write the current model as ONNX (checked in onnxruntime against PyTorch) and/or
    safetensors; the stage's row measures the ONNX model in onnxruntime when there is one."""

    kind: Literal["export"]
    formats: list[Literal["onnx", "safetensors"]] = Field(["onnx", "safetensors"], min_length=1)
    rtol: Annotated[float, Field(gt=0)] | None = Field(
        None, description="allowed max |onnx - torch| / max |torch| on test inputs; null: 1e-4 "
        "for fp32 models, 0.05 for int8 ones (other kernels round differently)")
    opset: Annotated[int, Field(ge=13)] | None = Field(
        None, description="ONNX opset; null: the exporter's default")


CompressStage = Annotated[
    Union[PruneStage, DistillStage, QuantizeStage, ExportStage],  # noqa: UP007 - pydantic union
    Field(discriminator="kind"),
]
"""One stage; the type of the `compress` field of a recipe is `list[CompressStage]`."""

_STAGES: TypeAdapter[list[Any]] = TypeAdapter(list[CompressStage])
KINDS = ("prune", "distill", "quantize", "export")


def parse_stages(raw: Any, *, where: str = "compress") -> list[
        PruneStage | DistillStage | QuantizeStage | ExportStage]:
    """Validate a list of stage mappings; the first error as a ConfigError naming the field
    (`compress.1.amount: ...`)."""
    try:
        return _STAGES.validate_python(raw)
    except ValidationError as exc:
        raise stage_error(exc, where) from None


def stage_error(exc: ValidationError, where: str = "compress") -> ConfigError:
    """The first pydantic error of a stage list as one line naming its field."""
    errors = exc.errors()
    first = errors[0]
    # Pydantic puts the union tag ("prune") into the location; the recipe doesn't have it.
    loc = [str(p) for i, p in enumerate(first["loc"]) if not (i == 1 and str(p) in KINDS)]
    field = ".".join([where, *loc])
    msg = pydantic_message(first, {
        "union_tag_invalid": f"unknown stage kind; expected one of: {', '.join(KINDS)}",
        "union_tag_not_found": f"each stage needs a kind: one of {', '.join(KINDS)}"})
    return ConfigError(field, msg + more_errors(errors))


def check_order(stages: list[Any], *, where: str = "compress") -> None:
    """Refuse chains that cannot run, before any training: nothing trains or prunes an int8
    model (QAT is how quantized models are trained), and there is one quantization."""
    quantized_at: int | None = None
    for i, stage in enumerate(stages):
        if stage.kind == "quantize":
            if quantized_at is not None:
                raise ConfigError(f"{where}.{i}", f"the model is already quantized by "
                                                  f"{where}.{quantized_at}; quantize once")
            quantized_at = i
        elif stage.kind in ("prune", "distill") and quantized_at is not None:
            raise ConfigError(f"{where}.{i}", f"'{stage.kind}' after {where}.{quantized_at} "
                                              f"(quantize): prune and distill the fp32 model "
                                              f"first, or use quantize method qat")
