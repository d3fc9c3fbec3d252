"""Datasets and loaders: shapes, exact shards, one clear error for a missing or bad folder."""

import functools
import gc
import gzip
import hashlib
import itertools
import math
import multiprocessing
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import LINUX_PROC, WAIT_S, private_kb
from PIL import Image
from torch.utils.data import default_collate

from raydeq import datasets
from raydeq.training import data
from raydeq.training.config import ConfigError, validate
from raydeq.training.storage import StorageError


def mnist_folder(root: Path) -> Path:
    """Write the embedded digits to root/MNIST/raw as the uncompressed IDX files of full MNIST."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in datasets.MNIST10K_FILES:
        (raw / name.removesuffix(".gz")).write_bytes(
            gzip.decompress(datasets.MNIST10K_DIR.joinpath(name).read_bytes())
        )
    return root


def section(**options: Any) -> data.DataSection:
    """A validated data section with the given options."""
    return validate({"data": options}).data


def test_digits_are_mnist_shaped_standardised_and_split_80_20(monkeypatch, tmp_path):
    """The digits are scikit-learn's, read to the bit without importing sklearn.datasets (1.6 s
    in each training worker, with SciPy): an import of it fails here; a scikit-learn that
    keeps its file elsewhere is read through its own loader."""
    from sklearn.datasets import load_digits

    reference = load_digits()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    table = data._digits_table()
    assert np.array_equal(table[:, :-1].reshape(-1, 8, 8), reference.images)
    assert np.array_equal(table[:, -1], reference.target)
    splits = data.load_splits(section())
    assert (len(splits.train), len(splits.test)) == (1438, 359)
    assert data.train_samples(section()) == len(splits.train)  # known before it is read
    assert splits.shape == (1, 28, 28) and splits.num_classes == 10
    images, labels = splits.train.tensors
    assert images.shape == (1438, 1, 28, 28)
    assert abs(images.mean().item()) < 1e-4 and images.std().item() == pytest.approx(1, abs=1e-3)
    assert set(labels.tolist()) == set(range(10))
    assert set(labels.tolist()) == set(splits.test.tensors[1].tolist())
    monkeypatch.undo()
    moved = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: moved)
    assert np.array_equal(data._digits_table(), table)  # a scikit-learn keeping it elsewhere
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataError) as missing:
        data.load_splits(section())
    monkeypatch.undo()
    assert str(missing.value) == (
        "dataset 'digits' is unreadable: scikit-learn is not installed (pip install scikit-learn)"
    )


def test_the_embedded_mnist10k_is_the_8000_2000_subset_and_reads_no_folder():
    splits = data.load_splits(section(dataset="mnist10k"))
    assert (len(splits.train), len(splits.test)) == (8000, 2000)
    assert data.train_samples(section(dataset="mnist10k")) == len(splits.train)
    image, label = splits.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0 <= label < 10
    labels = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    assert torch.bincount(labels, minlength=10).min() > 150  # every digit, roughly balanced
    pixels, _ = datasets.mnist10k(train=True)
    assert pixels.dtype == torch.uint8 and pixels.float().div(255).mean() == pytest.approx(
        0.131, abs=1e-3
    )  # the README's mean pixel value; full MNIST's is 0.1307
    with pytest.raises(ConfigError, match="^data.data_dir: dataset 'mnist10k' ships with raydeq"):
        section(dataset="mnist10k", data_dir="/anywhere")


def test_the_embedded_files_are_checked_against_their_checksums(tmp_path, monkeypatch):
    for name in datasets.MNIST10K_FILES:
        payload = (datasets.MNIST10K_DIR / name).read_bytes()
        assert hashlib.sha256(payload).hexdigest() == datasets.MNIST10K_FILES[name]
        (tmp_path / name).write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    monkeypatch.setattr(datasets, "MNIST10K_DIR", tmp_path)
    with pytest.raises(data.DataError, match="^dataset 'mnist10k' is unreadable: .* checksum"):
        data.load_splits(section(dataset="mnist10k"))


def test_mnist_reads_idx_files_from_data_dir_like_the_embedded_digits(tmp_path):
    folder = mnist_folder(tmp_path)
    files = data.load_splits(section(dataset="mnist", data_dir=str(folder), augment=False))
    embedded = data.load_splits(section(dataset="mnist10k", augment=False))
    assert (len(files.train), len(files.test)) == (8000, 2000)
    for index in (0, 4321):
        assert torch.equal(files.train[index][0], embedded.train[index][0])
        assert files.train[index][1] == embedded.train[index][1]


def test_augmentation_moves_training_digits_only_and_can_be_switched_off():
    plain = data.load_splits(section(dataset="mnist10k", augment=False))
    augmented = data.load_splits(section(dataset="mnist10k"))
    torch.manual_seed(0)
    draws = torch.stack([augmented.train[0][0] for _ in range(4)])
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    assert (draws - plain.train[0][0]).abs().amax(dim=(1, 2, 3)).min() > 0.5
    assert draws.sum(dim=(1, 2, 3)).std() / plain.train[0][0].sum().abs() < 0.2  # same digit
    assert torch.equal(augmented.test[0][0], plain.test[0][0])


def test_mnist10k_pixels_are_standardised_with_mnists_mean_and_deviation():
    """Each pixel p in 0..255 becomes (p / 255 - 0.1307) / 0.3081, MNIST's published mean and
    standard deviation, so the 2,000 test digits have mean near 0 and deviation near 1."""
    splits = data.load_splits(section(dataset="mnist10k", augment=False))
    pixels, _ = datasets.mnist10k(train=False)
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    expected = (pixels.double() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(images.squeeze(1).double(), expected, rtol=0, atol=1e-6)
    assert abs(images.mean().item()) < 0.02 and images.std().item() == pytest.approx(1, abs=0.02)


@functools.cache
def torchvision_digits(affine: bool, train: bool) -> dict[int, torch.Tensor]:
    """Every fifth embedded digit of a split as torchvision's ToTensor and Normalize give it
    (after RandomAffine drawn with the digit's index as seed, where `affine`): the reference
    of both datasets' tests, made once."""
    from torchvision import transforms as T

    moved = (T.RandomAffine(degrees=10, translate=(0.1, 0.1)),) if affine else ()
    reference = T.Compose([*moved, T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])
    pixels, _ = datasets.mnist10k(train=train)
    expected = {}
    for index in range(0, len(pixels), 5):
        torch.manual_seed(index)
        expected[index] = reference(Image.fromarray(pixels[index].numpy(), mode="L"))
    return expected


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("dataset", ["mnist10k", "mnist"])
def test_mnist_digits_read_to_the_bit_as_torchvisions_transforms_give_them(
    tmp_path, dataset, augment
):
    """Every fifth digit, train and test, embedded or read from MNIST's files, equals
    torchvision's ToTensor and Normalize (after RandomAffine drawn from the same seed where
    augmented) of its PIL image, to the bit."""
    folder = {"data_dir": str(mnist_folder(tmp_path))} if dataset == "mnist" else {}
    splits = data.load_splits(section(dataset=dataset, augment=augment, **folder))
    for split, train in ((splits.train, True), (splits.test, False)):
        _, labels = datasets.mnist10k(train=train)
        expected = torchvision_digits(augment and train, train)
        for index, reference in expected.items():
            torch.manual_seed(index)
            image, label = split[index]
            assert torch.equal(image, reference) and label == labels[index], index


def dot_pair_geometry(image: torch.Tensor) -> tuple[float, float, float]:
    """For a 28 x 28 image of ink in 0..1 holding one dot in each half (left, right): the angle
    in degrees of the line from the left dot's centroid to the right one's, the largest
    coordinate shift of their midpoint from (13, 13.5), and their distance."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centroids = []
    for half in (cols < 14, cols >= 14):
        ink = image * half
        centroids.append(torch.stack([(ink * rows).sum(), (ink * cols).sum()]) / ink.sum())
    left, right = centroids
    d = right - left
    shift = ((left + right) / 2 - torch.tensor([13.0, 13.5])).abs().max()
    return math.degrees(math.atan2(d[0], d[1])), float(shift), float(d.norm())


def test_augmentation_rotates_and_shifts_a_digit_without_rescaling_its_ink():
    """Rotations up to 10 degrees and shifts up to 10% keep a centred digit's ink (the sum of
    its pixels in 0..1) within a few percent; a zoom would scale it by the area's factor.
    Measured on two 3 x 3 dots 17 pixels apart: the line between them turns by at most 10
    degrees (and by more than 8 in some of 200 draws), their midpoint moves by at most
    round(2.8) = 3 pixels (and by 3 in some draws), their distance stays 17 (to the half
    pixel of nearest-neighbour sampling)."""
    plain = data.load_splits(section(dataset="mnist10k", augment=False))
    augmented = data.load_splits(section(dataset="mnist10k"))
    torch.manual_seed(0)
    for index in (0, 28, 49):
        ink = (plain.train[index][0] * 0.3081 + 0.1307).sum()
        draws = torch.stack([augmented.train[index][0] for _ in range(8)]) * 0.3081 + 0.1307
        assert (draws.sum(dim=(1, 2, 3)) / ink - 1).abs().max() < 0.1
    pixels = torch.zeros(28, 28, dtype=torch.uint8)
    pixels[12:15, 4:7] = pixels[12:15, 21:24] = 255
    dots = Image.fromarray(pixels.numpy(), mode="L")
    assert dot_pair_geometry(pixels / 255) == (0.0, 0.0, 17.0)
    angles, shifts, distances = zip(
        *(
            dot_pair_geometry(augmented.train.transform(dots)[0] * 0.3081 + 0.1307)
            for _ in range(200)
        ),
        strict=True,
    )
    assert 8 < max(map(abs, angles)) <= 10.5, max(map(abs, angles))
    assert 2.5 < max(shifts) <= 3.5, max(shifts)
    assert max(abs(d - 17) for d in distances) <= 0.5, distances


@pytest.mark.parametrize("augment", [True, False])
def test_a_split_says_whether_reading_a_training_sample_draws_random_numbers(augment):
    """The loaders seed each augmented read from (seed, epoch, index) only where the split
    says it is augmented; otherwise a resumed run would train on other images."""
    splits = data.load_splits(section(dataset="mnist10k", augment=augment))
    torch.manual_seed(0)
    first = splits.train[0][0]
    torch.manual_seed(1)
    assert torch.equal(first, splits.train[0][0]) is not augment
    assert splits.augmented is augment


def one_image(pixels: torch.Tensor, svhn: bool = False) -> Callable:
    """A stand-in for torchvision's CIFAR10 (or, `svhn`, SVHN) whose every split holds the one
    uint8 image `pixels` (H, W, 3), of class 3, in that dataset's layout."""

    def make(root: str, download: bool, **split: Any) -> SimpleNamespace:
        if svhn:
            return SimpleNamespace(data=pixels.permute(2, 0, 1)[None].numpy(), labels=[3])
        return SimpleNamespace(data=pixels[None].numpy(), targets=[3])

    return make


