"""From a recipe's model section to an `nn.Module`: the registry, argument checks, weights.

`build_model(arch, input_shape=..., num_classes=..., args=..., weights=..., target=...)` looks
`arch` up in `MODELS`, checks `args` against the builder's signature (an unknown or missing
argument is a `ConfigError` naming `<where>.args`, never a bare TypeError), builds the model
and optionally loads a state dict from `.safetensors` / `.pt` / `.pth`. The arch "custom"
imports `target="package.module:Name"` (a class or a function) and is the only place where a
recipe makes kdistill import code: a module path is imported only when the recipe says
`arch: custom` and names it in `target` (an arch that looks like a module path is an unknown
arch, and `target` beside any other arch is an error). Weights are read with safetensors or
`torch.load(..., weights_only=True)`, so a weights file never runs code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from kdistill.errors import ConfigError
from kdistill.models.hf import llama_student, pretrained_causal_lm
from kdistill.models.sentence import hf_sentence_encoder, hf_sentence_student
from kdistill.models.seq2seq import hf_seq2seq, seq2seq_transformer
from kdistill.models.text import hf_encoder_classifier, hf_encoder_student, textcnn
from kdistill.models.transformer import TinyTransformer
from kdistill.models.zoo import MLP, CCExamMnistCNN, CNN1d, LeNet5, SmallCNN
from kdistill.weights import load_weights

CUSTOM = "custom"


def _custom(
    input_shape: tuple[int, ...], num_classes: int, *, target: str, **args: Any
) -> nn.Module:
    """The registry's face of `custom_model`; `build_model` calls `custom_model` directly."""
    return custom_model(target, input_shape=input_shape, num_classes=num_classes, args=args)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "lenet5": LeNet5,
    "cnn1d": CNN1d,
    "ccexam_mnist_cnn": CCExamMnistCNN,
    "transformer": TinyTransformer,
    "hf_causal_lm": pretrained_causal_lm,
    "llama": llama_student,
    "textcnn": textcnn,
    "hf_encoder_classifier": hf_encoder_classifier,
    "hf_encoder_student": hf_encoder_student,
    "seq2seq_transformer": seq2seq_transformer,
    "hf_seq2seq": hf_seq2seq,
    "hf_sentence_encoder": hf_sentence_encoder,
    "hf_sentence_student": hf_sentence_student,
    CUSTOM: _custom,
}

_FROM_DATA = ("input_shape", "num_classes")  # passed by build_model, never through args


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters of `model`; only those with requires_grad if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _relocated(err: ConfigError, where: str) -> ConfigError:
    """The same error, its field prefixed by `where` (`args.hidden` -> `model.args.hidden`)."""
    new = Exception.__new__(type(err))
    new.__dict__.update(vars(err))
    new.where = f"{where}.{err.where}" if err.where else where
    new.args = (f"{new.where}: {err.message}",)
    return new


def _bind_args(
    fn: Callable[..., Any], args: Mapping[str, Any], data: dict[str, Any], what: str, where: str
) -> dict[str, Any]:
    """Keyword arguments for `fn`: `args` plus whichever of `data` its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: pass args as given
        return dict(args)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    own = [n for n in named if n not in _FROM_DATA]
    for key in args:
        if key in _FROM_DATA:
            raise ConfigError(
                f"{where}.args", f"{key!r} comes from the data set; remove it from args"
            )
        if key not in named and not takes_any:
            close = difflib.get_close_matches(key, own, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            expected = f"expected one of: {', '.join(own)}" if own else "it takes no arguments"
            raise ConfigError(
                f"{where}.args", f"unknown argument {key!r} for {what}{hint}; {expected}"
            )
    kwargs = {k: v for k, v in data.items() if k in named or takes_any}
    kwargs.update(args)
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError:
        missing = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and n not in kwargs
        ]
        message = (
            f"missing argument {', '.join(map(repr, missing))} for {what}"
            if missing
            else f"arguments {sorted(kwargs)} do not fit {what}{inspect.signature(fn)}"
        )
        raise ConfigError(f"{where}.args", message) from None
    return kwargs


def import_target(target: str, *, where: str = "model.target") -> Callable[..., Any]:
    """Import `"package.module:Name"` (Name may be dotted, e.g. `Outer.Inner`)."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise ConfigError(where, f"expected 'package.module:Name', got {target!r}")
    module_name, attr_path = target.split(":")
    if not module_name or not attr_path:
        raise ConfigError(where, f"expected 'package.module:Name', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module failed to import: show why, in one line
        raise ConfigError(
            where, f"cannot import module {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(where, f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(where, f"{target!r} is not a class or function")
    return obj


def custom_model(
    target: str | None,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    args: Mapping[str, Any] | None = None,
    where: str = "model",
) -> nn.Module:
    """Import `target`; call it with `args` (+ `input_shape` / `num_classes` if it takes them)."""
    if not target:
        raise ConfigError(f"{where}.target", "arch 'custom' needs target: 'package.module:Name'")
    builder = import_target(target, where=f"{where}.target")
    data = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    kwargs = _bind_args(builder, dict(args or {}), data, f"target {target!r}", where)
    try:
        model = builder(**kwargs)
    except ConfigError as e:
        raise _relocated(e, where) from e
    except Exception as e:
        raise ConfigError(
            f"{where}.target", f"building {target!r} failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{where}.target", f"{target!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def build_model(
    arch: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    args: dict[str, Any] | None = None,
    weights: str | os.PathLike[str] | None = None,
    target: str | None = None,
    where: str = "model",
) -> nn.Module:
    """Build `arch` for inputs (B, *input_shape) -> logits (B, num_classes).

    Args:
        arch: a key of `MODELS`; "custom" builds `target` instead.
        input_shape, num_classes: from the data set; passed to the builder (to a custom target
            only if its signature takes them).
        args: the builder's own keyword arguments, checked against its signature.
        weights: optional state dict file (.safetensors, .pt, .pth) loaded strictly.
        target: "package.module:Name", only with arch "custom".
        where: the recipe section (`model`, `teacher`, `student`), used to name fields in errors.
    """
    args = dict(args or {})
    if arch not in MODELS:
        close = difflib.get_close_matches(str(arch), MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{where}.arch", f"unknown arch {arch!r}{hint}; expected one of: {', '.join(MODELS)}"
        )
    if arch == CUSTOM:
        model = custom_model(
            target, input_shape=input_shape, num_classes=num_classes, args=args, where=where
        )
    else:
        if target is not None:
            raise ConfigError(f"{where}.target", f"only used with arch 'custom', not {arch!r}")
        builder = MODELS[arch]
        data = {"input_shape": tuple(input_shape), "num_classes": num_classes}
        kwargs = _bind_args(builder, args, data, f"arch {arch!r}", where)
        try:
            model = builder(**kwargs)
        except ConfigError as e:
            raise _relocated(e, where) from e
    if weights is not None:
        load_weights(model, weights, where=f"{where}.weights")
    return model
