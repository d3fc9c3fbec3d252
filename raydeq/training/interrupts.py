"""SIGTERM as Ctrl-C for the commands, for as long as a command runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Make SIGTERM raise KeyboardInterrupt, as Ctrl-C does, and put the caller's handler back
    on exit: its default killed a command without a word (a cut rewrite leaving its partial
    file behind), and a command's main called from a script must leave that script's handler.
    A handler set inside (Ray's driver, `launch.connect`) is replaced on exit too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
