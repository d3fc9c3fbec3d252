"""Solver work recorded as CUDA graphs and replayed: a forward step once per solve, GMRES's
Arnoldi steps once per batch shape (gmres.py).

Written by hand because torch.compile's CUDA graphs ("reduce-overhead") cost 0.2 to 0.35 ms of
host time per call (guards, graph-tree bookkeeping, input copies), as much as the eager step's
launches they replace; a replay of a recorded graph costs a few microseconds. A forward step
reads its carry and the monitor's running state from buffers the graph owns the addresses of
and writes the new ones back into them, so that replaying it advances the solve. Recording
once per solve keeps everything f closes over (the input's injection, the parameters) at the
addresses the graph read them from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch

from raydeq.solvers.termination import Monitor

Carry = Any
Step = Callable[[Callable, Carry, Monitor], Carry]


def leaves(carry: Carry) -> list[torch.Tensor]:
    """The tensors of a carry (nested frozen dataclasses and tuples), in a fixed order."""
    if isinstance(carry, torch.Tensor):
        return [carry]
    if dataclasses.is_dataclass(carry):
        return [t for f in dataclasses.fields(carry) for t in leaves(getattr(carry, f.name))]
    if isinstance(carry, tuple):
        return [t for item in carry for t in leaves(item)]
    return []


def rebuild(carry: Carry, tensors: Iterator[torch.Tensor]) -> Carry:
    """The carry with its tensors, in the order of `leaves`, taken from `tensors`."""
    if isinstance(carry, torch.Tensor):
        return next(tensors)
    if dataclasses.is_dataclass(carry):
        fields = dataclasses.fields(carry)
        return dataclasses.replace(
            carry, **{f.name: rebuild(getattr(carry, f.name), tensors) for f in fields}
        )
    if isinstance(carry, tuple):
        return tuple(rebuild(item, tensors) for item in carry)
    return carry


class Recorder(Protocol):
    """Records a function's device work once (without running it) and replays it."""

    def warm_up(self) -> contextlib.AbstractContextManager:
        """A context in which the step runs eagerly once before recording."""

    def record(self, body: Callable[[], object], written: Sequence[torch.Tensor]) -> None:
        """Record body's work; `written` are the tensors it writes (a recorder that runs body
        while recording, as a tracer does, restores them)."""

    def replay(self) -> None:
        """Run the recorded work again, on the same buffers."""


class CudaGraphRecorder:
    """torch.cuda.CUDAGraph on a side stream of the device (warm-up on the same stream, as
    torch's documentation asks, so that cuBLAS has its workspace there before recording).

    A capture records whatever any thread queues on its stream, and torch supports one
    capture at a time: the threads of a process take the side streams in turn (SIDE_STREAM),
    so that one thread's warm-up or capture never joins another's graph; the same thread may
    take it again (a nested solve inside f's warm-up).
    """

    STREAMS: dict[torch.device, torch.cuda.Stream] = {}
    SIDE_STREAM = threading.RLock()

    def __init__(self, device: torch.device, shares: CudaGraphRecorder | None = None) -> None:
        if device not in self.STREAMS:
            self.STREAMS[device] = torch.cuda.Stream(device)
        self.device = device
        self.stream = self.STREAMS[device]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shares = shares

    @contextlib.contextmanager
    def _on_side_stream(self) -> Iterator[None]:
        """Run on the side stream after the work queued so far, and queue later work after,
        also where the work raised (a warm-up cut short leaves kernels queued that write the
        step's buffers); the other threads wait meanwhile."""
        with self.SIDE_STREAM:
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            try:
                with torch.cuda.stream(self.stream):
                    yield
            finally:
                current.wait_stream(self.stream)

    def warm_up(self) -> contextlib.AbstractContextManager:
        """The side stream."""
        return self._on_side_stream()

    def record(self, body: Callable[[], object], written: Sequence[torch.Tensor]) -> None:
        """Capture body on the side stream (other threads may use CUDA meanwhile); a capture
        runs nothing, so `written` keep their values. With `shares`, a recorder that has
        recorded already, the graph takes its memory pool: graphs that are never replayed at
        once and keep no tensor of their pool alive between replays can share its scratch.
        Each recording captures into a new graph, so that one made again after a failed
        capture does not meet the part that capture left."""
        pool = self.shares.graph.pool() if self.shares is not None else None
        self.graph = torch.cuda.CUDAGraph()
        with self._on_side_stream():
            self.graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                body()
            finally:
                self.graph.capture_end()

    def replay(self) -> None:
        """Launch the graph on the current stream."""
        self.graph.replay()


