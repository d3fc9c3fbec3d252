"""ImageNet-style folders: listed once into an index for every later reader, both validation
layouts, staging to local disk, and one-line errors from the preflight for a broken layout."""

import errno
import fcntl
import gc
import io
import os
import shutil
import tarfile
import threading
import traceback
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
import torch
import yaml
from conftest import LINUX_PROC, private_kb, ticking
from PIL import Image
from torchvision import datasets
from torchvision.datasets.folder import default_loader

from raydeq import train
from raydeq.training import data, folders, launch, preflight, staging
from raydeq.training.config import ConfigError, validate
from raydeq.training.storage import StorageError

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


def read_only(monkeypatch, tmp_path: Path, *roots: Path) -> None:
    """Index writes under `roots` refused as on a read-only mount, with the node's temporary
    folder at tmp_path / "node"."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    written = folders.write

    def refused(index, path):
        if any(path.is_relative_to(root) for root in roots):
            raise PermissionError(13, "Permission denied", str(path))
        written(index, path)

    monkeypatch.setattr(folders, "write", refused)


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
        assert again.train.files.equals(first.train.files)
        assert np.array_equal(again.test.labels, first.test.labels)
    assert listings[listed:] == [str(root / "train")] * 4  # its classes, checked against the index
    reference = datasets.ImageFolder(root / "train")
    files, labels = first.train.files.to_pylist(), first.train.labels.tolist()
    assert [(str(root / f), n) for f, n in zip(files, labels, strict=True)] == [
        (str(path), n) for path, n in reference.samples
    ]
    assert first.num_classes == 10 and len(first.test) == VAL_IMAGES
    truth = [CLASSES.index(w) for w in val_truth()]
    numbers = [int(Path(f).stem.rsplit("_", 1)[1]) for f in first.test.files.to_pylist()]
    assert [truth[n - 1] for n in numbers] == first.test.labels.tolist()
    image, label = first.test[7]
    expected = datasets.ImageFolder(root / "train", transform=first.test.transform)
    same_class = expected.targets.index(label)
    assert image.shape == (3, 16, 16) and torch.equal(image, expected[same_class][0])


def test_a_read_only_folder_is_indexed_once_per_node(tmp_path, listings, monkeypatch):
    root = imagenet_tree(tmp_path / "data")
    read_only(monkeypatch, tmp_path, root)
    first = folders.load_index(str(root))
    listed = len(listings)
    assert folders.load_index(str(root)) == first and listings[listed:] == [str(root / "train")]
    assert not (root / folders.INDEX_FILE).exists()
    assert folders.index_paths(str(root))[1].is_relative_to(tmp_path / "node")


def test_the_workers_of_a_node_that_find_no_index_list_a_read_only_folder_once(
    tmp_path, monkeypatch
):
    """Two workers of a node without the index of a read-only folder (a node other than the
    driver's): the second, starting while the first listed the folder, found no index either
    and listed it again (a node of 8 workers listed it 8 times, over network storage); it now
    waits for the first one's listing and reads its index."""
    root = imagenet_tree(tmp_path / "data")
    read_only(monkeypatch, tmp_path, root)
    built = folders.build
    listed, read, listing, second_listing = [], [], threading.Event(), threading.Event()

    def build(folder):
        listed.append(folder)
        if len(listed) == 1:
            listing.set()
            second_listing.wait(timeout=2)  # the second worker, were it to list too
        else:
            second_listing.set()
        return built(folder)

    def second_worker():
        listing.wait()
        read.append(folders.load_index(str(root)))

    monkeypatch.setattr(folders, "build", build)
    worker = threading.Thread(target=second_worker)
    worker.start()
    first = folders.load_index(str(root))
    worker.join()
    assert len(listed) == 1 and read == [first]
    assert len(first.files["train"]) == len(CLASSES) * TRAIN_PER_CLASS


def test_staging_copies_the_indexed_files_to_local_disk_once(tmp_path, monkeypatch):
    root = imagenet_tree(tmp_path / "data", "kaggle")
    local = tmp_path / "local"
    splits = data.load_splits(section(root, stage_to=str(local)))
    staged = staging.staged_root(str(local), str(root))
    assert splits.train.root == staged and (staged / staging.COMPLETE_FILE).is_file()
    copied = sorted(p.relative_to(staged) for p in staged.rglob("*.JPEG"))
    listed = splits.train.files.to_pylist() + splits.test.files.to_pylist()
    assert copied == sorted(Path(f) for f in listed)
    assert len(copied) == len(CLASSES) * TRAIN_PER_CLASS + VAL_IMAGES
    name = splits.test.files[3].as_py()
    assert (staged / name).read_bytes() == (root / name).read_bytes()
    monkeypatch.setattr(shutil, "copyfile", lambda *args: pytest.fail("copied again"))
    again = data.load_splits(section(root, stage_to=str(local)))
    in_place = data.load_splits(section(root))
    assert again.test.root == staged and in_place.test.root == root
    assert torch.equal(again.test[3][0], in_place.test[3][0])


def test_a_staging_lock_that_links_to_a_file_is_refused_leaving_the_file_as_it_was(tmp_path):
    """A link in the staged copy's lock's place, put there by a user who can write in a shared
    node-local disk: the worker emptied the file it links to and wrote its pid in it; it is now
    refused."""
    private = tmp_path / "private"
    private.write_text("export TOKEN=1\n")
    root = staging.staged_root(str(tmp_path / "local"), str(tmp_path / "data"))
    root.mkdir(parents=True)
    (root / staging.LOCK_FILE).symlink_to(private)
    with pytest.raises(StorageError) as refused:
        staging.stage(str(tmp_path / "data"), ["train/n01/0.png"], str(tmp_path / "local"))
    assert str(refused.value) == (
        f"{root / staging.LOCK_FILE}, the lock file of the copy of {tmp_path / 'data'} to "
        f"{root}, is a link to {private}; remove the link"
    )
    assert private.read_text() == "export TOKEN=1\n"


def test_a_listing_lock_that_links_to_a_file_is_refused_leaving_the_file_as_it_was(
    tmp_path, monkeypatch
):
    """A link in the listing lock's place in the node's temporary folder, whose name another
    user there can tell from the data folder's path: the listing emptied the file it links
    to and wrote its pid in it; it is now refused."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    private = tmp_path / "private"
    private.write_text("export TOKEN=1\n")
    data_dir = small_tree(tmp_path / "data", ["n01"])
    lock = folders.index_paths(str(data_dir))[-1].parent / folders.LISTING_LOCK
    lock.parent.mkdir(parents=True)
    lock.symlink_to(private)
    with pytest.raises(StorageError) as refused:
        folders.load_index(str(data_dir))
    assert str(refused.value) == (
        f"{lock}, the lock file of the listing of {data_dir}, is a link to {private}; remove "
        "the link"
    )
    assert private.read_text() == "export TOKEN=1\n"


def test_an_index_in_another_users_folder_of_the_temporary_folder_is_refused_not_read(
    tmp_path, monkeypatch
):
    """An index that another user of the node put where this node keeps this user's (a folder
    named by the data folder's path), its labels swapped: a data folder without an index of
    its own trained on those labels; a folder there of another user's is now refused. Each
    user's folder has a name of its own, so that one user's never stands in another's way."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    data_dir = small_tree(tmp_path / "data", ["n01", "n02"])
    real = folders.build(data_dir)
    swapped = {split: [1 - label for label in labels] for split, labels in real.labels.items()}
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # this user; the planter is `owner`
    planted = folders.index_paths(str(data_dir))[-1]
    folders.write(folders.Index(real.classes, real.files, swapped), planted)
    with pytest.raises(StorageError) as refused:
        folders.load_index(str(data_dir))
    assert str(refused.value) == (
        f"{planted.parent}, the folder of this user's index of {data_dir}, is not a folder of "
        f"this user's (owner uid {owner}); remove it, or set TMPDIR to a folder of your own"
    )
    monkeypatch.setattr(os, "getuid", lambda: owner)
    assert folders.index_paths(str(data_dir))[-1].parent != planted.parent


def test_a_staged_copy_of_another_user_is_refused_not_trained_on(tmp_path, monkeypatch):
    """A copy's folder that another user made first in a shared stage_to, with their own image
    and a mark that the copy is complete: the workers trained on that user's image; it is now
    refused, the image not read."""
    data_dir = small_tree(tmp_path / "data", ["n01"])
    local = tmp_path / "local"
    root = staging.staged_root(str(local), str(data_dir))
    staging.stage(str(data_dir), ["train/n01/0.png"], str(local))
    (root / "train/n01/0.png").write_bytes(b"another user's image")
    monkeypatch.setattr(staging.os, "getuid", lambda: root.stat().st_uid + 1)
    with pytest.raises(StorageError) as refused:
        staging.stage(str(data_dir), ["train/n01/0.png"], str(local))
    assert str(refused.value) == (
        f"{root}, the copy of {data_dir} in data.stage_to, is not a folder of this user's "
        f"(owner uid {root.stat().st_uid}); remove it, or set data.stage_to to a folder of "
        "your own"
    )


def test_a_link_in_the_place_of_a_staged_copy_is_refused_not_followed(tmp_path):
    """A link in the place of a copy's folder in a shared stage_to, to a folder holding a
    complete copy of the data, is not taken for the copy: the workers would read and write the
    folder it links to; it is refused naming it, the folder left as it was."""
    data_dir = small_tree(tmp_path / "data", ["n01"])
    elsewhere = tmp_path / "elsewhere"
    staging.stage(str(data_dir), ["train/n01/0.png"], str(elsewhere))
    linked_to = staging.staged_root(str(elsewhere), str(data_dir))
    before = sorted(linked_to.rglob("*"))
    local = tmp_path / "local"
    root = staging.staged_root(str(local), str(data_dir))
    root.parent.mkdir(parents=True)
    root.symlink_to(linked_to)
    with pytest.raises(StorageError) as refused:
        staging.stage(str(data_dir), ["train/n01/0.png"], str(local))
    assert str(refused.value).startswith(f"{root}, the copy of {data_dir} in data.stage_to, is ")
    assert sorted(linked_to.rglob("*")) == before


def test_staging_says_how_far_the_copy_has_come_on_stderr(tmp_path, monkeypatch, capsys):
    """The copy of 1.28M files to a node's disk (minutes to hours) said nothing until training
    started; a file copied 5 s or more after the line before is a line on stderr, with the time
    left at the pace so far. A resumed copy counts only the files it lacks: the ones already
    there, passed over at once, made the pace so far many times the copy's. Finding those
    (12 s for ImageNet's files on 2 busy cores) says how far it has come too."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    root = small_tree(tmp_path / "data", ["a", "b", "c"])
    files = folders.load_index(str(root)).files
    listed = files["train"] + files["val"]
    ticking(monkeypatch, 10.0)
    staged = staging.stage(str(root), listed, str(tmp_path / "local"))
    found = f"finding the files of {root} that {staged} lacks"
    what = f"copying 6 of the 6 files of {root} to {staged}"
    etas = ["", ", eta 1m40s", ", eta 1m00s", ", eta 40s", ", eta 25s", ", eta 12s"]
    said = [f"{line}: {n}/6{e}\n" for line in (found, what) for n, e in enumerate(etas)]
    assert capsys.readouterr() == ("", "".join(said))
    assert [(staged / f).read_bytes() for f in listed] == [(root / f).read_bytes() for f in listed]
    for name in listed[1:5]:
        (staged / name).unlink()
    (staged / staging.COMPLETE_FILE).unlink()  # a copy stopped part of the way
    ticking(monkeypatch, 10.0)
    staging.stage(str(root), listed, str(tmp_path / "local"))
    what = f"copying 4 of the 6 files of {root} to {staged}"
    said = [f"{found}: {n}/6{e}\n" for n, e in enumerate(etas)]
    etas = ["", ", eta 1m00s", ", eta 30s", ", eta 13s"]
    said += [f"{what}: {n}/4{e}\n" for n, e in enumerate(etas)]
    assert capsys.readouterr() == ("", "".join(said))
    assert [(staged / f).read_bytes() for f in listed] == [(root / f).read_bytes() for f in listed]


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


def test_a_folder_indexed_again_after_a_change_stages_the_files_its_copy_lacks(tmp_path):
    """Images added to a staged folder, its index deleted and listed again: the next stage
    copies the new images beside the old copy, instead of reading a copy without them."""
    root = small_tree(tmp_path / "data", ["n01"], payload=b"old")
    local = str(tmp_path / "local")
    staged = staging.stage(str(root), folders.load_index(str(root)).files["train"], local)
    (root / "train/n01/added.png").write_bytes(b"new")
    (root / folders.INDEX_FILE).unlink()
    files = folders.load_index(str(root)).files["train"]
    assert "train/n01/added.png" in files
    assert staging.stage(str(root), files, local) == staged
    assert (staged / "train/n01/added.png").read_bytes() == b"new"


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_an_index_whose_classes_train_no_longer_holds_is_listed_again(tmp_path, change):
    """A stored index was read as it was after train/'s class folders changed: an added class
    went untrained without a word, a removed one stopped the run on its first file; an index
    naming other classes than train/ holds is now listed again and stored over."""
    root = small_tree(tmp_path / "data", ["n01", "n02"], payload=b"x")
    assert folders.load_index(str(root)).classes == ("n01", "n02")
    for split in folders.SPLITS:
        if change == "added":
            (root / split / "n03").mkdir()
            (root / split / "n03/a.png").write_bytes(b"x")
        elif change == "removed":
            shutil.rmtree(root / split / "n02")
        else:
            (root / split / "n02").rename(root / split / "n04")
    expected = sorted(p.name for p in (root / "train").iterdir())
    index = folders.load_index(str(root))
    assert list(index.classes) == expected
    assert {f.split("/")[1] for f in index.files["train"]} == set(expected)
    assert folders.read(root / folders.INDEX_FILE).classes == index.classes


def test_a_read_only_folders_out_of_date_index_is_passed_over_for_the_nodes_own(
    tmp_path, monkeypatch
):
    """A read-only folder whose own index names classes train/ no longer holds: the folder is
    listed once into the node's temporary folder, and later reads take that index instead
    of listing the folder again on every read."""
    root = small_tree(tmp_path / "data", ["n01", "n02"], payload=b"x")
    folders.load_index(str(root))  # written beside the data while the folder was writable
    for split in folders.SPLITS:
        shutil.rmtree(root / split / "n02")
    read_only(monkeypatch, tmp_path, root)
    built: list[Path] = []
    monkeypatch.setattr(folders, "build", lambda r, b=folders.build: built.append(r) or b(r))
    for _ in range(3):
        assert folders.load_index(str(root)).classes == ("n01",)
    assert len(built) == 1


def test_a_read_only_folders_index_that_does_not_read_is_passed_over_for_the_nodes_own(
    tmp_path, monkeypatch, caplog
):
    """A read-only folder's index that does not read (another raydeq's without the class
    list, or a copy cut short) stopped every start with 'delete it', which no reader of that
    folder can; it is passed over with a warning for an index listed into the node's
    temporary folder, which later reads take."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    folders.load_index(str(root))  # written beside the data while the folder was writable
    index = root / folders.INDEX_FILE
    pq.write_table(pq.read_table(index).replace_schema_metadata({}), index)
    read_only(monkeypatch, tmp_path, root)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != root and access(path, mode))
    for _ in range(2):
        listed = folders.load_index(str(root))
        assert listed.files["train"] == ["train/n01/0.png", "train/n02/0.png"]
        assert listed.path == folders.index_paths(str(root))[1]
    assert [record.getMessage() for record in caplog.records] == [
        f"passed over, its folder being read-only here: {index} does not read as an index of "
        "the data folder (KeyError: b'classes'); delete it for the folder to be listed again"
    ] * 2


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
        (
            "malformed labels",
            "the labels of val/ in LOC_val_solution.csv are malformed (ValueError: its header "
            "'ImageId,Label' lacks PredictionString); expected the header "
            "ImageId,PredictionString and a row per image",
        ),
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


