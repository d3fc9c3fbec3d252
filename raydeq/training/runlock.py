"""One driver per run: a second `raydeq.train` of a run that is training, or a second
`raydeq.tune` of an experiment that is running, is refused at once.

Two drivers of one run folder both resume from its newest checkpoint, then write and prune
checkpoints side by side: the second one's restore found the folders the first had just
pruned, and failed after three worker restarts. A driver holds two flocks, which the system
releases when it ends, however it ends: one on a file named after the run in this user's
temporary folder (its storage may be a URI, which has no locks), and, for a local folder, one
on a file beside it in the storage, which a driver on another machine of a shared disk, of
another user or with another TMPDIR takes too. The driver removes the file in the storage as
it ends, so one found there unheld was left by a driver that was killed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from raydeq.training.storage import StorageError, local_path

# What raydeq.train, raydeq.tune and raydeq.bench say on Windows, where this module's import
# of fcntl ended each of them in a ModuleNotFoundError traceback.
NO_FCNTL = (
    "raydeq's commands (raydeq.train, raydeq.tune, raydeq.bench) run on Linux and macOS, not on "
    "Windows, which has no fcntl for their file locks: run them in WSL"
)

try:
    import fcntl
except ModuleNotFoundError:
    raise SystemExit(NO_FCNTL) from None

PROBE_WAIT_S = 5.0  # the longest a start waits out readers' shared probes of its lock

log = logging.getLogger(__name__)


class RunInUse(StorageError):
    """Another process is running the same run."""


def lock_file(run: str) -> Path:
    """The lock file of a run folder or URI, in this user's temporary folder; a local folder,
    given as a path or a file: URI, is named by its real path, so that a path through a link to
    it or a URI of it takes the same lock, and another URI by itself without a trailing slash."""
    local = local_path(run)
    place = run.rstrip("/") if local is None else os.path.realpath(local)
    digest = hashlib.sha256(place.encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"raydeq-locks-{os.getuid()}" / f"{digest}.lock"


def own_folder(folder: Path, what: str = "the folder of this user's run locks") -> None:
    """Make the folder of this user's lock files (or `what` else it is), or check the one
    there, private (mode 0700): made under umask 000 it was writable by every user, or made
    first by another user it was theirs, either of whom could remove a driver's lock file (a
    second driver then trained beside it) or put a link in its place to a file of this user's,
    which `hold` empties. A StorageError names a folder that another user owns."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = folder.lstat()
    if found.st_uid != os.getuid() or not stat.S_ISDIR(found.st_mode):
        raise StorageError(
            f"{folder}, {what}, is not a folder of this user's (owner uid {found.st_uid}); "
            "remove it, or set TMPDIR to a folder of your own"
        )
    if stat.S_IMODE(found.st_mode) != 0o700:
        folder.chmod(0o700)


@contextmanager
def hold(run: str) -> Iterator[str | None]:
    """Hold the locks of `run` for the block, or raise RunInUse naming the process that holds
    one; yields a note naming the driver that was killed holding it, else None."""
    path = lock_file(run)
    own_folder(path.parent)
    with open(path, "a+", encoding="utf-8", errors="replace") as file:
        holder = take(file)
        if holder is not None:
            raise RunInUse(in_use(run, f"{holder} on this machine")) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()}")
        file.flush()
        with hold_shared(run) as left:
            yield left


def in_use(run: str, holder: str) -> str:
    """The refusal of a run that `holder` (a process and its machine) runs."""
    return (
        f"{run} is being run by {holder}; wait for it to end (or stop it), or give this run "
        "another name"
    )


def shared_lock_file(run: str, suffix: str = ".lock") -> Path | None:
    """The lock file of a local run folder in its storage, beside the folder (in it, it would
    be one more entry where Tune and load_model list theirs); None for a URI."""
    local = local_path(run)
    if local is None:
        return None
    folder = Path(os.path.realpath(local))
    return folder.parent / f".{folder.name}{suffix}"


