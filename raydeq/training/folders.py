"""ImageNet-style folders listed once: an index file of every image's path and class, written
by the first reader (the driver's preflight) and read by every worker, trial and restart after
it, instead of each one listing the 1.28M files again.

`train/` holds one folder per class (WordNet ids, numbered in sorted order), its images in it or
in its subfolders. `val/` holds the same class folders, or the images flat as the official
archive unpacks them, labelled by Kaggle's `LOC_val_solution.csv` or by the ImageNet devkit
(`ILSVRC2012_devkit_t12/` or its `.tar.gz`: `data/ILSVRC2012_validation_ground_truth.txt`
numbers the images' classes by `data/meta.mat`'s ILSVRC2012_ID).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torchvision.datasets.folder import IMG_EXTENSIONS

from raydeq.training.console import Progress
from raydeq.training.data import DataError
from raydeq.training.runlock import open_lock, own_folder, sign, wait_for

INDEX_FILE = "raydeq-index.parquet"
# Held, in this node's folder of the index, by the process that lists the data folder.
LISTING_LOCK = ".listing.lock"
SPLITS = ("train", "val")
KAGGLE_LABELS = "LOC_val_solution.csv"
KAGGLE_COLUMNS = ("ImageId", "PredictionString")
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
KAGGLE_FORMAT = (
    "the header ImageId,PredictionString and a row per image whose PredictionString starts "
    "with its class's WordNet id"
)
DEVKIT_FORMAT = (
    f"{META} with the synsets' ILSVRC2012_ID and WNID, and {GROUND_TRUTH} with one "
    "ILSVRC2012_ID a line, image n's on line n"
)
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Index:
    """Class names (sorted) and, per split, image paths relative to the data folder with their
    class numbers; `path`: the file it is stored in (None before it is), for an error to name."""

    classes: tuple[str, ...]
    files: dict[str, list[str]]
    labels: dict[str, list[int]]
    path: Path | None = field(default=None, compare=False)


def is_image(name: str) -> bool:
    """Whether a file of that name is listed as an image: an image extension in any case, and
    not hidden (macOS writes `._x.png` beside x.png on other filesystems, its metadata, which
    no image reader opens; ImageFolder lists it and fails on it mid-training)."""
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(subfolder names, image file names) of a folder, each sorted: one listing."""
    folders, images = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                folders.append(entry.name)
            elif is_image(entry.name):
                images.append(entry.name)
    return sorted(folders), sorted(images)


def _raise(err: OSError) -> None:
    """Raise a listing's error, which os.walk would pass over."""
    raise err


def _walk(folder: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk through links, with an OSError naming a link to a folder that holds it (to
    itself, its class or the split): os.walk would follow it without end."""
    for path, subfolders, names in os.walk(folder, onerror=_raise, followlinks=True):
        here = os.path.realpath(path)
        for name in subfolders:
            link = os.path.join(path, name)
            target = os.path.realpath(link)
            if os.path.commonpath([here, target]) == target:
                raise OSError(
                    errno.ELOOP,
                    f"it links to {target}, a folder that holds it, so its listing never ends; "
                    "remove the link",
                    link,
                )
        yield path, subfolders, names


def _tree_images(folder: Path) -> list[str]:
    """Image paths relative to `folder`, in it and in its subfolders (followed through links),
    in the order of torchvision's ImageFolder, which reads a class's subfolders too."""
    images = []
    for path, _, names in sorted(_walk(folder)):
        within = Path(path).relative_to(folder)
        images += [(within / n).as_posix() for n in sorted(names) if is_image(n)]
    return images


def _class_images(
    split: Path, classes: list[str], number: dict[str, int], shown: Progress | None = None
) -> tuple[list, list]:
    """Paths (relative to the data folder) and class numbers of the images in class folders,
    a part of `shown` per class."""
    files, labels = [], []
    for name in classes:
        if shown is not None:
            shown.next(f"{split.name}/{name}")
        images = _tree_images(split / name)
        files += [f"{split.name}/{name}/{image}" for image in images]
        labels += [number[name]] * len(images)
    return files, labels


def _kaggle_labels(path: Path) -> Callable[[str], str | None]:
    """Image name -> WordNet id from Kaggle's LOC_val_solution.csv (ImageId, PredictionString
    whose first word is the class); a ValueError names a header or a row that is not so."""
    wnids = {}
    with path.open(newline="", encoding="utf-8-sig") as stream:  # with or without a BOM
        rows = csv.DictReader(stream)
        header = rows.fieldnames or []
        missing = [name for name in KAGGLE_COLUMNS if name not in header]
        if missing:
            raise ValueError(f"its header {','.join(header)!r} lacks {' and '.join(missing)}")
        for row in rows:
            words = (row["PredictionString"] or "").split()
            if not words:
                raise ValueError(f"line {rows.line_num} ({row['ImageId']}) gives no class")
            wnids[row["ImageId"]] = words[0]
    return lambda image: wnids.get(image.rsplit(".", 1)[0])


def _devkit_source(root: Path) -> Path | None:
    """The devkit in `root`: its folder where that holds both files, else its archive, else
    its folder lacking one (for the error to name), else None."""
    folder, archive = root / DEVKIT, root / f"{DEVKIT}.tar.gz"
    if archive.is_file() and not all((folder / name).is_file() for name in (META, GROUND_TRUTH)):
        return archive
    return folder if folder.is_dir() else None


def _devkit_files(source: Path) -> tuple[bytes, bytes]:
    """The devkit's (meta.mat, ground truth) from its folder or archive."""
    if source.is_dir():
        return (source / META).read_bytes(), (source / GROUND_TRUTH).read_bytes()
    with tarfile.open(source) as tar:
        return tuple(tar.extractfile(f"{DEVKIT}/{name}").read() for name in (META, GROUND_TRUTH))


