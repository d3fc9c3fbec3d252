"""The datasets read through torchvision: mnist10k (embedded), MNIST, CIFAR-10, SVHN, ImageNet
folders (listed once, optionally staged to local disk) and FakeData, the MNIST, CIFAR-10 and
ImageNet ones with their standard training augmentation (SVHN and FakeData take none)."""

import errno
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader

from raydeq.datasets import mnist10k
from raydeq.training.config import DataSection
from raydeq.training.console import first_line
from raydeq.training.data import CLASSES, DataError, Splits, image_shape
from raydeq.training.folders import SPLITS, Index, load_index
from raydeq.training.staging import stage, staged_root

# A copy's errors in writing, which shutil's sendfile copy gives under the source file's name.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _normalized(
    stats: tuple[tuple[float, ...], tuple[float, ...]], *augment: Callable
) -> T.Compose:
    """The given augmentations, then ToTensor and Normalize(mean, std)."""
    return T.Compose([*augment, T.ToTensor(), T.Normalize(*stats)])


def _mnist_augmentation(cfg: DataSection) -> tuple[Callable, ...]:
    """MNIST's training augmentation: random rotations (up to 10 degrees) and shifts (up to
    10%), which a dense model needs to generalise from a few thousand digits."""
    return (T.RandomAffine(degrees=10, translate=(0.1, 0.1)),) if cfg.augment else ()


class ArrayImages(Dataset):
    """uint8 images (N, C, H, W) and labels, each image passed through the PIL transforms
    `augment` and then ToTensor and Normalize(*stats) (see `transform`). Without augmentation
    every image is standardised once, here, so that a read is an index rather than a PIL round
    trip (200 us of CPU time for a CIFAR-10 image through torchvision's dataset and
    transforms)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        stats: tuple[tuple[float, ...], tuple[float, ...]],
        *augment: Callable,
    ) -> None:
        self.images, self.labels, self.augment = images, torch.as_tensor(labels), T.Compose(augment)
        self.mean, self.std = (torch.tensor(s).view(-1, 1, 1) for s in stats)
        self.standardised = None if augment else self.standardise(images)

    def __len__(self) -> int:
        return len(self.labels)

    def standardise(self, planes: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., C, H, W) as ToTensor and Normalize give them: floats p / 255,
        less the mean, over the deviation, in the same float32 operations."""
        return planes.float().div(255).sub(self.mean).div(self.std)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """A PIL image augmented and standardised, as a training read gives it."""
        pixels = np.array(self.augment(image), np.uint8)
        planes = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return self.standardise(torch.from_numpy(planes))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.standardised is not None:
            return self.standardised[index], int(self.labels[index])
        planes = self.images[index].numpy()
        pixels = planes[0] if len(planes) == 1 else planes.transpose(1, 2, 0)
        return self.transform(Image.fromarray(pixels)), int(self.labels[index])


def _mnist(cfg: DataSection) -> Splits:
    """MNIST from `data_dir/MNIST/raw` in the IDX layout torchvision reads, its digits read as
    the embedded ones (see ArrayImages)."""
    make = partial(datasets.MNIST, cfg.data_dir, download=cfg.download)
    train, test = make(train=True), make(train=False)
    return Splits(
        ArrayImages(train.data[:, None], train.targets, MNIST_STATS, *_mnist_augmentation(cfg)),
        ArrayImages(test.data[:, None], test.targets, MNIST_STATS),
        image_shape(cfg),
        CLASSES["mnist"],
        augmented=cfg.augment,
    )


def _mnist10k(cfg: DataSection) -> Splits:
    """The embedded 10,000 MNIST digits (8,000 train / 2,000 test), a subset of MNIST.

    Transforms and augmentation are MNIST's; the files ship in the package (MNIST10K_DIR).
    """
    (train_images, train_labels), (test_images, test_labels) = mnist10k(True), mnist10k(False)
    augment = _mnist_augmentation(cfg)
    train = ArrayImages(train_images[:, None], train_labels, MNIST_STATS, *augment)
    test = ArrayImages(test_images[:, None], test_labels, MNIST_STATS)
    return Splits(train, test, image_shape(cfg), CLASSES["mnist10k"], augmented=cfg.augment)


