"""The one timing harness: warm-up, interleaved repeats, device-synchronised wall times, medians."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from raydeq.training.console import Progress

# A case prepares one timed call: it runs untimed set-up (e.g. a forward pass before a timed
# backward) and returns the thunk whose wall time is measured; the last call's value is kept.
Case = Callable[[], Callable[[], Any]]


@dataclass(frozen=True)
class After:
    """A thunk's value computed once its clock has stopped: what a case reports about its result
    (a true residual, a gradient error) is no part of the time it measures."""

    compute: Callable[[], Any]


@dataclass
class Timing:
    """Wall times of the repeats of one case (seconds) and the value its last call returned.

    Only the last value is kept: values kept from every round grew and fragmented the heap
    from round to round, and the page faults of that growth, about 2,000 per call, more than
    doubled the Neural ODE's measured training step on a CPU.
    """

    seconds: list[float] = field(default_factory=list)
    value: Any = None

    @property
    def median(self) -> float:
        """Median wall time over the repeats."""
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0 when fewer than 4 repeats)."""
        if len(self.seconds) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.seconds, n=4)
        return (q3 - q1) / self.median if self.median > 0 else 0.0


# glibc's mallopt parameters, and the largest mmap threshold that every glibc accepts on a
# 64-bit system (older ones refuse more, above HEAP_MAX_SIZE / 2; 2.36 takes 1 GiB too).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the system
    (a no-op elsewhere).

    Otherwise a call that frees a block above the mmap threshold, or leaves more free memory at
    the top of the heap than the trim threshold, gives it back, and the next call faults those
    pages in again: on a CPU the Neural ODE's training step with the continuous adjoint took
    about 200 such page faults per call (mnist_dense, batch 256), a share of its time that
    depended on the heap the cases timed before it left behind; with these settings, 1.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name is not None else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock times it (any accelerator that
    --device accepts, e.g. mps, queues its work as CUDA does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_call(thunk: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of `thunk` takes on `device` (garbage collection paused) and its value;
    a value `After` is computed after the clock stops."""
    gc.disable()
    try:
        synchronize(device)
        start = time.perf_counter()
        value = thunk()
        synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, value.compute() if isinstance(value, After) else value
    finally:
        gc.enable()


def measure(
    cases: Mapping[str, Case],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    label: str = "",
) -> dict[str, Timing]:
    """Time every case `repeats` times after `warmup` untimed rounds, interleaving the cases;
    with a `label`, a progress line on stderr after each round, and between two a line naming
    the case that begins 5 s or more after the line before (`console.Progress`): one round of
    the node suite's cifar10_small cases at batch 16 took 47 s on 2 busy cores.

    Each round runs every case once, in an order rotated by one from the previous round, so
    that slow drifts of the machine (other processes, clocks, caches) spread over all cases.
    A full garbage collection runs before each round, never inside a timed call.
    """
    names = list(cases)
    timings = {name: Timing() for name in names}
    if not names:  # nothing to time (e.g. no case reached its target): no rounds
        return timings
    rounds = warmup + repeats
    shown = Progress(label, rounds * len(names)) if label else None
    for round_index in range(rounds):
        gc.collect()
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if shown:
                shown.next(f"round {round_index + 1}/{rounds}, {name}")
            seconds, value = time_call(cases[name](), device)
            if round_index >= warmup:
                timings[name].seconds.append(seconds)
                timings[name].value = value
        if label:
            print(f"{label}: round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
    return timings


def part_line(label: str, number: int, total: int) -> None:
    """A progress line on stderr as part `number` of a suite's `total` begins, `label
    (number/total)`: a part outside the timing's rounds may take minutes."""
    print(f"{label} ({number}/{total})", file=sys.stderr, flush=True)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, inf when the denominator is 0."""
    return numerator / denominator if denominator > 0 else float("inf")


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over the rounds of `measure` of the two cases' time ratio within a round.

    A slow spell of the machine slows every case of the rounds it falls in, so the ratio of
    the two medians swings with how the spells fall between the cases; within a round they
    cancel.
    """
    pairs = zip(numerator.seconds, denominator.seconds, strict=True)
    return statistics.median(ratio(a, b) for a, b in pairs)