@contextmanager
def hold_shared(run: str) -> Iterator[str | None]:
    """Hold the lock file of `run` in its storage for the block, or raise RunInUse naming its
    holder and machine; yields a note where a killed driver left it. The file, and the folders
    made for it that are empty after (`remove_new_folders`), are removed, so a run that never
    started stores nothing. A storage where no file can be made or locked (read-only, a
    filesystem without flock) is left to the preflight's checks, under the lock of this
    machine alone."""
    path = shared_lock_file(run)
    new = [] if path is None else missing_folders(path.parent)
    file = None
    try:
        file = None if path is None else open_locked(path, run, folders_made=new)
    except OSError:
        pass
    try:
        if file is None:
            yield None
            return
        left = written(file)
        sign(file)
        yield (
            f"{run} was last run by {place(left)}, which ended without releasing its lock "
            f"{path} (killed); the lock is taken over"
            if left
            else None
        )
    finally:
        if file is not None:
            release(path, file)
        if path is not None:
            remove_new_folders(path.parent, new)


def remove_new_folders(folder: Path, new: list[Path]) -> None:
    """Remove `folder` and those above it, up to the highest of `new` (those missing when the
    driver first looked, and those it made), while they are empty: each came into being after
    that look, made by this driver or by another that crossed it, for a lock file beside a run
    (a driver refused by this one could not remove those it made, which held this one's lock
    file); a driver that meets one removed makes it again (`open_locked`)."""
    if not new:
        return
    top = min(new, key=lambda made: len(made.parts))
    chain = [folder, *folder.parents]
    for each in chain[: chain.index(top) + 1]:
        try:
            each.rmdir()
        except FileNotFoundError:  # removed by another driver as it ended
            continue
        except OSError:  # something else was put in it
            return


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those above it that do not exist, deepest first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def sign(file: IO[str]) -> None:
    """Write this process and its machine in the lock file it holds, for a process that meets
    the lock to name its holder; on a full disk the lock is held unnamed (unbuffered, so that
    no write is left to fail again as the file closes)."""
    with suppress(OSError):
        os.ftruncate(file.fileno(), 0)
        os.pwrite(file.fileno(), f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)


def wait_for(file: IO[str], path: Path, what: str) -> None:
    """Take the exclusive flock of `file`, the lock file at `path` opened for reading; where
    another process holds it, first say in a line what is waited for (`what`), the lock and
    its holder: a lock held long (a long --report, a dead NFS client until its server lets
    it go) was otherwise waited for without a word."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = written(file)
        by = place(holder) if holder else "another process"
        log.warning("Waiting for %s: its lock %s is held by %s", what, path, by)
        fcntl.flock(file, fcntl.LOCK_EX)


def open_locked(
    path: Path, run: str, wait: str | None = None, folders_made: list[Path] | None = None
) -> IO[str]:
    """The lock file of `run` at `path`, opened and locked; raise RunInUse where another process
    holds it, or given `wait`, what is waited for, wait for it (`wait_for`). A holder removes
    the file before releasing it, so a lock taken on a file no longer at `path` is dropped and
    the new file opened: two processes never hold two files; a StorageError names a link there
    (`linked`). Given `folders_made`, the file's missing folders are made and added to it,
    again where a holder that made them removed them as it ended. A file it made on a
    filesystem that refuses flock, which no process can hold, is removed before the OSError is
    raised."""
    while True:
        try:
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileNotFoundError:
            if folders_made is None:
                raise
            for folder in reversed(missing_folders(path.parent)):
                try:
                    folder.mkdir()
                except FileExistsError:  # made by another driver meanwhile
                    continue
                except FileNotFoundError:  # one above it removed by a driver as it ended
                    break
                folders_made.append(folder)
            continue
        except FileExistsError:
            try:
                fd, made = os.open(path, os.O_RDWR | os.O_NOFOLLOW), False
            except FileNotFoundError:
                continue  # removed by its holder since
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise
                raise StorageError(linked(path, run)) from None
        file = os.fdopen(fd, "r+", encoding="utf-8", errors="replace")
        try:
            with suppress(OSError):  # shared by the users of a shared disk; the owner's alone
                os.fchmod(fd, 0o666)
            if wait is not None:
                wait_for(file, path, wait)
            elif (holder := take(file)) is not None:
                raise RunInUse(in_use(run, place(holder)))
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return file
        except FileNotFoundError:
            pass
        except OSError:
            file.close()
            if made:
                path.unlink(missing_ok=True)
            raise
        except BaseException:
            file.close()
            raise
        file.close()


def linked(path: Path, what: str) -> str:
    """The refusal of a link at `path`, the lock file of `what`: a lock file is never one, and
    opened through it, the driver would empty the file it links to, write in it and make it
    writable by every user (another user of a shared storage could link it to a file of yours)."""
    target = os.readlink(path)
    missing = "" if path.exists() else ", which does not exist"
    return f"{path}, the lock file of {what}, is a link to {target}{missing}; remove the link"


def open_lock(path: Path, what: str) -> IO[str]:
    """The lock file at `path` of `what`, opened to read and write, made where missing; a
    StorageError names a link there (`linked`), which is not followed."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise StorageError(linked(path, what)) from None
    return os.fdopen(fd, "r+", encoding="utf-8", errors="replace")


