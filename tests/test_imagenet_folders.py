"""ImageNet-style folders: listed once into an index for every later reader, both validation
layouts, staging to local disk, and one-line errors from the preflight for a broken layout."""

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image
from torchvision import datasets

from raydeq import train
from raydeq.training import data, folders, preflight, staging
from raydeq.training.config import ConfigError, validate

CLASSES = [f"n0{7 * i + 1440764:07d}" for i in range(10)]
TRAIN_PER_CLASS = 250
VAL_IMAGES = 500
VAL_LAYOUTS = ("folders", "kaggle", "devkit", "devkit_tar")


def jpeg(colour: int) -> bytes:
    """A tiny 8x8 JPEG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 255 - colour, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def val_truth() -> list[str]:
    """The class of validation image n (1-based, at index n - 1): a fixed shuffle."""
    order = np.random.default_rng(0).permutation(VAL_IMAGES)
    return [CLASSES[i % len(CLASSES)] for i in order]


def devkit_files() -> dict[str, bytes]:
    """The devkit's meta.mat (ILSVRC2012_IDs in reverse order of the WordNet ids, unlike the
    sorted class numbers) and its ground truth of the validation images."""
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(CLASSES), 1), dtype=fields)
    ids = {wnid: len(CLASSES) - i for i, wnid in enumerate(CLASSES)}
    for i, wnid in enumerate(CLASSES):
        synsets[i, 0] = (ids[wnid], wnid, f"class {i}", 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[wnid]}\n" for wnid in val_truth())
    return {folders.META: meta.getvalue(), folders.GROUND_TRUTH: truth.encode()}


def write_val(root: Path, layout: str) -> None:
    """val/ in class folders, or flat with Kaggle's labels or the devkit (folder or archive)."""
    truth = val_truth()
    for number, wnid in enumerate(truth, start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = root / "val" / (wnid if layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg(CLASSES.index(wnid) * 20))
    if layout == "kaggle":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in enumerate(truth, 1)]
        (root / folders.KAGGLE_LABELS).write_text("ImageId,PredictionString\n" + "\n".join(rows))
    if layout == "devkit":
        for name, payload in devkit_files().items():
            path = root / folders.DEVKIT / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
    if layout == "devkit_tar":
        with tarfile.open(root / f"{folders.DEVKIT}.tar.gz", "w:gz") as tar:
            for name, payload in devkit_files().items():
                info = tarfile.TarInfo(f"{folders.DEVKIT}/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def imagenet_tree(root: Path, layout: str = "folders") -> Path:
    """2,500 training and 500 validation JPEGs of 10 classes, val/ in the given layout."""
    for index, wnid in enumerate(CLASSES):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        payload = jpeg(index * 20)
        for i in range(TRAIN_PER_CLASS):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(payload)
    write_val(root, layout)
    return root


def section(root: Path, **options) -> data.DataSection:
    """The data section of an ImageNet folder at 16x16 pixels."""
    settings = {"dataset": "imagenet", "data_dir": str(root), "image_size": 16} | options
    return validate({"data": settings}).data


@pytest.fixture
def listings(monkeypatch) -> list[str]:
    """The folders listed (os.scandir calls) while the test runs."""
    calls: list[str] = []
    scandir = os.scandir

    def counted(path):
        calls.append(str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    return calls


@pytest.mark.parametrize("layout", VAL_LAYOUTS)
def test_a_folder_is_listed_once_for_every_dataset_built_from_it(tmp_path, listings, layout):
    root = imagenet_tree(tmp_path, layout)
    first = data.load_splits(section(root))
    listed = len(listings)
    assert listed == 1 + len(CLASSES) + 1 + (len(CLASSES) if layout == "folders" else 0)
    assert (root / folders.INDEX_FILE).is_file()
    for _ in range(4):  # more workers, trials and restarts
        again = data.load_splits(section(root))
        assert again.train.files == first.train.files and again.test.labels == first.test.labels
    assert len(listings) == listed
    reference = datasets.ImageFolder(root / "train")
    assert [(str(root / f), n) for f, n in zip(first.train.files, first.train.labels)] == [
        (str(path), n) for path, n in reference.samples
    ]
    assert first.num_classes == 10 and len(first.test) == VAL_IMAGES
    truth = [CLASSES.index(w) for w in val_truth()]
    numbers = [int(Path(f).stem.rsplit("_", 1)[1]) for f in first.test.files]
    assert [truth[n - 1] for n in numbers] == first.test.labels
    image, label = first.test[7]
    expected = datasets.ImageFolder(root / "train", transform=first.test.transform)
    same_class = expected.targets.index(label)
    assert image.shape == (3, 16, 16) and torch.equal(image, expected[same_class][0])


def test_a_read_only_folder_is_indexed_once_per_node(tmp_path, listings, monkeypatch):
    root = imagenet_tree(tmp_path / "data")
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    original = folders.write

    def read_only(index, path):
        if path.is_relative_to(root):
            raise PermissionError(13, "Permission denied", str(path))
        original(index, path)

    monkeypatch.setattr(folders, "write", read_only)
    first = folders.load_index(str(root))
    listed = len(listings)
    assert folders.load_index(str(root)) == first and len(listings) == listed
    assert not (root / folders.INDEX_FILE).exists()
    assert folders.index_paths(str(root))[1].is_relative_to(tmp_path / "node")


def test_staging_copies_the_indexed_files_to_local_disk_once(tmp_path, monkeypatch):
    root = imagenet_tree(tmp_path / "data", "kaggle")
    local = tmp_path / "local"
    splits = data.load_splits(section(root, stage_to=str(local)))
    staged = staging.staged_root(str(local), str(root))
    assert splits.train.root == staged and (staged / staging.COMPLETE_FILE).is_file()
    copied = sorted(p.relative_to(staged) for p in staged.rglob("*.JPEG"))
    assert copied == sorted(Path(f) for f in splits.train.files + splits.test.files)
    assert len(copied) == len(CLASSES) * TRAIN_PER_CLASS + VAL_IMAGES
    assert (staged / splits.test.files[3]).read_bytes() == (
        root / splits.test.files[3]
    ).read_bytes()
    monkeypatch.setattr(shutil, "copyfile", lambda *args: pytest.fail("copied again"))
    again = data.load_splits(section(root, stage_to=str(local)))
    in_place = data.load_splits(section(root))
    assert again.test.root == staged and in_place.test.root == root
    assert torch.equal(again.test[3][0], in_place.test[3][0])


def test_a_copy_cut_short_resumes_without_copying_a_file_twice(tmp_path, monkeypatch):
    root = imagenet_tree(tmp_path / "data")
    index = folders.load_index(str(root))
    files = index.files["train"]
    staged = staging.stage(str(root), files[:100], str(tmp_path / "local"))
    (staged / staging.COMPLETE_FILE).unlink()  # as if stopped after 100 files
    copies = []
    copyfile = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", lambda a, b: copies.append(a) or copyfile(a, b))
    staging.stage(str(root), files, str(tmp_path / "local"))
    assert len(copies) == len(files) - 100
    assert not list(staged.rglob("*.partial"))


def test_stage_to_is_for_image_folders_only():
    with pytest.raises(ConfigError, match="^data.stage_to: dataset 'digits' is read in place"):
        validate({"data": {"stage_to": "/tmp/x"}})


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("flat val, no labels", "val/ holds 500 images but no class folders and no labels"),
        ("unknown val class", "val/ has class folders that train/ lacks: n09999999"),
        ("no train classes", "train/ has no class folders (expected train/<class>/<image>)"),
        ("unlabelled image", "val/ILSVRC2012_val_00000501.JPEG has no label in LOC_val_solution"),
        ("malformed labels", "the labels of val/ are malformed (KeyError: 'PredictionString')"),
    ],
)
def test_a_broken_layout_is_one_line_from_the_preflight_before_ray(
    tmp_path, capsys, breakage, message
):
    root = imagenet_tree(tmp_path / "data", "folders" if "class" in breakage else "kaggle")
    if breakage == "flat val, no labels":
        (root / folders.KAGGLE_LABELS).unlink()
    if breakage == "unknown val class":
        (root / "val" / "n09999999").mkdir()
    if breakage == "no train classes":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    if breakage == "malformed labels":
        (root / folders.KAGGLE_LABELS).write_text("ImageId,Label\nILSVRC2012_val_00000001,n0\n")
    if breakage == "unlabelled image":
        (root / "val" / "ILSVRC2012_val_00000501.JPEG").write_bytes(jpeg(0))
    settings = {"model": {"model": "imagenet_small"}, "storage_path": str(tmp_path / "runs")}
    settings |= {"data": {"dataset": "imagenet", "data_dir": str(root), "image_size": 32}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    assert train.main([str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: dataset 'imagenet' in {root} is unreadable: ")
    assert message in err and err.count("\n") == 1
    with pytest.raises(data.DataError, match="is unreadable"):
        preflight.check_run(validate(settings), storage=False)
