"""A solver step recorded once per solve as a CUDA graph and replayed for every later step.

Written by hand because torch.compile's CUDA graphs ("reduce-overhead") cost 0.2 to 0.35 ms of
host time per call (guards, graph-tree bookkeeping, input copies), as much as the eager step's
launches they replace; a replay of a recorded graph costs a few microseconds. The step reads
its carry and the monitor's running state from buffers the graph owns the addresses of and
writes the new ones back into them, so that replaying it advances the solve. Recording once
per solve keeps everything f closes over (the input's injection, the parameters) at the
addresses the graph read them from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
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

    def record(self, body: Callable[[], None], written: Sequence[torch.Tensor]) -> None:
        """Record body's work; `written` are the tensors it writes (a recorder that runs body
        while recording, as a tracer does, restores them)."""

    def replay(self) -> None:
        """Run the recorded work again, on the same buffers."""


class CudaGraphRecorder:
    """torch.cuda.CUDAGraph on a side stream of the device (warm-up on the same stream, as
    torch's documentation asks, so that cuBLAS has its workspace there before recording)."""

    STREAMS: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, device: torch.device) -> None:
        if device not in self.STREAMS:
            self.STREAMS[device] = torch.cuda.Stream(device)
        self.device = device
        self.stream = self.STREAMS[device]
        self.graph = torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def _on_side_stream(self) -> Iterator[None]:
        """Run on the side stream after the work queued so far, and queue later work after."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def warm_up(self) -> contextlib.AbstractContextManager:
        """The side stream."""
        return self._on_side_stream()

    def record(self, body: Callable[[], None], written: Sequence[torch.Tensor]) -> None:
        """Capture body on the side stream (other threads may use CUDA meanwhile); a capture
        runs nothing, so `written` keep their values."""
        with self._on_side_stream():
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                body()
            finally:
                self.graph.capture_end()

    def replay(self) -> None:
        """Launch the graph on the current stream."""
        self.graph.replay()


# The recorder per device type; a device type not listed runs its steps eagerly.
RECORDERS: dict[str, Callable[[torch.device], Recorder]] = {"cuda": CudaGraphRecorder}


class GraphedStep:
    """A method's step that runs eagerly once (the warm-up), is recorded on the second call,
    and is replayed from then on; call it as the step itself, with the carry it returned.

    The recorded step writes its new carry and the monitor's running state (best iterate,
    residual, running mask) into the tensors it read them from. The monitor's checks between
    steps replace its running mask; the next call copies it back into the graph's tensor.
    """

    def __init__(self, step: Step, recorder: Recorder) -> None:
        self.step = step
        self.recorder = recorder
        self.calls = 0
        self.carry: Carry = None
        self.buffers: list[torch.Tensor] = []
        self.monitor_buffers: dict[str, torch.Tensor] = {}

    def __call__(self, f: Callable, carry: Carry, monitor: Monitor) -> Carry:
        """One step of the solve."""
        self.calls += 1
        if self.calls == 1:
            with self.recorder.warm_up():
                return self.step(f, carry, monitor)
        if self.calls == 2:
            self._record(f, carry, monitor)
        self._keep(monitor)
        self.recorder.replay()
        return self.carry

    def _keep(self, monitor: Monitor) -> None:
        """Put the monitor's running state that something replaced back into its buffers."""
        for name, buffer in self.monitor_buffers.items():
            if getattr(monitor, name) is not buffer:
                buffer.copy_(getattr(monitor, name))
                setattr(monitor, name, buffer)

    def _record(self, f: Callable, carry: Carry, monitor: Monitor) -> None:
        """Move the carry and the monitor's running state into buffers of their own (two
        fields of a carry may be one tensor) and record one step on them."""
        self.buffers = [t.clone() for t in leaves(carry)]
        self.carry = rebuild(carry, iter(self.buffers))
        self.monitor_buffers = {name: getattr(monitor, name).clone() for name in Monitor.STEPPED}
        for name, buffer in self.monitor_buffers.items():
            setattr(monitor, name, buffer)

        def body() -> None:
            new = self.step(f, self.carry, monitor)
            for buffer, tensor in zip(self.buffers, leaves(new), strict=True):
                if tensor is not buffer:
                    buffer.copy_(tensor)
            self._keep(monitor)

        self.recorder.record(body, [*self.buffers, *self.monitor_buffers.values()])
