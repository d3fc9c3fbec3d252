"""A trial's reports across resumes and restarts: Ray Tune starts a trial's result.json anew in a
Ray session where the trial has no checkpoint, so before a resume the reports that no archive
holds yet are archived next to it (`archive_results`), with those a stopped driver never
recorded, which only the checkpoints that the resumed trial prunes kept, and as a trial starts
those that only its checkpoints keep (`archive_unrecorded`); `history` joins them back in step
order, with those of the checkpoints still there."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.json

from raydeq.training.checkpoint import MANIFEST_FILE, REPORTS_FILE, reports_sha256
from raydeq.training.console import Progress
from raydeq.training.storage import (
    CHECKPOINT_PREFIX,
    TRAIN_RUN,
    StorageError,
    filesystem,
    reading,
    subfolders,
    write_bytes,
)

RESULT_FILE = "result.json"
ARCHIVE_PREFIX = "result-before-resume-"
_ARCHIVE_NAME = re.compile(rf"{ARCHIVE_PREFIX}(\d+)\.json")
# How long a result file found empty or cut short, and written to within that long, is read
# again: a running driver copies each trial's result.json into the storage in place, emptying
# it first, so a --report from a second terminal could find it so for the copy's milliseconds
# and count the trial as one with no reports. A copy of a long trial's file (5,000 reports,
# 4 MB) takes 3 ms on a local disk.
RESULT_RETRY_S = 1.0
log = logging.getLogger(__name__)
# pyarrow's types of JSON's plain values (it reads a date's text as a timestamp).
JSON_VALUES = (
    pa.types.is_null,
    pa.types.is_boolean,
    pa.types.is_int64,
    pa.types.is_float64,
    pa.types.is_string,
)


class DamagedReports(StorageError, ValueError):
    """A trial's result file with a line before its last that is no JSON report, or one of
    any place that is JSON but no report (a file edited by hand): the results are not written
    from it, and the commands that write them say so in one line naming the file and line."""


def _trial_folders(path: str) -> list[str]:
    """The trial folders of an experiment."""
    fs, inner = filesystem(path)
    selector = pyarrow.fs.FileSelector(inner)
    infos = fs.get_file_info(selector)
    return [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory]


def archive_results(path: str) -> None:
    """Keep each trial's reports before a resume: in a new Ray session Tune starts them anew,
    or goes on from a copy of them (a trial with a checkpoint), so an archive holds the lines
    that no earlier one does and none is written where there are none; a last line cut short
    is left out of the result file once archived (`_end_at_whole_line`), saying how far it has
    come: 3,000 trials of 200 reports took 54 s on 2 busy cores."""
    fs, _ = filesystem(path)
    folders = _trial_folders(path)
    what = f"archiving the reports of the trials of {path} before the resume"
    for folder in Progress(what, len(folders)).over(folders):
        numbered = _archived(fs, folder)
        earlier = list(numbered.values())
        current = f"{folder}/{RESULT_FILE}"
        trial_path = f"{path.rstrip('/')}/{folder.rsplit('/', 1)[-1]}"
        unrecorded = _unrecorded(fs, trial_path, [*earlier, current])
        lines = unrecorded + _unarchived(fs, current, earlier)  # a line cut short stays last
        _write_archive(trial_path, numbered, lines)
        _end_at_whole_line(fs, current, f"{trial_path}/{RESULT_FILE}")


def _end_at_whole_line(fs: pyarrow.fs.FileSystem, file: str, path: str) -> None:
    """Leave out the last line of the result file `file` (at `path`) where a stop cut it short,
    once archived: Tune resumes a trial with a checkpoint by appending to a copy of the file,
    which joined its next report to that line, one before the last that is no report, so
    that every report of the experiment after it stopped naming that line."""
    data = _read(fs, file)
    if data and not data.endswith(b"\n"):
        write_bytes(path, data[: data.rfind(b"\n") + 1])


def archive_unrecorded(trial_path: str) -> None:
    """Archive the reports that the checkpoints of the trial at `trial_path` keep and none of
    its result files holds, as a trial starts: Tune restarts a failed trial with the storage's
    copy of its result file, which the driver syncs every 10 s or more, so the reports since
    that copy were left only in the checkpoints that the restarted trial then prunes."""
    fs, folder = filesystem(trial_path)
    if fs.get_file_info(folder).type != pyarrow.fs.FileType.Directory:
        return  # a trial's first start: nothing stored yet
    numbered = _archived(fs, folder)
    files = [*numbered.values(), f"{folder}/{RESULT_FILE}"]
    _write_archive(trial_path, numbered, _unrecorded(fs, trial_path, files))


def _write_archive(trial_path: str, numbered: dict[int, str], lines: list[bytes]) -> None:
    """Write `lines` as the next archive of the trial at `trial_path`, whose archives are
    `numbered`; nothing where there are none. A write that fails (a full disk) is a
    StorageError naming the archive, and leaves none cut short (`write_bytes`)."""
    if lines:
        number = max(numbered, default=-1) + 1  # past a gap: none is written over
        write_bytes(f"{trial_path.rstrip('/')}/{ARCHIVE_PREFIX}{number}.json", b"".join(lines))


def _unarchived(fs: pyarrow.fs.FileSystem, file: str, archives: list[str]) -> list[bytes]:
    """The lines of the result file `file` that none of the `archives` holds, in order."""
    held: set[bytes] = set()
    for name in archives:
        held.update(_lines(fs, name))
    return [line for line in _lines(fs, file) if line not in held]


def _unrecorded(fs: pyarrow.fs.FileSystem, trial_path: str, files: list[str]) -> list[bytes]:
    """The reports that a trial's checkpoints keep of steps none of the result `files` holds
    (a driver stopped before it recorded them), as their lines: the resumed trial prunes
    those checkpoints as it goes on, and the reports with them."""
    recorded = {step for file in files for step in reports(fs, file).get("step", [])}
    return [
        f"{line}\n".encode()
        for file, data in _checkpoint_reports(fs, trial_path)
        for line, row in _rows(file, data)
        if row.get("step") not in recorded
    ]


def _lines(fs: pyarrow.fs.FileSystem, file: str) -> list[bytes]:
    """The lines of a file, each with its line end (a last line cut short without one); none
    where there is no file."""
    with reading(file):
        if fs.get_file_info(file).type != pyarrow.fs.FileType.File:
            return []
        with fs.open_input_stream(file) as stream:
            return stream.readall().splitlines(keepends=True)


def _archived(fs: pyarrow.fs.FileSystem, folder: str) -> dict[int, str]:
    """A trial folder's archived result files by their number, oldest first; a file named
    otherwise (a copy's `result-before-resume-0 copy.json`) is none, and so is every file of a
    folder that is gone (removed by hand), as S3, which has no folders, lists it."""
    with reading(folder):
        infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    numbered = {
        int(found.group(1)): info.path
        for info in infos
        if (found := _ARCHIVE_NAME.fullmatch(info.base_name))
        and info.type == pyarrow.fs.FileType.File
    }
    return {number: numbered[number] for number in sorted(numbered)}


def _carried(fs: pyarrow.fs.FileSystem, trial_path: str) -> list[pd.DataFrame]:
    """The reports of a trial's checkpoints (see `_checkpoint_reports`), one frame each."""
    return [_frame(file, data) for file, data in _checkpoint_reports(fs, trial_path)]


def _checkpoint_reports(fs: pyarrow.fs.FileSystem, trial_path: str) -> list[tuple[str, bytes]]:
    """The report files of a trial's checkpoints and their bytes, in its folder or, for a trial
    of several workers, its Train run's (TRAIN_RUN): each holds the reports since the
    checkpoint before, which a driver stopped before it recorded them left nowhere else. A file
    whose SHA-256 is not the one its manifest records (a copy cut short or altered, which
    loading the checkpoint refuses) is left out as a missing one is, with a warning, once it
    is not being copied (`_settled`)."""
    files = []
    for folder in (trial_path, f"{trial_path.rstrip('/')}/{TRAIN_RUN}"):
        with reading(folder):
            paths = subfolders(folder, CHECKPOINT_PREFIX)
        files += [(f"{path}/{REPORTS_FILE}", reports_sha256(fs, path)) for path in paths]
    read = [(file, _settled(fs, file, sha256)) for file, sha256 in files]
    return [(file, data) for file, data in read if data is not None]


def reports(fs: pyarrow.fs.FileSystem, file: str) -> pd.DataFrame:
    """The reports of one result file, flattened as Tune flattens them ("config/model/..."); a
    last line cut short (the driver stopped while writing it) is left out, where Tune's reader
    would drop the whole file; one the driver is copying is read once copied (`_settled`)."""
    data = _settled(fs, file)
    return pd.DataFrame() if data is None else _frame(file, data)


def _settled(fs: pyarrow.fs.FileSystem, file: str, sha256: str | None = None) -> bytes | None:
    """The bytes of a report file, read again for up to RESULT_RETRY_S while they are not
    whole (`_whole`) and it was written to within that long: a copy in progress, of Tune's
    result file, which the driver copies in place, or of a checkpoint's reports, which Ray
    copies beside its manifest (often the first file there). One found so and left alone
    longer (a trial yet to report, a driver stopped mid-line, a copy cut short) is read once,
    as an archive is (written once, its cut last line kept); reports whose SHA-256 is not
    `sha256` then are None, with a warning."""
    deadline = time.monotonic() + RESULT_RETRY_S
    while True:
        data = _read(fs, file)
        whole = data is None or _whole(file, data, sha256)
        if whole or time.monotonic() > deadline:
            break
        mtime = fs.get_file_info(file).mtime
        if mtime is None or time.time() - mtime.timestamp() > RESULT_RETRY_S:
            break
        time.sleep(0.05)
    if not whole and sha256 is not None:
        log.warning("%s fails the checksum its %s records: left out", file, MANIFEST_FILE)
        return None
    return data


def _whole(file: str, data: bytes, sha256: str | None) -> bool:
    """Whether the bytes of a report file are whole: of the SHA-256 `sha256` where its
    checkpoint's manifest records one, ending in a line's end where it is Tune's result file
    (emptied as the driver copies it), else as they are."""
    if sha256 is not None:
        return hashlib.sha256(data).hexdigest() == sha256
    return data.endswith(b"\n") or file.rsplit("/", 1)[-1] != RESULT_FILE


def _read(fs: pyarrow.fs.FileSystem, file: str) -> bytes | None:
    """The bytes of a report file; None where there is none (or no longer: a running trial
    prunes its checkpoints); a StorageError naming it and why where it cannot be read."""
    try:
        with reading(file):
            if fs.get_file_info(file).type != pyarrow.fs.FileType.File:
                return None
            with fs.open_input_stream(file) as stream:
                return stream.readall()
    except FileNotFoundError:  # a checkpoint its running trial pruned since it was found
        return None


def _frame(file: str, data: bytes) -> pd.DataFrame:
    """The reports in the bytes `data` of the report file `file` (see `reports`)."""
    table = _table(data) if _plain(data) else None
    if table is None:
        return _parsed(file, data)
    # pd.json_normalize puts a report's objects, flattened, after its plain values.
    nested = [pa.types.is_struct(column.type) for column in table.columns]
    order = sorted(range(table.num_columns), key=nested.__getitem__)
    columns = [table.column(i) for i in order]
    return pd.DataFrame(dict(_flattened(columns, [table.column_names[i] for i in order], "")))


def _plain(data: bytes) -> bool:
    """Whether a file may be read as columns: no blank line, which `_parsed` refuses, and no
    carriage return, which it takes for a line's end."""
    return bool(data) and b"\n\n" not in data and b"\r" not in data and not data.startswith(b"\n")


def _table(data: bytes) -> pa.Table | None:
    """A file's reports as columns, read by pyarrow, its last line left out where it is cut
    short; None where pyarrow refuses a line (which `_parsed` names) or reads a value as other
    than JSON gives it (a date's text as a timestamp)."""
    whole, _, last = data.rpartition(b"\n")
    try:
        json.loads(last or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):  # cut in a character too
        data = whole
    try:
        table = pyarrow.json.read_json(pa.BufferReader(data))
    except pa.ArrowInvalid:
        return None
    return table if all(_json_type(field.type) for field in table.schema) else None


def _json_type(kind: pa.DataType) -> bool:
    """Whether pyarrow's type holds JSON values as they are: null, bool, numbers, text and
    lists or objects of them."""
    if pa.types.is_struct(kind):
        return all(_json_type(field.type) for field in kind)
    if pa.types.is_list(kind):
        return _json_type(kind.value_type)
    return any(check(kind) for check in JSON_VALUES)


def _flattened(
    columns: list[pa.ChunkedArray | pa.Array], names: list[str], prefix: str
) -> list[tuple[str, pd.Series]]:
    """(name, values) of each column, a struct's fields named `<struct>/<field>` as
    `pd.json_normalize` names them; lists as Python lists and a bool's missing values as NaN,
    as pandas reads them from the reports."""
    flat = []
    for column, name in zip(columns, names, strict=True):
        if pa.types.is_struct(column.type):
            whole = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            flat += _flattened(whole.flatten(), [f.name for f in column.type], f"{prefix}{name}/")
        elif pa.types.is_list(column.type) or (
            column.null_count and pa.types.is_boolean(column.type)
        ):
            values = [math.nan if v is None else v for v in column.to_pylist()]
            flat.append((f"{prefix}{name}", pd.Series(values, dtype=object)))
        else:
            flat.append((f"{prefix}{name}", column.to_pandas()))
    return flat


def _parsed(file: str, data: bytes) -> pd.DataFrame:
    """The reports of a file read line by line (see `_rows`)."""
    return pd.json_normalize([row for _, row in _rows(file, data)], sep="/")


def _rows(file: str, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The lines of a report file, each with its report: a last line cut short (in a character
    too) is left out, another line that is no report a DamagedReports naming it."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            row = None
        if not isinstance(row, dict):
            raise DamagedReports(f"{file}, line {number}: not a JSON report: {line[:80]!r}")
        rows.append((line, row))
    return rows


def history(trial_path: str) -> pd.DataFrame:
    """A trial's reports in step order, archived ones first; the latest report of a step wins,
    measure by measure (a finished trial started again reports its last step's evaluation
    alone, which must not drop that step's training times). A file or folder of the trial's
    that cannot be read is a StorageError naming it and why: results left without its reports
    would rank the trial as one that never reported them."""
    fs, folder = filesystem(trial_path)
    results = [*_archived(fs, folder).values(), f"{folder}/{RESULT_FILE}"]
    frames = [*_carried(fs, trial_path), *(reports(fs, file) for file in results)]
    frame = pd.concat(frames, ignore_index=True)
    if frame.empty or "step" not in frame:
        return frame
    return frame.dropna(subset=["step"]).groupby("step", as_index=False, sort=True).last()
