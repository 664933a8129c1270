"""From a recipe's model section to an `nn.Module`: the registry, argument checks, weights.

`build_model(arch, input_shape=..., num_classes=..., args=..., weights=..., target=...)` looks
`arch` up in `MODELS`, checks `args` against the builder's signature (an unknown or missing
argument is a `ConfigError` naming `<where>.args`, never a bare TypeError), builds the model
and optionally loads a state dict from `.safetensors` / `.pt` / `.pth`. A model too large to
allocate is one `ConfigError` with its parameter count. Weights are read with safetensors or
`torch.load(..., weights_only=True)`, so a weights file never runs code.

The trust boundary (docs/security.md): the arch "custom" imports `target="package.module:Name"`
and is the only place where a recipe makes kdistill import code; a module path is imported only
when the recipe says `arch: custom` and names it in `target`. Before anything is called,
`check_target` requires the target to be the user's own code: not in the standard library,
not in an installed package (site-packages: torch, numpy, transformers ...), not kdistill; and
an `nn.Module` subclass, or a function annotated to return one. So `os:system`,
`subprocess:run`, `builtins:eval` or a dependency's loader are refused before any call.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import sysconfig
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.errors import ConfigError, is_out_of_memory, too_large
from kdistill.models.cross_tokenizer import projected_causal_lm
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
    "projected_lm": projected_causal_lm,
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


_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ATTRS = re.compile(r"[A-Za-z]\w*(\.[A-Za-z]\w*)*")  # no `_private` or `__dunder__` step
SECURITY = "see docs/security.md"


def _system_dirs() -> list[Path]:
    """The standard library's directories (of this environment and its base interpreter)."""
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    paths |= {sysconfig.get_paths(vars=base)[k] for k in ("stdlib", "platstdlib")}
    return [Path(p).resolve() for p in paths]


def _installed_where(path: str | None) -> str | None:
    """Why a module file at `path` is not the user's own code, or None if it is."""
    if path is None or path in ("built-in", "frozen"):
        return "a module without a file of its own (built into Python, or made interactively)"
    resolved = Path(path).resolve()
    if {"site-packages", "dist-packages"} & set(resolved.parts):
        return f"an installed package ({resolved})"
    if any(resolved.is_relative_to(d) for d in _system_dirs()):
        return f"Python's standard library ({resolved})"
    return None


def _refuse_package(module_name: str, target: str, where: str) -> None:
    """ConfigError unless `module_name` is the user's own code; imports nothing."""
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ConfigError(where, f"{target!r} is in Python's standard library; arch: custom "
                          f"builds a model class of your own project, never a library "
                          f"function ({SECURITY})")
    if top == "kdistill":
        raise ConfigError(where, f"{target!r} is kdistill's own code: its models are archs "
                          f"(arch: {', '.join(a for a in MODELS if a != CUSTOM)})")
    loaded = sys.modules.get(top)
    if loaded is not None:
        origins = list(getattr(loaded, "__path__", None) or []) or [
            getattr(loaded, "__file__", None)]
    else:
        spec = importlib.util.find_spec(top)  # a top-level spec: locating it runs nothing
        if spec is None:
            return  # not found: import_module says so below
        origins = list(spec.submodule_search_locations or []) or [spec.origin]
    for origin in origins:
        why = _installed_where(origin)
        if why is not None:
            raise ConfigError(where, f"{target!r} is in {why}; arch: custom imports only your "
                              "own project's modules (the working directory, PYTHONPATH or an "
                              "editable install): subclass the layer there if you need it "
                              f"({SECURITY})")


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The working directory on the import path for this import only (as `python -m` has it),
    so `arch: custom` finds a models.py next to where the command runs without PYTHONPATH."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import is found
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _returns_module(fn: Any) -> bool:
    """True for a Python function or method whose return annotation is an nn.Module subclass
    (a string annotation is resolved in the function's own module, which is already imported)."""
    if not (inspect.isfunction(fn) or (inspect.ismethod(fn) and inspect.isfunction(fn.__func__))):
        return False
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve: not a declared model factory
        return False
    return isinstance(returned, type) and issubclass(returned, nn.Module)