def small_tree(root: Path, classes: list[str], payload: bytes = b"") -> Path:
    """train/ and val/ with one PNG per class (each class's own colour, or `payload`)."""
    for split in folders.SPLITS:
        for number, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            if payload:
                (root / split / wnid / "0.png").write_bytes(payload)
            else:
                Image.new("RGB", (8, 8), (number * 40, 10, 20)).save(root / split / wnid / "0.png")
    return root


def test_listing_a_folder_says_how_far_it_has_come_and_an_interrupt_stores_no_index(
    tmp_path, monkeypatch, capsys
):
    """A first listing (1,000 classes of 50 images: 1.2 s here, 1.28M files over network
    storage far longer) said nothing until it ended; a class folder begun 5 s or more after
    the line before is a line on stderr, with the time left. Ctrl-C part of the way leaves no
    index, whole or partial, and the next listing is complete."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    root = small_tree(tmp_path / "data", ["a", "b", "c"])
    ticking(monkeypatch, 10.0)
    index = folders.load_index(str(root))
    what = f"listing the images of {root} for its index"
    assert capsys.readouterr() == (
        "",
        f"{what}: 0/4, train/a\n{what}: 1/4, train/b, eta 1m00s\n"
        f"{what}: 2/4, train/c, eta 30s\n{what}: 3/4, val/, eta 13s\n",
    )
    assert folders.read(root / folders.INDEX_FILE) == index
    assert index.files["train"] == ["train/a/0.png", "train/b/0.png", "train/c/0.png"]
    other = small_tree(tmp_path / "other", ["a", "b", "c"])
    listed = folders._tree_images

    def interrupted(folder: Path) -> list[str]:
        if folder.name == "b":
            raise KeyboardInterrupt
        return listed(folder)

    monkeypatch.setattr(folders, "_tree_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        folders.load_index(str(other))
    assert sorted(p.name for p in other.iterdir()) == ["train", "val"]
    assert not list((tmp_path / "node").rglob("*.parquet*"))
    monkeypatch.setattr(folders, "_tree_images", listed)
    assert folders.load_index(str(other)).files == index.files


def test_read_only_folders_each_have_their_own_index_on_a_node(tmp_path, monkeypatch):
    """Two read-only data folders indexed in the node's temporary folder: each later reader
    finds its own folder's classes, not those of the folder indexed first."""
    first = small_tree(tmp_path / "first", ["n01", "n02"])
    second = small_tree(tmp_path / "second", ["n07", "n08", "n09"])
    read_only(monkeypatch, tmp_path, first, second)
    for _ in range(2):  # listed, then read back
        assert folders.load_index(str(first)).classes == ("n01", "n02")
        assert folders.load_index(str(second)).classes == ("n07", "n08", "n09")
        assert folders.load_index(str(second)).files["val"] == [
            f"val/{wnid}/0.png" for wnid in ("n07", "n08", "n09")
        ]