@pytest.mark.parametrize("augment", [True, False])
def test_cifar10_augments_training_images_only(monkeypatch, tmp_path, augment):
    """Flips and crops draw a new training image per read; the test images are only
    normalised with CIFAR-10's per-channel mean and deviation."""
    from raydeq.training import vision

    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(vision.datasets, "CIFAR10", one_image(pixels.to(torch.uint8)))
    cfg = section(dataset="cifar10", data_dir=str(tmp_path), augment=augment)
    splits = vision.BUILDERS["cifar10"](cfg)
    assert splits.augmented is augment and splits.shape == (3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    normalised = (pixels.permute(2, 0, 1).float() / 255 - mean) / std
    for seed in range(3):
        torch.manual_seed(seed)
        torch.testing.assert_close(splits.test[0], (normalised, 3))
    draws = []
    for seed in range(3):
        torch.manual_seed(seed)
        draws.append(splits.train[0][0])
    assert all(d.shape == (3, 32, 32) for d in draws)
    moved = [not torch.equal(d, normalised) for d in draws]
    assert moved == [augment] * 3


def test_fake_data_has_the_configured_shape_and_classes():
    splits = data.load_splits(
        section(dataset="fake", fake_shape=[3, 12, 10], fake_classes=4, fake_samples=40)
    )
    assert (len(splits.train), len(splits.test)) == (40, 10)
    assert data.train_samples(section(dataset="fake", fake_samples=40)) == 40
    image, label = splits.test[3]
    assert image.shape == (3, 12, 10) and 0 <= label < 4
    assert splits.shape == (3, 12, 10) and splits.num_classes == 4


def test_imagenet_folders_are_read_at_the_configured_resolution(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (50, 40), (i * 90, 30, 60)).save(folder / f"{i}.png")
    splits = data.load_splits(section(dataset="imagenet", data_dir=str(tmp_path), image_size=32))
    assert splits.shape == (3, 32, 32) and splits.num_classes == 2
    assert splits.train[0][0].shape == (3, 32, 32)
    assert splits.test[3][0].shape == (3, 32, 32)


def test_imagenet_images_are_resized_whole_as_the_reference_does(tmp_path):
    """As experiments/imagenet/main.jl of SciML/DeepEquilibriumNetworks.jl at d18c610: a test
    image is resized to size x size whole (its left and right edges stay in), and a training
    image to 256 x 256 at size 224, flipped and cropped to size, so that every crop holds most of
    the image (its white top and black bottom); RandomResizedCrop and a centre crop did not."""
    for split in ("train", "val"):
        folder = tmp_path / split / "cls"
        folder.mkdir(parents=True)
        image = Image.new("RGB", (64, 32), (255, 255, 255))
        image.paste((0, 0, 0), (0, 16, 64, 32))
        image.paste((255, 0, 0), (0, 0, 4, 16))
        image.paste((0, 0, 255), (60, 0, 64, 16))
        image.save(folder / "0.png")
    splits = data.load_splits(section(dataset="imagenet", data_dir=str(tmp_path), image_size=16))
    test = splits.test[0][0]
    assert test[0, 0, 0] > test[2, 0, 0] and test[2, 0, -1] > test[0, 0, -1]
    torch.manual_seed(0)
    for _ in range(20):
        train = splits.train[0][0].mean(dim=(0, 2))
        assert train[0] > 1.5 and train[-1] < -1.5
    assert splits.augmented


def test_the_first_imagenet_test_batches_mix_the_classes_of_a_val_folder_sorted_by_class(
    tmp_path,
):
    """val/ in class folders is listed class by class: train.eval_batches=2 in batches of 4
    tested classes 0 and 1 alone. The test set is read in one mixed order, the same on every
    load and worker, each image still with its own class (its red level)."""
    for split, count in (("train", 1), ("val", 4)):
        for cls in range(5):
            folder = tmp_path / split / f"n{cls:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (cls * 60, i * 60, 0)).save(folder / f"{i}.png")
    cfg = section(dataset="imagenet", data_dir=str(tmp_path), image_size=8, eval_batch_size=4)
    splits = data.load_splits(cfg)
    red = [round(float(image[0, 0, 0] * 0.229 + 0.485) * 255 / 60) for image, _ in splits.test]
    labels = [int(label) for _, label in splits.test]
    assert red == labels and sorted(labels) == [c for c in range(5) for _ in range(4)]
    first = [
        label
        for _, batch in itertools.islice(data.eval_loader(splits.test, cfg, 0, 1), 2)
        for label in batch.tolist()
    ]
    assert len(set(first)) >= 4
    shared = [data.eval_loader(splits.test, cfg, rank, 2) for rank in (0, 1)]
    assert [next(iter(loader))[1].tolist() for loader in shared] == [first[:4], first[4:]]
    assert [int(label) for _, label in data.load_splits(cfg).test] == labels


@pytest.mark.parametrize(
    ("dataset", "files"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte, MNIST/raw/train-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("svhn", "train_32x32.mat, test_32x32.mat"),
    ],
)
def test_a_missing_folder_names_the_folder_the_files_and_the_download_option(
    tmp_path, dataset, files
):
    folder = tmp_path / "nothing-here"
    with pytest.raises(data.DataError) as info:
        data.load_splits(section(dataset=dataset, data_dir=str(folder)))
    message = str(info.value)
    assert message.startswith(f"dataset {dataset!r} not found in {folder}: expected {files}")
    assert "none of them is there" in message
    assert message.endswith(
        "put the files there, point data.data_dir at the folder that holds them, or set "
        "data.download=true to download them"
    )
    assert "\n" not in message


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_a_failed_download_is_one_line_naming_its_reason_and_what_to_do(
    tmp_path, monkeypatch, dataset
):
    """torchvision's refusal of a failed MNIST download spans lines, the first ending in a
    colon: the error read "is unreadable: Error downloading train-images-idx3-ubyte.gz:",
    without the reason, and called files that were never there unreadable."""

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no route to the download site")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(data.DataError) as info:
        data.load_splits(section(dataset=dataset, data_dir=str(tmp_path), download=True))
    message = str(info.value)
    assert message.startswith(f"dataset {dataset!r} could not be downloaded to {tmp_path}: ")
    assert "no route to the download site" in message
    expected = ", ".join(data.EXPECTED_FILES[dataset])
    assert message.endswith(f"; put its files there ({expected}) and set data.download=false")
    assert "\n" not in message


def test_a_partial_or_malformed_folder_is_one_clear_error(tmp_path):
    source = mnist_folder(tmp_path / "source")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.EXPECTED_FILES["mnist"]:
        (tmp_path / name).write_bytes((source / name).read_bytes()[:100])
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="missing MNIST/raw/t10k-labels-idx1-ubyte"):
        data.load_splits(section(dataset="mnist", data_dir=str(tmp_path)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 10)
    with pytest.raises(data.DataError, match=f"^dataset 'mnist' in {tmp_path} is unreadable: "):
        data.load_splits(section(dataset="mnist", data_dir=str(tmp_path)))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(data.DataError, match="dataset 'imagenet' in .* is unreadable: "):
        data.load_splits(section(dataset="imagenet", data_dir=str(tmp_path)))
    with pytest.raises(data.DataError, match="ImageFolder layout, one subfolder per class$"):
        data.load_splits(section(dataset="imagenet", data_dir=str(tmp_path / "none")))


@pytest.mark.parametrize(
    ("dataset", "name", "content", "problem"),
    [
        (
            "mnist",
            "MNIST/raw/train-images-idx3-ubyte",
            b"<html>",
            "an IDX image file: it starts with b'<htm'",
        ),
        ("mnist", "MNIST/raw/t10k-labels-idx1-ubyte", b"", "an IDX label file: it is empty"),
        (
            "cifar10",
            "cifar-10-batches-py/test_batch",
            b"<html>",
            "a CIFAR-10 pickle: it starts with b'<h'",
        ),
        ("svhn", "test_32x32.mat", b"Not Found", "a MATLAB 5 file: it starts with b'Not Found'"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_named_before_it_is_read(
    tmp_path, dataset, name, content, problem
):
    signature = {"mnist": b"", "cifar10": b"\x80\x02", "svhn": b"MATLAB 5.0 MAT-file"}[dataset]
    if dataset == "mnist":
        mnist_folder(tmp_path)
    for expected in data.EXPECTED_FILES[dataset]:
        (tmp_path / expected).parent.mkdir(parents=True, exist_ok=True)
        if dataset != "mnist":
            (tmp_path / expected).write_bytes(signature + b"rest")
    (tmp_path / name).write_bytes(content)
    cfg = section(dataset=dataset, data_dir=str(tmp_path))
    with pytest.raises(data.DataError) as info:
        data.check_files(cfg)  # the driver's preflight, before Ray starts
    assert str(info.value) == (
        f"dataset {dataset!r} in {tmp_path} is unreadable: {name} is not {problem}; "
        "replace it, or delete it and set data.download=true to download it again"
    )


def test_a_download_folder_that_cannot_be_made_is_refused_before_ray_starts(tmp_path):
    """data.download=true into a data_dir that cannot be made (below a file) passed the
    driver's preflight, and every worker failed to make it once Ray had started, then again
    at each of its restarts; the preflight now names the folder and why."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for dataset in ("mnist", "cifar10"):
        cfg = section(dataset=dataset, data_dir=str(blocker / "data"), download=True)
        with pytest.raises(data.DataError) as info:
            data.check_files(cfg)
        assert str(info.value) == (
            f"data.data_dir: {blocker / 'data'} cannot be made or written (Not a directory), "
            "where data.download=true downloads into it; give a folder you can write, or put "
            "the files there and set data.download=false"
        )
    made = tmp_path / "new" / "data"
    assert data.check_files(section(dataset="mnist", data_dir=str(made), download=True)) is None
    assert made.is_dir()


def test_a_folder_that_cannot_be_written_is_refused_only_to_download_into(tmp_path, monkeypatch):
    """A data_dir that the user may read but not write (root, who runs these tests, may write
    any) holds files to train on, and is refused where data.download=true would write there."""
    mnist_folder(tmp_path)
    monkeypatch.setattr(data.os, "access", lambda path, mode: not mode & os.W_OK)
    assert data.check_files(section(dataset="mnist", data_dir=str(tmp_path))) is None
    with pytest.raises(data.DataError) as info:
        data.check_files(section(dataset="mnist", data_dir=str(tmp_path), download=True))
    assert str(info.value).startswith(
        f"data.data_dir: {tmp_path} cannot be made or written (Permission denied), where "
    )


def test_an_idx_file_shorter_than_its_header_says_is_cut_short(tmp_path):
    mnist_folder(tmp_path)
    images = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    whole = images.read_bytes()
    assert data.check_files(section(dataset="mnist", data_dir=str(tmp_path))) is None
    images.write_bytes(whole[:-1000])
    with pytest.raises(data.DataError) as info:
        data.load_splits(section(dataset="mnist", data_dir=str(tmp_path)))
    assert f"is cut short: {len(whole) - 1000:,} of the {len(whole):,} bytes its header gives;" in (
        str(info.value)
    )


def test_mnist_labels_past_the_classes_or_not_one_per_image_are_named_before_they_are_read(
    tmp_path,
):
    """torchvision reads an IDX label file unchecked: a label 10 failed in the loss of each
    worker, and 7,999 labels for 8,000 images dropped an image without a word."""
    mnist_folder(tmp_path)
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    whole = bytearray(labels.read_bytes())
    bad = whole.copy()
    bad[8 + 5], bad[8 + 70] = 10, 255
    labels.write_bytes(bytes(bad))
    with pytest.raises(data.DataError) as info:
        data.check_files(section(dataset="mnist", data_dir=str(tmp_path)))
    assert (
        f"{tmp_path} is unreadable: MNIST/raw/train-labels-idx1-ubyte holds label 10 at index 5 "
        "(2 labels in all), where the labels of 10 classes run from 0 to 9;"
    ) in str(info.value)
    short = whole[:4] + (8000 - 1).to_bytes(4, "big") + whole[8:-1]
    labels.write_bytes(bytes(short))
    with pytest.raises(data.DataError) as info:
        data.load_splits(section(dataset="mnist", data_dir=str(tmp_path)))
    assert (
        "MNIST/raw/train-labels-idx1-ubyte holds 7,999 labels for the 8,000 images of "
        "MNIST/raw/train-images-idx3-ubyte;"
    ) in str(info.value)


def test_mnist_files_that_download_would_keep_are_checked_as_without_it(tmp_path):
    """With data.download=true torchvision downloads MNIST only where a file is missing and
    reads the four it finds as they are, unchecked: a label 12 reached the loss of each
    worker, a file cut short failed in each. They are named before they are read, as
    without download; a missing file is left to the download."""
    mnist_folder(tmp_path)
    cfg = section(dataset="mnist", data_dir=str(tmp_path), download=True)
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    whole = labels.read_bytes()
    labels.write_bytes(whole[:8] + bytes([12]) + whole[9:])
    with pytest.raises(data.DataError) as info:
        data.check_files(cfg)
    assert str(info.value) == (
        f"dataset 'mnist' in {tmp_path} is unreadable: MNIST/raw/train-labels-idx1-ubyte "
        "holds label 12 at index 0 (1 labels in all), where the labels of 10 classes run from "
        "0 to 9; replace it, or delete it to download it again"
    )
    labels.write_bytes(whole[:-1])
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte is cut short: 8,007 of"):
        data.check_files(cfg)
    labels.unlink()
    data.check_files(cfg)


def test_a_worker_checks_mnists_files_after_another_has_downloaded_them(tmp_path, monkeypatch):
    """A worker of a node checks the files with download=true once it holds the download lock:
    before it, another worker's download may have written part of one."""
    import fcntl
    import threading

    from raydeq.training import vision

    mnist_folder(tmp_path)
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    whole = labels.read_bytes()
    labels.write_bytes(whole[:100])
    monkeypatch.setitem(vision.BUILDERS, "mnist", lambda cfg: "read")
    cfg = section(dataset="mnist", data_dir=str(tmp_path), download=True)
    results = []
    at_lock = threading.Event()
    lock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        at_lock.set()  # the worker has done all it does before the lock
        lock(fd, operation)

    with data.download_lock(str(tmp_path)):
        monkeypatch.setattr(fcntl, "flock", flock)
        worker = threading.Thread(target=lambda: results.append(data.load_splits(cfg)))
        worker.start()
        assert at_lock.wait(WAIT_S)
        labels.write_bytes(whole)
    worker.join()
    assert results == ["read"]


def test_any_failure_of_a_reader_is_one_data_error(tmp_path, monkeypatch):
    from raydeq.training import vision

    def bare_assertion(cfg):
        raise AssertionError  # as torchvision's readers do on a file they cannot parse

    mnist_folder(tmp_path)
    monkeypatch.setitem(vision.BUILDERS, "mnist", bare_assertion)
    with pytest.raises(
        data.DataError, match=f"^dataset 'mnist' in {tmp_path} is unreadable: AssertionError$"
    ):
        data.load_splits(section(dataset="mnist", data_dir=str(tmp_path)))


def test_train_shards_split_each_epoch_between_workers_and_reshuffle_per_epoch():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    shards = [data.ShardSampler(dataset, num_replicas=2, rank=r, seed=3) for r in range(2)]
    first = [list(s) for s in shards]
    assert {epoch for s in first for epoch, _ in s} == {0}
    first = [[i for _, i in s] for s in first]
    assert sorted(first[0] + first[1]) == list(range(10))
    for sampler in shards:
        sampler.set_position(1, 0)
    second = [list(s) for s in shards]
    assert {epoch for s in second for epoch, _ in s} == {1}
    second = [[i for _, i in s] for s in second]
    assert sorted(second[0] + second[1]) == list(range(10))
    assert second != first
    shards[0].set_position(1, 2)
    assert [i for _, i in shards[0]] == second[0][2:] and len(shards[0]) == 3


def test_the_train_loaders_of_two_workers_split_each_epoch_between_them():
    """Each worker draws its share of batch_size from its own shard; together the two shards
    cover every training sample once per epoch, in a new order each epoch."""
    cfg = section(batch_size=4)
    dataset = torch.utils.data.TensorDataset(torch.zeros(12, 1), torch.arange(12))
    loaders = [data.train_loader(dataset, cfg, seed=5, rank=r, world_size=2) for r in range(2)]
    orders = []
    for epoch in (0, 1):
        seen = []
        for loader in loaders:
            data.set_position(loader, epoch, 0)
            batches = [labels.tolist() for _, labels in loader]
            assert [len(b) for b in batches] == [2, 2, 2]
            seen += [i for batch in batches for i in batch]
        assert sorted(seen) == list(range(12))
        orders.append(seen)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("world", [2, 4])
def test_each_step_reads_the_same_batch_on_any_number_of_workers(world):
    """11 samples in batches of 4: two steps an epoch on one worker and on `world` (not three,
    which would read a sample that DistributedSampler repeats to even out the shards), and at
    each step, from any position of a resumed epoch, the shards' batches together are the one
    worker's batch."""
    cfg = section(batch_size=4)
    dataset = torch.utils.data.TensorDataset(torch.zeros(11, 1), torch.arange(11))
    alone = data.train_loader(dataset, cfg, seed=5, rank=0, world_size=1)
    shards = [
        data.train_loader(dataset, cfg, seed=5, rank=r, world_size=world) for r in range(world)
    ]
    assert data.steps_per_epoch(alone) == 2 == data.steps_per_epoch(shards[0])
    for epoch, position in [(0, 0), (1, 0), (1, 1)]:
        for loader in [alone, *shards]:
            data.set_position(loader, epoch, position)
        steps = 2 - position
        one = [sorted(labels.tolist()) for _, labels in itertools.islice(alone, steps)]
        parts = [[labels.tolist() for _, labels in itertools.islice(s, steps)] for s in shards]
        assert [sorted(sum(batch, [])) for batch in zip(*parts, strict=True)] == one


def test_an_in_memory_training_set_is_read_a_batch_at_a_time(monkeypatch):
    """A batch of the digits is read with one index into each of their tensors, not sample by
    sample (64 reads and their stack took 0.3 ms a step), and is to the bit the batch of its
    samples read one by one, from any position of an epoch."""
    cfg = section(batch_size=64)
    train = data.load_splits(cfg).train
    loader = data.train_loader(train, cfg, seed=3, rank=0, world_size=1)
    data.set_position(loader, 1, 2)
    keys = [index for _, index in loader.sampler][: 3 * 64]
    reads = []
    read = torch.utils.data.TensorDataset.__getitem__

    def counted(dataset, index):
        reads.append(index)
        return read(dataset, index)

    monkeypatch.setattr(torch.utils.data.TensorDataset, "__getitem__", counted)
    batches = list(itertools.islice(loader, 3))
    monkeypatch.undo()
    assert reads == []
    for step, batch in enumerate(batches):
        alone = default_collate([train[i] for i in keys[64 * step : 64 * (step + 1)]])
        assert all(torch.equal(a, b) for a, b in zip(batch, alone, strict=True))


def test_an_augmented_sample_draws_the_same_images_wherever_it_is_read():
    """Each (epoch, index) draws its augmentation from a stream of its own: the same key gives
    the same image in any order and process, another epoch another image, and the process's
    own stream is left where it was."""
    cfg = section(dataset="mnist10k", augment=True)
    samples = data.Samples(data.load_splits(cfg).train, seed=0, augmented=True)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a, b, c = samples[(0, 5)][0], samples[(1, 5)][0], samples[(0, 5)][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, c) and not torch.equal(a, b)
    plain = data.Samples(
        data.load_splits(section(dataset="mnist10k", augment=False)).train, 0, False
    )
    assert not torch.equal(a, plain[(0, 5)][0])


class DrawnStates(torch.utils.data.Dataset):
    """Reads give the state of torch's generator, from which an augmentation would draw."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> bytes:
        return torch.get_rng_state().numpy().tobytes()


def test_no_augmentation_draws_from_the_stream_of_an_epochs_order_or_of_another_seed(
    monkeypatch,
):
    """Sample 0 of an epoch drew its augmentation from the state that drew the epoch's order:
    numpy's SeedSequence drops a trailing 0, so (seed, epoch, 0) and (seed, epoch) seeded one
    stream, and the sample's flip was the permutation's first draw. Each seed's orders and
    each (seed, epoch, sample)'s augmentation now start from states of their own."""
    permute = torch.randperm

    def recorded(n: int, generator: torch.Generator) -> torch.Tensor:
        states[len(states)] = generator.get_state().numpy().tobytes()
        return permute(n, generator=generator)

    monkeypatch.setattr(torch, "randperm", recorded)
    dataset, states = DrawnStates(), {}
    for seed in (0, 1):
        sampler = data.ShardSampler(dataset, 1, 0, seed)
        samples = data.Samples(dataset, seed, augmented=True)
        for epoch in (0, 1):
            sampler.set_position(epoch, 0)
            assert len(list(sampler)) == 4
            states |= {(seed, epoch, i): samples[(epoch, i)] for i in range(3)}
    assert len(set(states.values())) == len(states) == 16


class CollectedPages(torch.utils.data.Dataset):
    """Reads give the private memory (kB) that a full garbage collection adds to the process."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        before = private_kb()
        gc.collect()
        return private_kb() - before


@LINUX_PROC
def test_a_loader_processs_garbage_collections_copy_no_pages_of_its_worker():
    """A loader process is a fork of its worker, and a full collection there wrote to each
    object it inherited, copying the pages the fork shared (89 MB a loader process of an
    ImageNet worker over a quarter of an epoch, 97 MB at one collection here); the objects it
    inherits are left out of its collections, which copy under 2 MB."""
    held = [[index] for index in range(200_000)]
    loader = data.train_loader(CollectedPages(), section(batch_size=2, loader_workers=1), 0, 0, 1)
    data.set_position(loader, 0, 0)
    (copied,) = [batch.max().item() for batch in loader]
    assert copied < 2 * 1024 and len(held) == 200_000


class LoaderPages(torch.utils.data.Dataset):
    """Reads give the private memory (kB) of the loader process that reads them."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return private_kb()


@LINUX_PROC
def test_loader_processes_fork_where_the_default_start_is_the_forkserver():
    """Python 3.14 starts processes on Linux by the forkserver: a loader process then imported
    torch and unpickled its dataset afresh, 395 MB of private memory (448 MB with ImageNet's
    index) and 22 s to start two on 2 busy cores, against 6 MB and 0.3 s forked; the loaders
    fork on Linux whatever the default."""
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        loader = data.train_loader(LoaderPages(), section(batch_size=2, loader_workers=1), 0, 0, 1)
        data.set_position(loader, 0, 0)
        (batch,) = list(loader)
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert batch.max().item() < 50 * 1024


def test_eval_shards_cover_the_test_set_once_without_padding():
    dataset = torch.utils.data.TensorDataset(torch.arange(7))
    parts = [list(data.eval_shard(dataset, 2, r, 3).indices) for r in range(3)]
    assert parts == [[0, 1, 6], [2, 3], [4, 5]]


def test_loaders_pin_batches_only_for_a_cuda_device(monkeypatch):
    """data.pin_memory pins a worker's batches where they go to a GPU; a worker training on
    the CPU of a GPU node (Ray hides no GPU from it) pinned them too, opening a CUDA context on
    GPU 0 beside the trials that hold it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = section(pin_memory=True)
    splits = data.load_splits(cfg)
    pinned = {}
    for device in (torch.device("cpu"), torch.device("cuda")):
        train = data.train_loader(splits.train, cfg, 0, 0, 1, device=device)
        test = data.eval_loader(splits.test, cfg, 0, 1, device)
        pinned[device.type] = (train.pin_memory, test.pin_memory)
    assert pinned == {"cpu": (False, False), "cuda": (True, True)}


def test_loaders_give_full_batches_and_resume_mid_epoch():
    cfg = section(batch_size=100, eval_batch_size=64)
    splits = data.load_splits(cfg)
    train = data.train_loader(splits.train, cfg, seed=0, rank=0, world_size=1)
    data.set_position(train, 2, 0)
    epoch = [labels for _, labels in train]
    data.set_position(train, 2, 5)
    rest = [labels for _, labels in train]
    test = [images.shape[0] for images, _ in data.eval_loader(splits.test, cfg, 0, 1)]
    out = {"epoch": epoch, "rest": rest, "steps": data.steps_per_epoch(train), "test": test}
    assert out["steps"] == 14 == len(out["epoch"])
    assert all(labels.shape == (100,) for labels in out["epoch"])
    assert len(out["rest"]) == 9
    assert all(torch.equal(a, b) for a, b in zip(out["rest"], out["epoch"][5:], strict=True))
    assert out["test"] == [64] * 5 + [39]


def test_workers_that_download_into_one_folder_take_turns(tmp_path, monkeypatch):
    import threading
    import time

    from raydeq.training import vision

    inside, most, errors = [], [], []

    def download(cfg):
        inside.append(cfg)
        most.append(len(inside))
        time.sleep(0.2)
        inside.pop()
        raise OSError("no network")

    def worker():
        """Load the splits, keeping the error for the test's thread: one raised here would
        only be a warning."""
        try:
            data.load_splits(
                section(dataset="mnist", data_dir=str(tmp_path / "new"), download=True)
            )
        except data.DataError as err:
            errors.append(str(err))

    monkeypatch.setitem(vision.BUILDERS, "mnist", download)
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == [1, 1, 1]
    assert len(errors) == 3
    assert all(
        error.startswith(
            f"dataset 'mnist' could not be downloaded to {tmp_path / 'new'}: no network;"
        )
        for error in errors
    )


def test_a_batch_as_large_as_the_training_set_is_allowed_and_one_more_is_refused():
    data.check_batch(section(batch_size=1438), 1438)
    with pytest.raises(data.DataError) as info:
        data.check_batch(section(batch_size=1440), 1439)
    assert str(info.value) == (
        "data.batch_size=1440 exceeds the 1439 training samples of 'digits'; lower it"
    )


def test_a_batch_larger_than_a_training_set_of_one_sample_names_it_in_the_singular():
    with pytest.raises(data.DataError) as info:
        data.check_batch(section(batch_size=8), 1)
    assert (
        str(info.value) == "data.batch_size=8 exceeds the 1 training sample of 'digits'; lower it"
    )


@pytest.mark.parametrize(
    ("dataset", "samples"), [("mnist", 60000), ("cifar10", 50000), ("svhn", 73257)]
)
def test_the_standard_training_sets_are_known_by_their_published_sizes(tmp_path, dataset, samples):
    """MNIST's 60,000 training digits, CIFAR-10's 50,000 images, SVHN's 73,257 digits (its
    train_32x32.mat, without the extra set): a batch is checked against them before Ray."""
    cfg = section(dataset=dataset, data_dir=str(tmp_path))
    assert data.train_samples(cfg) == samples


def test_svhn_images_are_normalised_with_svhns_mean_and_deviation(monkeypatch, tmp_path):
    from raydeq.training import vision

    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(vision.datasets, "SVHN", one_image(pixels.to(torch.uint8), svhn=True))
    splits = vision.BUILDERS["svhn"](section(dataset="svhn", data_dir=str(tmp_path)))
    assert splits.shape == (3, 32, 32) and not splits.augmented
    mean = torch.tensor([0.4377, 0.4438, 0.4728])[:, None, None]
    std = torch.tensor([0.1980, 0.2010, 0.1970])[:, None, None]
    normalised = (pixels.permute(2, 0, 1).float() / 255 - mean) / std
    for split in (splits.train, splits.test):
        torch.testing.assert_close(split[0], (normalised, 3))


def test_cifar10_training_crops_32_pixels_of_the_image_resized_to_42(monkeypatch, tmp_path):
    """An image whose red channel rises by 8 per column: resized to 42 x 42, neighbouring
    columns differ by 8 * 32 / 42, so any 32 columns of it span 8 * 31 * 32 / 42 = 189
    (flipped or not); a crop without the resize would span 248. A flip turns the rise into a
    fall: of the 8 seeds' images some rise and some fall along the row."""
    from raydeq.training import vision

    columns = torch.arange(32, dtype=torch.uint8) * 8
    pixels = torch.zeros(32, 32, 3, dtype=torch.uint8)
    pixels[:, :, 0] = columns
    monkeypatch.setattr(vision.datasets, "CIFAR10", one_image(pixels))
    splits = vision.BUILDERS["cifar10"](section(dataset="cifar10", data_dir=str(tmp_path)))
    rising = []
    for seed in range(8):
        torch.manual_seed(seed)
        red = splits.train[0][0][0] * 0.2470 + 0.4914  # back to 0..1
        spread = (red[16].max() - red[16].min()).item() * 255
        assert spread == pytest.approx(8 * 31 * 32 / 42, abs=4), seed
        rising.append(bool(red[16, -1] > red[16, 0]))
    assert set(rising) == {True, False}, rising


def test_fake_test_images_are_not_the_training_images():
    splits = data.load_splits(section(dataset="fake", fake_shape=[3, 8, 8], fake_samples=40))
    for index in range(len(splits.test)):
        assert not torch.equal(splits.test[index][0], splits.train[index][0]), index


def test_fake_images_are_torchvisions_and_leave_the_gpus_generators_alone(monkeypatch):
    """torchvision's FakeData seeds each read with torch.manual_seed, which seeds every GPU's
    generator too: on a GPU, dropout and Hutchinson probes drew from the seed of the batch's
    last sample, the same at each epoch. The images and labels are still FakeData's."""
    from torchvision import datasets as tv
    from torchvision import transforms as T

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    cfg = section(dataset="fake", fake_shape=[3, 6, 5], fake_classes=4, fake_samples=12)
    splits = data.load_splits(cfg)
    samples = data.Samples(splits.train, seed=0, augmented=splits.augmented)
    reads = [samples[(0, i)] for i in range(12)] + [splits.test[i] for i in range(3)]
    assert seeded == []
    reference = tv.FakeData(15, (3, 6, 5), 4, transform=T.ToTensor())
    for index, (image, label) in enumerate(reads):
        expected, expected_label = reference[index]
        assert torch.equal(image, expected) and label == expected_label, index


def test_the_run_seed_sets_the_order_of_the_samples_and_their_augmentation():
    """Runs of another seed (the seeds of a search) shuffle the samples otherwise and draw
    other augmentations of them; one seed gives the same order and images each time."""
    dataset = torch.utils.data.TensorDataset(torch.arange(100))
    orders = {
        seed: [list(data.ShardSampler(dataset, 1, 0, seed)) for _ in range(2)] for seed in (0, 1)
    }
    assert orders[0][0] == orders[0][1] and orders[1][0] == orders[1][1]
    assert orders[0][0] != orders[1][0]
    train = data.load_splits(section(dataset="mnist10k")).train
    images = {seed: data.Samples(train, seed, augmented=True)[(0, 5)][0] for seed in (0, 1)}
    assert torch.equal(images[0], data.Samples(train, 0, augmented=True)[(0, 5)][0])
    assert not torch.equal(images[0], images[1])


def test_the_order_of_an_epoch_depends_on_the_seed_and_the_epoch_apart():
    """DistributedSampler shuffles by seed + epoch, so seed 0's epoch 1 was seed 1's epoch 0
    and the runs of a search over seeds saw each other's orders an epoch apart; the 16 orders
    of seeds and epochs 0 to 3 are now all different."""
    dataset = torch.utils.data.TensorDataset(torch.arange(100))
    orders = set()
    for seed, epoch in itertools.product(range(4), range(4)):
        sampler = data.ShardSampler(dataset, 1, 0, seed)
        sampler.set_position(epoch, 0)
        orders.add(tuple(i for _, i in sampler))
    assert len(orders) == 16


def test_an_idx_file_cut_short_inside_its_header_is_named_before_it_is_read(tmp_path):
    """An IDX image file's header is its 4-byte signature and 3 dimensions of 4 bytes: 16
    bytes. One that ends inside them is cut short, the same one-line error as a file that
    ends inside its pixels."""
    mnist_folder(tmp_path)
    name = "MNIST/raw/train-images-idx3-ubyte"
    for size in (6, 8, 15):
        (tmp_path / name).write_bytes((b"\0\0\x08\x03" + b"\0\0\x1f\x40" * 3)[:size])
        with pytest.raises(data.DataError) as info:
            data.load_splits(section(dataset="mnist", data_dir=str(tmp_path)))
        assert str(info.value) == (
            f"dataset 'mnist' in {tmp_path} is unreadable: {name} is cut short: {size} bytes, "
            "within its 16-byte header; replace it, or delete it and set data.download=true "
            "to download it again"
        )


@pytest.mark.parametrize(
    "name", ["MNIST/raw/train-labels-idx1-ubyte", "MNIST/raw/t10k-images-idx3-ubyte"]
)
def test_a_folder_in_place_of_a_dataset_file_is_named_before_it_is_read(tmp_path, name):
    """An archive that unpacks each IDX file into a folder of its name leaves folders where the
    files belong: one line naming the path, not a traceback from the preflight."""
    mnist_folder(tmp_path)
    inner = tmp_path / name
    moved = tmp_path / "moved"
    inner.rename(moved)
    inner.mkdir()
    moved.rename(inner / inner.name)
    with pytest.raises(data.DataError) as info:
        data.check_files(section(dataset="mnist", data_dir=str(tmp_path)))
    assert str(info.value) == (
        f"dataset 'mnist' in {tmp_path} is unreadable: {name} is a folder, not a file; "
        "replace it, or delete it and set data.download=true to download it again"
    )


def cifar10_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """root/cifar-10-batches-py of two-image pickles in CIFAR-10's layout, published (for
    torchvision, which reads only files of its published MD5s) under their own checksums."""
    import pickle

    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    pixels = torch.arange(2 * 3072, dtype=torch.int64).remainder(256).to(torch.uint8)
    batch = {"data": pixels.reshape(2, 3072).numpy(), "labels": [3, 7]}
    for name in data.EXPECTED_FILES["cifar10"]:
        content = {"label_names": [str(i) for i in range(10)]} if "meta" in name else batch
        (root / name).write_bytes(pickle.dumps(content, protocol=2))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return root


def svhn_folder(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """root/train_32x32.mat and test_32x32.mat of three random images each in SVHN's layout
    (X (32, 32, 3, N), y (N, 1), 10 for the digit 0), published (for torchvision, which reads
    only files of its published MD5s) under their own checksums."""
    from scipy.io import savemat
    from torchvision.datasets import SVHN

    generator = np.random.default_rng(0)
    for name in data.EXPECTED_FILES["svhn"]:
        pixels = generator.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
        savemat(root / name, {"X": pixels, "y": np.array([[10], [1], [5]], np.uint8)})
    published = {
        split: [url, name, hashlib.md5((root / name).read_bytes()).hexdigest()]
        for split, (url, name, _) in SVHN.split_list.items()
        if (root / name).exists()
    }
    monkeypatch.setattr(SVHN, "split_list", {**SVHN.split_list, **published})
    return root


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_cifar10_and_svhn_batches_are_torchvisions_to_the_bit_and_plain_reads_skip_pil(
    tmp_path, monkeypatch, dataset, augment
):
    """Each training batch of two epochs (each sample augmented from its (seed, epoch, index)
    stream) and each test batch equal those of torchvision's dataset read through its
    ToTensor and Normalize, after CIFAR-10's flips and crops where augmented, to the bit; a
    read without augmentation makes no PIL image (its round trip was nearly all of the 300 us
    that reading a CIFAR-10 image took)."""
    from torchvision import datasets as tv
    from torchvision import transforms as T

    from raydeq.training import vision

    folder = (cifar10_folder if dataset == "cifar10" else svhn_folder)(tmp_path, monkeypatch)
    cfg = section(
        dataset=dataset, data_dir=str(folder), augment=augment, batch_size=2, eval_batch_size=2
    )
    splits = data.load_splits(cfg)
    cifar10 = dataset == "cifar10"
    flips = (T.RandomHorizontalFlip(), T.Resize(42, antialias=True), T.RandomCrop(32))
    augmentation = flips if cifar10 and augment else ()
    standard = (
        T.ToTensor(),
        T.Normalize(*(vision.CIFAR10_STATS if cifar10 else vision.SVHN_STATS)),
    )
    if cifar10:
        train = tv.CIFAR10(str(folder), train=True, transform=T.Compose([*augmentation, *standard]))
        test = tv.CIFAR10(str(folder), train=False, transform=T.Compose(standard))
    else:
        train, test = (tv.SVHN(str(folder), s, T.Compose(standard)) for s in ("train", "test"))
    assert splits.augmented is bool(augmentation)

    def epochs(training: torch.utils.data.Dataset, testing: torch.utils.data.Dataset) -> list:
        """The test batches, then the training batches of epochs 0 and 1."""
        loader = data.train_loader(training, cfg, 5, 0, 1, splits.augmented)
        batches = [list(data.eval_loader(testing, cfg, 0, 1))]
        for epoch in (0, 1):
            data.set_position(loader, epoch, 0)
            batches.append(list(loader))
        return batches

    def no_pil_image(*args: Any) -> None:
        raise AssertionError("a read without augmentation made a PIL image")

    reference = epochs(train, test)
    with monkeypatch.context() as patch:
        if not splits.augmented:
            patch.setattr(Image, "fromarray", no_pil_image)
        tested = epochs(splits.train, splits.test)
    assert len(tested) == 3 and len(tested[1]) == len(train) // 2
    for ours, theirs in zip(tested, reference, strict=True):
        for (images, labels), (expected, expected_labels) in zip(ours, theirs, strict=True):
            assert torch.equal(images, expected) and torch.equal(labels, expected_labels)


def test_a_cifar10_batch_cut_short_is_named_before_it_is_read(tmp_path, monkeypatch):
    """torchvision reads a CIFAR-10 batch only if its MD5 is the published one, and otherwise
    says in each worker 'Dataset not found or corrupted', naming no file; the preflight names
    the file whose checksum differs, before Ray starts."""
    from torchvision.datasets import CIFAR10

    cfg = section(dataset="cifar10", data_dir=str(cifar10_folder(tmp_path, monkeypatch)))
    data.check_files(cfg)
    splits = data.load_splits(cfg)
    assert (len(splits.train), len(splits.test)) == (10, 2)
    name = "cifar-10-batches-py/data_batch_3"
    whole = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(whole[:-100])
    with pytest.raises(RuntimeError, match="^Dataset not found or corrupted"):
        CIFAR10(str(tmp_path), download=False)
    with pytest.raises(data.DataError) as info:
        data.check_files(cfg)
    assert str(info.value) == (
        f"dataset 'cifar10' in {tmp_path} is unreadable: {name} is not the published file "
        f"that torchvision reads (cut short or altered): its MD5 is "
        f"{hashlib.md5(whole[:-100]).hexdigest()}, not {hashlib.md5(whole).hexdigest()}; "
        "replace it, or delete it and set data.download=true to download it again"
    )


def test_an_svhn_file_of_another_checksum_is_named_before_it_is_read(tmp_path):
    """SVHN's .mat files, as CIFAR-10's batches: torchvision reads only the published ones."""
    from torchvision.datasets import SVHN

    for name in data.EXPECTED_FILES["svhn"]:
        (tmp_path / name).write_bytes(b"MATLAB 5.0 MAT-file, cut")
    with pytest.raises(data.DataError) as info:
        data.check_files(section(dataset="svhn", data_dir=str(tmp_path)))
    published = SVHN.split_list["train"][2]
    digest = hashlib.md5(b"MATLAB 5.0 MAT-file, cut").hexdigest()
    assert str(info.value).startswith(
        f"dataset 'svhn' in {tmp_path} is unreadable: train_32x32.mat is not the published file "
        f"that torchvision reads (cut short or altered): its MD5 is {digest}, not {published}; "
    )


def test_mnist_files_kept_as_gz_archives_are_named_with_the_way_to_unpack_them(tmp_path):
    """MNIST/raw with the four files as their .gz archives only: the error names them and says
    that data.download=true unpacks them (torchvision checks them and downloads nothing)."""
    mnist_folder(tmp_path)
    for name in data.EXPECTED_FILES["mnist"]:
        file = tmp_path / name
        Path(f"{file}.gz").write_bytes(gzip.compress(file.read_bytes(), compresslevel=1))
        file.unlink()
    with pytest.raises(data.DataError) as info:
        data.check_files(section(dataset="mnist", data_dir=str(tmp_path)))
    names = ", ".join(data.EXPECTED_FILES["mnist"])
    assert str(info.value).endswith(
        f"put the files there, or unpack the .gz archives of {names} that are there (gunzip), "
        "or set data.download=true, which unpacks them without downloading"
    )


def test_a_data_dir_that_is_the_files_own_folder_is_told_to_point_above_it(tmp_path):
    """data_dir = .../MNIST/raw (the files' own folder, where torchvision reads
    data_dir/MNIST/raw): the error says that data_dir is the folder that holds MNIST/raw/."""
    mnist_folder(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(data.DataError) as info:
        data.check_files(section(dataset="mnist", data_dir=str(raw)))
    assert str(info.value).endswith(
        "put the files there, or point data.data_dir at the folder that holds MNIST/raw/ "
        f"({raw} holds train-images-idx3-ubyte itself)"
    )


def test_a_worker_kept_waiting_for_a_download_says_so(tmp_path, lock_waits):
    """A worker that met the node's download lock held (a download takes minutes, and a data
    folder on a shared disk is locked by the workers of every node) waited without a word; it
    now says at once what it waits for, the lock and its holder."""
    import os
    import threading

    entered = threading.Event()

    def download() -> None:
        with data.download_lock(str(tmp_path)):
            entered.set()

    with data.download_lock(str(tmp_path)):
        worker = threading.Thread(target=download, daemon=True)
        worker.start()
        said = lock_waits(worker)
        assert not entered.is_set()
    worker.join(timeout=WAIT_S)
    assert entered.is_set()
    assert said == [
        f"Waiting for the dataset's download into {tmp_path}: its lock "
        f"{tmp_path / data.DOWNLOAD_LOCK} is held by process {os.getpid()} on this machine"
    ]


def test_a_download_lock_that_links_to_a_file_is_refused_leaving_the_file_as_it_was(tmp_path):
    """A link in the download lock's place, put there by a user who can write in a shared data
    folder: the worker emptied the file it links to and wrote its pid in it; it is now refused."""
    private = tmp_path / "private"
    private.write_text("export TOKEN=1\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / data.DOWNLOAD_LOCK).symlink_to(private)
    with pytest.raises(StorageError) as refused, data.download_lock(str(data_dir)):
        pass
    assert str(refused.value) == (
        f"{data_dir / data.DOWNLOAD_LOCK}, the lock file of the dataset's download into "
        f"{data_dir}, is a link to {private}; remove the link"
    )
    assert private.read_text() == "export TOKEN=1\n"


def test_a_download_from_a_server_that_stalls_ends_in_a_data_error(tmp_path, monkeypatch):
    """torchvision downloads without a timeout: a server that took the connection and sent
    nothing held the worker (and its node's others, at the download lock) for good (still
    waiting after 20 s); the download now ends DOWNLOAD_TIMEOUT_S after its last bytes, in a
    DataError that says so."""
    import socket
    import threading
    import time

    from torchvision import datasets as torchvision_datasets

    server = socket.create_server(("127.0.0.1", 0))
    taken = []
    threading.Thread(target=lambda: taken.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    monkeypatch.setattr(torchvision_datasets.MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.5)
    cfg = section(dataset="mnist", data_dir=str(tmp_path), download=True)
    errors = []

    def load() -> None:
        try:
            data.load_splits(cfg)
        except data.DataError as err:
            errors.append(str(err))

    began = time.monotonic()
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    try:
        assert not worker.is_alive()
        assert time.monotonic() - began < 10
        assert errors == [
            f"dataset 'mnist' could not be downloaded to {tmp_path}: timed out (a download got "
            "nothing for 0.5 s); put its files there (MNIST/raw/train-images-idx3-ubyte, "
            "MNIST/raw/train-labels-idx1-ubyte, MNIST/raw/t10k-images-idx3-ubyte, "
            "MNIST/raw/t10k-labels-idx1-ubyte) and set data.download=false"
        ]
        assert socket.getdefaulttimeout() is None  # the process's own sockets as they were
    finally:
        server.close()
        for connection, _ in taken:
            connection.close()
