"""Adapters that map a student feature onto a teacher feature's shape, and shape probing.

Feature methods (FitNets hints, similarity losses on mismatched widths) need the student's
feature in the teacher's space. `probe_shapes` runs one example through a model with hooks to
learn each named layer's per-sample output shape; `make_adapter` then builds the smallest
trainable map between two shapes:

- vectors (C_s,) -> (C_t,): a linear layer;
- maps (C_s, H, W) -> (C_t, H', W'): a 1x1 convolution, then adaptive average pooling to
  (H', W') when the spatial sizes differ; 1-D maps (C, L) likewise with Conv1d;
- a map into a vector or a vector into a map (a CNN teacher and an MLP student): the map side
  is global-average-pooled to its channels first, so the target is (C_t,) and the adapter is
  linear. `adapt_target` applies the same pooling to the teacher feature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill.capture import capture


@torch.no_grad()
def probe_shapes(
    model: nn.Module, names: Sequence[str], example: Tensor, *, where: str = "layers"
) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each named module for `example` (a batch of >= 1)."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), example.device)
    try:
        with capture(model, names, where=where) as feats:
            model(example[:2].to(device))  # a teacher may sit on another device
            return {name: tuple(feats[name].shape[1:]) for name in names}
    finally:
        model.train(was_training)


def target_shape(student: tuple[int, ...], teacher: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the adapter outputs: the teacher's, or its channels when ranks differ."""
    return teacher if len(student) == len(teacher) else teacher[:1]


def adapt_target(teacher_feat: Tensor, target: tuple[int, ...]) -> Tensor:
    """The teacher feature in `target_shape(...)`: pooled to its channels when ranks differ."""
    if teacher_feat.dim() - 1 == len(target):
        return teacher_feat
    return teacher_feat.flatten(2).mean(dim=2) if teacher_feat.dim() > 2 else teacher_feat


class _PoolThenLinear(nn.Module):
    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.flatten(2).mean(dim=2))


class _ConvThenPool(nn.Module):
    def __init__(self, conv: nn.Module, size: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = conv
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if tuple(x.shape[2:]) == self.size:
            return x
        pool = nn.functional.adaptive_avg_pool2d if len(self.size) == 2 else (
            nn.functional.adaptive_avg_pool1d)
        return pool(x, self.size)


def make_adapter(student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    """A trainable map from per-sample student shape to `target_shape(student, teacher)`."""
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    if len(student) == len(teacher) and len(student) in (2, 3):
        conv_cls = nn.Conv2d if len(student) == 3 else nn.Conv1d
        return _ConvThenPool(conv_cls(student[0], teacher[0], kernel_size=1), teacher[1:])
    if len(student) in (2, 3) and len(teacher) == 1:
        return _PoolThenLinear(student[0], teacher[0])
    if len(student) == 1 and len(teacher) in (2, 3):
        return nn.Linear(student[0], teacher[0])  # the teacher map is pooled (adapt_target)
    raise ValueError(f"no adapter from a feature of shape {student} to one of shape {teacher}")