def test_an_index_cut_short_while_it_is_written_is_not_left_for_the_next_reader(
    tmp_path, monkeypatch
):
    """A disk that fills while the index is written: the next reader lists the folder again
    rather than finding half an index where the index belongs."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    write_table = folders.pq.write_table

    def disk_full(table, where):
        Path(where).write_bytes(b"PAR1 cut short")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folders.pq, "write_table", disk_full)
    listed = folders.load_index(str(root))
    assert all(not path.exists() for path in folders.index_paths(str(root)))
    monkeypatch.setattr(folders.pq, "write_table", write_table)
    again = folders.load_index(str(root))
    assert again == listed and again.files["train"] == ["train/n01/0.png", "train/n02/0.png"]
    assert folders.read(root / folders.INDEX_FILE) == listed


def test_the_index_keeps_the_1000_classes_of_imagenet(tmp_path):
    classes = tuple(f"n{i:08d}" for i in range(1000))
    files = {split: [f"{split}/{wnid}/0.JPEG" for wnid in classes] for split in folders.SPLITS}
    labels = {"train": list(range(1000)), "val": list(range(999, -1, -1))}
    index = folders.Index(classes, files, labels)
    folders.write(index, tmp_path / folders.INDEX_FILE)
    assert folders.read(tmp_path / folders.INDEX_FILE) == index


def test_a_validation_label_of_a_class_train_lacks_is_named_with_its_file(tmp_path):
    root = imagenet_tree(tmp_path / "data", "kaggle")
    labels = root / folders.KAGGLE_LABELS
    first = val_truth()[0]
    labels.write_text(labels.read_text().replace(f"_00000001,{first} ", "_00000001,n09999999 "))
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: val/ILSVRC2012_val_00000001.JPEG has "
        f"class n09999999, not a folder of train/, in {folders.KAGGLE_LABELS}"
    )


def test_data_folders_of_one_name_are_staged_apart(tmp_path):
    """/a/data and /b/data on one node: each training reads its own files, not the copy of
    the folder staged first."""
    sources = {
        parent: small_tree(tmp_path / parent / "data", ["n01"], payload=parent.encode() * 8)
        for parent in ("a", "b")
    }
    local = str(tmp_path / "local")
    for parent, root in sources.items():
        files = folders.load_index(str(root)).files["train"]
        staged = staging.stage(str(root), files, local)
        assert (staged / "train/n01/0.png").read_bytes() == parent.encode() * 8


def test_a_copy_that_fails_part_way_is_completed_whole_by_the_next_stage(tmp_path, monkeypatch):
    """A full disk half-way through a file, then a restart: every staged file is whole,
    none is taken for copied because a part of it is there."""
    root = imagenet_tree(tmp_path / "data")
    files = folders.load_index(str(root)).files["train"][:300]
    copyfile, copied = shutil.copyfile, []

    def fills_up(source, target):
        if len(copied) >= 120:
            Path(target).write_bytes(Path(source).read_bytes()[:50])
            raise OSError(28, "No space left on device")
        copied.append(source)
        return copyfile(source, target)

    monkeypatch.setattr(shutil, "copyfile", fills_up)
    with pytest.raises(OSError, match="No space left"):
        staging.stage(str(root), files, str(tmp_path / "local"))
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    staged = staging.stage(str(root), files, str(tmp_path / "local"))
    assert (staged / staging.COMPLETE_FILE).is_file()
    for name in files:
        assert (staged / name).read_bytes() == (root / name).read_bytes(), name


def test_a_worker_waits_for_the_copy_another_is_making(tmp_path):
    """The workers of a node copy once: while one holds the copy's lock, another copies
    nothing, and uses the copy once the first is done."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    files = folders.load_index(str(root)).files["train"]
    local = str(tmp_path / "local")
    staged = staging.staged_root(local, str(root))
    staged.mkdir(parents=True)
    result = []
    with open(staged / staging.LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(
            target=lambda: result.append(staging.stage(str(root), files, local))
        )
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and not list(staged.rglob("*.png"))
    waiting.join(timeout=30)
    assert result == [staged] and (staged / files[1]).read_bytes() == (root / files[1]).read_bytes()


def test_validation_images_are_resized_whole_to_the_image_size_and_normalised(tmp_path):
    """ImageNet's evaluation as the paper's reference code (imagenet/main.jl,
    Augmentor.Resize(224, 224)): the whole image is resized to image_size x image_size, no crop.
    A 36 x 18 image whose left third is one colour and the rest another, at image_size 16,
    keeps its left third (columns 0 to 4; a resize of the short side to 18 and a centre crop
    would keep 2 of its columns); each channel is then (value / 255 - mean) / std with
    ImageNet's published mean (0.485, 0.456, 0.406) and deviation (0.229, 0.224, 0.225).
    Training images without augmentation are read the same way."""
    left, right = (51, 102, 204), (250, 0, 0)
    image = Image.new("RGB", (36, 18), right)
    image.paste(Image.new("RGB", (12, 18), left), (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    root = small_tree(tmp_path / "data", ["n01"], payload=buffer.getvalue())
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def normalised(colour: tuple[int, int, int], width: int) -> torch.Tensor:
        values = torch.tensor([(v / 255 - m) / s for v, m, s in zip(colour, mean, std)])
        return values[:, None, None].expand(3, 16, width)

    augmented = data.load_splits(section(root))
    plain = data.load_splits(section(root, augment=False))
    assert augmented.augmented and not plain.augmented  # see Samples: drawn per (epoch, index)
    for seed in range(3):
        torch.manual_seed(seed)
        for read in (augmented.test[0][0], plain.test[0][0], plain.train[0][0]):
            assert read.shape == (3, 16, 16)
            torch.testing.assert_close(read[:, :, :5], normalised(left, 5), rtol=0, atol=1e-5)
            torch.testing.assert_close(read[:, :, 6:], normalised(right, 10), rtol=0, atol=1e-5)


def test_training_crops_are_mirrored_at_random(tmp_path):
    """An image red on its left half and blue on its right: a crop of it keeps the red to the
    left unless it is flipped, and RandomHorizontalFlip flips about every other read."""
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    image.paste(Image.new("RGB", (16, 32), (255, 0, 0)), (0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    root = small_tree(tmp_path / "data", ["n01"], payload=buffer.getvalue())
    train = data.load_splits(section(root)).train
    sides = set()
    for seed in range(20):
        torch.manual_seed(seed)
        red = train[0][0][0]
        left, right = red[:, :4].mean().item(), red[:, -4:].mean().item()
        sides.add("red left" if left > right + 0.5 else "red right" if right > left + 0.5 else "")
    assert {"red left", "red right"} <= sides


def test_class_folders_linked_from_another_tree_are_listed_as_imagefolder_lists_them(tmp_path):
    """A subset of ImageNet made of links to some of its class folders (as ImageNet-100 is
    often made): its classes and images are those torchvision's ImageFolder finds."""
    full = small_tree(tmp_path / "full", ["n01", "n02", "n03"])
    subset = tmp_path / "subset"
    for split in folders.SPLITS:
        (subset / split).mkdir(parents=True)
        for wnid in ("n01", "n03"):
            (subset / split / wnid).symlink_to(full / split / wnid, target_is_directory=True)
    index = folders.load_index(str(subset))
    assert index.classes == ("n01", "n03")
    reference = datasets.ImageFolder(subset / "train")
    assert [(str(subset / f), n) for f, n in zip(index.files["train"], index.labels["train"])] == [
        (str(path), n) for path, n in reference.samples
    ]
    assert index.files["val"] == ["val/n01/0.png", "val/n03/0.png"] and index.labels["val"] == [
        0,
        1,
    ]


def test_a_flat_val_sorted_part_of_the_way_into_class_folders_is_refused(tmp_path):
    """val/ unpacked flat and then sorted into class folders part of the way (a sorting script
    stopped): its 300 flat images were left out without a word, and the test accuracy was that
    of the 200 sorted ones; the listing now refuses it, naming the flat images."""
    root = imagenet_tree(tmp_path / "data", "kaggle")
    for number, wnid in enumerate(val_truth()[:200], start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        (root / "val" / wnid).mkdir(exist_ok=True)
        (root / "val" / name).rename(root / "val" / wnid / name)
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: val/ holds 300 images outside its class "
        "folders (ILSVRC2012_val_00000201.JPEG, ILSVRC2012_val_00000202.JPEG, "
        "ILSVRC2012_val_00000203.JPEG and 297 more), which would not be evaluated; sort them "
        "into their class folders, or move the class folders' images back into val/ for its "
        "labels file to label them"
    )


def test_a_stray_folder_in_a_flat_val_is_named_not_its_images(tmp_path):
    """A flat val/ holding a folder that is no class (a notebook's .ipynb_checkpoints) was
    refused for its 500 flat images, told to sort them into class folders; it is now
    refused naming that folder, the one thing to remove."""
    root = imagenet_tree(tmp_path / "data", "kaggle")
    (root / "val" / ".ipynb_checkpoints").mkdir()
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: val/ has class folders that train/ "
        "lacks: .ipynb_checkpoints"
    )


def test_an_empty_val_folder_is_one_clear_error(tmp_path):
    root = imagenet_tree(tmp_path / "data", "kaggle")
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == f"dataset 'imagenet' in {root} is unreadable: val/ holds no images"


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        ("archive cut short", "EOFError: Compressed file ended before the end-of-stream marker"),
        ("meta.mat cut short", "OSError: could not read bytes"),
        ("meta.mat empty", "MatReadError: Mat file appears to be truncated"),
    ],
)
def test_devkit_labels_cut_short_are_one_line_naming_the_labels(tmp_path, breakage, error):
    """A devkit whose download ended early is the labels of val/ being malformed, one
    DataError for the preflight to print, not the reader's traceback."""
    root = imagenet_tree(tmp_path / "data", "devkit_tar" if "archive" in breakage else "devkit")
    if breakage == "archive cut short":
        archive = root / f"{folders.DEVKIT}.tar.gz"
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    else:
        meta = root / folders.DEVKIT / folders.META
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2 if "cut" in breakage else 0])
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    source = f"{folders.DEVKIT}.tar.gz" if "archive" in breakage else f"{folders.DEVKIT}/"
    assert str(info.value).startswith(
        f"dataset 'imagenet' in {root} is unreadable: the labels of val/ in {source} are "
        f"malformed ({error}"
    )
    assert str(info.value).endswith(f"; expected {folders.DEVKIT_FORMAT}")
    assert "\n" not in str(info.value)


