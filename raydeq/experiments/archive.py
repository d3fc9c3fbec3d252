"""A trial's reports across resumes: Ray Tune starts a trial's result.json anew in each Ray
session, so before a resume the reports are archived next to it (`archive_results`) and
`history` joins them back in step order, with those a stopped driver never recorded from the
checkpoints that kept them."""

from __future__ import annotations

import hashlib
import json
import logging

import pandas as pd
import pyarrow.fs

from raydeq.training.checkpoint import MANIFEST_FILE, REPORTS_FILE, reports_sha256
from raydeq.training.storage import CHECKPOINT_PREFIX, filesystem, subfolders

RESULT_FILE = "result.json"
ARCHIVE_PREFIX = "result-before-resume-"
log = logging.getLogger(__name__)


def _trial_folders(path: str) -> list[str]:
    """The trial folders of an experiment."""
    fs, inner = filesystem(path)
    selector = pyarrow.fs.FileSelector(inner)
    infos = fs.get_file_info(selector)
    return [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory]


def archive_results(path: str) -> None:
    """Keep each trial's reports before a resume: in a new Ray session Tune starts them anew."""
    fs, _ = filesystem(path)
    for folder in _trial_folders(path):
        current = fs.get_file_info(f"{folder}/{RESULT_FILE}")
        if current.type == pyarrow.fs.FileType.File and current.size:
            kept = len(_archived(fs, folder))
            fs.copy_file(current.path, f"{folder}/{ARCHIVE_PREFIX}{kept}.json")


def _archived(fs: pyarrow.fs.FileSystem, folder: str) -> list[str]:
    """A trial folder's archived result files, oldest first."""
    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder))
    names = [i.path for i in infos if i.base_name.startswith(ARCHIVE_PREFIX)]
    return sorted(names, key=lambda p: int(p.rsplit("-", 1)[-1].removesuffix(".json")))


def _carried(fs: pyarrow.fs.FileSystem, trial_path: str) -> list[pd.DataFrame]:
    """The reports of a trial's checkpoints, oldest first: each holds the reports since the
    checkpoint before, which a driver stopped before it recorded them left nowhere else."""
    return [
        reports(fs, f"{path}/{REPORTS_FILE}", reports_sha256(fs, path))
        for path in subfolders(trial_path, CHECKPOINT_PREFIX)
    ]


def reports(fs: pyarrow.fs.FileSystem, file: str, sha256: str | None = None) -> pd.DataFrame:
    """The reports of one result file, flattened as Tune flattens them ("config/model/..."); a
    last line cut short (the driver stopped while writing it) is left out, where Tune's reader
    would drop the whole file. A checkpoint's file whose SHA-256 is not the `sha256` its
    manifest records (a copy cut short or altered, which loading the checkpoint refuses) is
    left out as a missing one is, with a warning."""
    if fs.get_file_info(file).type != pyarrow.fs.FileType.File:
        return pd.DataFrame()
    with fs.open_input_stream(file) as stream:
        data = stream.readall()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        log.warning("%s fails the checksum its %s records: left out", file, MANIFEST_FILE)
        return pd.DataFrame()
    lines = data.decode("utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{file}, line {number}: not a JSON report: {line[:80]!r}"
                ) from None
    return pd.json_normalize(rows, sep="/")


def history(trial_path: str) -> pd.DataFrame:
    """A trial's reports in step order, archived ones first; the latest report of a step wins,
    measure by measure (a finished trial started again reports its last step's evaluation
    alone, which must not drop that step's training times)."""
    fs, folder = filesystem(trial_path)
    results = [*_archived(fs, folder), f"{folder}/{RESULT_FILE}"]
    frames = [*_carried(fs, trial_path), *(reports(fs, file) for file in results)]
    frame = pd.concat(frames, ignore_index=True)
    if frame.empty or "step" not in frame:
        return frame
    return frame.dropna(subset=["step"]).groupby("step", as_index=False, sort=True).last()
