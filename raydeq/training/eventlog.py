"""TensorBoard event files in the run's storage, a local folder or a URI such as s3://.

TensorBoard's own writer appends to one file in place, which object stores cannot do (its S3
fallback uploads the whole file again at every flush, and needs boto3). For a URI the events are
written to a local folder instead and uploaded through pyarrow as closed segments: at every
checkpoint (before it is reported, so a restart finds the events up to it) and at the end.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raydeq.training.console import first_line
from raydeq.training.storage import StorageError, is_uri, write_bytes

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

EVENTS_GLOB = "events.out.tfevents.*"


class EventLog:
    """Scalars to TensorBoard at `folder` (local path or URI); `purge_step` drops the events a
    resumed run writes again (TensorBoard hides those of earlier files from that step on)."""

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        self.folder = folder
        self.remote = is_uri(folder)
        self.local = tempfile.mkdtemp(prefix="raydeq-events-") if self.remote else folder
        # The hook of the process (a num_workers=0 run's is the driver's), put back at close,
        # or once the writer's thread ended where the writer's first event already failed.
        self.excepthook = threading.excepthook
        threading.excepthook = _WriterThreadsUnsaid(self.excepthook)
        try:
            with self.writing():
                self.writer = _writer(self.local, purge_step)
        except BaseException:
            _failed_writers_ended()
            threading.excepthook = self.excepthook
            raise
        self.described: set[str] = set()  # the tags whose description the open file holds

    def add_scalars(
        self, values: Mapping[str, float], step: int, describe: Callable[[str], str] | None = None
    ) -> None:
        """The scalars of one step as one event: the writer hands each event to its thread
        through a queue, and an event per scalar cost a training step of 18 scalars 4 to 7 ms
        (on 2 cores). A tag's description, `describe(tag)` (what it measures, in which unit), which
        TensorBoard shows beside the tag's chart, goes with the tag's first value in a file."""
        from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_SCALAR, Summary
        from tensorboard.plugins.scalar.metadata import create_summary_metadata

        summary = Summary()
        for tag, value in values.items():
            entry = summary.value.add(tag=tag, simple_value=float(value))
            description = describe(tag) if describe and tag not in self.described else ""
            if description:
                entry.metadata.CopyFrom(create_summary_metadata(tag, description))
                # TensorBoard's data server drops the description of a scalar whose class is unset.
                entry.metadata.data_class = DATA_CLASS_SCALAR
                self.described.add(tag)
        with self.writing():
            self.writer.file_writer.add_summary(summary, step)

    def flush(self) -> None:
        """Make the events so far readable at `folder`; for a URI, upload them as a segment."""
        if not self.remote:
            with self.writing():
                self.writer.flush()
            return
        with self.writing():
            self.writer.close()
        self._upload()
        with self.writing():
            self.writer = _writer(self.local)
        self.described.clear()

    def close(self) -> None:
        """Write the last events and release the writer (and a URI's local folder), and put
        back the process's threading.excepthook once its writer thread has ended."""
        try:
            with self.writing():
                self.writer.close()
        finally:
            threading.excepthook = self.excepthook
        if self.remote:
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Raise a StorageError naming the local folder and why for the OSError of a write of
        TensorBoard's (a full disk), which names no file, from the writer's own thread too."""
        try:
            yield
        except OSError as err:
            reason = first_line(err)
            raise StorageError(
                f"TensorBoard's events could not be written to {self.local}: {reason}"
            ) from None

    def _upload(self) -> None:
        """Move the closed local event files to `folder`."""
        for path in sorted(Path(self.local).glob(EVENTS_GLOB)):
            # TensorBoard reads a folder's event files in name order: a zero-padded upload time
            # keeps that the order they were written in (the writer's own names do not, within
            # one second).
            name = f"events.out.tfevents.{time.time_ns():020d}.{socket.gethostname()}"
            write_bytes(f"{self.folder.rstrip('/')}/{name}", path.read_bytes())
            path.unlink()


@dataclass(frozen=True)
class _WriterThreadsUnsaid:
    """threading.excepthook leaving out the traceback of TensorBoard's writer thread, which
    printed the OSError of a full disk beside the run's one line: the writer raises it again
    at its next call, a StorageError naming the folder (`EventLog.writing`). Other threads'
    go to `passed_on`."""

    passed_on: Callable[[threading.ExceptHookArgs], object]

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        """Pass on the exception of any thread but a writer thread of TensorBoard's."""
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

        if not isinstance(args.thread, _AsyncWriterThread):
            self.passed_on(args)


def _failed_writers_ended() -> None:
    """Wait until TensorBoard's writer threads that failed have ended, and so passed their
    error to threading.excepthook: a writer whose first event fails raises it as it opens."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    for thread in threading.enumerate():
        if isinstance(thread, _AsyncWriterThread) and thread.exception is not None:
            thread.join()


def _writer(folder: str, purge_step: int | None = None) -> SummaryWriter:
    """TensorBoard's writer at a local folder, imported here since only a run's rank 0 writes:
    the commands that import this module for their settings pay nothing for TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(folder, purge_step=purge_step)
