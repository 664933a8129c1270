"""A tiny pre-LN transformer encoder classifier (ViT-style) for 1-D signals and images.

Small enough to train on a CPU in minutes (MNIST-1D), and written so that attention
distillation can read every layer's attention probabilities without touching the model:
each block's attention passes its softmax output through an identity submodule named
`blocks.<i>.attn.probs`, and a forward hook on that module (`kdistill.capture`) receives the
(B, heads, L, L) probabilities, L = number of patches + 1 ([CLS] first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models.zoo import _positive_int, _probability


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q, k, v projections and softmax.

    `probs` is an `nn.Identity` that the probabilities pass through before dropout, only so
    that a forward hook can capture exact distributions (rows sum to 1); it computes nothing.
    `torch.nn.MultiheadAttention` or `scaled_dot_product_attention` would not expose them.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.probs = nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:  # (B, N, D) -> (B, heads, N, D / heads)
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        probs = self.probs(scores.softmax(dim=-1))  # (B, heads, N, N): the hooked tensor
        out = self.drop(probs) @ v
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Patchify -> linear patch embedding + [CLS] + learned positions -> blocks -> LN -> head.

    Inputs: signals (L,) or (C, L), cut into non-overlapping patches of `patch` samples;
    images (C, H, W), cut into `patch`×`patch` patches. A length (or height/width) that is not
    a multiple of `patch` is zero-padded at the end. The head reads the [CLS] token.
    Hook `blocks.<i>.attn.probs` for block i's attention probabilities (B, heads, N+1, N+1),
    `blocks.<i>` for its output tokens (B, N+1, dim), `norm` for the final tokens.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ConfigError(
                "arch", f"'transformer' expects (L,), (C, L) or (C, H, W) inputs; the data "
                f"gives {tuple(input_shape)}"
            )
        dim, heads = _positive_int(dim, "dim"), _positive_int(heads, "heads")
        if dim % heads:
            raise ConfigError("args.heads", f"dim {dim} is not divisible by heads {heads}")
        patch = _positive_int(patch, "patch")
        mlp_ratio = _positive_int(mlp_ratio, "mlp_ratio")
        dropout = _probability(dropout, "dropout")
        self._shape, self._patch = shape, patch
        # A conv with kernel = stride = patch is exactly a linear map of each flattened patch.
        conv = nn.Conv1d if len(shape) == 2 else nn.Conv2d
        self.embed = conv(shape[0], dim, patch, stride=patch)
        tokens = math.prod(math.ceil(side / patch) for side in shape[1:])
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        depth = _positive_int(depth, "depth")
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self._shape)
        # Zero-pad the trailing edge of each spatial axis up to a multiple of the patch size.
        pad: list[int] = []
        for side in reversed(self._shape[1:]):
            pad += [0, -side % self._patch]
        if any(pad):
            x = F.pad(x, pad)
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls.expand(x.shape[0], -1, -1)
        h = self.drop(torch.cat([cls, tokens], dim=1) + self.pos)
        return self.head(self.norm(self.blocks(h))[:, 0])
