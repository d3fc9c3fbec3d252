"""Ctrl-C and SIGTERM stop a command the same way, for as long as it runs."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

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


def raise_again(frames: list[FrameType], frame: FrameType, event: str, arg: object) -> None:
    """The trace function of a dropped stop: raise KeyboardInterrupt at the next line of the
    `frames` that it interrupted or the next call of a Python function, outside stop_again."""
    caller: FrameType | None = frame
    while caller is not None:
        if caller.f_code is stop_again.__code__:
            return
        caller = caller.f_back
    for interrupted in frames:
        interrupted.f_trace = None
    raise KeyboardInterrupt  # which unsets the trace function, as any error in it does


def stop_again(previous: Callable[[Any], object], unraisable: Any) -> None:
    """sys.unraisablehook while a command runs: raise a KeyboardInterrupt that Python dropped
    again at the next line that it interrupted or call of a Python function (replacing a
    debugger's trace function), and pass any other exception to the caller's hook `previous`.
    Ctrl-C (or SIGTERM) landing in a weakref callback, a __del__ or a GC finaliser raised it
    there, where Python prints 'Exception ignored in' and goes on: the command ran to its end."""
    if threading.current_thread() is not threading.main_thread() or not issubclass(
        unraisable.exc_type, KeyboardInterrupt
    ):
        previous(unraisable)
        return
    armed = sys.gettrace()
    if isinstance(armed, functools.partial) and armed.func is raise_again:  # raised once
        return
    frames: list[FrameType] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    stop = functools.partial(raise_again, frames)
    for interrupted in frames:
        interrupted.f_trace = stop
    sys.settrace(stop)


@contextlib.contextmanager
def stops_kept() -> Iterator[None]:
    """Raise again a KeyboardInterrupt that Python dropped (see stop_again), and put the
    caller's sys.unraisablehook back on exit."""
    if threading.current_thread() is not threading.main_thread():  # which alone has signals
        yield
        return
    previous = sys.unraisablehook
    sys.unraisablehook = functools.partial(stop_again, previous)
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt and SIGTERM stop as it does, and put the
    caller's handlers back on exit: SIGTERM's default killed a command without a word (a cut
    rewrite leaving its partial file behind), a SIGINT handler left by the caller (Ray
    Train's, after a trainer ran in the process) swallowed Ctrl-C, and a command's main called
    from a script must leave that script's handlers. Handlers set inside (Ray Train's) are
    replaced on exit too. A KeyboardInterrupt that Python drops (raised within a weakref
    callback or a __del__) is raised again, so that the stop is not lost."""
    with handlers_kept(), stops_kept():
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, stop_as_on_ctrl_c)
        yield
