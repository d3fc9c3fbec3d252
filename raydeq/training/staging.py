"""Copying a dataset's files to node-local disk (`data.stage_to`) once per node, so that
training reads local files instead of many small ones over network storage.

The workers of a node share one copy: the first takes a file lock and copies, the others wait
for it; a finished copy is marked complete for its list of files and reused by later trials
and restarts (another list, after the folder changed, gets the files it lacks). A copy cut
short resumes where it stopped, since each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from raydeq.training.console import Progress
from raydeq.training.runlock import open_lock, sign, wait_for
from raydeq.training.storage import StorageError

COMPLETE_FILE = ".complete"
LOCK_FILE = ".lock"
# Copying small files from network storage waits on round trips, not on bandwidth.
COPY_THREADS = 16


def staged_root(stage_to: str, data_dir: str) -> Path:
    """The local copy's folder: named after the data folder, with a digest of its full path."""
    digest = hashlib.sha256(data_dir.encode()).hexdigest()[:8]
    return Path(stage_to, f"{Path(data_dir).name}-{digest}")


def _copy(source: Path, target: Path) -> None:
    """Copy one file, written under a temporary name first."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _complete(root: Path, mark: str) -> bool:
    """True when the copy at `root` was completed for the files that `mark` describes."""
    try:
        return (root / COMPLETE_FILE).read_text() == mark
    except OSError:
        return False


def _check_owner(root: Path, data_dir: str) -> None:
    """Raise a StorageError unless `root`, the copy of `data_dir`, is a folder of this user's:
    one that another user made first in a shared `stage_to` holds files that user can change,
    and a mark that the copy is complete, so the training would read them as the data's."""
    found = root.lstat()
    if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid():
        return
    raise StorageError(
        f"{root}, the copy of {data_dir} in data.stage_to, is not a folder of this user's "
        f"(owner uid {found.st_uid}); remove it, or set data.stage_to to a folder of your own"
    )


def stage(data_dir: str, files: Sequence[str], stage_to: str) -> Path:
    """Copy `files` (paths relative to `data_dir`) to this node's `stage_to`, once; the copy's
    root, to read them from. A copy completed for other files (the folder changed and was
    indexed again) gets the files it lacks. A worker that waits for another's copy says so."""
    root = staged_root(stage_to, data_dir)
    root.mkdir(parents=True, exist_ok=True)
    _check_owner(root, data_dir)
    listing = hashlib.sha256("\n".join(files).encode()).hexdigest()
    mark = f"{len(files)} files from {data_dir}\nlisting sha256 {listing}\n"
    if _complete(root, mark):
        return root
    what = f"the copy of {data_dir} to {root}"
    with open_lock(root / LOCK_FILE, what) as lock:
        wait_for(lock, root / LOCK_FILE, what)
        sign(lock)
        if not _complete(root, mark):
            # Only the files the copy lacks are parts: a resumed copy's files already there,
            # passed over at once, made the time left a fraction of the copy's. Finding them
            # among ImageNet's 1.28M files took 7 s on 2 busy cores, and their folders 5 s more.
            what = f"finding the files of {data_dir} that {root} lacks"
            shown = Progress(what, len(files))
            lacking = [name for name in shown.over(files) if not (root / name).exists()]
            for folder in sorted({Path(name).parent for name in lacking}):
                (root / folder).mkdir(parents=True, exist_ok=True)
            what = f"copying {len(lacking)} of the {len(files)} files of {data_dir} to {root}"
            shown = Progress(what, len(lacking))
            with ThreadPoolExecutor(COPY_THREADS) as pool:
                sources = (Path(data_dir, name) for name in lacking)
                for _ in pool.map(_copy, sources, (root / name for name in lacking)):
                    shown.next()
            (root / COMPLETE_FILE).write_text(mark)
    return root
