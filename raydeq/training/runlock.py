"""One driver per run on a machine: a second `raydeq.train` of a run that is training here, or
a second `raydeq.tune` of an experiment that is running here, is refused at once.

Two drivers of one run folder both resume from its newest checkpoint, then write and prune
checkpoints side by side: the second one's restore found the folders the first had just
pruned, and failed after three worker restarts. The lock is an flock on a file named after the
run (its storage may be a URI, which has no locks), so the system releases it when the driver
ends, however it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from raydeq.training.storage import StorageError, local_path

PROBE_WAIT_S = 5.0  # the longest a start waits out readers' shared probes of its lock


class RunInUse(StorageError):
    """Another process on this machine is running the same run."""


def lock_file(run: str) -> Path:
    """The lock file of a run folder or URI, in this user's temporary folder; a local folder,
    given as a path or a file: URI, is named by its real path, so that a path through a link to
    it or a URI of it takes the same lock, and another URI by itself without a trailing slash."""
    local = local_path(run)
    place = run.rstrip("/") if local is None else os.path.realpath(local)
    digest = hashlib.sha256(place.encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"raydeq-locks-{os.getuid()}" / f"{digest}.lock"


@contextmanager
def hold(run: str) -> Iterator[None]:
    """Hold the lock of `run` for the block, or raise RunInUse naming the process that holds
    it."""
    path = lock_file(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        holder = take(file)
        if holder is not None:
            raise RunInUse(
                f"{run} is being run by {holder} on this machine; wait for it to end (or stop "
                "it), or give this run another name"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()}")
        file.flush()
        yield


def take(file: IO[str]) -> str | None:
    """Take the exclusive lock of the open lock file, or name the driver that holds it; a
    reader's shared probe (`holder`) lasts a moment, so a start that meets one waits it out
    rather than be refused in the name of the driver that ended before."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            return file.read().strip() or "another process"
        fcntl.flock(file, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            return f"processes that kept reading its lock for {PROBE_WAIT_S:g} s"
        time.sleep(0.01)


@contextmanager
def writing_results(experiment: str) -> Iterator[None]:
    """Hold the results lock of the experiment at `experiment` for the block, waiting while
    another process here reads and writes its results: a --report that read a trial still
    running would otherwise write its results over those the run wrote at its end."""
    path = lock_file(experiment).with_suffix(".results")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def holder(run: str) -> str | None:
    """The process that runs `run` on this machine ("process N"), or None where none does (the
    lock is held, shared, for the test alone)."""
    path = lock_file(run)
    if not path.is_file():
        return None
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return file.read().strip() or "another process"
    return None
