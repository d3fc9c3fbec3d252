"""Datasets and Ray Train data loaders: digits, mnist10k, MNIST, CIFAR-10, SVHN, ImageNet, FakeData.

Each training worker reads its own shard: the train loader samples with a seeded
`DistributedSampler` for the worker's rank (so shuffling is reproducible and an epoch can be
resumed part-way), the test loader reads every world_size-th sample without padding (so test
accuracy is exact), and both are passed through `ray.train.torch.prepare_data_loader`, which
moves batches to the worker's device.
"""

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import ray.train.torch
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T

from raydeq.datasets import mnist10k
from raydeq.training.config import DataSection

MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
EXPECTED_FILES = {
    "mnist": [
        f"MNIST/raw/{name}"
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
        + ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    ],
    "cifar10": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    + ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
    "imagenet": ["train/", "val/"],
}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SIZE = (28, 28)


class DataError(ValueError):
    """A dataset's folder is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class Splits:
    """The train and test sets of one dataset, with the image shape and the number of classes."""

    train: Dataset
    test: Dataset
    shape: tuple[int, int, int]
    num_classes: int


def check_files(cfg: DataSection) -> None:
    """Raise a DataError naming the folder and the expected files if any of them is missing."""
    if cfg.dataset not in EXPECTED_FILES or cfg.download:
        return
    root = Path(cfg.data_dir or ".")
    expected = EXPECTED_FILES[cfg.dataset]
    missing = [name for name in expected if not (root / name).exists()]
    if not missing:
        return
    absent = "none of them is there" if missing == expected else f"missing {', '.join(missing)}"
    hint = (
        "in the ImageFolder layout, one subfolder per class"
        if cfg.dataset == "imagenet"
        else "or set data.download=true to download them"
    )
    raise DataError(
        f"dataset {cfg.dataset!r} not found in {root}: expected {', '.join(expected)} "
        f"({absent}); put the files there {hint}"
    )


def image_shape(cfg: DataSection) -> tuple[int, int, int]:
    """(channels, height, width) of the images the configured dataset yields."""
    shapes = {"digits": (1, *DIGITS_SIZE), "mnist": (1, 28, 28), "mnist10k": (1, 28, 28)}
    shapes |= {"cifar10": (3, 32, 32)}
    shapes |= {"svhn": (3, 32, 32), "imagenet": (3, cfg.image_size, cfg.image_size)}
    c, h, w = cfg.fake_shape if cfg.dataset == "fake" else shapes[cfg.dataset]
    return c, h, w


def _normalized(
    stats: tuple[tuple[float, ...], tuple[float, ...]], *augment: Callable
) -> T.Compose:
    """The given augmentations, then ToTensor and Normalize(mean, std)."""
    return T.Compose([*augment, T.ToTensor(), T.Normalize(*stats)])


def _digits(cfg: DataSection) -> Splits:
    """scikit-learn's 8x8 digits (1,797 images) upsampled to MNIST's 28x28, fixed 80/20 split.

    The upsampling lets the MNIST models read them; pixels are standardised with the train
    set's mean and standard deviation.
    """
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=DIGITS_SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    n_test = round(len(labels) * DIGITS_TEST_FRACTION)
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Splits(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
        image_shape(cfg),
        10,
    )


def _mnist_transforms(cfg: DataSection) -> tuple[T.Compose, T.Compose]:
    """MNIST's train and test transforms.

    Augmentation: random rotations (up to 10 degrees) and shifts (up to 10%), which a dense
    model needs to generalise from a few thousand digits.
    """
    augment = (T.RandomAffine(degrees=10, translate=(0.1, 0.1)),) if cfg.augment else ()
    return _normalized(MNIST_STATS, *augment), _normalized(MNIST_STATS)


def _mnist(cfg: DataSection) -> Splits:
    """MNIST from `data_dir/MNIST/raw` in the IDX layout torchvision reads."""
    train_transform, test_transform = _mnist_transforms(cfg)
    make = partial(datasets.MNIST, cfg.data_dir, download=cfg.download)
    train = make(train=True, transform=train_transform)
    return Splits(train, make(train=False, transform=test_transform), image_shape(cfg), 10)


class GreyImages(Dataset):
    """uint8 images (N, H, W) and labels, each image a PIL image passed through `transform`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(image), int(self.labels[index])


def _mnist10k(cfg: DataSection) -> Splits:
    """The embedded 10,000 MNIST digits (8,000 train / 2,000 test), a subset of MNIST.

    Transforms and augmentation are MNIST's; the files ship in the package (MNIST10K_DIR).
    """
    train_transform, test_transform = _mnist_transforms(cfg)
    train = GreyImages(*mnist10k(train=True), train_transform)
    test = GreyImages(*mnist10k(train=False), test_transform)
    return Splits(train, test, image_shape(cfg), 10)


