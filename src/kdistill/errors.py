"""Errors a user can act on. The CLI prints them as one line; `--debug` shows the traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class KDistillError(Exception):
    """Base class: a failure with a message meant for the user. Exit code 1 (runtime)."""

    exit_code = 1

    def __str__(self) -> str:
        # The CLI promises one line per error; messages that quote a library's exception
        # (torch's and safetensors' run over several lines) are folded here, in one place.
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class ConfigError(KDistillError):
    """Bad input: a recipe field, a file named by the recipe, an incompatible model. Exit code 2."""

    exit_code = 2

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Picklable with its two arguments (errors cross process boundaries under DDP).
        return (ConfigError, (self.where, self.message))


class MissingDependencyError(ConfigError):
    """An optional package (a data set, a pretrained model) is not installed."""

    def __init__(self, where: str, what: str, install: str) -> None:
        self.what, self.install = what, install
        super().__init__(where, f"{what} is not installed; install it with `{install}`")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (MissingDependencyError, (self.where, self.what, self.install))


class TrainingError(KDistillError):
    """A run that failed while training (a NaN loss, a failed write). Exit code 1."""


# Lines of torch's weights-only paragraph that say nothing about the file at hand.
_TORCH_PREAMBLE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_failure(exc: BaseException) -> tuple[str, bool]:
    """(the one informative line of a failed `torch.load(..., weights_only=True)`, whether it
    refused a pickled Python object). torch explains over a paragraph that mostly suggests
    retrying with weights_only=False, which kdistill never does."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    refused = next((line for line in lines if "unsupported global" in line.lower()), None)
    if refused is not None:
        return refused, True
    useful = [line for line in lines if not line.startswith(_TORCH_PREAMBLE)]
    return (useful or lines or [type(exc).__name__])[0], False


def pydantic_message(error: Mapping[str, Any], own: Mapping[str, str] | None = None) -> str:
    """One pydantic error as the user-facing text after its field: the caller's own text for
    an error type (`own`, e.g. an unknown union tag), "unknown key", or pydantic's message
    with the offending value."""
    kind = error["type"]
    if own and kind in own:
        return own[kind]
    if kind == "extra_forbidden":
        return "unknown key"
    msg = str(error["msg"]).removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], dict) and "(got" not in msg:
        msg += f" (got {error['input']!r})"
    return msg


def more_errors(errors: list[Any]) -> str:
    """" (and N more error(s))" after the first of several validation errors."""
    return f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""


# What torch and Python say when an allocation fails (CPU allocator, CUDA, MPS).
_OOM_TEXT = ("not enough memory", "can't allocate memory", "out of memory",
             "defaultcpuallocator", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a failed allocation: a MemoryError, torch.OutOfMemoryError, or a RuntimeError
    from an allocator ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def too_large(where: str, what: str, params: int | None) -> ConfigError:
    """A model that cannot be allocated, as one line with its size (None: size unknown)."""
    if params is None:
        size = "its size could not be estimated"
    else:
        size = f"{params:,} parameters, {params * 4 / 2**30:,.1f} GiB in float32"
    return ConfigError(where, f"{what} is too large to allocate ({size}); make it smaller "
                       "(fewer or narrower layers) or run on a machine with more memory")
