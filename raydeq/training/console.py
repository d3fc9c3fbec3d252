"""The commands' output where their standard streams are closed, cannot encode a character or
lose their reader: the run goes on, and what they print is never the end of it."""

from __future__ import annotations

import codecs
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

# The codec error handler of the commands' streams (`escaped`).
ERRORS = "raydeq.console"
# Characters of the commands' output written in ASCII where a stream's encoding lacks them.
ASCII_FORMS = {"±": "+-"}
STREAMS = ("stdout", "stderr")
# The least time before a long task's first progress line and between two of them: a task
# done sooner says nothing.
PROGRESS_EVERY_S = 5.0
Item = TypeVar("Item")


def escaped(err: UnicodeError) -> tuple[str | bytes, int]:
    """Write what a stream's encoding lacks (`±` in a table, to an ASCII or Latin-1 terminal)
    in its ASCII form, a path's undecodable bytes as they were read (surrogateescape), and
    anything else as a backslash escape: Python's strict handler ended the command in a
    traceback after its run, with the results unprinted."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    part = err.object[err.start : err.end]
    if all(char in ASCII_FORMS for char in part):
        return "".join(ASCII_FORMS[char] for char in part), err.end
    try:
        return codecs.lookup_error("surrogateescape")(err)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(err)


codecs.register_error(ERRORS, escaped)


def first_line(err: BaseException) -> str:
    """The first line of err's message for a one-line error, or its type's name where it has
    none (an OSError() from a storage layer): indexing the lines of an empty message raised an
    IndexError in place of the error being reported."""
    text = str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def os_reason(err: OSError) -> str:
    """Why an OSError was raised, in one line: its errno's text where it has one (pyarrow's
    message repeats the path, and Python's adds it), else its first line."""
    return os.strerror(err.errno) if err.errno else first_line(err)


def tensorboard_command(logdir: str) -> str:
    """The command that shows a run in TensorBoard, its folder quoted for a shell (a folder
    with a space was printed as it is, which the shell split when pasted)."""
    return f"tensorboard --logdir {shlex.quote(logdir)}"


def duration(seconds: float) -> str:
    """A time span to the second, in its two largest units: `2h05m`, `4m09s`, `12s`."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """How far a long task of `total` parts has come, as plain lines on stderr (`what: 120/300,
    doing, eta 1m05s`) at most one every PROGRESS_EVERY_S seconds, none for a task done
    sooner: a log file or `| tee` keeps them readable, where a redrawn bar fills it with
    carriage returns. `eta`: whether the parts take alike, so that the time left is the pace
    so far times the parts left."""

    def __init__(self, what: str, total: int, eta: bool = True) -> None:
        self.what, self.total, self.eta, self.done = what, total, eta, 0
        self.start = self.shown = time.monotonic()

    def next(self, doing: str = "") -> None:
        """Start the next part (`doing` says what it is): a line where PROGRESS_EVERY_S have
        passed since the start or the line before."""
        now = time.monotonic()
        if now - self.shown >= PROGRESS_EVERY_S:
            self.shown = now
            parts_left = self.total - self.done if self.eta and self.done else 0
            left = (now - self.start) / max(self.done, 1) * parts_left
            line = f"{self.what}: {self.done}/{self.total}" + (f", {doing}" if doing else "")
            print(line + (f", eta {duration(left)}" if left else ""), file=sys.stderr, flush=True)
        self.done += 1

    def over(self, items: Iterable[Item]) -> Iterator[Item]:
        """`items`, each taken as the start of the next part."""
        for item in items:
            self.next()
            yield item


class Kept:
    """A standard stream whose reader may go away (`| head -1`, a closed terminal): once a
    write or flush meets a broken pipe, its descriptor is pointed at /dev/null and the output
    is dropped, where the BrokenPipeError stopped a run mid-way (in Tune's callback, with its
    trials left running)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        """Write `text`, or drop it once the reader has gone."""
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.drop()
            return len(text)

    def flush(self) -> None:
        """Flush, or drop what is buffered once the reader has gone."""
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.drop()

    def drop(self) -> None:
        """Point the stream's descriptor at /dev/null and drop what it holds."""
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.stream.fileno())
        finally:
            os.close(null)
        with contextlib.suppress(BrokenPipeError):
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        """Everything else as the stream has it (encoding, fileno, isatty, ...)."""
        return getattr(self.stream, name)


@contextlib.contextmanager
def output_kept() -> Iterator[None]:
    """For a command's run: a closed descriptor 1 or 2 (`>&-`) opened on /dev/null, so that no
    file opened later takes its number and receives what Ray's processes print; the standard
    streams writing what their encoding lacks by `escaped` and dropping their output once their
    reader has gone (`Kept`). The caller's streams are back on exit."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(null := os.open(os.devnull, os.O_WRONLY), fd)
            if null != fd:
                os.close(null)
    kept = {name: getattr(sys, name) for name in STREAMS}
    errors = {}
    for name, stream in kept.items():
        if stream is None:
            continue
        if hasattr(stream, "reconfigure") and stream.errors != ERRORS:
            errors[name] = stream.errors
            with contextlib.suppress(BrokenPipeError):
                stream.reconfigure(errors=ERRORS)
        setattr(sys, name, Kept(stream))
    try:
        yield
    finally:
        for name, stream in kept.items():
            setattr(sys, name, stream)
            if name in errors:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    stream.reconfigure(errors=errors[name])
