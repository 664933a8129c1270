"""Feature capture by forward hooks, keyed by `named_modules()` name. Models are never edited.

A name may end in an index, `"encoder.layer.0.attention.self[1]"`: element 1 of that module's
tuple output (Hugging Face attention modules return `(hidden, attention_probs)`); without one
the first tensor of a tuple output is captured.
"""

from __future__ import annotations

import difflib
import re
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


_INDEXED = re.compile(r"^(?P<module>.*)\[(?P<index>\d+)\]$")


def split_name(name: str) -> tuple[str, int | None]:
    """`"a.b[1]"` -> `("a.b", 1)`; `"a.b"` -> `("a.b", None)`."""
    match = _INDEXED.match(name)
    return (match["module"], int(match["index"])) if match else (name, None)


def _pick(output: object, index: int | None, name: str, where: str) -> torch.Tensor:
    if index is None:
        return _first_tensor(output)
    if not isinstance(output, tuple | list) or index >= len(output):
        got = f"a {type(output).__name__}" + (
            f" of length {len(output)}" if isinstance(output, tuple | list) else "")
        raise ConfigError(where, f"'{name}': the module returned {got}, which has no "
                                 f"element {index}")
    item = output[index]
    if not isinstance(item, torch.Tensor):
        raise ConfigError(where, f"'{name}': element {index} of the module's output is "
                                 f"{type(item).__name__}, not a tensor (attention weights, for "
                                 f"one, come only with output_attentions=True, eager attention)")
    return item


def resolve_modules(model: nn.Module, names: Iterable[str], *, where: str = "layers") -> dict[
    str, nn.Module
]:
    """Look the names up in `model.named_modules()`; an unknown name lists the closest ones.

    Keys are the names as given (an index suffix such as `[1]` is kept in the key)."""
    available = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for full_name in names:
        name, _ = split_name(full_name)
        if name not in available:
            close = difflib.get_close_matches(name, [n for n in available if n], n=5, cutoff=0.3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(where, f"no module named '{name}' in {type(model).__name__}{hint}")
        found[full_name] = available[name]
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
        index = split_name(name)[1]

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            feats[name] = _pick(output, index, name, where)

        return hook

    try:
        for name, module in resolve_modules(model, names, where=where).items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield feats
    finally:
        for handle in handles:
            handle.remove()
