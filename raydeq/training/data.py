"""Datasets and per-worker data loaders: digits here, the torchvision-read ones in `vision`.

Each training worker reads its own shard: the train loader samples with a seeded
`DistributedSampler` for the worker's rank (so shuffling is reproducible and an epoch can be
resumed part-way), the test loader reads every world_size-th batch without padding (so test
accuracy is exact, and the test NFE the same on any number of workers). The loop moves the
batches to its device. Neither loader draws from the process's random stream, and a training
sample's augmentation draws from a stream of its own, so that a resumed run trains as the
uninterrupted one would have.
"""

import errno
import gc
import gzip
import hashlib
import importlib.util
import itertools
import math
import os
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from raydeq.training.config import DataSection
from raydeq.training.errors import Recurring
from raydeq.training.runlock import open_lock, sign, wait_for
from raydeq.training.seeding import AUGMENTATION_STREAM, stream_seed

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
# What each kind of dataset file starts with (MNIST's IDX images and labels, CIFAR-10's
# protocol-2 pickles, SVHN's MATLAB 5 files), by a part of its name: a web page or a stub saved
# in a file's place is named before Ray starts, where torchvision's readers fail on it in each
# worker with a bare AssertionError.
SIGNATURES = {
    "idx3-ubyte": ("an IDX image file", b"\0\0\x08\x03"),
    "idx1-ubyte": ("an IDX label file", b"\0\0\x08\x01"),
    "cifar-10-batches-py/": ("a CIFAR-10 pickle", b"\x80\x02"),
    ".mat": ("a MATLAB 5 file", b"MATLAB 5.0 MAT-file"),
}
DOWNLOAD_LOCK = ".raydeq-download.lock"
# The longest a download waits for a connection or for its next bytes (torchvision sets no
# timeout, so a server or a link that stalls held the worker, and its node's others, for good).
DOWNLOAD_TIMEOUT_S = 60.0
# The datasets whose files torchvision reads only at their published MD5s, downloading them again
# with data.download=true where they differ; it keeps MNIST's four files where they are all there.
CHECKSUMMED = ("cifar10", "svhn")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SIZE = (28, 28)
CPU = torch.device("cpu")


class DataError(Recurring, ValueError):
    """A dataset's folder is missing, incomplete or unreadable, or too small for a batch: a
    restart meets it again, but for a download that failed or a read that the system failed
    (an OSError of a network folder may pass: `recurs=False`)."""


# Training samples of the datasets whose size is fixed (the embedded ones, torchvision's
# standard files), so that a batch larger than the training set is refused before Ray starts
# rather than in each worker, after every restart that Ray Train grants it.
TRAIN_SAMPLES = {
    "digits": 1797 - round(1797 * DIGITS_TEST_FRACTION),
    "mnist10k": 8000,
    "mnist": 60000,
    "cifar10": 50000,
    "svhn": 73257,
}


# Classes of the datasets whose classes are fixed, as their Splits give them (an image
# folder's are its class folders).
CLASSES = {"digits": 10, "mnist10k": 10, "mnist": 10, "cifar10": 10, "svhn": 10}


def dataset_classes(cfg: DataSection) -> int | None:
    """The configured dataset's classes where they are known without reading it."""
    return cfg.fake_classes if cfg.dataset == "fake" else CLASSES.get(cfg.dataset)


def train_samples(cfg: DataSection) -> int | None:
    """The configured dataset's training samples where they are known without reading it."""
    return cfg.fake_samples if cfg.dataset == "fake" else TRAIN_SAMPLES.get(cfg.dataset)


def check_batch(cfg: DataSection, samples: int) -> None:
    """Raise a DataError when data.batch_size exceeds `samples` training samples."""
    if cfg.batch_size > samples:
        counted = f"{samples} training sample{'' if samples == 1 else 's'}"
        raise DataError(
            f"data.batch_size={cfg.batch_size} exceeds the {counted} of {cfg.dataset!r}; lower it"
        )


@dataclass(frozen=True)
class Splits:
    """The train and test sets of one dataset, with the image shape and the number of classes;
    `augmented`: whether reading a training sample draws random numbers (augmentation)."""

    train: Dataset
    test: Dataset
    shape: tuple[int, int, int]
    num_classes: int
    augmented: bool = False


