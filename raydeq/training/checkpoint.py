"""Checkpoint folders: written atomically, checksummed, read tensors-only, with a fallback.

No Ray here: the benchmarks and any script read a run's weights with `read_checkpoint`, and
`state.load_model` its trained model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs
import torch

from raydeq.training.console import first_line, os_reason
from raydeq.training.errors import Recurring
from raydeq.training.storage import TRAIN_RUN, StorageError

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
# The reports made since the previous checkpoint, this one's included, one JSON object a line:
# Tune records a trial's reports on the driver, and a driver stopped before it recorded (or
# synced) them leaves them here alone, where `experiments.archive.history` finds them.
REPORTS_FILE = "reports.jsonl"
# Written in a run's folder, beside its checkpoints, when it stops for non-finite steps (see
# `loop.Loop.diverged`), with the step of its newest checkpoint as "from_step".
DIVERGED_FILE = "diverged.json"
# The manifest layout this raydeq writes, and the newest it reads; a manifest without "format"
# was written before layouts were numbered, and is format 1.
MANIFEST_FORMAT = 1
# The files a checkpoint folder holds.
CHECKPOINT_FILES = (STATE_FILE, MANIFEST_FILE, REPORTS_FILE)
log = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(Recurring, RuntimeError):
    """A checkpoint folder is incomplete, corrupted, or holds something other than tensors."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint folder without its manifest, its state or the reports its manifest records,
    with a manifest cut short, or whose state or reports are shorter than its manifest
    records: never a whole checkpoint, since `write_checkpoint` renames a whole folder into
    place, but a copy cut short (Ray copies a checkpoint's files side by side, and a process
    killed mid-copy leaves some of them, or part of one)."""


class NewerFormat(CheckpointError, StorageError):
    """A checkpoint whose manifest a newer raydeq wrote, in a layout this one does not read:
    refused, never passed over for an older checkpoint (a resume from that one would train
    the newer steps again and prune the checkpoints that hold them)."""


def check_format(manifest: object, file: str) -> None:
    """Raise NewerFormat where the manifest read from `file` records a format above
    MANIFEST_FORMAT, and a ValueError (a damaged file) where its format is not a positive
    integer; a manifest that is not a JSON object is left to its reader."""
    if not isinstance(manifest, dict):
        return
    found = manifest.get("format", 1)
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ValueError(f"{file}: format {found!r} is not a positive integer")
    if found > MANIFEST_FORMAT:
        raise NewerFormat(
            f"{file}: format {found}, written by a newer raydeq; this raydeq reads formats up "
            f"to {MANIFEST_FORMAT}; update raydeq"
        )


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(
    state: dict[str, Any], directory: Path, reports: Sequence[Mapping[str, Any]] = ()
) -> Path:
    """Write `state` to the new folder `directory`, atomically: a temporary folder is renamed.

    The folder holds `state.pt` and `manifest.json` with its format (MANIFEST_FORMAT), the
    step, and the state's size in bytes and SHA-256,
    so a copy that was cut short or altered later is recognised when it is read, and the run's
    `settings` where the state has them, so that a start can tell whose run it would resume,
    and its `evaluation` (the test batches of its evaluations) where it has one;
    `reports` go to REPORTS_FILE, whose size and SHA-256 the manifest records under "reports".
    A write that fails (a full disk) is a StorageError naming the step, the folder and why, and
    leaves no temporary folder behind, so the same write can be tried again.
    """
    staging = directory.with_name(f".{directory.name}.partial")
    try:
        _stage(state, staging, reports)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        reason = first_line(err)
        raise StorageError(
            f"the checkpoint of step {state['step']} could not be written to {staging}: {reason}"
        ) from None
    staging.rename(directory)
    return directory


def _stage(state: dict[str, Any], staging: Path, reports: Sequence[Mapping[str, Any]]) -> None:
    """Write the files of `write_checkpoint` into the new folder `staging`. The state is
    serialised in memory and then written: torch.save given a path or a file reports a full
    disk as 'unexpected pos 704 vs 598' (it drops the file's OSError), where a file's write
    raises the OSError that says so."""
    staging.mkdir(parents=True)
    saved = staging / STATE_FILE
    serialised = io.BytesIO()
    torch.save(state, serialised)
    saved.write_bytes(serialised.getbuffer())
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "step": state["step"],
        **_recorded(saved),
    }
    if reports:
        lines = "".join(json.dumps(dict(report)) + "\n" for report in reports)
        (staging / REPORTS_FILE).write_text(lines)
        manifest["reports"] = _recorded(staging / REPORTS_FILE)
    for recorded in ("settings", "evaluation"):
        if recorded in state:
            manifest[recorded] = state[recorded]
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest))


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """The state in a checkpoint folder, checked against its manifest and loaded tensors-only;
    NewerFormat where a newer raydeq wrote it."""
    try:
        check_file(directory, MANIFEST_FILE)
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        check_format(manifest, str(directory / MANIFEST_FILE))
        listed = _listed(manifest)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise manifest_error(directory, err) from None
    for name, (expected, recorded) in listed.items():
        with _reading(directory, name):
            check_size(directory, name, recorded)
            digest = _sha256(directory / name)
        if digest != expected:
            raise CheckpointError(f"{directory}: {name} fails its checksum")
    with _reading(directory, STATE_FILE):
        return _load_state(directory)


@contextmanager
def _reading(directory: Path, name: str) -> Iterator[None]:
    """Raise an IncompleteCheckpoint where the checkpoint's file `name` was removed as it was
    read (pruned by its run), and a CheckpointError naming it and why for another OSError
    (EACCES, EIO), which restore falls back past as past a damaged file."""
    try:
        yield
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{directory}: {name} is missing") from None
    except OSError as err:
        raise CheckpointError(f"{directory}: {name} cannot be read ({os_reason(err)})") from None


def _load_state(directory: Path) -> dict[str, Any]:
    """The state of a checked checkpoint folder, loaded tensors-only on the CPU; a
    CheckpointError where the loader refuses it."""
    try:
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = first_line(err)
        raise CheckpointError(
            f"{directory}: {STATE_FILE} refused by the loader ({reason})"
        ) from None


def manifest_error(directory: Path, err: Exception) -> CheckpointError:
    """The error for a manifest that cannot be read: an IncompleteCheckpoint where it is
    missing or is not whole JSON (empty, or cut inside, as a copy cut short leaves it: the
    manifest `write_checkpoint` renames into place is always whole), else a CheckpointError."""
    cut = isinstance(err, FileNotFoundError | json.JSONDecodeError)
    error = IncompleteCheckpoint if cut else CheckpointError
    return error(f"{directory}: no valid {MANIFEST_FILE} ({err})")


def _recorded(path: Path) -> dict[str, Any]:
    """The size in bytes and SHA-256 of a checkpoint's file, as its manifest records them."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _listed(manifest: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """The files a manifest records, each with its SHA-256 and size (None in manifests written
    before sizes were recorded): the state, and the reports where they were recorded
    (manifests written before them leave reports.jsonl unchecked)."""
    listed = {STATE_FILE: (manifest["sha256"], manifest.get("bytes"))}
    if "reports" in manifest:
        listed[REPORTS_FILE] = (manifest["reports"]["sha256"], manifest["reports"]["bytes"])
    return listed


def check_size(directory: Path, name: str, recorded: int | None) -> None:
    """Raise an IncompleteCheckpoint when the folder's file `name` is missing or shorter than
    the `recorded` bytes, and a CheckpointError where no file can be there (`check_file`)."""
    path = directory / name
    check_file(directory, name)
    if not path.is_file():
        raise IncompleteCheckpoint(f"{directory}: {name} is missing")
    size = path.stat().st_size
    if isinstance(recorded, int) and size < recorded:
        raise IncompleteCheckpoint(
            f"{directory}: {name} is cut short: {size} of the {recorded} bytes its "
            f"{MANIFEST_FILE} records"
        )


def check_file(directory: Path, name: str) -> None:
    """Raise a CheckpointError where the folder's `name` is a folder or a link to nothing:
    unreadable, not a copy cut short (which leaves a file missing or short, never so), so that
    a checkpoint holding one is fallen back past, or stops the run, rather than passed over
    for a start from step 0 that would prune it."""
    path = directory / name
    if path.is_symlink() and not path.exists():
        raise CheckpointError(
            f"{directory}: {name} is a link to {os.readlink(path)}, which does not exist"
        )
    if path.is_dir():
        raise CheckpointError(f"{directory}: {name} is a folder, not a file")


def read_newest(folder: Path) -> dict[str, Any]:
    """The state in a checkpoint folder, or in the newest readable `checkpoint_*` folder of a
    run's or a trial's folder, as `newest_checkpoint` finds it."""
    return newest_checkpoint(folder)[1]


# Where the checkpoints of the runs in an experiment's folder (trials of several workers, which
# keep them in their Train run) and in a storage folder of experiments lie.
DEEPER_RUNS = ("*/*/checkpoint_*", "*/*/*/checkpoint_*")


def _runs(folders: list[str]) -> str:
    """'N runs (a, b, c, ...); name the folder of one' for the run folders `folders`."""
    shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
    runs = "1 run" if len(folders) == 1 else f"{len(folders)} runs"
    return f"{runs} ({shown}); name the folder of one"


def _deeper_runs(folder: Path) -> list[str]:
    """The folders, relative to `folder`, that hold checkpoints DEEPER_RUNS below it."""
    found = {
        path.parent for pattern in DEEPER_RUNS for path in folder.glob(pattern) if path.is_dir()
    }
    return sorted(str(path.relative_to(folder)) for path in found)


def newest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder `folder` names and its state: `folder` itself, or the newest
    readable `checkpoint_*` folder of a run's or a trial's folder, or of a folder in it (a
    trial of several workers keeps them in its Train run), falling back past unreadable ones
    as a resume does. A folder whose
    folders hold the checkpoints of several runs (an experiment's trials) is refused: its
    newest step would be some one run's, by how long it ran; so is one whose checkpoints lie
    deeper (an experiment of trials of several workers, a storage folder of experiments),
    naming the runs that hold them, one without a checkpoint, naming what it lacks, and a
    file, naming its folder where it is a checkpoint's (state.pt), else what is read. The Train
    run of a trial of one worker, which keeps only its TensorBoard, is read as its trial's
    folder. A run that prunes the checkpoint being read, having written a newer one, is listed
    again (`Relisted`)."""
    if folder.is_file():
        named = (
            f"the folder that holds it ({folder.parent})"
            if folder.name in CHECKPOINT_FILES
            else f"a run's, a trial's or a checkpoint's folder (one with {MANIFEST_FILE} and "
            f"{STATE_FILE})"
        )
        raise CheckpointError(f"{folder}: a file, not a folder; name {named}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    inside = _checkpoint_folders(folder)
    runs = sorted({path.parent.name for path in inside})
    if len(runs) > 1:
        raise CheckpointError(f"{folder}: holds the checkpoints of {_runs(runs)}")
    if not inside and not any((folder / name).exists() for name in (MANIFEST_FILE, STATE_FILE)):
        if folder.name == TRAIN_RUN and any(folder.parent.glob("checkpoint_*/")):
            # A trial of one worker: its Train run (the run a results row names) holds only its
            # TensorBoard, the checkpoints are the trial folder's.
            return newest_checkpoint(folder.parent)
        deeper = _deeper_runs(folder)
        if deeper:
            raise CheckpointError(
                f"{folder}: holds no checkpoint in it or in a folder in it, but folders "
                f"deeper in it hold the checkpoints of {_runs(deeper)}"
            )
        raise CheckpointError(
            f"{folder}: holds no checkpoint (no checkpoint_* folder in it or in a folder in it, "
            f"and no {MANIFEST_FILE})"
        )
    if (folder / MANIFEST_FILE).exists() or not inside:
        return folder, read_checkpoint(folder)
    local = pyarrow.fs.LocalFileSystem()
    while True:
        tried: list[str] = []
        listed = newest_first(local, [str(path) for path in inside])
        try:
            state = restore(_in_turn(folder, inside, listed, tried), False)
        except Relisted as relisted:
            inside = relisted.inside
            continue
        if state is None:
            cut = ", ".join(str(Path(path).relative_to(folder)) for path in tried)
            raise CheckpointError(
                f"{folder}: no whole checkpoint, only copies cut short ({cut}): one that its "
                "run is copying now is whole once the copy ends, so load it again then; a run "
                "stopped mid-copy has none until it is resumed (from step 0) and writes one"
            )
        return Path(tried[-1]), state


def _checkpoint_folders(folder: Path) -> list[Path]:
    """The `checkpoint_*` folders of a run's or a trial's folder, or else of the folders in it
    (a trial of several workers keeps them in its Train run)."""
    inside = [path for path in folder.glob("checkpoint_*") if path.is_dir()]
    return inside or [path for path in folder.glob("*/checkpoint_*") if path.is_dir()]


class Relisted(Exception):
    """A checkpoint could not be read while its run wrote and pruned checkpoints (its folder's
    checkpoint folders are no longer those listed): `inside` holds those there now."""

    def __init__(self, inside: list[Path]) -> None:
        super().__init__()
        self.inside = inside


def _in_turn(
    folder: Path, inside: list[Path], listed: list[str], tried: list[str]
) -> Iterator[AbstractContextManager[str]]:
    """The checkpoint folders `listed` as restore's candidates, each added to `tried` as
    restore comes to it, so that the last of `tried` is the one it read; one that cannot be
    read where `folder`'s checkpoints are no longer `inside` (its run pruned it as a reader
    came to it, with a newer one written) raises Relisted in place of its error."""
    for path in listed:
        tried.append(path)
        yield _unless_pruned(path, folder, set(inside))


@contextmanager
def _unless_pruned(path: str, folder: Path, inside: set[Path]) -> Iterator[str]:
    """`path` for restore to read; Relisted where its read fails and `folder` no longer holds
    the checkpoint folders `inside`."""
    try:
        yield path
    except CheckpointError:
        now = _checkpoint_folders(folder)
        if set(now) != inside:
            raise Relisted(now) from None
        raise


def own_report(directory: Path) -> dict[str, Any] | None:
    """The report a checkpoint folder was written with, the last of its REPORTS_FILE (with the
    test metrics where its step was evaluated); None where it keeps none (written before
    checkpoints kept their reports, or by a caller that gave none)."""
    try:
        lines = (directory / REPORTS_FILE).read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):  # none, or one written before manifests checked it, damaged
        return None


