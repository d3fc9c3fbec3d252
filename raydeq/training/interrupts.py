"""Ctrl-C and SIGTERM stop a command the same way, for as long as it runs."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_as_on_ctrl_c(signum: int, frame: object) -> None:
    """Stop on SIGTERM (`kill`, a batch scheduler's preemption, `docker stop`) as Ctrl-C stops:
    through the SIGINT handler of the moment, Ray Train's or Tune's while they fit (the run
    stops and Tune saves the experiment), else KeyboardInterrupt. Ray's own handler, set by
    ray.init, dumped a stack and aborted (status 134) with the run's last state unsaved."""
    os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Put the handlers of SIGINT and SIGTERM back on exit as they were on entry: a library
    call (ray.init's, a command's) leaves its caller's as it found them."""
    if threading.current_thread() is not threading.main_thread():  # which alone has them
        yield
        return
    previous = [signal.getsignal(signum) for signum in SIGNALS]
    try:
        yield
    finally:
        for signum, handler in zip(SIGNALS, previous, strict=True):
            signal.signal(signum, handler)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt and SIGTERM stop as it does, and put the
    caller's handlers back on exit: SIGTERM's default killed a command without a word (a cut
    rewrite leaving its partial file behind), a SIGINT handler left by the caller (Ray
    Train's, after a trainer ran in the process) swallowed Ctrl-C, and a command's main called
    from a script must leave that script's handlers. Handlers set inside (Ray Train's) are
    replaced on exit too."""
    with handlers_kept():
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, stop_as_on_ctrl_c)
        yield
