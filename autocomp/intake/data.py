"""Datasets named by spec strings, split into train / val / test.

``val`` is carved deterministically from the official training set and is the
only split the search sees; ``test`` is the official test set and is only
reported. The three splits are disjoint by construction.
"""

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from autocomp.core.errors import AutocompError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DATA_SPEC_HELP = "fashion-mnist[:DIR], cifar10:DIR or imagefolder:DIR"
SPLIT_SEED = 0


@dataclass
class DataSplits:
    """Three disjoint splits plus what a model needs to know about them."""

    spec: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    sample_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class NormalizedImages(Dataset):
    """Images held in memory as uint8 NCHW, normalised per channel when read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: list[float],
                 std: list[float]) -> None:
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)
        return (image - self.mean) / self.std, int(self.labels[index])


def load_data(spec: str, *, val_size: int = 5000, image_size: int = 224) -> DataSplits:
    """Load the dataset named by ``spec`` (see ``DATA_SPEC_HELP``)."""
    kind, _, directory = spec.partition(":")
    if kind == "fashion-mnist":
        train, test, classes = _fashion_mnist(Path(directory) if directory else FASHION_MNIST_DIR)
    elif kind == "cifar10":
        train, test, classes = _cifar10(_need_dir(spec, directory))
    elif kind == "imagefolder":
        train, test, classes = _image_folder(_need_dir(spec, directory), image_size)
    else:
        raise AutocompError(f"unknown dataset {spec!r}: expected {DATA_SPEC_HELP}")
    if not 0 < val_size < len(train):
        raise AutocompError(f"validation size {val_size} does not fit {len(train)} training images")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[:val_size].tolist(), order[val_size:].tolist()
    sample_shape = tuple(train[0][0].shape)
    return DataSplits(spec, Subset(train, train_idx), Subset(train, val_idx), test, classes,
                      sample_shape)


def take(dataset: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """A deterministic random subset of ``count`` items (all of them when None or larger)."""
    if count is None or count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:count].tolist())


CALIBRATION_IMAGES = 512


def calibration_loader(dataset: Dataset, count: int | None = None, seed: int = 0) -> DataLoader:
    """Fixed batches of training images (``CALIBRATION_IMAGES`` unless ``count`` is given) for
    methods that calibrate or initialise from data."""
    return make_loader(take(dataset, count or CALIBRATION_IMAGES, seed), 64, shuffle=False)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process loader; shuffling is seeded so a run is repeatable."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _need_dir(spec: str, directory: str) -> Path:
    if not directory:
        raise AutocompError(f"dataset {spec!r} needs a directory: {spec.split(':')[0]}:DIR")
    path = Path(directory)
    if not path.is_dir():
        raise AutocompError(f"dataset directory {path} does not exist")
    return path


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise AutocompError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory} "
        "(on Debian: apt-get install dataset-fashion-mnist)"
    )


def _fashion_mnist(directory: Path) -> tuple[Dataset, Dataset, list[str]]:
    # torchvision's FashionMNIST class wants its own download layout; Debian
    # ships the four gzipped IDX files flat, so they are read directly.
    if not directory.is_dir():
        raise AutocompError(
            f"Fashion-MNIST directory {directory} does not exist "
            "(on Debian: apt-get install dataset-fashion-mnist)"
        )
    mean, std = [0.2860], [0.3530]
    splits = []
    for prefix in ("train", "t10k"):
        images = torch.from_numpy(_read_idx(_find(directory, f"{prefix}-images-idx3-ubyte")).copy())
        labels = torch.from_numpy(_read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte")).copy())
        splits.append(NormalizedImages(images.unsqueeze(1), labels.long(), mean, std))
    return splits[0], splits[1], list(FASHION_MNIST_CLASSES)


def _cifar10(directory: Path) -> tuple[Dataset, Dataset, list[str]]:
    # The standard "python version" batches. torchvision's CIFAR10 class also
    # checks each file's MD5 against the original archive, which refuses any
    # re-packed copy, so the (documented, pickle-based) batches are read here.
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]

    def read(names: list[str]) -> NormalizedImages:
        images, labels = [], []
        for name in names:
            path = directory / name
            if not path.is_file():
                raise AutocompError(f"CIFAR-10 batch {path} not found")
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        return NormalizedImages(torch.from_numpy(np.concatenate(images)),
                                torch.tensor(labels, dtype=torch.long), mean, std)

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    meta = directory / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as handle:
            classes = [name.decode() for name in pickle.load(handle, encoding="bytes")[b"label_names"]]
    else:
        classes = [str(i) for i in range(10)]
    return train, test, classes


def _image_folder(directory: Path, image_size: int) -> tuple[Dataset, Dataset, list[str]]:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    if not ((directory / "train").is_dir() and (directory / "test").is_dir()):
        raise AutocompError(f"image folder {directory} needs train/ and test/ subfolders of classes")
    try:
        train = datasets.ImageFolder(str(directory / "train"), transform=transform)
        test = datasets.ImageFolder(str(directory / "test"), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise AutocompError(f"image folder {directory}: {err}") from None
    if train.classes != test.classes:
        raise AutocompError(f"image folder {directory}: train/ and test/ have different classes")
    return train, test, list(train.classes)
