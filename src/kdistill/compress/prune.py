"""Pruning: global unstructured magnitude pruning, and structured pruning that really shrinks
the network (fewer output units/channels, rebuilt smaller layers), so parameters, bytes and
latency all go down, not just the count of non-zero weights.

Structured pruning finds its groups by tracing the model with torch.fx: a Linear/Conv
(`producer`) whose output reaches exactly one Linear/Conv (`consumer`) through ops that keep
units/channels apart (activations, dropout, pooling, BatchNorm, a flatten of conv maps). Those
are the producers whose outputs can be removed together with the consumer's matching inputs.
Anything else (a residual add, a reshape, a layer used twice, the head) is left whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import prune

from kdistill.errors import ConfigError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Modules that act on each unit/channel separately: removing unit k before them removes
# exactly unit k after them. BatchNorm is listed apart because it has per-channel tensors.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                nn.ELU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool1d,
                nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.tanh,
              torch.sigmoid, torch.nn.functional.dropout, torch.nn.functional.max_pool2d}


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Linear/Conv: what magnitude pruning ranks globally."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def sparsity(model: nn.Module) -> float:
    """Share of zero weights over every Linear/Conv weight tensor (biases excluded)."""
    weights = [getattr(m, name) for m, name in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def apply_magnitude(model: nn.Module, amount: float) -> None:
    """Mask the smallest-|w| share `amount` of all Linear/Conv weights, ranked globally.

    The masks stay attached (a forward pre-hook multiplies `weight_orig` by `weight_mask`) so
    that fine-tuning afterwards cannot revive pruned weights; `make_permanent` removes them.
    An earlier round's masks are made permanent first: its zeros then rank lowest, so a larger
    `amount` keeps them pruned and adds the next smallest.
    """
    make_permanent(model)
    targets = prunable_weights(model)
    if not targets:
        raise ConfigError("compress.prune", "the model has no Linear/Conv layer to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)


def make_permanent(model: nn.Module) -> None:
    """Fold pruning masks into the weights (plain tensors with zeros, no hooks left)."""
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")


@dataclass
class Group:
    """A producer whose output units can be removed: `batchnorms` sit between it and the
    `consumer`; `spatial` > 1 when the consumer is a Linear reading flattened conv maps
    (then each channel is `spatial` consecutive inputs)."""

    producer: str
    consumer: str
    batchnorms: list[str] = field(default_factory=list)
    spatial: int = 1


def _is_flatten(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Flatten):
        return modules[str(node.target)].start_dim == 1
    if node.op == "call_function" and node.target is torch.flatten:
        return (node.args[1:2] or [node.kwargs.get("start_dim", 0)])[0] == 1
    return node.op == "call_method" and node.target == "flatten" and node.args[1:2] == (1,)


def find_groups(model: nn.Module) -> list[Group]:
    """The structured-prunable producers of `model`, in forward order (see the module doc)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # dynamic control flow: this model cannot be analysed
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("compress.prune", f"structured pruning traces the model with "
                                            f"torch.fx, which failed: {first}") from None
    modules = dict(model.named_modules())
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], PRUNABLE):
            continue
        producer = modules[str(node.target)]
        if uses[str(node.target)] != 1 or getattr(producer, "groups", 1) != 1:
            continue
        group = Group(producer=str(node.target), consumer="")
        current, flattened = node, False
        while len(current.users) == 1:
            nxt = next(iter(current.users))
            mod = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if mod is not None and isinstance(mod, PRUNABLE):
                if uses[str(nxt.target)] == 1 and getattr(mod, "groups", 1) == 1:
                    group.consumer = str(nxt.target)
                    if flattened:
                        channels = producer.weight.shape[0]
                        if not isinstance(mod, nn.Linear) or mod.in_features % channels:
                            break
                        group.spatial = mod.in_features // channels
                    groups.append(group)
                break
            if mod is not None and isinstance(mod, _BATCHNORM) and not flattened:
                group.batchnorms.append(str(nxt.target))
            elif _is_flatten(nxt, modules) and not flattened and not isinstance(producer,
                                                                                    nn.Linear):
                flattened = True
            elif not ((mod is not None and isinstance(mod, _ELEMENTWISE))
                      or (nxt.op == "call_function" and nxt.target in _FUNCTIONS)
                      or (nxt.op == "call_method" and nxt.target in ("relu", "relu_"))):
                break  # an op that mixes units (add, reshape, getitem of operator...)
            current = nxt
    return groups


def unit_importance(layer: nn.Module) -> Tensor:
    """L2 norm of each output unit's weights and bias: a unit with all-zero weights and bias
    contributes nothing after a ReLU-like activation, so it ranks lowest."""
    w = layer.weight.detach().flatten(1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach()[:, None]], dim=1)
    return w.norm(dim=1)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _slice_layer(layer: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    """A new Linear/Conv with only the `keep_out` output units and `keep_in` inputs."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if keep_out is not None:
        w = w[keep_out]
        b = b[keep_out] if b is not None else None
    if keep_in is not None:
        w = w[:, keep_in]
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        conv = type(layer)
        new = conv(w.shape[1], w.shape[0], layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, bias=b is not None,
                   padding_mode=layer.padding_mode)
    new = new.to(dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(layer.training)
    return new


def _slice_batchnorm(bn: nn.Module, keep: Tensor) -> nn.Module:
    new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def prune_structured(model: nn.Module, widths: dict[str, int]) -> dict[str, int]:
    """Shrink each producer named in `widths` to that many output units (highest importance
    kept, original order preserved) and cut the matching inputs of its consumer and its
    BatchNorms. The model keeps its class and module names; returns the new widths."""
    groups = {g.producer: g for g in find_groups(model)}
    unknown = sorted(set(widths) - set(groups))
    if unknown:
        raise ConfigError("compress.prune", f"{unknown[0]} cannot be pruned structurally "
                                            f"(prunable: {', '.join(groups) or 'none'})")
    for name, width in widths.items():
        group = groups[name]
        producer = model.get_submodule(name)
        units = producer.weight.shape[0]
        if not 1 <= width <= units:
            raise ConfigError("compress.prune", f"{name}: keep 1..{units} units, not {width}")
        # topk then sort: the kept units stay in their original order, so a no-op prune is
        # an identity and outputs compare position by position.
        keep = unit_importance(producer).topk(width).indices.sort().values
        _set_module(model, name, _slice_layer(producer, keep, None))
        for bn in group.batchnorms:
            _set_module(model, bn, _slice_batchnorm(model.get_submodule(bn), keep))
        # Channel c of flattened maps is inputs [c*S, (c+1)*S) (NCHW, flatten from dim 1).
        keep_in = (keep[:, None] * group.spatial + torch.arange(group.spatial)).flatten()
        _set_module(model, group.consumer,
                    _slice_layer(model.get_submodule(group.consumer), None, keep_in))
    return {name: model.get_submodule(name).weight.shape[0] for name in groups}


def structured_targets(original: dict[str, int], amount: float) -> dict[str, int]:
    """Widths after removing a share `amount` of each layer's original units (at least 1)."""
    return {name: max(1, math.ceil(units * (1.0 - amount))) for name, units in original.items()}


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output units of every structured-prunable producer (what structured pruning can cut)."""
    return {g.producer: model.get_submodule(g.producer).weight.shape[0]
            for g in find_groups(model)}


def round_amounts(amount: float, rounds: int) -> list[float]:
    """Cumulative targets of an iterative schedule: equal steps up to `amount`."""
    return [amount * (r + 1) / rounds for r in range(rounds)]