def _cifar10(cfg: DataSection) -> Splits:
    """CIFAR-10, its images read as arrays (see ArrayImages); augmentation as the paper's
    reference code (experiments/cifar10/main.jl at DeepEquilibriumNetworks.jl d18c610):
    horizontal flips, then a 32 x 32 crop of the image resized to 42 x 42."""
    augment = (
        (T.RandomHorizontalFlip(), T.Resize(42, antialias=True), T.RandomCrop(32))
        if cfg.augment
        else ()
    )
    make = partial(datasets.CIFAR10, cfg.data_dir, download=cfg.download)
    train, test = make(train=True), make(train=False)

    def planes(images: np.ndarray) -> torch.Tensor:
        """CIFAR-10's images (N, H, W, C) as (N, C, H, W), without a copy."""
        return torch.from_numpy(images).permute(0, 3, 1, 2)

    return Splits(
        ArrayImages(planes(train.data), train.targets, CIFAR10_STATS, *augment),
        ArrayImages(planes(test.data), test.targets, CIFAR10_STATS),
        image_shape(cfg),
        CLASSES["cifar10"],
        augmented=cfg.augment,
    )


def _svhn(cfg: DataSection) -> Splits:
    """SVHN (train and test .mat files), its images read as arrays (see ArrayImages); no
    flips, since digits are not mirror-symmetric."""
    make = partial(datasets.SVHN, cfg.data_dir, download=cfg.download)
    train, test = make(split="train"), make(split="test")
    return Splits(
        *(ArrayImages(torch.from_numpy(s.data), s.labels, SVHN_STATS) for s in (train, test)),
        image_shape(cfg),
        CLASSES["svhn"],
    )


class FileImages(Dataset):
    """Image files under `root` (paths relative to it) with their labels, each passed through
    `transform`; read with torchvision's loader (RGB). `index_file` (the index that lists them,
    where one is stored) is named in the error of a file that does not read. Paths and labels
    are held in arrays, not lists, and a read's path is a string, not a Path: reading a Python
    object writes its reference count, so that each loader process copied the pages of the
    lists it read, and pathlib interns each name it parses, for good (together 166 MB a
    process once it had read each of ImageNet's 1.28M images; now under 1 MB)."""

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        labels: Sequence[int],
        transform: Callable,
        index_file: Path | None = None,
    ) -> None:
        self.root, self.transform, self.index_file = root, transform, index_file
        self.files, self.labels = pa.array(files, pa.string()), np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = os.path.join(self.root, self.files[index].as_py())  # pathlib interns each name
        try:
            image = default_loader(path)
        except FileNotFoundError:
            raise _missing_file(Path(path), self.index_file) from None
        except OSError as err:  # PIL's UnidentifiedImageError and "image file is truncated"
            relist = f" and delete {self.index_file}, which lists it" if self.index_file else ""
            raise DataError(
                f"{path} cannot be read as an image ({first_line(err)}); replace it, "
                f"or remove it{relist}"
            ) from None
        return self.transform(image), int(self.labels[index])


def _missing_file(path: Path, index_file: Path | None) -> DataError:
    """The error of a listed image that is not there: the folder changed after `index_file`
    listed it, so the index is to be deleted for the folder to be listed again."""
    listed = f", listed in {index_file}," if index_file else ""
    relist = f"; delete {index_file} for the folder to be listed again" if index_file else ""
    return DataError(f"{path}{listed} is not there: the folder changed after it was listed{relist}")