def _found_elsewhere(root: Path, missing: list[str]) -> str | None:
    """Where the missing files are there in another form, what to do: gzip archives of them
    (torchvision unpacks those it can verify, with no download), or the files in `root` itself
    where they belong in a subfolder (data_dir names that subfolder)."""
    packed = [name for name in missing if (root / f"{name}.gz").is_file()]
    if packed:
        return (
            f"or unpack the .gz archives of {', '.join(packed)} that are there (gunzip), or set "
            "data.download=true, which unpacks them without downloading"
        )
    for name in missing:
        folder, file = Path(name).parent, Path(name).name
        if folder.parts and (root / file).exists():
            return (
                f"or point data.data_dir at the folder that holds {folder.as_posix()}/ ({root} "
                f"holds {file} itself)"
            )
    return None


def check_files(cfg: DataSection) -> None:
    """Raise a DataError naming the folder and the expected files if any of them is missing,
    or naming the file if one of them is not what its name says or is cut short; with
    data.download=true, only the files that the download keeps (see CHECKSUMMED)."""
    if cfg.dataset not in EXPECTED_FILES:
        return
    root = Path(cfg.data_dir or ".")
    if cfg.download:
        check_download_folder(root)
    expected = EXPECTED_FILES[cfg.dataset]
    missing = [name for name in expected if not (root / name).exists()]
    if cfg.download and (missing or cfg.dataset in CHECKSUMMED):
        return
    if not missing:
        problem = (
            unreadable_file(root, expected)
            or altered_file(root, cfg.dataset)
            or mislabelled_file(root, cfg.dataset)
        )
        if problem:
            download = "" if cfg.download else " and set data.download=true"
            raise DataError(
                f"dataset {cfg.dataset!r} in {root} is unreadable: {problem}; replace it, or "
                f"delete it{download} to download it again"
            )
        return
    absent = "none of them is there" if missing == expected else f"missing {', '.join(missing)}"
    hint = (
        "or point data.data_dir at the folder that holds them, in the ImageFolder layout, one "
        "subfolder per class"
        if cfg.dataset == "imagenet"
        else _found_elsewhere(root, missing)
        or "point data.data_dir at the folder that holds them, or set data.download=true to "
        "download them"
    )
    raise DataError(
        f"dataset {cfg.dataset!r} not found in {root}: expected {', '.join(expected)} "
        f"({absent}); put the files there, {hint}"
    )


def check_download_folder(root: Path) -> None:
    """Raise a DataError where `root`, which data.download=true downloads into and locks for
    the node's workers, cannot be made or written: each worker failed there once Ray had
    started, and again at each restart."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(root))
    except OSError as err:
        raise DataError(
            f"data.data_dir: {root} cannot be made or written ({err.strerror}), where "
            "data.download=true downloads into it; give a folder you can write, or put the "
            "files there and set data.download=false"
        ) from None


def unreadable_file(root: Path, names: list[str]) -> str | None:
    """'NAME PROBLEM' for the first of the files `names` in `root` that cannot be read (see
    `file_problem`), None where each looks whole."""
    return next((f"{n} {p}" for n in names if (p := file_problem(root, n))), None)


def published_checksums(dataset: str) -> dict[str, str]:
    """The MD5 of each file of `dataset` by its name where torchvision reads only the published
    files (CIFAR-10's, SVHN's) and says in each worker 'Dataset not found or corrupted' of any
    other, naming none; empty for the other datasets."""
    if dataset not in CHECKSUMMED:
        return {}
    from torchvision.datasets import CIFAR10, SVHN  # seconds to import; for these two only

    if dataset == "svhn":
        files = SVHN.split_list.values()  # train, test and extra, which raydeq does not read
        return {name: md5 for _, name, md5 in files if name in EXPECTED_FILES["svhn"]}
    meta = (CIFAR10.meta["filename"], CIFAR10.meta["md5"])
    files = [*CIFAR10.train_list, *CIFAR10.test_list, meta]
    return {f"{CIFAR10.base_folder}/{name}": md5 for name, md5 in files}


def altered_file(root: Path, dataset: str) -> str | None:
    """'NAME PROBLEM' for the first file of `dataset` in `root` whose MD5 is not the published
    one that torchvision requires (see `published_checksums`), None where each has it."""
    for name, md5 in published_checksums(dataset).items():
        with (root / name).open("rb") as stream:
            digest = hashlib.file_digest(stream, "md5").hexdigest()
        if digest != md5:
            return (
                f"{name} is not the published file that torchvision reads (cut short or "
                f"altered): its MD5 is {digest}, not {md5}"
            )
    return None


def idx_count(path: Path) -> int:
    """The number of items (images or labels) an IDX file's header gives."""
    with path.open("rb") as stream:
        return struct.unpack(">I", stream.read(8)[4:])[0]


