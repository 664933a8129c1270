"""The user's image folders (`data.name: image_folder`) and arrays (`data.name: arrays`).

Images are real: the sklearn digits (8x8 grey) written as PNG / JPEG / BMP / WebP files into
tmp_path, a few per class, so decoding, statistics and errors are exercised on actual files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.config import data_source
from kdistill.data import ImageFiles, LoadContext
from kdistill.data.loader import BatchLoader
from kdistill.errors import ConfigError


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images * 255 / 16).astype(np.uint8), bunch.target


def write_folder(root: Path, per_class: int = 6, classes: tuple[int, ...] = (0, 1, 2),
                 suffix: str = ".png", start: int = 0) -> Path:
    """`root/<digit name>/<k>.png`: real digit images, `per_class` of each class."""
    images, labels = _digits()
    names = ["zero", "one", "two", "three"]
    for c in classes:
        folder = root / names[c]
        folder.mkdir(parents=True, exist_ok=True)
        chosen = np.flatnonzero(labels == c)[start:start + per_class]
        for k, i in enumerate(chosen):
            Image.fromarray(images[i], mode="L").save(folder / f"{k}{suffix}")
    return root


def load(run_dir: Path | None = None, **fields):
    return data_source(name="image_folder", num_workers=0, **fields).load(
        LoadContext(run_dir=run_dir))


def test_folder_loads_lazily_with_stratified_splits_and_saved_statistics(tmp_path: Path):
    root = write_folder(tmp_path / "digits", per_class=10)
    run = tmp_path / "run"
    splits = load(run, path=str(root), val_size=0.2, test_size=0.2)
    assert isinstance(splits.train_x, ImageFiles) and splits.task == "classification"
    assert splits.class_names == ("one", "two", "zero") and splits.num_classes == 3
    assert (len(splits.train_x), len(splits.val_x), len(splits.test_x)) == (18, 6, 6)
    assert sorted(splits.val_y.tolist()) == [0, 0, 1, 1, 2, 2]  # stratified
    assert splits.input_shape == (1, 8, 8) and splits.train_x.shape == (18, 1, 8, 8)
    batch = splits.train_x[torch.tensor([3, 0])]
    assert batch.dtype == torch.float32 and batch.shape == (2, 1, 8, 8)
    assert torch.equal(batch[1], splits.train_x[0]) and torch.equal(splits.train_x[:2][0], batch[1])
    # Normalised with the training split's own statistics, saved in the run directory.
    every = splits.train_x[:]
    assert abs(float(every.mean())) < 1e-5 and abs(float(every.std()) - 1) < 0.05
    stats = json.loads((run / "normalization.json").read_text())
    assert stats["channels"] == 1 and len(stats["mean"]) == 1
    assert json.loads((run / "labels.json").read_text()) == {"classes": ["one", "two", "zero"]}
    # The recipe's statistics instead: pixels / 255 -> (p - 0.5) / 0.25.
    given = load(path=str(root), val_size=0.2, test_size=0.2, mean=[0.5], std=[0.25])
    raw = np.asarray(Image.open(given.train_x.files[0]), dtype=np.float32) / 255
    assert torch.allclose(given.train_x[0][0], (torch.from_numpy(raw) - 0.5) / 0.25)


def test_separate_folders_resize_and_mixed_formats(tmp_path: Path):
    train = write_folder(tmp_path / "train", per_class=4)
    write_folder(tmp_path / "val", per_class=2, classes=(0, 1), suffix=".jpg", start=10)
    write_folder(tmp_path / "test", per_class=2, suffix=".bmp", start=20)
    write_folder(tmp_path / "test", per_class=1, classes=(2,), suffix=".webp", start=30)
    splits = load(path=str(train), val_path=str(tmp_path / "val"),
                  test_path=str(tmp_path / "test"), image_size=[12, 10], channels=3)
    assert (len(splits.train_x), len(splits.val_x), len(splits.test_x)) == (12, 4, 7)
    assert splits.input_shape == (3, 12, 10) and splits.test_x[:7].shape == (7, 3, 12, 10)
    assert sorted(set(splits.val_y.tolist())) == [0, 2]  # "one", "zero": a subset of classes
    assert any("converted to RGB" in n for n in splits.notes)
    with pytest.raises(ConfigError, match=r"data.val_size: .*val_path"):
        data_source(name="image_folder", path="x", val_path="y", val_size=0.1)


def test_workers_give_the_batches_of_the_main_process(tmp_path: Path):
    root = write_folder(tmp_path / "digits", per_class=12)
    serial = load(path=str(root), random_crop=2, random_flip=True)
    parallel = data_source(name="image_folder", path=str(root), random_crop=2, random_flip=True,
                           num_workers=2).load(LoadContext())
    assert serial.fingerprint == parallel.fingerprint
    a = BatchLoader(serial.train_x, serial.train_y, batch_size=5, seed=3, augment=serial.augment)
    b = BatchLoader(parallel.train_x, parallel.train_y, batch_size=5, seed=3,
                    augment=parallel.augment)
    assert b.num_workers == 2 and a.num_workers == 0
    for epoch in (0, 1):
        for x, y in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["input"], y["input"])
            assert torch.equal(x["label"], y["label"])
    resumed = next(iter(b.epoch(1, start=2)))  # the persistent workers restart mid-epoch
    assert torch.equal(resumed["input"], list(a.epoch(1))[2]["input"])
    # Augmented: crops and flips change the images, differently per epoch.
    plain = serial.train_x[next(iter(a.epoch(0)))["index"]]
    assert not torch.equal(plain, next(iter(a.epoch(0)))["input"])
    assert not torch.equal(next(iter(a.epoch(0)))["input"], next(iter(a.epoch(1)))["input"])


def test_a_file_broken_during_training_is_one_config_error_from_a_worker(tmp_path: Path):
    root = write_folder(tmp_path / "digits", per_class=4)
    splits = data_source(name="image_folder", path=str(root), num_workers=1,
                         val_size=1, test_size=1).load(LoadContext())
    victim = Path(splits.train_x.files[0])
    victim.write_bytes(victim.read_bytes()[:20])
    loader = BatchLoader(splits.train_x, splits.train_y, batch_size=4, shuffle=False)
    with pytest.raises(ConfigError, match=f"{victim}: cannot read the image any more"):
        list(loader.epoch(0))


def test_fingerprint_follows_file_content(tmp_path: Path):
    root = write_folder(tmp_path / "digits")
    first = load(path=str(root)).fingerprint
    assert load(path=str(root)).fingerprint == first
    image = root / "one" / "0.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(image)
    assert load(path=str(root)).fingerprint != first


def test_duplicates_across_splits_are_counted(tmp_path: Path):
    train = write_folder(tmp_path / "train", per_class=4)
    test = write_folder(tmp_path / "test", per_class=2)  # the first two of each: copies
    splits = load(path=str(train), test_path=str(test), val_size=1)
    assert splits.notes == ("data: 0 validation and 6 test images are exact copies of earlier "
                            "splits' images (kept; scores on them may be optimistic)",)


def test_bad_images_stop_the_load_or_are_skipped(tmp_path: Path):
    root = write_folder(tmp_path / "digits")
    broken = root / "two" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    (root / "two" / "2.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=f"{broken}: cannot read the image .*skip_bad"):
        load(path=str(root))
    splits = load(path=str(root), skip_bad=True, val_size=1, test_size=1)
    assert len(splits.train_x) + 2 == 16
    assert any("skipped 2 unreadable image(s)" in n for n in splits.notes)


def test_folder_errors_name_the_folder_or_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^data.path: .*nowhere: no such file"):
        load(path=str(tmp_path / "nowhere"))
    root = write_folder(tmp_path / "digits")
    (root / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"{root / 'empty'}: holds no images"):
        load(path=str(root))
    (root / "empty").rmdir()
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "one" / "big.png")
    with pytest.raises(ConfigError, match=r"data.image_size: .*big.png is 9x8 but .* is 8x8"):
        load(path=str(root))
    assert load(path=str(root), image_size=8).input_shape == (1, 8, 8)  # resized
    write_folder(tmp_path / "val", classes=(3,))
    with pytest.raises(ConfigError, match="class 'three' is not one of the training"):
        load(path=str(root), val_path=str(tmp_path / "val"))
    with pytest.raises(ConfigError, match=r"data.mean: 1 value\(s\) for 3-channel"):
        load(path=str(root), channels=3, mean=[0.5], std=[0.2])
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(ConfigError, match="no class folders"):
        load(path=str(flat))


# --- arrays --------------------------------------------------------------------------------


def arrays(**fields):
    return data_source(name="arrays", **fields).load(LoadContext())


def test_arrays_in_every_format_give_the_same_splits(tmp_path: Path):
    x = np.random.default_rng(0).normal(size=(40, 2, 3)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    from safetensors.numpy import save_file

    save_file({"inputs": x, "labels": y}, str(tmp_path / "d.safetensors"))
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    ways = [dict(path=str(tmp_path / "d.npz")),
            dict(path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy")),
            dict(path=str(tmp_path / "d.safetensors"), x_key="inputs", y_key="labels"),
            dict(path=str(tmp_path / "d.pt"))]
    loaded = [arrays(**w) for w in ways]
    first = loaded[0]
    assert first.input_shape == (2, 3) and first.num_classes == 4 and len(first.val_x) == 4
    assert first.train_x.dtype == torch.float32 and first.train_y.dtype == torch.int64
    for other in loaded[1:]:
        assert torch.equal(other.train_x, first.train_x)
        assert torch.equal(other.test_y, first.test_y)


def test_array_labels_strings_and_errors(tmp_path: Path):
    x = np.zeros((12, 3), np.float32) + np.arange(12)[:, None]
    names = np.array(["cat", "dog", "emu"] * 4)
    np.savez(tmp_path / "s.npz", x=x, y=names)
    splits = arrays(path=str(tmp_path / "s.npz"), val_size=3, test_size=3)
    assert splits.class_names == ("cat", "dog", "emu")
    with pytest.raises(ConfigError, match=r"^data.num_classes: .*string labels"):
        arrays(path=str(tmp_path / "s.npz"), val_size=3, test_size=3, num_classes=5)
    np.savez(tmp_path / "neg.npz", x=x, y=np.array([0, 1, -1] * 4))
    with pytest.raises(ConfigError, match=r"neg.npz row 2: label -1 is out of range"):
        arrays(path=str(tmp_path / "neg.npz"))
    np.savez(tmp_path / "frac.npz", x=x, y=np.array([0.0, 1.5] * 6))
    with pytest.raises(ConfigError, match=r"frac.npz row 1: label 1.5 is not a class id"):
        arrays(path=str(tmp_path / "frac.npz"))
    np.savez(tmp_path / "short.npz", x=x, y=np.zeros(5, np.int64))
    with pytest.raises(ConfigError, match="5 labels for 12 input rows"):
        arrays(path=str(tmp_path / "short.npz"))
    with pytest.raises(ConfigError, match=r"has no array 'x' .*arrays: a, y"):
        np.savez(tmp_path / "keys.npz", a=x, y=np.zeros(12, np.int64))
        arrays(path=str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "big.npz", x=x, y=np.arange(12) % 3)
    np.savez(tmp_path / "bigtest.npz", x=x[:2], y=np.array([0, 3]))
    with pytest.raises(ConfigError, match=r"bigtest.npz row 1: label 3 is out of range 0..2"):
        arrays(path=str(tmp_path / "big.npz"), test_path=str(tmp_path / "bigtest.npz"))
    torch.save({"x": torch.zeros(2), "y": [1, 2]}, tmp_path / "obj.pt")
    with pytest.raises(ConfigError, match=r"obj.pt: expected a dict of tensors"):
        arrays(path=str(tmp_path / "obj.pt"))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "big.npz").read_bytes()[:50])
    with pytest.raises(ConfigError, match=r"cut.npz: cannot read the arrays"):
        arrays(path=str(tmp_path / "cut.npz"))