def _staged(data_dir: str, index: Index, stage_to: str) -> Path:
    """The root of this node's copy of the indexed files in `stage_to` (see `stage`); a DataError
    names a listed image that is not there, or else the copy that cannot be written (a full
    disk, a read-only or misnamed `stage_to`), which reading the data folder would not fix."""
    try:
        return stage(data_dir, [f for split in SPLITS for f in index.files[split]], stage_to)
    except OSError as err:
        source = (
            err.errno not in WRITE_ERRORS
            and err.filename is not None
            and Path(err.filename).is_relative_to(data_dir)
        )
        if source and isinstance(err, FileNotFoundError):
            raise _missing_file(Path(err.filename), index.path) from None
        if source:
            raise
        written = err.filename2 or err.filename  # the copy's file, where shutil names both
        at = f": {written}" if written else ""
        copy = staged_root(stage_to, data_dir)
        raise DataError(
            f"data.stage_to {stage_to}: the copy of {data_dir} to {copy} "
            f"cannot be written ({err.strerror}{at}); set data.stage_to to a folder this node can "
            f"write, with room for the copy, or leave it unset to read {data_dir} in place"
        ) from None


def _mixed(files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """The validation images and labels in one order drawn from seed 0, the same on every worker
    and start: a val/ in class folders lists them class by class, so that the first
    train.eval_batches batches held the first classes alone."""
    order = np.random.default_rng(0).permutation(len(files))
    return [files[i] for i in order], [labels[i] for i in order]


def _imagenet(cfg: DataSection) -> Splits:
    """ImageNet `train/` and `val/` from the folder's index (listed once, see `folders`), read
    from the node-local copy when `stage_to` is set; transforms as the paper's reference code
    (experiments/imagenet/main.jl at DeepEquilibriumNetworks.jl d18c610): resized whole to
    size x size; augmentation: resized to 256 x 256 (at size 224), flipped, cropped to size.
    The validation images are read in a fixed mixed order (see `_mixed`)."""
    size = cfg.image_size
    val_steps = (T.Resize((size, size)),)
    enlarged = round(size * 256 / 224)
    augment = (T.Resize((enlarged, enlarged)), T.RandomHorizontalFlip(), T.RandomCrop(size))
    data_dir = cfg.data_dir or "."
    index = load_index(data_dir)
    root = Path(data_dir) if cfg.stage_to is None else _staged(data_dir, index, cfg.stage_to)
    train_steps = augment if cfg.augment else val_steps
    train = FileImages(
        root,
        index.files["train"],
        index.labels["train"],
        _normalized(IMAGENET_STATS, *train_steps),
        index.path,
    )
    val = FileImages(
        root,
        *_mixed(index.files["val"], index.labels["val"]),
        _normalized(IMAGENET_STATS, *val_steps),
        index.path,
    )
    return Splits(train, val, image_shape(cfg), len(index.classes), augmented=cfg.augment)


class FakeImages(Dataset):
    """torchvision FakeData's random images and labels (sample i drawn from seed i + offset),
    drawn from a generator of their own: FakeData seeds the process's with torch.manual_seed,
    which seeds every GPU's too, so that dropout and probes on a GPU would draw from the seed
    of the batch's last sample."""

    def __init__(self, size: int, shape: tuple[int, int, int], classes: int, offset: int) -> None:
        self.size, self.shape, self.classes, self.offset = size, shape, classes, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"FakeImages index {index} out of range of {self.size}")
        generator = torch.Generator().manual_seed(index + self.offset)
        image = torch.randn(*self.shape, generator=generator)
        label = int(torch.randint(0, self.classes, (1,), generator=generator))
        return T.ToTensor()(T.ToPILImage()(image)), label


def _fake(cfg: DataSection) -> Splits:
    """FakeData of the configured shape (see FakeImages): random images, for tests."""
    shape = image_shape(cfg)
    train = FakeImages(cfg.fake_samples, shape, cfg.fake_classes, 0)
    test = FakeImages(max(cfg.fake_samples // 4, 1), shape, cfg.fake_classes, cfg.fake_samples)
    return Splits(train, test, shape, cfg.fake_classes)


BUILDERS: dict[str, Callable[[DataSection], Splits]] = {
    "mnist10k": _mnist10k,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "svhn": _svhn,
    "imagenet": _imagenet,
    "fake": _fake,
}