def _cifar10(cfg: DataSection) -> Splits:
    """CIFAR-10; augmentation: random crops (padding 4) and horizontal flips."""
    augment = (T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()) if cfg.augment else ()
    train = datasets.CIFAR10(
        cfg.data_dir,
        train=True,
        download=cfg.download,
        transform=_normalized(CIFAR10_STATS, *augment),
    )
    test = datasets.CIFAR10(
        cfg.data_dir, train=False, download=cfg.download, transform=_normalized(CIFAR10_STATS)
    )
    return Splits(train, test, image_shape(cfg), 10)


def _svhn(cfg: DataSection) -> Splits:
    """SVHN (train and test .mat files); no flips, since digits are not mirror-symmetric."""
    make = partial(
        datasets.SVHN, cfg.data_dir, download=cfg.download, transform=_normalized(SVHN_STATS)
    )
    return Splits(make(split="train"), make(split="test"), image_shape(cfg), 10)


def _imagenet(cfg: DataSection) -> Splits:
    """ImageNet `train/` and `val/` folders: resize + center crop; augmentation: RandomResizedCrop
    + flip for training."""
    size = cfg.image_size
    root = Path(cfg.data_dir or ".")
    val_steps = (T.Resize(round(size * 256 / 224)), T.CenterCrop(size))
    augment = (T.RandomResizedCrop(size), T.RandomHorizontalFlip()) if cfg.augment else val_steps
    train = datasets.ImageFolder(root / "train", transform=_normalized(IMAGENET_STATS, *augment))
    val = datasets.ImageFolder(root / "val", transform=_normalized(IMAGENET_STATS, *val_steps))
    return Splits(train, val, image_shape(cfg), len(train.classes))


def _fake(cfg: DataSection) -> Splits:
    """torchvision FakeData of the configured shape: random images, for tests."""
    shape = image_shape(cfg)
    make = partial(
        datasets.FakeData, image_size=shape, num_classes=cfg.fake_classes, transform=T.ToTensor()
    )
    train = make(size=cfg.fake_samples)
    test = make(size=max(cfg.fake_samples // 4, 1), random_offset=cfg.fake_samples)
    return Splits(train, test, shape, cfg.fake_classes)


BUILDERS: dict[str, Callable[[DataSection], Splits]] = {
    "digits": _digits,
    "mnist10k": _mnist10k,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "svhn": _svhn,
    "imagenet": _imagenet,
    "fake": _fake,
}


def load_splits(cfg: DataSection) -> Splits:
    """The configured dataset's train and test sets; any read failure is one DataError."""
    check_files(cfg)
    try:
        return BUILDERS[cfg.dataset](cfg)
    except (OSError, RuntimeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = f" in {cfg.data_dir}" if cfg.data_dir else ""
        raise DataError(f"dataset {cfg.dataset!r}{where} is unreadable: {message}") from err


class ShardSampler(DistributedSampler):
    """A seeded DistributedSampler whose epoch can start after a number of samples (resume)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Shuffle for `epoch` and skip the shard's first `start` samples of it."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        """The shard's indices for the current epoch, from `start` on."""
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        """Samples left in the current epoch."""
        return self.num_samples - self.start


def _loader_options(cfg: DataSection) -> dict:
    """DataLoader options shared by the train and test loaders."""
    return {
        "num_workers": cfg.loader_workers,
        "pin_memory": cfg.pin_memory and torch.cuda.is_available(),
        "persistent_workers": cfg.loader_workers > 0,
    }


def train_loader(dataset: Dataset, cfg: DataSection, seed: int) -> DataLoader:
    """This worker's shuffled shard of `dataset` in full batches of its share of batch_size."""
    context = ray.train.get_context()
    world_size = context.get_world_size()
    if cfg.batch_size % world_size:
        raise DataError(
            f"data.batch_size={cfg.batch_size} does not split over {world_size} workers"
        )
    sampler = ShardSampler(dataset, world_size, context.get_world_rank(), seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size // world_size,
        sampler=sampler,
        drop_last=True,
        **_loader_options(cfg),
    )
    return ray.train.torch.prepare_data_loader(loader)


def eval_shard(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """Every world_size-th sample from `rank` on: the shards cover `dataset` once, unpadded."""
    return Subset(dataset, range(rank, len(dataset), world_size))


def eval_loader(dataset: Dataset, cfg: DataSection) -> DataLoader:
    """This worker's share of `dataset` (see `eval_shard`), in order, on the worker's device."""
    context = ray.train.get_context()
    shard = eval_shard(dataset, context.get_world_rank(), context.get_world_size())
    loader = DataLoader(shard, batch_size=cfg.eval_batch_size, **_loader_options(cfg))
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


def steps_per_epoch(loader: DataLoader) -> int:
    """Full batches in one epoch of a train loader's shard, wherever the epoch started."""
    sampler = loader.sampler
    return sampler.num_samples // loader.batch_size


def set_position(loader: DataLoader, epoch: int, step_in_epoch: int) -> None:
    """Prepare a train loader for `epoch`, starting after `step_in_epoch` batches of it."""
    loader.sampler.set_position(epoch, step_in_epoch * loader.batch_size)
