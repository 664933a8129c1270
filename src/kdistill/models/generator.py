"""The generator of data-free distillation: latent noise z ~ N(0, I) -> inputs shaped like the data.

Not a classifier, so not in the model factory: the data-free methods (methods/datafree.py) build
it themselves once they know the data's input shape. `save_sample_grid` draws its samples sorted
by the class the teacher gives them, for reports.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import ConfigError


class Generator(nn.Module):
    """DAFL's DCGAN-style generator (arXiv:1904.01186) for images, an MLP for other shapes.

    Images (C, H, W) (or (H, W)): Linear(z -> width·⌈H/4⌉·⌈W/4⌉) -> BN -> upsample to ⌈H/2⌉×⌈W/2⌉
    -> Conv3x3(width) -> BN -> LeakyReLU -> upsample to H×W -> Conv3x3(width/2) -> BN ->
    LeakyReLU -> Conv3x3(C) -> tanh -> BN without affine. The last BN gives every channel zero
    mean and unit variance over the batch, the scale of standardised data (as the authors' code
    does). Flat inputs (D,) or (C, L): Linear(z -> width) -> BN -> LeakyReLU, twice, -> Linear(D)
    -> BN without affine. `forward(z)` maps (B, latent_dim) to (B, *output_shape).
    """

    def __init__(self, output_shape: Sequence[int], *, latent_dim: int = 100,
                 width: int = 128) -> None:
        super().__init__()
        shape = tuple(int(s) for s in output_shape)
        if not shape or min(shape) < 1:
            raise ConfigError("method.generator", f"cannot generate inputs of shape {shape}")
        if latent_dim < 1 or width < 2:
            raise ConfigError("method.generator", f"latent_dim ({latent_dim}) must be >= 1 "
                              f"and width ({width}) >= 2")
        self.output_shape, self.latent_dim = shape, latent_dim
        self.image = len(shape) in (2, 3)
        if self.image:
            c, h, w = (1, *shape) if len(shape) == 2 else shape
            self._init = (math.ceil(h / 4), math.ceil(w / 4))
            self._mid = (math.ceil(h / 2), math.ceil(w / 2))
            self._full = (h, w)
            self.width = width
            self.project = nn.Linear(latent_dim, width * self._init[0] * self._init[1])
            self.bn0 = nn.BatchNorm2d(width)
            self.block1 = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(width, width, 3, padding=1), bn=nn.BatchNorm2d(width),
                act=nn.LeakyReLU(0.2)))
            self.block2 = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(width, width // 2, 3, padding=1),
                bn=nn.BatchNorm2d(width // 2), act=nn.LeakyReLU(0.2),
                out=nn.Conv2d(width // 2, c, 3, padding=1), tanh=nn.Tanh(),
                norm=nn.BatchNorm2d(c, affine=False)))
        else:
            dim = math.prod(shape)
            self.mlp = nn.Sequential(
                nn.Linear(latent_dim, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2),
                nn.Linear(width, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2),
                nn.Linear(width, dim), nn.BatchNorm1d(dim, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        if not self.image:
            return self.mlp(z).reshape(z.shape[0], *self.output_shape)
        x = self.project(z).reshape(z.shape[0], self.width, *self._init)
        x = self.bn0(x)
        # Upsampling to exact sizes (not ×2) lets odd sizes such as 7×7 or 27×27 come out right.
        x = self.block1(F.interpolate(x, size=self._mid, mode="nearest"))
        x = self.block2(F.interpolate(x, size=self._full, mode="nearest"))
        return x.reshape(z.shape[0], *self.output_shape)

    def sample(self, n: int) -> Tensor:
        """n inputs from fresh noise drawn from torch's global RNG (the engine seeds and
        checkpoints it, so a resumed run draws the same)."""
        device = next(self.parameters()).device
        return self(torch.randn(n, self.latent_dim, device=device))


@torch.no_grad()
def save_sample_grid(generator: Generator, teacher: nn.Module, path: str | Path, *,
                     per_class: int = 8, draws: int = 512, seed: int = 0) -> Path:
    """A PNG grid of generated images, one row per class the teacher assigns them to.

    Draws `draws` samples (generator in eval mode, its own seeded RNG so the caller's stream is
    untouched), labels them with the teacher's argmax, and shows up to `per_class` per row, each
    scaled to its own min..max; an empty cell means the generator made fewer of that class (a
    short row is itself a finding: the class-balance term failed there). Images only.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    if not generator.image:
        raise ValueError("save_sample_grid draws images; this generator makes flat inputs")
    was_training, teacher_training = generator.training, teacher.training
    generator.eval()
    teacher.eval()
    try:
        device = next(generator.parameters()).device
        rng = torch.Generator(device="cpu").manual_seed(seed)
        z = torch.randn(draws, generator.latent_dim, generator=rng).to(device)
        x = generator(z)
        # The teacher may sit on another device than the generator (teacher.device).
        logits = teacher(x.to(next((p.device for p in teacher.parameters()), device)))
    finally:
        generator.train(was_training)
        teacher.train(teacher_training)
    labels = logits.argmax(dim=1).cpu()
    classes = logits.shape[1]
    images = x.float().cpu()
    images = images[:, 0] if images.dim() == 4 else images  # first channel of (B, C, H, W)
    fig, axes = plt.subplots(classes, per_class, figsize=(per_class * 0.8, classes * 0.8),
                             squeeze=False)
    for c in range(classes):
        chosen = (labels == c).nonzero().flatten()[:per_class]
        for j in range(per_class):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=10)
            if j < len(chosen):
                ax.imshow(images[chosen[j]].numpy(), cmap="gray")
    fig.suptitle("generated samples by teacher class", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