def release(path: Path, file: IO[str]) -> None:
    """Remove the lock file at `path` and release its lock, in that order (see `open_locked`);
    one that cannot be removed (another user's, in a folder with the sticky bit) is emptied,
    so that the next holder finds no killed driver in it."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        file.seek(0)
        file.truncate()
        file.flush()
    file.close()


def written(file: IO[str]) -> str:
    """What an open lock file holds, as one line: a file damaged or edited by hand may hold
    bytes that are no UTF-8 (read as U+FFFD) and several lines."""
    file.seek(0)
    return " ".join(file.read().split())


def place(holder: str) -> str:
    """A holder written in the storage ("process N on HOST"), HOST said "this machine" here."""
    process, _, host = holder.partition(" on ")
    return f"{process} on this machine" if host == socket.gethostname() else holder


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
            return written(file) or "another process"
        fcntl.flock(file, fcntl.LOCK_UN)
        if time.monotonic() > deadline:
            return f"processes that kept reading its lock for {PROBE_WAIT_S:g} s"
        time.sleep(0.01)


@contextmanager
def writing_results(experiment: str) -> Iterator[None]:
    """Hold the results lock of the experiment at `experiment` for the block, waiting while
    another process, here or on another machine of its shared disk, reads and writes its
    results: a --report that read a trial still running would otherwise write its results
    over those the run wrote at its end. A writer kept waiting says for whom (`wait_for`)."""
    path = lock_file(experiment).with_suffix(".results")
    own_folder(path.parent)
    what = f"the results of {experiment}"
    with open(path, "a+", encoding="utf-8", errors="replace") as file:
        wait_for(file, path, what)
        sign(file)
        shared = shared_lock_file(experiment, ".results.lock")
        try:
            held = None if shared is None else open_locked(shared, experiment, wait=what)
        except OSError:  # a storage without flock: this machine's lock alone
            held = None
        if held is not None:
            sign(held)
        try:
            yield
        finally:
            if held is not None:
                release(shared, held)


def holder(run: str) -> str | None:
    """The process that runs `run` and its machine ("process N on this machine"), or None
    where none does (each lock is held, shared, for the test alone)."""
    here = probe(lock_file(run))
    if here is not None:
        return f"{here} on this machine"
    shared = shared_lock_file(run)
    there = None if shared is None else probe(shared)
    return None if there is None else place(there)


def probe(path: Path) -> str | None:
    """What the holder of the lock file at `path` wrote there, or None where none holds it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return written(file) or "another process"
    except OSError:  # no such file, or one that cannot be read
        return None
    return None
