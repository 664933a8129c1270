"""Errors a user can act on. The CLI prints them as one line; `--debug` shows the traceback."""

from __future__ import annotations


class KDistillError(Exception):
    """Base class: a failure with a message meant for the user. Exit code 1 (runtime)."""

    exit_code = 1


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
