"""Ctrl-C and SIGTERM stop a command the same way, for as long as it runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Make Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, and put the caller's handlers
    back on exit: SIGTERM's default killed a command without a word (a cut rewrite leaving its
    partial file behind), a SIGINT handler left by the caller (Ray Train's, after a trainer
    ran in the process) swallowed Ctrl-C, and a command's main called from a script must leave
    that script's handlers. Handlers set inside (Ray's driver, `launch.connect`) are replaced
    on exit too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = [signal.signal(signum, signal.default_int_handler) for signum in SIGNALS]
    try:
        yield
    finally:
        for signum, handler in zip(SIGNALS, previous, strict=True):
            signal.signal(signum, handler)