def test_kaggle_labels_saved_with_a_byte_order_mark_are_read(tmp_path):
    """LOC_val_solution.csv saved again by a spreadsheet starts with a UTF-8 byte order mark,
    which made its first column '\\ufeffImageId' and the labels unreadable; they now label
    each image as the file without it does."""
    root = imagenet_tree(tmp_path / "data", "kaggle")
    expected = folders.build(root)
    labels = root / folders.KAGGLE_LABELS
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    index = folders.build(root)
    assert index.labels["val"] == expected.labels["val"]
    assert index.labels["val"] == [CLASSES.index(w) for w in val_truth()]


@pytest.mark.parametrize(
    ("layout", "breakage", "reason"),
    [
        ("kaggle", "a row without a class", "line 3 (ILSVRC2012_val_00000002) gives no class"),
        ("kaggle", "a header without ImageId", "its header 'Id,PredictionString' lacks ImageId"),
        (
            "devkit",
            "an ID meta.mat lacks",
            f"line 2 of {folders.GROUND_TRUTH} is ILSVRC2012_ID 77, which {folders.META} lacks",
        ),
    ],
)
def test_malformed_labels_name_their_file_the_bad_line_and_the_expected_format(
    tmp_path, layout, breakage, reason
):
    """Labels of val/ that do not read name the labels file, the header or line at fault and
    the format expected, where the reader's KeyError or IndexError named none of them."""
    root = imagenet_tree(tmp_path / "data", layout)
    if layout == "kaggle":
        path, expected = root / folders.KAGGLE_LABELS, folders.KAGGLE_FORMAT
        lines = path.read_text().splitlines()
        if "row" in breakage:
            lines[2] = lines[2].split(",")[0] + ","
        else:
            lines[0] = "Id,PredictionString"
        path.write_text("\n".join(lines))
        source = folders.KAGGLE_LABELS
    else:
        path, expected = root / folders.DEVKIT / folders.GROUND_TRUTH, folders.DEVKIT_FORMAT
        lines = path.read_text().splitlines()
        lines[1] = "77"
        path.write_text("\n".join(lines) + "\n")
        source = f"{folders.DEVKIT}/"
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: the labels of val/ in {source} are "
        f"malformed (ValueError: {reason}); expected {expected}"
    )