def _devkit_labels(meta: bytes, ground_truth: bytes) -> Callable[[str], str | None]:
    """Image name -> WordNet id: line n of the ground truth is the ILSVRC2012_ID of image n; a
    ValueError names a line whose ID meta.mat lacks."""
    from scipy.io import loadmat  # only for the devkit's labels

    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    by_number = []
    for line, number in enumerate(ground_truth.split(), start=1):
        if int(number) not in wnid:
            raise ValueError(
                f"line {line} of {GROUND_TRUTH} is ILSVRC2012_ID {int(number)}, which {META} lacks"
            )
        by_number.append(wnid[int(number)])

    def label(image: str) -> str | None:
        found = _VAL_NUMBER.match(image)
        number = int(found.group(1)) if found else 0
        return by_number[number - 1] if 0 < number <= len(by_number) else None

    return label


def _flat_labels(root: Path, count: int) -> tuple[Callable[[str], str | None], str]:
    """The labeller of flat validation images and the file it reads, or a DataError naming
    the labels file that does not read and what it should hold."""
    kaggle = (root / KAGGLE_LABELS).is_file()
    devkit = None if kaggle else _devkit_source(root)
    if not kaggle and devkit is None:
        raise DataError(
            f"dataset 'imagenet' in {root} is unreadable: val/ holds {count} images but no class "
            f"folders and no labels for them; put {KAGGLE_LABELS}, {DEVKIT}/ or {DEVKIT}.tar.gz "
            f"(the ImageNet devkit) in {root}, or sort val/ into class folders"
        )
    try:
        if kaggle:
            return _kaggle_labels(root / KAGGLE_LABELS), KAGGLE_LABELS
        return _devkit_labels(*_devkit_files(devkit)), f"{DEVKIT}/{GROUND_TRUTH}"
    except Exception as err:  # scipy's, tarfile's and gzip's errors too: each is a bad file
        source = KAGGLE_LABELS if kaggle else devkit.name + ("/" if devkit.is_dir() else "")
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DataError(
            f"dataset 'imagenet' in {root} is unreadable: the labels of val/ in {source} are "
            f"malformed ({reason}); expected {KAGGLE_FORMAT if kaggle else DEVKIT_FORMAT}"
        ) from None


