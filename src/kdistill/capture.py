"""Feature capture by forward hooks, keyed by `named_modules()` name. Models are never edited."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kdistill.errors import ConfigError


def _first_tensor(output: object) -> torch.Tensor:
    # Modules such as nn.LSTM or HF layers return tuples; the first tensor is the hidden state.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state  # type: ignore[no-any-return]
    raise TypeError(f"cannot capture a module output of type {type(output).__name__}")


def resolve_modules(model: nn.Module, names: Iterable[str], *, where: str = "layers") -> dict[
    str, nn.Module
]:
    """Look the names up in `model.named_modules()`; an unknown name lists the closest ones."""
    available = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, [n for n in available if n], n=5, cutoff=0.3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(where, f"no module named '{name}' in {type(model).__name__}{hint}")
        found[name] = available[name]
    return found


@contextmanager
def capture(
    model: nn.Module, names: Iterable[str], *, where: str = "layers"
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during forward passes inside the block.

    >>> with capture(student, ["layers.1"]) as feats:
    ...     logits = student(x)
    >>> feats["layers.1"].shape

    The dict is refilled on every forward; hooks are removed on exit, also after an error.
    """
    feats: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            feats[name] = _first_tensor(output)

        return hook

    try:
        for name, module in resolve_modules(model, names, where=where).items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield feats
    finally:
        for handle in handles:
            handle.remove()