def test_a_devkit_folder_without_its_ground_truth_is_named_with_the_file_it_lacks(tmp_path):
    """A devkit folder holding meta.mat but not the ground truth (unpacked in part) was passed
    over, and the error said val/ had no labels and to put the devkit there, beside the
    devkit; it now names the file the folder lacks and what the devkit should hold."""
    root = imagenet_tree(tmp_path / "data", "devkit")
    (root / folders.DEVKIT / folders.GROUND_TRUTH).unlink()
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: the labels of val/ in {folders.DEVKIT}/ "
        "are malformed (FileNotFoundError: [Errno 2] No such file or directory: "
        f"'{root / folders.DEVKIT / folders.GROUND_TRUTH}'); expected {folders.DEVKIT_FORMAT}"
    )


def test_a_batch_larger_than_an_image_folders_training_set_is_refused_by_the_preflight(tmp_path):
    """The preflight lists the folder, so it knows its 3 training images: a batch of 4 is
    refused there, before Ray starts, not in each worker after every restart."""
    root = small_tree(tmp_path / "data", ["n01", "n02", "n03"])
    settings = {"model": {"model": "imagenet_small"}, "storage_path": str(tmp_path / "runs")}
    settings |= {"data": {"dataset": "imagenet", "data_dir": str(root), "image_size": 32}}
    settings["scaling"] = {"num_workers": 1}
    preflight.check_run(validate(settings | {"data": settings["data"] | {"batch_size": 3}}), False)
    with pytest.raises(data.DataError) as info:
        preflight.check_run(
            validate(settings | {"data": settings["data"] | {"batch_size": 4}}), False
        )
    assert str(info.value) == (
        "data.batch_size=4 exceeds the 3 training samples of 'imagenet'; lower it"
    )