def _val_images(root: Path, number: dict[str, int]) -> tuple[list, list]:
    """Paths and class numbers of the validation images, in either layout; images beside class
    folders (a flat val/ sorted part of the way) are refused, which no evaluation would read."""
    folders, images = _entries(root / "val")
    unknown = sorted(set(folders) - set(number))
    if unknown:
        raise DataError(
            f"dataset 'imagenet' in {root} is unreadable: val/ has class folders that "
            f"train/ lacks: {', '.join(unknown[:5])}"
        )
    if folders and images:
        more = f" and {len(images) - 3} more" if len(images) > 3 else ""
        raise DataError(
            f"dataset 'imagenet' in {root} is unreadable: val/ holds {len(images)} images "
            f"outside its class folders ({', '.join(images[:3])}{more}), which "
            "would not be evaluated; sort them into their class folders, or move the class "
            "folders' images back into val/ for its labels file to label them"
        )
    if folders:
        return _class_images(root / "val", folders, number)
    if not images:
        raise DataError(f"dataset 'imagenet' in {root} is unreadable: val/ holds no images")
    label, source = _flat_labels(root, len(images))
    labels = []
    for image in images:
        wnid = label(image)
        if wnid not in number:
            raise DataError(
                f"dataset 'imagenet' in {root} is unreadable: val/{image} has "
                f"{'no label' if wnid is None else f'class {wnid}, not a folder of train/,'} "
                f"in {source}"
            )
        labels.append(number[wnid])
    return [f"val/{image}" for image in images], labels


def build(root: Path) -> Index:
    """List the train and val splits of an ImageNet-style folder (the one full listing); a
    class folder of train/ without images is refused, as ImageFolder refuses it: no step would
    train its class, and it would shift the number of every class after it."""
    classes, _ = _entries(root / "train")
    if not classes:
        raise DataError(
            f"dataset 'imagenet' in {root} is unreadable: train/ has no class folders "
            "(expected train/<class>/<image>)"
        )
    number = {name: i for i, name in enumerate(classes)}
    # A part per class folder of train/ and one for val/, which holds 4% of ImageNet's images.
    shown = Progress(f"listing the images of {root} for its index", len(classes) + 1)
    train_files, train_labels = _class_images(root / "train", classes, number, shown)
    held = set(train_labels)
    empty = [name for name in classes if number[name] not in held]
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise DataError(
            f"dataset 'imagenet' in {root} is unreadable: train/ has class folders without "
            f"images: {', '.join(empty[:5])}{more} (expected train/<class>/<image>); unpack "
            "their images there, or remove them"
        )
    shown.next("val/")
    val_files, val_labels = _val_images(root, number)
    files = {"train": train_files, "val": val_files}
    return Index(tuple(classes), files, {"train": train_labels, "val": val_labels})