def newest_first(fs: pyarrow.fs.FileSystem, folders: Iterable[str]) -> list[str]:
    """Checkpoint folders in `fs`, newest first by the step in each one's manifest, those
    without a readable manifest first (restore names them and falls back). Not by name: Ray
    Train names them by the local time of the worker that wrote them, which a clock set back
    (daylight saving time's end) or a resume in another time zone puts before older ones."""
    steps = {path: manifest_step(fs, path) for path in folders}
    return sorted(steps, key=lambda p: (steps[p] is None, steps[p] or 0, p), reverse=True)


def manifest_step(fs: pyarrow.fs.FileSystem, path: str) -> int | None:
    """The step in the manifest of the checkpoint folder `path` in `fs`, None if unreadable."""
    return _from_manifest(fs, path, lambda manifest: int(manifest["step"]))


def reports_sha256(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    """The SHA-256 of REPORTS_FILE that the manifest of the checkpoint folder `path` in `fs`
    records, None where it records none (written before reports were recorded) or cannot be
    read (a copy cut short before it, which leaves nothing to check against)."""
    return _from_manifest(fs, path, lambda manifest: str(manifest["reports"]["sha256"]))


def final_report(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | None:
    """The last report in the checkpoint folder `path` in `fs` where it is its run's last
    step's (its step at its total_steps) and the folder is whole (its state of the size and
    its reports of the SHA-256 that its manifest records); else None."""
    try:
        manifest = read_manifest(fs, path)
        with fs.open_input_stream(f"{path}/{REPORTS_FILE}") as stream:
            data = stream.readall()
        last = json.loads(data.splitlines()[-1])
        done = last["step"] >= last["total_steps"]
        whole = hashlib.sha256(data).hexdigest() == manifest["reports"]["sha256"]
        size = fs.get_file_info(f"{path}/{STATE_FILE}").size
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return last if done and whole and size == manifest["bytes"] else None


def _from_manifest(
    fs: pyarrow.fs.FileSystem, path: str, entry: Callable[[dict[str, Any]], T]
) -> T | None:
    """`entry` of the manifest of the checkpoint folder `path` in `fs`, None where the manifest
    cannot be read or lacks that entry (a step edited to 1e999, which JSON reads as infinite,
    is none)."""
    try:
        return entry(read_manifest(fs, path))
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def read_manifest(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any]:
    """The manifest of the checkpoint folder `path` in `fs` (OSError or ValueError if it
    cannot be read, NewerFormat where a newer raydeq wrote it)."""
    file = f"{path}/{MANIFEST_FILE}"
    with fs.open_input_stream(file) as stream:
        manifest = json.loads(stream.readall())
    check_format(manifest, file)
    return manifest


def restore(
    candidates: Iterable[AbstractContextManager[str]], resuming: bool = True
) -> dict[str, Any] | None:
    """The state of the first readable checkpoint, newest first; None when there is none.

    Each candidate is a context manager that yields a local folder (Ray's
    `Checkpoint.as_directory()`). A checkpoint that cannot be read is reported and the previous
    one is tried; when every one is unreadable the run stops instead of starting from scratch.
    A copy cut short (IncompleteCheckpoint) was never a checkpoint: it is passed over with a
    warning, and where it is all there is (the first checkpoint's copy, cut by a killed
    driver) the run starts from step 0 instead of failing on every restart. Not `resuming`
    (a reader of a run's weights), the warnings say which checkpoint was read and start nothing.
    """
    failures, passed_over = [], False
    for candidate in candidates:
        try:
            with candidate as directory:
                state = read_checkpoint(Path(directory))
        except NewerFormat:
            raise
        except IncompleteCheckpoint as err:
            log.warning("%s: a copy cut short, passed over", err)
            passed_over = True
            continue
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            failures.append(str(err))
            continue
        if failures or passed_over:
            took = "resumed from" if resuming else "read"
            log.warning("%s the checkpoint of step %d", took, state["step"])
        return state
    if failures:
        raise CheckpointError(f"no readable checkpoint: {'; '.join(failures)}")
    if passed_over and resuming:
        log.warning("no whole checkpoint, only copies cut short: starting from step 0")
    return None