# The recorder per device type, made for a device and optionally a recorder whose memory
# pool it shares; a device type not listed runs its steps eagerly.
RECORDERS: dict[str, Callable[..., Recorder]] = {"cuda": CudaGraphRecorder}


class Replayed:
    """fn(), which reads and writes tensors at fixed addresses only: run eagerly on its first
    call (the warm-up), recorded on its second and replayed from then on; a warm-up or a
    recording that fails is made again at the next call, never replayed (a capture that an
    error cut short, the device out of memory, holds part of fn's work)."""

    def __init__(
        self, fn: Callable[[], object], written: Sequence[torch.Tensor], recorder: Recorder
    ) -> None:
        self.fn = fn
        self.written = written
        self.recorder = recorder
        self.calls = 0

    def __call__(self) -> None:
        """Run fn's work once; `calls` counts those that ran."""
        if self.calls == 0:
            with self.recorder.warm_up():
                self.fn()
        else:
            if self.calls == 1:
                self._record()
            self.recorder.replay()
        self.calls += 1

    def _record(self) -> None:
        """Record fn, or raise a RuntimeError naming the first line of the recorder's error."""
        try:
            self.recorder.record(self.fn, self.written)
        except Exception as err:
            reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise RuntimeError(
                f"compile='graph' could not record a solver step as a graph ({reason}): "
                "its work, f's included, must stay on the device without host reads; "
                "compile=True or False run it without recording"
            ) from err


class GraphedStep:
    """A method's step replayed (see Replayed) on buffers of its own; call it as the step
    itself, with the carry it returned.

    The first call moves the carry and the monitor's running state (best iterate, residual,
    running mask) into the buffers (two fields of a carry may be one tensor); the step writes
    its new carry and running state back into them. The monitor's checks between steps replace
    its running mask; the next call copies it back into its buffer.
    """

    def __init__(self, step: Step, recorder: Recorder) -> None:
        self.step = step
        self.recorder = recorder
        self.replayed: Replayed | None = None
        self.carry: Carry = None
        self.buffers: list[torch.Tensor] = []
        self.monitor_buffers: dict[str, torch.Tensor] = {}

    def __call__(self, f: Callable, carry: Carry, monitor: Monitor) -> Carry:
        """One step of the solve."""
        if self.replayed is None:
            self.buffers = [t.clone() for t in leaves(carry)]
            self.carry = rebuild(carry, iter(self.buffers))
            self.monitor_buffers = {n: getattr(monitor, n).clone() for n in Monitor.STEPPED}
            written = [*self.buffers, *self.monitor_buffers.values()]
            # The recorded work holds the buffers, not this step: a cycle through it left each
            # solve's recording (a CUDA graph and its memory pool) to Python's cycle collector.
            advance = partial(
                _advance, self.step, f, self.carry, self.buffers, self.monitor_buffers, monitor
            )
            self.replayed = Replayed(advance, written, self.recorder)
        _keep(self.monitor_buffers, monitor)
        self.replayed()
        return self.carry


def _advance(
    step: Step,
    f: Callable,
    carry: Carry,
    buffers: Sequence[torch.Tensor],
    monitor_buffers: dict[str, torch.Tensor],
    monitor: Monitor,
) -> None:
    """One step from the buffers (`carry` is made of them) into the buffers."""
    new = step(f, carry, monitor)
    for buffer, tensor in zip(buffers, leaves(new), strict=True):
        if tensor is not buffer:
            buffer.copy_(tensor)
    _keep(monitor_buffers, monitor)


def _keep(monitor_buffers: dict[str, torch.Tensor], monitor: Monitor) -> None:
    """Put the monitor's running state that something replaced back into its buffers."""
    for name, buffer in monitor_buffers.items():
        if getattr(monitor, name) is not buffer:
            buffer.copy_(getattr(monitor, name))
            setattr(monitor, name, buffer)