def mislabelled_file(root: Path, dataset: str) -> str | None:
    """'NAME PROBLEM' for the first IDX label file of `dataset` in `root` whose count is not its
    images' or that holds a label past the dataset's classes, None where each is sound:
    torchvision reads both unchecked, so a worker would drop the images past the labels, fail
    on the labels past the images, or fail in the loss (a device assert on a GPU)."""
    classes = CLASSES.get(dataset, 0)
    for name in (n for n in EXPECTED_FILES.get(dataset, []) if n.endswith("idx1-ubyte")):
        images = name.replace("labels-idx1", "images-idx3")
        count, pictured = idx_count(root / name), idx_count(root / images)
        if count != pictured:
            return f"{name} holds {count:,} labels for the {pictured:,} images of {images}"
        labels = np.fromfile(root / name, np.uint8, count, offset=8)
        bad = np.flatnonzero(labels >= classes)
        if bad.size:
            return (
                f"{name} holds label {labels[bad[0]]} at index {bad[0]:,} ({bad.size:,} labels "
                f"in all), where the labels of {classes} classes run from 0 to {classes - 1}"
            )
    return None


def file_problem(root: Path, name: str) -> str | None:
    """Why the dataset file root/name cannot be read: a folder in its place, its first bytes
    (see SIGNATURES) and, for an IDX file, its size against the dimensions in its header; None
    where it looks whole."""
    kind, signature = next((v for k, v in SIGNATURES.items() if k in name), (None, b""))
    if kind is None:
        return None
    path = root / name
    if path.is_dir():
        return "is a folder, not a file"
    with path.open("rb") as stream:
        head = stream.read(len(signature))
        if head != signature:
            return f"is not {kind}: it " + (f"starts with {head!r}" if head else "is empty")
        if not name.endswith("ubyte"):
            return None
        dims = stream.read(4 * head[3])
    header, size = len(head) + 4 * head[3], path.stat().st_size
    if len(dims) < 4 * head[3]:
        return f"is cut short: {size:,} bytes, within its {header:,}-byte header"
    needed = header + math.prod(struct.unpack(f">{head[3]}I", dims))
    if size < needed:
        return f"is cut short: {size:,} of the {needed:,} bytes its header gives"
    return None


def image_shape(cfg: DataSection) -> tuple[int, int, int]:
    """(channels, height, width) of the images the configured dataset yields."""
    shapes = {"digits": (1, *DIGITS_SIZE), "mnist": (1, 28, 28), "mnist10k": (1, 28, 28)}
    shapes |= {"cifar10": (3, 32, 32)}
    shapes |= {"svhn": (3, 32, 32), "imagenet": (3, cfg.image_size, cfg.image_size)}
    c, h, w = cfg.fake_shape if cfg.dataset == "fake" else shapes[cfg.dataset]
    return c, h, w


def _digits_table() -> np.ndarray:
    """scikit-learn's digits file, one row per image: its 64 pixels (0 to 16), then its label.

    Read as sklearn.datasets.load_digits reads it, without importing scikit-learn: that import
    (SciPy's with it) took 0.8 s in each training worker and trial process of a digits run.
    """
    sklearn = importlib.util.find_spec("sklearn")
    if sklearn is None:
        raise ModuleNotFoundError("scikit-learn is not installed (pip install scikit-learn)")
    (package,) = sklearn.submodule_search_locations
    path = Path(package, "datasets", "data", "digits.csv.gz")
    if not path.is_file():  # a scikit-learn that keeps it elsewhere: its own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.column_stack([bunch.data, bunch.target]).astype(np.float64)
    with gzip.open(path, "rt") as file:
        return np.loadtxt(file, delimiter=",")


