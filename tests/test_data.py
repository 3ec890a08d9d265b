import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autocomp.core.errors import AutocompError
from autocomp.intake.data import DataSplits, load_data


def test_fashion_mnist_splits_are_disjoint_and_sized(fmnist: DataSplits) -> None:
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (55000, 5000, 10000)
    assert fmnist.sample_shape == (1, 28, 28)
    assert fmnist.num_classes == 10
    train_idx, val_idx = set(fmnist.train.indices), set(fmnist.val.indices)
    assert not train_idx & val_idx
    assert len(train_idx | val_idx) == 60000
    # test is the official test set, a different file from the one train/val come from
    assert fmnist.test is not fmnist.train.dataset


def test_fashion_mnist_splits_are_deterministic(fmnist: DataSplits) -> None:
    again = load_data("fashion-mnist")
    assert again.val.indices == fmnist.val.indices
    image, label = fmnist.val[0]
    assert torch.equal(image, again.val[0][0]) and label == again.val[0][1]


def test_fashion_mnist_images_are_normalised(fmnist: DataSplits) -> None:
    images = torch.stack([fmnist.train[i][0] for i in range(2000)])
    assert abs(images.mean().item()) < 0.1
    assert 0.8 < images.std().item() < 1.2
    labels = {fmnist.test[i][1] for i in range(2000)}
    assert labels == set(range(10))


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AutocompError, match="does not exist"):
        load_data(f"fashion-mnist:{tmp_path / 'nope'}")
    with pytest.raises(AutocompError, match="not found"):
        load_data(f"fashion-mnist:{tmp_path}")
    with pytest.raises(AutocompError, match="unknown dataset"):
        load_data("mnist-but-better")
    with pytest.raises(AutocompError, match="needs a directory"):
        load_data("cifar10")


def _write_cifar_batch(path: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, count).tolist()}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", 40, i)
    _write_cifar_batch(folder / "test_batch", 30, 9)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle)
    data = load_data(f"cifar10:{tmp_path}", val_size=50)
    assert (len(data.train), len(data.val), len(data.test)) == (150, 50, 30)
    assert data.sample_shape == (3, 32, 32)
    assert data.classes[3] == "c3"


def test_imagefolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    data = load_data(f"imagefolder:{tmp_path}", val_size=4, image_size=32)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)
    assert data.sample_shape == (3, 32, 32)
    assert data.classes == ["cat", "dog"]