def test_an_image_folder_of_more_classes_than_the_model_predicts_is_refused_by_the_preflight(
    tmp_path,
):
    """cifar10_large predicts 10 classes: a folder of 11 is refused before Ray starts, where
    its 11th class's labels stopped the first step that drew one (target 10 out of bounds)."""
    root = small_tree(tmp_path / "data", [f"n{i:02d}" for i in range(11)])
    settings = {"model": {"model": "cifar10_large"}, "storage_path": str(tmp_path / "runs")}
    images = {"dataset": "imagenet", "data_dir": str(root), "image_size": 32, "batch_size": 8}
    settings["data"] = images
    with pytest.raises(ConfigError, match="^model: 'cifar10_large' predicts 10 classes, fewer"):
        preflight.check_run(validate(settings), storage=False)


def test_a_class_folder_of_train_without_images_is_refused_as_imagefolder_refuses_it(tmp_path):
    """An editor's hidden folder and a class whose archive is not unpacked yet: classes that no
    step trains on, numbered among the others (n01 would be class 1, not 0). ImageFolder
    refuses them; the index names them and is not written."""
    root = small_tree(tmp_path / "data", ["n01", "n02", "n03"])
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "n02" / "0.png").unlink()
    (root / "train" / "n02" / "n02.tar").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match="no valid file for the classes .ipynb_checkpoints, n02"
    ):
        datasets.ImageFolder(root / "train")
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: train/ has class folders without images: "
        ".ipynb_checkpoints, n02 (expected train/<class>/<image>); unpack their images there, "
        "or remove them"
    )
    assert not (root / folders.INDEX_FILE).exists()


@pytest.mark.parametrize("breakage", ["train is a file", "class folder unreadable"])
def test_a_folder_that_cannot_be_listed_is_one_line_naming_it(tmp_path, monkeypatch, breakage):
    """A file named train where its folder should be, and a class folder this user may not
    read (as on shared storage): the preflight's one line names the path and why, instead of
    os.scandir's traceback."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    if breakage == "train is a file":
        shutil.rmtree(root / "train")
        (root / "train").write_bytes(b"")
        path, reason = root / "train", "Not a directory"
    else:
        path, reason = root / "train" / "n02", "Permission denied"
        scandir = os.scandir

        def refused(folder):
            if Path(folder) == path:
                raise PermissionError(13, reason, str(folder))
            return scandir(folder)

        monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: {path} cannot be listed ({reason})"
    )


def test_images_in_subfolders_of_a_class_are_listed_as_imagefolder_lists_them(tmp_path):
    """A class folder whose images sit in subfolders of it (train/n02/a/0.png, as some
    archives unpack) keeps them all, in ImageFolder's order, and a class whose every image is
    in a subfolder is no class without images."""
    root = small_tree(tmp_path, ["n01", "n02", "n03"])
    for split in folders.SPLITS:
        for name in ("b/1.png", "a/2.png", "a/c/3.png"):
            (root / split / "n02" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / split / "n01" / "0.png", root / split / "n02" / name)
        (root / split / "n03" / "z").mkdir()
        (root / split / "n03" / "0.png").rename(root / split / "n03" / "z" / "0.png")
    index = folders.load_index(str(root))
    assert index.files["train"] == [
        "train/n01/0.png",
        "train/n02/0.png",
        "train/n02/a/2.png",
        "train/n02/a/c/3.png",
        "train/n02/b/1.png",
        "train/n03/z/0.png",
    ]
    for split in folders.SPLITS:
        reference = datasets.ImageFolder(root / split)
        assert [(str(root / f), n) for f, n in zip(index.files[split], index.labels[split])] == [
            (str(path), n) for path, n in reference.samples
        ]


def test_hidden_files_such_as_macos_metadata_are_not_listed_as_images(tmp_path):
    """A folder copied from a Mac holds `._0.png` beside each 0.png (its metadata: 4 KB that
    begin 00 05 16 07, no image) and `.DS_Store`; the index listed each `._0.png` as an image,
    which the loader fails on mid-training ('cannot identify image file'). Hidden files are
    left out, an image's extension is read in any case, and every listed file opens."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    for split in folders.SPLITS:
        for wnid in ("n01", "n02"):
            (root / split / wnid / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))
            (root / split / wnid / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        shutil.copy(root / split / "n02" / "0.png", root / split / "n02" / "1.PNG")
    index = folders.load_index(str(root))
    for split in folders.SPLITS:
        assert index.files[split] == [
            f"{split}/n01/0.png",
            f"{split}/n02/0.png",
            f"{split}/n02/1.PNG",
        ]
        assert index.labels[split] == [0, 1, 1]
        for file in index.files[split]:
            assert default_loader(root / file).size == (8, 8)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"<html>Not found</html>", "cannot identify image file"),
        (b"", "cannot identify image file"),
        (jpeg(10)[:-40], "Truncated File Read"),
    ],
    ids=["a saved web page", "empty", "cut short"],
)
def test_a_listed_file_that_is_no_image_is_one_line_naming_it(tmp_path, payload, reason):
    """A file of an image's name that is no image, or one cut short, failed the run in PIL's
    error inside the loader's traceback, which Ray prints whole for each worker and restart;
    it is now raydeq's DataError naming the file and what to do, one line from a loader
    process's traceback too."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    bad = root / "train" / "n02" / "0.png"
    bad.write_bytes(payload)
    splits = data.load_splits(section(root, augment=False))
    assert splits.train[0][0].shape == (3, 16, 16)
    with pytest.raises(data.DataError) as refused:
        splits.train[1]
    message = str(refused.value)
    assert message.startswith(f"{bad} cannot be read as an image ({reason}")
    assert message.endswith(
        f"); replace it, or remove it and delete {root / folders.INDEX_FILE}, which lists it"
    )
    batches = iter(torch.utils.data.DataLoader(splits.train, batch_size=2, num_workers=1))
    with pytest.raises(data.DataError) as wrapped:
        next(batches)
    # Stopped here: collected later with the error's frames, its worker waited 5 s for a stop
    # signal its queue, finalised first, never sent (10 s of a later test's time).
    batches._shutdown_workers()
    lines = "".join(traceback.format_exception(wrapped.value))
    assert launch.own_error(lines) == f"DataError: {message}"


@LINUX_PROC
def test_a_loader_process_reading_the_listed_images_copies_no_pages_of_the_list(
    tmp_path, monkeypatch
):
    """A loader process is a fork of its worker, and reading a Python object writes its
    reference count: each one copied the pages of the lists of paths and labels it read, and
    kept each file's name that pathlib interned (166 MB once it had read ImageNet's 1.28M
    images). Reading 100,000 paths copied 17 MB; the paths and labels are arrays now, a path
    a string, and a child reading them copies under 3 MB (0.6 MB, as for reading 1,000)."""
    from raydeq.training import vision

    files = [f"train/n{c:08d}/n{c:08d}_{i:04d}.JPEG" for c in range(100) for i in range(1000)]
    monkeypatch.setattr(vision, "default_loader", str)
    images = vision.FileImages(tmp_path, files, [i // 1000 for i in range(len(files))], len)
    assert images[54321] == (len(str(tmp_path / files[54321])), 54)
    del files
    readable, writable = os.pipe()
    child = os.fork()
    if child == 0:
        gc.disable()
        before = private_kb()
        for index in range(len(images)):
            images[index]
        os.write(writable, str(private_kb() - before).encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert int(os.read(readable, 64)) < 3 * 1024


@pytest.mark.parametrize("staged", [False, True], ids=["read in place", "staged"])
def test_an_image_removed_from_a_read_only_folder_after_its_index_names_that_index(
    tmp_path, monkeypatch, staged
):
    """A read-only folder's index lives in the node's temporary folder; an image removed after
    it was listed said to delete 'the folder's raydeq-index.parquet', a file that is not there
    (and, staged, named no index at all): the error now names the index that lists the image,
    and deleting that index lists the folder anew."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    gone = root / "train" / "n02" / "1.png"
    shutil.copy(root / "train" / "n02" / "0.png", gone)
    read_only(monkeypatch, tmp_path, root)
    index_file = folders.index_paths(str(root))[1]
    assert folders.load_index(str(root)).path == index_file
    gone.unlink()
    cfg = section(root, augment=False, stage_to=str(tmp_path / "local") if staged else None)
    with pytest.raises(data.DataError) as refused:
        data.load_splits(cfg).train[2]
    assert str(refused.value) == (
        f"{gone}, listed in {index_file}, is not there: the folder changed after it was listed; "
        f"delete {index_file} for the folder to be listed again"
    )
    index_file.unlink()
    assert folders.load_index(str(root)).files["train"] == ["train/n01/0.png", "train/n02/0.png"]