def _digits(cfg: DataSection) -> Splits:
    """scikit-learn's 8x8 digits (1,797 images) upsampled to MNIST's 28x28, fixed 80/20 split.

    The upsampling lets the MNIST models read them; pixels are standardised with the train
    set's mean and standard deviation.
    """
    table = _digits_table()
    pixels = table[:, :-1].reshape(-1, 1, 8, 8)
    images = torch.tensor(pixels, dtype=torch.float32) / 16.0
    images = F.interpolate(images, size=DIGITS_SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(table[:, -1], dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    n_test = round(len(labels) * DIGITS_TEST_FRACTION)
    test_idx, train_idx = order[:n_test], order[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Splits(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
        image_shape(cfg),
        CLASSES["digits"],
    )


def load_splits(cfg: DataSection) -> Splits:
    """The configured dataset's train and test sets; any read failure is one DataError."""
    try:
        with (
            download_lock(cfg.data_dir or ".") if cfg.download else nullcontext(),
            socket_timeout(DOWNLOAD_TIMEOUT_S if cfg.download else None),
        ):
            check_files(cfg)  # in the lock: another worker of the node may be writing them
            if cfg.dataset == "digits":
                return _digits(cfg)
            # torchvision takes seconds to import; digits, the default, needs none of it
            from raydeq.training.vision import BUILDERS

            return BUILDERS[cfg.dataset](cfg)
    except DataError:
        raise
    except Exception as err:  # a reader's bare AssertionError too
        # torchvision's refusal of a download spans lines, the first ending in a colon.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        message = message or type(err).__name__
        if cfg.download and isinstance(err, TimeoutError):
            message += f" (a download got nothing for {DOWNLOAD_TIMEOUT_S:g} s)"
        expected = EXPECTED_FILES.get(cfg.dataset, [])
        root = Path(cfg.data_dir or ".")
        if cfg.download and not all((root / name).exists() for name in expected):
            raise DataError(
                f"dataset {cfg.dataset!r} could not be downloaded to {root}: {message}; put "
                f"its files there ({', '.join(expected)}) and set data.download=false",
                recurs=False,
            ) from err
        where = f" in {cfg.data_dir}" if cfg.data_dir else ""
        unreadable = f"dataset {cfg.dataset!r}{where} is unreadable: {message}"
        # The system's failed read (an OSError; a network folder's) may pass at a restart.
        raise DataError(unreadable, recurs=not isinstance(err, OSError)) from err


@contextmanager
def socket_timeout(seconds: float | None) -> Iterator[None]:
    """Give the sockets made in the block a timeout of `seconds` for each connect and read
    (None: as the process has it), which downloads by torchvision, setting none, then end on."""
    previous = socket.getdefaulttimeout()
    if seconds is not None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextmanager
def download_lock(data_dir: str) -> Iterator[None]:
    """Hold a file lock in `data_dir` for a read that may download into it: the workers of a
    node download one at a time, and the later ones find the files there (torchvision writes
    into the folder without a lock, so two workers downloading at once corrupt each other's
    files); a worker kept waiting says so."""
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    what = f"the dataset's download into {folder}"
    with open_lock(folder / DOWNLOAD_LOCK, what) as lock:
        wait_for(lock, folder / DOWNLOAD_LOCK, what)
        sign(lock)
        yield


class ShardSampler(DistributedSampler):
    """A seeded DistributedSampler whose epoch can start after a number of samples (resume);
    it yields (epoch, index) keys, read by `Samples`. An epoch's order is drawn from (seed,
    epoch) as `Samples` draws an augmentation: DistributedSampler's seed + epoch gave seed 0's
    epoch 1 the order of seed 1's epoch 0."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Shuffle for `epoch` and skip the shard's first `start` samples of it."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The shard's (epoch, index) keys for the current epoch, from `start` on."""
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(self._shard(), self.start, None))

    def _shard(self) -> list[int]:
        """The shard's indices for the current epoch: the epoch's permutation, repeated to
        a whole number of samples per replica as DistributedSampler pads it, every
        num_replicas-th from rank."""
        seed = int(np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padded = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        return padded[self.rank : self.total_size : self.num_replicas]

    def __len__(self) -> int:
        """Samples left in the current epoch."""
        return self.num_samples - self.start


class Samples(Dataset):
    """A training set read by the (epoch, index) keys of a ShardSampler. Where reading a sample
    draws random numbers (`augmented`), it draws them from the process's generator seeded by
    (seed, epoch, index) for that read alone, as torchvision's FakeData seeds its images: a
    sample's augmentation then depends neither on the loader process that reads it nor on
    where a run was resumed, and the process's own stream (dropout, Hutchinson probes, which
    a checkpoint restores) is left where it was."""

    def __init__(self, dataset: Dataset, seed: int, augmented: bool) -> None:
        self.dataset, self.seed, self.augmented = dataset, seed, augmented

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> object:
        epoch, index = key
        if not self.augmented:
            return self.dataset[index]
        generator = torch.default_generator  # torch.manual_seed also seeds every GPU: 200 us
        state = generator.get_state()
        generator.manual_seed(stream_seed(self.seed, AUGMENTATION_STREAM, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """The samples of a batch's `keys`, for `collate`: an in-memory set's without
        augmentation (the digits) as its batch, one index into each of its tensors, where
        reading its 64 samples one by one and stacking them took 0.3 ms a step; any other's one
        by one."""
        if self.augmented or not isinstance(self.dataset, TensorDataset):
            return [self[key] for key in keys]
        index = torch.tensor([i for _, i in keys])
        return Batch(tensor[index] for tensor in self.dataset.tensors)


class Batch(list):
    """A batch read whole by `Samples.__getitems__`: its tensors, as collating its samples
    gives them."""


def collate(samples: list) -> list:
    """A training batch: a Batch as it was read, other samples stacked (default_collate)."""
    return samples if isinstance(samples, Batch) else default_collate(samples)


# How the loader processes start: forked on Linux, where they share their worker's pages (the
# dataset, torch's libraries). Python 3.14's default there, the forkserver, started each one
# afresh, importing torch and unpickling its own copy of the dataset: 395 MB of private memory
# a loader process (448 MB with ImageNet's index) and 22 s to start two on 2 busy cores,
# against 6 MB and 0.3 s forked. Elsewhere the system's default (spawn on macOS, where a fork
# is unsafe; the datasets and freeze_inherited pickle for it).
LOADER_START = "fork" if sys.platform.startswith("linux") else None


def freeze_inherited(loader_process: int) -> None:
    """Leave the objects a loader process inherits from its worker out of its garbage
    collections: a full collection writes to each object it visits, copying the pages the
    fork shared (89 MB a loader process over its share of a quarter of an ImageNet epoch)."""
    gc.freeze()


def _loader_options(cfg: DataSection, device: torch.device, seed: int = 0) -> dict:
    """DataLoader options shared by the train and test loaders; the loader's own generator
    seeds its processes, so that starting an epoch draws nothing from the process's stream.
    Batches are pinned (data.pin_memory) only for a CUDA `device`: Ray 2.60 hides no GPU from
    a worker that holds none, and pinning there opened a CUDA context on GPU 0."""
    return {
        "num_workers": cfg.loader_workers,
        "pin_memory": cfg.pin_memory and device.type == "cuda",
        "persistent_workers": cfg.loader_workers > 0,
        "generator": torch.Generator().manual_seed(seed),
        "worker_init_fn": freeze_inherited,
        "multiprocessing_context": LOADER_START if cfg.loader_workers > 0 else None,
    }


def train_loader(
    dataset: Dataset,
    cfg: DataSection,
    seed: int,
    rank: int,
    world_size: int,
    augmented: bool = False,
    device: torch.device = CPU,
) -> DataLoader:
    """Worker `rank`'s shuffled shard of `dataset` in full batches of its share of batch_size
    for `device` (`augmented`: see Samples); config.validate has checked that batch_size
    splits over the workers, scaling.num_workers."""
    sampler = ShardSampler(dataset, world_size, rank, seed)
    return DataLoader(
        Samples(dataset, seed, augmented),
        batch_size=cfg.batch_size // world_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        **_loader_options(cfg, device, seed),
    )


def eval_shard(dataset: Dataset, batch_size: int, rank: int, world_size: int) -> Subset:
    """Every world_size-th batch of `dataset` in batches of `batch_size`, from `rank` on: the
    shards cover `dataset` once, unpadded, in the same batches on any number of workers (a
    batch's NFE is its slowest sample's, so the test NFE depends on which samples share one)."""
    starts = range(rank * batch_size, len(dataset), world_size * batch_size)
    return Subset(dataset, [i for s in starts for i in range(s, min(s + batch_size, len(dataset)))])


def eval_loader(
    dataset: Dataset, cfg: DataSection, rank: int, world_size: int, device: torch.device = CPU
) -> DataLoader:
    """Worker `rank`'s share of `dataset` (see `eval_shard`), in order, for `device`."""
    shard = eval_shard(dataset, cfg.eval_batch_size, rank, world_size)
    return DataLoader(shard, batch_size=cfg.eval_batch_size, **_loader_options(cfg, device))


def steps_per_epoch(loader: DataLoader) -> int:
    """Full batches of batch_size in one epoch, whatever the number of workers: at each step
    the shards' batches together are the next batch_size samples of the epoch's permutation
    (DistributedSampler deals it out in turn), so a run resumed on another number of workers
    goes on with the same batches, and no step reads the samples that DistributedSampler
    repeats to even out the shards."""
    sampler = loader.sampler
    return len(sampler.dataset) // (loader.batch_size * sampler.num_replicas)


def set_position(loader: DataLoader, epoch: int, step_in_epoch: int) -> None:
    """Prepare a train loader for `epoch`, starting after `step_in_epoch` batches of it."""
    loader.sampler.set_position(epoch, step_in_epoch * loader.batch_size)