def import_target(target: str, *, where: str = "model.target") -> Callable[..., nn.Module]:
    """Import and check `"package.module:Name"` (Name may be dotted, e.g. `Outer.Inner`);
    see `check_target`. Nothing is called but the module's own top-level code."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise ConfigError(where, f"expected 'package.module:Name', got {target!r}")
    module_name, attr_path = target.split(":")
    if not _MODULE.fullmatch(module_name) or not _ATTRS.fullmatch(attr_path):
        raise ConfigError(where, f"expected 'package.module:Name' (Python names, none starting "
                          f"with '_' after the colon), got {target!r}")
    with _cwd_importable():
        _refuse_package(module_name, target, where)
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
    # Where the object is defined, not where it was imported into: a user module that does
    # `from os import system` or `from torch.nn import Linear` does not make them its own.
    home = getattr(obj, "__module__", None)
    if not callable(obj) or not isinstance(home, str) or home not in sys.modules:
        raise ConfigError(where, f"{target!r} is a {type(obj).__name__} value, not a class or "
                          "function defined in a module")
    _refuse_package(home, target, where)
    is_model_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if not (is_model_class or _returns_module(obj)):
        kind = "a class" if isinstance(obj, type) else "a function"
        raise ConfigError(where, f"{target!r} is {kind}, not an nn.Module subclass or a function "
                          "annotated to return one (def make(...) -> nn.Module); kdistill "
                          f"checks this before calling anything ({SECURITY})")
    return obj


def check_target(target: str | None, where: str = "model") -> None:
    """Validate an `arch: custom` target without building it: its format, that it is the
    user's own code (not the standard library, an installed package or kdistill) and that it
    is an nn.Module subclass or a function annotated to return one. Importing the module runs
    its top-level code (the user's own); nothing else is called. `where` names the recipe
    section (`teacher.model`); errors name `<where>.target`."""
    if not target:
        raise ConfigError(f"{where}.target", "arch 'custom' needs target: 'package.module:Name'")
    import_target(target, where=f"{where}.target")


def _parameters_on_meta(build: Callable[[], nn.Module]) -> int | None:
    """The parameter count of `build()` made on the meta device (no memory), or None."""
    try:
        with torch.device("meta"):
            return count_parameters(build())
    except Exception:
        return None


def _built(build: Callable[[], nn.Module], what: str, where: str) -> nn.Module:
    """`build()`, with a failed allocation as one ConfigError giving the model's size."""
    try:
        return build()
    except ConfigError as e:
        raise _relocated(e, where) from e
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
    raise too_large(where, what, _parameters_on_meta(build))


def custom_model(
    target: str | None,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    args: Mapping[str, Any] | None = None,
    where: str = "model",
) -> nn.Module:
    """Check `target` (`check_target`), then call it with `args` (+ `input_shape` /
    `num_classes` if its signature takes them)."""
    if not target:
        raise ConfigError(f"{where}.target", "arch 'custom' needs target: 'package.module:Name'")
    builder = import_target(target, where=f"{where}.target")  # check_target's checks
    data = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    kwargs = _bind_args(builder, dict(args or {}), data, f"target {target!r}", where)
    try:
        model = _built(lambda: builder(**kwargs), f"target {target!r}", where)
    except ConfigError:
        raise
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
            model = _built(lambda: builder(**kwargs), f"arch {arch!r}", where)
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:
            # e.g. a negative or absurd layer size in args: the recipe's values, not a bug
            raise ConfigError(f"{where}.args", f"building arch {arch!r} failed: "
                              f"{type(e).__name__}: {e}") from e
    if weights is not None:
        load_weights(model, weights, where=f"{where}.weights")
    return model