@pytest.mark.parametrize("fault", ["a file named as stage_to", "a full disk"])
def test_a_copy_that_cannot_be_written_names_stage_to_not_the_data_folder(
    tmp_path, monkeypatch, fault
):
    """A staged copy that cannot be written (stage_to a file, a disk that fills mid-copy) said
    the data folder was unreadable ('dataset 'imagenet' in DATA is unreadable: [Errno 28] No
    space left on device'), where the images read fine; it now names data.stage_to and the
    copy, and how to go on."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    local = tmp_path / "local"
    if fault == "a file named as stage_to":
        local.write_text("")
        reason = f"Not a directory: {local}/data-"
    else:

        def full(source, target):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(staging.shutil, "copyfile", full)
        reason = "No space left on device)"
    with pytest.raises(data.DataError) as refused:
        data.load_splits(section(root, stage_to=str(local)))
    copy = staging.staged_root(str(local), str(root))
    message = str(refused.value)
    assert message.startswith(f"data.stage_to {local}: the copy of {root} to {copy} cannot be ")
    assert f"written ({reason}" in message
    assert message.endswith(
        "; set data.stage_to to a folder this node can write, with room for the copy, or leave "
        f"it unset to read {root} in place"
    )


@pytest.mark.parametrize("damage", ["cut short", "no class list"])
def test_an_index_that_does_not_read_is_one_line_naming_it(tmp_path, damage):
    """An index cut short (a copy of the data folder stopped in it) or a Parquet file of its
    name without the class list stopped the preflight in pyarrow's or a KeyError's traceback;
    it is now one DataError naming the file and saying to delete it."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    folders.load_index(str(root))
    index = root / folders.INDEX_FILE
    if damage == "cut short":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
        reason = "ArrowInvalid: "
    else:
        table = pq.read_table(index)
        pq.write_table(table.replace_schema_metadata({}), index)
        reason = "KeyError: b'classes'"
    with pytest.raises(data.DataError) as refused:
        folders.load_index(str(root))
    message = str(refused.value)
    assert message.startswith(f"{index} does not read as an index of the data folder ({reason}")
    assert message.endswith("); delete it for the folder to be listed again")
    assert "\n" not in message
    index.unlink()
    assert folders.load_index(str(root)).files["train"] == ["train/n01/0.png", "train/n02/0.png"]


def test_a_disk_that_fills_in_the_kernels_copy_names_stage_to_and_the_copys_file(
    tmp_path, monkeypatch
):
    """shutil's sendfile copy gives a full disk under the source image's name, so a copy that
    filled its disk said the data folder was unreadable, naming an image that reads fine; it
    names data.stage_to and the file of the copy that could not be written."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    local = tmp_path / "local"

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging.shutil, "_USE_CP_SENDFILE", True)
    monkeypatch.setattr(os, "sendfile", full)
    with pytest.raises(data.DataError) as refused:
        data.load_splits(section(root, stage_to=str(local)))
    copy = staging.staged_root(str(local), str(root))
    assert str(refused.value) == (
        f"data.stage_to {local}: the copy of {root} to {copy} cannot be written (No space left "
        f"on device: {copy}/train/n01/.0.png.partial); set data.stage_to to a folder this node "
        f"can write, with room for the copy, or leave it unset to read {root} in place"
    )


UP_TWO = "/".join(["train", os.pardir, os.pardir, "secret.png"])


@pytest.mark.parametrize("listed", [UP_TWO, "{tmp}/secret.png", "val/a.png"])
def test_an_index_listing_a_file_outside_its_split_is_refused_before_a_read_or_a_copy(
    tmp_path, listed
):
    """An index in the data folder (written elsewhere, or edited) that lists a path up two
    folders from train/ to secret.png had the staged copy read the file beside the data
    folder and write it beside the copy's folder, outside it, and train on it; such an index,
    or one listing an absolute path or a file of the other split, is refused naming it."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    (tmp_path / "secret.png").write_bytes((root / "train" / "n01" / "0.png").read_bytes())
    index = folders.load_index(str(root))
    outside = listed.format(tmp=tmp_path)
    folders.write(
        folders.Index(
            index.classes,
            {**index.files, "train": [*index.files["train"][:1], outside]},
            index.labels,
        ),
        root / folders.INDEX_FILE,
    )
    with pytest.raises(data.DataError) as refused:
        data.load_splits(section(root, stage_to=str(tmp_path / "stage")))
    assert str(refused.value) == (
        f"{root / folders.INDEX_FILE} lists {outside!r}, which is not a file in train/ of the "
        "data folder; delete the index for the folder to be listed again"
    )
    assert not (tmp_path / "stage").exists()
    (root / folders.INDEX_FILE).unlink()
    assert folders.load_index(str(root)) == index


