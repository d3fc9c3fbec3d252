"""Files at a local path or a URI (s3://, gs://, ...), through pyarrow's filesystems."""

from __future__ import annotations

import codecs
import os
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs

from raydeq.training.console import first_line, os_reason

# How Ray Train and Tune name a checkpoint's folder in a run's or trial's folder.
CHECKPOINT_PREFIX = "checkpoint_"
# The folder of a Tune trial that holds its Ray Train run and its checkpoints: a trial's of
# several workers, and a one-worker trial's that raydeq wrote before such trials trained in
# their own process (until 2026-12-02, when every trial trained through Ray Train).
TRAIN_RUN = "train"
# What a URI holds as written (RFC 3986's reserved characters and escapes); others are escaped.
URI_CHARACTERS = ":/?#[]@!$&'()*+,;=%"


class StorageError(RuntimeError):
    """The storage folder cannot be created or written, or what it holds cannot be read back."""


def is_uri(path: str) -> bool:
    """True for a URI such as s3://bucket/runs or file:/data/runs (the short form of
    file:///data/runs, which pyarrow and Ray read as a URI), False for a local path."""
    return "://" in path or path.startswith("file:/")


def absolute(path: str) -> str:
    """An absolute local path, or the URI unchanged (so workers see the same place); a local
    path that this locale writes other than in UTF-8 is refused (`check_encoding`)."""
    return path if is_uri(path) else check_encoding(os.path.abspath(os.path.expanduser(path)))


def check_encoding(path: str) -> str:
    """`path`, or a StorageError where the filesystem encoding of this process's locale (ASCII
    under LC_ALL=C with PYTHONUTF8=0, as plain LC_ALL=C turns Python's UTF-8 mode on; Latin-1
    under en_US.ISO-8859-1) writes it other than in UTF-8, in which
    pyarrow, Ray and TensorBoard write every path: a run's files went to two folders (`é`
    written as two bytes by one and as four by the other), or the run ended in a traceback.
    Under a UTF-8 locale, a path whose bytes are no UTF-8 (a folder named in another encoding)
    is refused for what it is, as is a NUL character, which no file name holds."""
    if "\0" in path:
        raise StorageError(f"{path!r} holds a NUL character, which no path can hold; remove it")
    try:
        same = os.fsencode(path) == path.encode("utf-8")
    except UnicodeEncodeError:
        same = False
    if not same and codecs.lookup(sys.getfilesystemencoding()).name == "utf-8":
        raise StorageError(
            f"{os.fsencode(path)!r} holds bytes that are no UTF-8 (a name written in another "
            "encoding), which pyarrow and Ray cannot name; rename it in UTF-8"
        )
    if not same:
        raise StorageError(
            f"{path} is not ASCII, and this locale writes paths in "
            f"{sys.getfilesystemencoding()}, pyarrow and Ray in UTF-8; run under a UTF-8 "
            "locale (LC_ALL=C.UTF-8) or with PYTHONUTF8=1"
        )
    return path


def local_path(path: str) -> str | None:
    """The absolute local path that a local path or a file: URI names (its percent-escapes
    decoded, as pyarrow reads it); None for a URI of another scheme or one pyarrow refuses."""
    if not is_uri(path):
        return absolute(path)
    if not path.startswith("file:"):
        return None
    try:
        return filesystem(path)[1]
    except ValueError:
        return None


def filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and the path within it for a local path or a URI."""
    return pyarrow.fs.FileSystem.from_uri(absolute(path))


def exists(path: str) -> bool:
    """True when a file or folder is at `path`."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def subfolders(path: str, prefix: str) -> list[str]:
    """The paths of the folders in `path` whose names start with `prefix`, sorted by name, in
    `filesystem(path)`'s form."""
    fs, root = filesystem(path)
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    folders = [i.path for i in found if i.type == pyarrow.fs.FileType.Directory]
    return sorted(p for p in folders if p.rsplit("/", 1)[-1].startswith(prefix))


def write_bytes(path: str, payload: bytes) -> None:
    """Write a file at a local path or URI. A local file is written beside it and renamed into
    place, so that a crash mid-write (a stored experiment's settings, diverged.json) leaves the
    old file or the new one, never a cut one; an object store's upload is whole already. The
    file beside it is named after no file: TensorBoard reads any file whose name holds
    "tfevents" as an event file, and one it polled as it was written, renamed after, failed
    its every later poll of the folder, which then showed no new event. A
    write that fails (a full disk, a read-only folder) is a StorageError naming the file and
    why, where pyarrow's error for a full disk names no file."""
    try:
        _write(path, payload)
    except OSError as err:
        reason = first_line(err)
        raise StorageError(f"{path} could not be written: {reason}") from None


def _write(path: str, payload: bytes) -> None:
    """`write_bytes` without its error: the OSError of the filesystem."""
    fs, inner = filesystem(path)
    folder = inner.rsplit("/", 1)[0]
    fs.create_dir(folder, recursive=True)
    local = fs.type_name == "local"
    written = f"{folder}/.{uuid.uuid4().hex}.partial" if local else inner
    stream = fs.open_output_stream(written)
    try:
        with stream:
            stream.write(payload)
    except BaseException:
        if local:
            fs.delete_file(written)
        raise
    if local:
        fs.move(written, inner)


def read_bytes(path: str) -> bytes:
    """Read a file at a local path or URI."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.readall()


def read_text(path: str) -> str:
    """Read a text file at a local path or URI."""
    return read_bytes(path).decode()


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Raise a StorageError naming `path` and why for an OSError as it is read or listed
    (Permission denied, Input/output error), which pyarrow raised in a traceback; a
    FileNotFoundError, which its readers take for no file, is raised as it is."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(f"{path} cannot be read: {os_reason(err)}") from None


def unparsed_uri(path: str) -> str | None:
    """Why pyarrow refuses a URI holding a character it reads only percent-encoded (a space, a
    non-ASCII one), giving that form; None for a local path or a URI written so."""
    escaped = urllib.parse.quote(path, safe=URI_CHARACTERS)
    if not is_uri(path) or escaped == path:
        return None
    return (
        f"{path} is not a URI that pyarrow reads: a space or a non-ASCII character in a URI "
        f"is written percent-encoded, as in {escaped}"
    )


def check_storage(path: str) -> None:
    """Create the storage folder and write a probe file to it, or raise a StorageError; the
    probe is removed whether or not its write went through. A URI with a character pyarrow
    refuses unparsed (a space, a non-ASCII one) is refused giving its escaped form."""
    problem = unparsed_uri(path)
    if problem:
        raise StorageError(f"storage_path {problem}")
    try:
        fs, root = filesystem(path)
        fs.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.write-test-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(probe) as stream:
                stream.write(b"ok")
        finally:
            if fs.get_file_info(probe).type != pyarrow.fs.FileType.NotFound:
                fs.delete_file(probe)
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise StorageError(f"storage_path {path} is not writable: {reason}") from None