def write(index: Index, path: Path) -> None:
    """Write the index as Parquet (split, path, label; the classes in its metadata), atomically:
    a write stopped part of the way (Ctrl-C, a full disk) leaves no file beside it."""
    splits = [split for split in SPLITS for _ in index.files[split]]
    table = pa.table(
        {
            "split": pa.array(splits).dictionary_encode(),
            "path": [f for split in SPLITS for f in index.files[split]],
            "label": pa.array([n for split in SPLITS for n in index.labels[split]], pa.int32()),
        }
    ).replace_schema_metadata({"classes": json.dumps(index.classes)})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        pq.write_table(table, partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read(path: Path) -> Index:
    """The index stored at `path`; a DataError where it lists a file outside its split's folder
    (through `..`, or an absolute path), which a read or a staged copy would reach outside the data
    folder or write outside the copy's, or a class it does not name, which would fail the
    loss mid-training (an index written elsewhere, or edited), or where it does not read as
    one (cut short, or another file of its name)."""
    try:
        table = pq.read_table(path)
        classes = tuple(json.loads(table.schema.metadata[b"classes"]))
        rows = {split: table.filter(pc.equal(table["split"], split)) for split in SPLITS}
        files = {split: rows[split]["path"].to_pylist() for split in SPLITS}
        labels = {split: rows[split]["label"].to_pylist() for split in SPLITS}
    except Exception as err:  # pyarrow's, json's, a missing column's or metadata's
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise DataError(
            f"{path} does not read as an index of the data folder ({reason}); delete it for the "
            "folder to be listed again"
        ) from None
    for split in SPLITS:
        outside = next((f for f in files[split] if not _within(f, split)), None)
        if outside is not None:
            raise DataError(
                f"{path} lists {outside!r}, which is not a file in {split}/ of the data folder; "
                "delete the index for the folder to be listed again"
            )
        label = next((n for n in labels[split] if not 0 <= n < len(classes)), None)
        if label is not None:
            raise DataError(
                f"{path} lists a file of class {label}, of {len(classes)} classes (0 to "
                f"{len(classes) - 1}); delete the index for the folder to be listed again"
            )
    return Index(classes, files, labels, path)


def _within(name: str, split: str) -> bool:
    """Whether an index's path names a file inside the `split` folder: relative, under it,
    with no `..`. A path as the listing writes it (`split/`, then components none of which is
    empty or starts with a dot) is one at sight: parsing each of ImageNet's 1.33M paths took
    20 s of every start and of every worker's read."""
    plain = "//" not in name and "/." not in name and not name.endswith("/")
    if plain and name.startswith(f"{split}/"):
        return True
    parts = PurePosixPath(name).parts
    return len(parts) > 1 and parts[0] == split and ".." not in parts


def index_paths(data_dir: str) -> list[Path]:
    """Where the index is kept: next to the data, else (a read-only folder) in this user's
    folder of this node's temporary folder, so that each node lists it at most once."""
    digest = hashlib.sha256(data_dir.encode()).hexdigest()[:12]
    local = Path(tempfile.gettempdir(), f"raydeq-{os.getuid()}-{digest}")
    return [Path(data_dir, INDEX_FILE), local / INDEX_FILE]


def _current(index: Index, data_dir: str) -> bool:
    """Whether a stored index names the class folders that train/ holds now (one listing of
    train/): one of a folder whose classes were added, removed or renamed since would train
    without the new ones, or stop mid-run on a file that is gone."""
    try:
        classes, _ = _entries(Path(data_dir, "train"))
    except OSError:
        return True  # the listing, when it is needed, names the folder that cannot be read
    return tuple(classes) == index.classes


def stored(candidates: list[Path], data_dir: str, warn: bool = True) -> Index | None:
    """The index stored at the first of `candidates` that holds one naming train/'s classes
    as they are (`_current`), else None: a read-only folder's out-of-date index is passed over
    for the one listed since in this node's temporary folder, and so, with a warning where
    `warn`, is one there that does not read (another raydeq's, or cut short), which no reader
    could delete."""
    for path in candidates:
        if not path.is_file():
            continue
        try:
            index = read(path)
        except DataError as err:
            if os.access(path.parent, os.W_OK):
                raise
            if warn:
                log.warning("passed over, its folder being read-only here: %s", err)
            continue
        if _current(index, data_dir):
            return index
    return None


@contextmanager
def node_lock(folder: Path, data_dir: str) -> Iterator[None]:
    """Hold the lock file LISTING_LOCK in this node's `folder` for the block, so that the
    processes of a node that find no index list the folder one at a time, the later ones
    finding the first one's index (one kept waiting says for which folder of images,
    `data_dir`); a folder where none can be made (another user's) leaves the block unlocked,
    and a link in the lock file's place is a StorageError (`open_lock`)."""
    what = f"the listing of {data_dir}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open_lock(folder / LISTING_LOCK, what)
    except OSError:
        yield
        return
    with lock:
        wait_for(lock, folder / LISTING_LOCK, what)
        sign(lock)
        yield


def load_index(data_dir: str) -> Index:
    """The folder's index: read where it was stored while it names train/'s classes as they
    are (`stored`), else listed now and stored for the next, by one process of this node at
    a time (`node_lock`); a folder that cannot be listed (a file in its place, no permission)
    is a DataError."""
    candidates = index_paths(data_dir)
    with suppress(OSError):  # a temporary folder where none can be made: listed unlocked
        own_folder(candidates[-1].parent, f"the folder of this user's index of {data_dir}")
    index = stored(candidates, data_dir)
    if index is not None:
        return index
    with node_lock(candidates[-1].parent, data_dir):
        # Listed by another process of this node meanwhile? (What it passes over was told.)
        index = stored(candidates, data_dir, warn=False)
        if index is not None:
            return index
        try:
            index = build(Path(data_dir))
        except OSError as err:
            raise DataError(
                f"dataset 'imagenet' in {data_dir} is unreadable: {err.filename} cannot be "
                f"listed ({err.strerror})"
            ) from None
        for path in candidates:
            try:
                write(index, path)
                return replace(index, path=path)
            except OSError:
                continue
    return index