def test_an_index_of_the_paths_the_listing_writes_reads_without_parsing_each(tmp_path, monkeypatch):
    """Reading ImageNet's index parsed each of its 1.33M paths to check it stays within its
    split: 21 s of every start and of every worker's read, 1.5 s now. The paths the listing
    writes are checked as strings, any other as before: the same answers as the parsed
    parts' rule on paths that double, dot or end their slashes."""
    parsed = []
    monkeypatch.setattr(folders, "PurePosixPath", lambda name: parsed.append(name) or Path(name))
    root = small_tree(tmp_path / "data", ["a", "n02 b"])
    index = folders.load_index(str(root))
    assert folders.read(root / folders.INDEX_FILE) == index and parsed == []
    names = ["train/a/0.png", "train//a/0.png", "train/./a/0.png", "train/a/", "train/", "train"]
    names += [
        "/".join(["train", "..", "a.png"]),
        "train/a/..",
        "train/..a/0.png",
        "/train/a.png",
        "./train/a.png",
    ]
    names += ["train/.a/0.png", "val/a/0.png", "trainer/a.png"]
    for name in names:
        parts = PurePosixPath(name).parts
        assert folders._within(name, "train") == (
            len(parts) > 1 and parts[0] == "train" and ".." not in parts
        ), name


def test_an_index_write_stopped_part_of_the_way_leaves_no_file_beside_it(tmp_path, monkeypatch):
    """Ctrl-C while the preflight wrote the index (3 s for ImageNet's 1.33M paths) left its
    partial file in the data folder for good; the write leaves nothing, and the next listing
    stores a whole index."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "node"))
    root = small_tree(tmp_path / "data", ["a", "b"])
    write_table = folders.pq.write_table

    def stopped(table, where):
        Path(where).write_bytes(b"PAR1 cut")
        raise KeyboardInterrupt

    monkeypatch.setattr(folders.pq, "write_table", stopped)
    with pytest.raises(KeyboardInterrupt):
        folders.load_index(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    monkeypatch.setattr(folders.pq, "write_table", write_table)
    index = folders.load_index(str(root))
    assert folders.read(root / folders.INDEX_FILE) == index
    assert sorted(p.name for p in root.iterdir()) == [folders.INDEX_FILE, "train", "val"]


@pytest.mark.parametrize("label", [2, -1])
def test_an_index_listing_a_class_it_does_not_name_is_refused(tmp_path, label):
    """An index of 2 classes edited to give a file class 2 (or -1) trained until the loss met
    it ('Target 2 is out of bounds'); it is refused naming the index, the class and the
    classes it names."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    index = folders.load_index(str(root))
    labels = {**index.labels, "train": [0, label]}
    folders.write(folders.Index(index.classes, index.files, labels), root / folders.INDEX_FILE)
    with pytest.raises(data.DataError) as refused:
        folders.load_index(str(root))
    assert str(refused.value) == (
        f"{root / folders.INDEX_FILE} lists a file of class {label}, of 2 classes (0 to 1); "
        "delete the index for the folder to be listed again"
    )


class Spin(Exception):
    """A listing that went on past the folders a tree could hold."""


@pytest.mark.parametrize("target", ["..", "."])
def test_a_link_back_to_a_folder_that_holds_it_is_one_line_naming_it(tmp_path, monkeypatch, target):
    """train/n01/up -> .. (and the same in n02) leads os.walk, which follows links, into
    train/n01/up/n02/up/n01/... without end (and one such link listed n02's images as n01's,
    41 times over); the listing stops at the link, named with where it leads. A guard on the
    folders listed fails the test instead of a wait."""
    root = small_tree(tmp_path / "data", ["n01", "n02", "n03"])
    for name in ("n01", "n02"):
        (root / "train" / name / "up").symlink_to(target, target_is_directory=True)
    scandir, listed = os.scandir, []

    def guarded(folder):
        listed.append(folder)
        if len(listed) > 1_000:
            raise Spin(f"{len(listed)} folders listed")
        return scandir(folder)

    monkeypatch.setattr(os, "scandir", guarded)
    with pytest.raises(data.DataError) as info:
        folders.load_index(str(root))
    held = root / "train" if target == ".." else root / "train" / "n01"
    assert str(info.value) == (
        f"dataset 'imagenet' in {root} is unreadable: {root}/train/n01/up cannot be listed (it "
        f"links to {held.resolve()}, a folder that holds it, so its listing never ends; remove "
        "the link)"
    )


def test_a_link_to_a_sibling_class_folder_is_listed_as_imagefolder_lists_it(tmp_path):
    """train/n01/more -> train/n02 (a relative link up one folder) is no cycle: its images
    count in n01, as ImageFolder counts them."""
    root = small_tree(tmp_path / "data", ["n01", "n02"])
    (root / "train" / "n01" / "more").symlink_to(Path(os.pardir, "n02"), target_is_directory=True)
    index = folders.load_index(str(root))
    assert index.files["train"] == ["train/n01/0.png", "train/n01/more/0.png", "train/n02/0.png"]
    reference = datasets.ImageFolder(root / "train")
    assert index.labels["train"] == [n for _, n in reference.samples]


def test_a_worker_kept_waiting_for_a_copy_or_a_listing_says_for_which(
    tmp_path, monkeypatch, caplog, lock_waits
):
    """A worker that met the lock of the node's copy (an ImageNet's takes many minutes) or of
    its listing held by another waited without a word for as long as it was held; it now says
    at once what it waits for, the lock and its holder."""
    monkeypatch.setattr(folders.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    root = small_tree(tmp_path / "data", ["n01"])
    listing = folders.index_paths(str(root))[-1].parent
    with folders.node_lock(listing, str(root)):
        worker = threading.Thread(target=folders.load_index, args=(str(root),), daemon=True)
        worker.start()
        assert lock_waits(worker) == [
            f"Waiting for the listing of {root}: its lock {listing / folders.LISTING_LOCK} is "
            f"held by process {os.getpid()} on this machine"
        ]
    worker.join(timeout=30)
    assert not worker.is_alive()
    caplog.clear()
    files = folders.load_index(str(root)).files["train"]
    local = str(tmp_path / "local")
    staged = staging.staged_root(local, str(root))
    staged.mkdir(parents=True)
    with open(staged / staging.LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("process 7 on node-7")
        lock.flush()
        worker = threading.Thread(target=staging.stage, args=(str(root), files, local))
        worker.start()
        assert lock_waits(worker) == [
            f"Waiting for the copy of {root} to {staged}: its lock {staged / staging.LOCK_FILE} "
            "is held by process 7 on node-7"
        ]
    worker.join(timeout=30)
    assert (staged / files[0]).read_bytes() == (root / files[0]).read_bytes()
