"""The one solver loop: a method's init, then its steps, read on the host every few steps.

A method is an `init` that evaluates f at z0, records it with the monitor and returns its
carry, and phases of a `step` that advances the carry without reading a tensor on the host
(VCAB3 has two: its start-up, then Adams steps; the others one).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import torch

from raydeq.solvers.graphs import RECORDERS, GraphedStep
from raydeq.solvers.termination import PREDICTED_BLOCK, UNKNOWN_BLOCK, Monitor

Map = Callable[[torch.Tensor], torch.Tensor]
Carry = Any

# Steps between the reads that end a phase with a `pending` test (VCAB3's start-up needs
# two accepted steps per sample).
PHASE_BLOCK = 2


@dataclass(frozen=True)
class Phase:
    """A run of one kind of step: its evaluations of f, and unless it lasts to the end, the
    samples that still need it (the phase ends when no running sample does)."""

    step: Callable[[Map, Carry, Monitor], Carry]
    evaluations: int
    pending: Callable[[Carry, Monitor], torch.Tensor] | None = None


class Method(Protocol):
    """A forward solver: init, the phases of its step, and its current residual.

    `capturable`: whether its steps have fixed shapes and no host-side state that changes
    from step to step, so that torch.compile (or a CUDA graph) can capture one for reuse.
    A method may also have `restart(f, carry, samples, monitor) -> carry`, which restarts
    the samples of a (B, 1) mask at their best iterates (monitor.best_z) with one evaluation
    of f: a sample that fails the divergence test then restarts once before it stops.
    """

    capturable: bool

    def init(self, f: Map, z: torch.Tensor, monitor: Monitor) -> tuple[Carry, int, int]:
        """The carry at z0 (recorded with the monitor), the evaluations of f spent and the
        steps they count as (1 for a root finder, whose evaluation at z0 is its first)."""

    def phases(self) -> tuple[Phase, ...]:
        """The kinds of step, in order."""

    def residual(self, carry: Carry) -> torch.Tensor:
        """Residual 2-norm (B, 1) at each sample's current point, for the termination test."""


# torch.compile's wrappers of the step functions and of `evaluate`, one per function,
# options and region: making one copies torch's compiler settings (about 1 ms, twice per
# VCAB3 solve when made anew), and dynamo keeps every wrapper it has run until
# torch._dynamo.reset().
WRAPPERS: dict[tuple[Callable, str, Hashable], Callable] = {}


def wrapped(fn: Callable, options: dict, region: Hashable = None) -> Callable:
    """fn through torch.compile with `options`, the wrapper made once per region and reused
    by every later solve of it; options torch refuses raise a ValueError naming them as the
    `compile=` they were given as.

    Dynamo caches compiled versions per code object, at most recompile_limit (8) of them,
    and runs the function eagerly from then on (fullgraph=True raises). Each region (a kind
    of solve: `solve` gives its solver, dtype, device, grad mode and f's code, each of which
    makes versions of its own) keeps its versions apart (isolate_recompiles), so that the
    limit counts a kind's batch-size classes and not every kind the process has solved."""
    key = (fn, repr(sorted(options.items())), region)
    if key not in WRAPPERS:
        try:
            WRAPPERS[key] = torch.compile(fn, **{"isolate_recompiles": True, **options})
        except (RuntimeError, TypeError, ValueError) as err:
            reason = str(err).splitlines()[0][:300]
            raise ValueError(f"compile={options!r}: {reason}") from None
    return WRAPPERS[key]


def compiled(
    step: Callable[[Map, Carry, Monitor], Carry], options: dict, region: Hashable = None
) -> Callable:
    """A method's bound step through torch.compile with `options` in `region` (see
    `wrapped`); f is traced inside the step."""
    return partial(wrapped(step.__func__, options, region), step.__self__)


def evaluate(f: Map, z: torch.Tensor) -> torch.Tensor:
    """f(z): compiled for a method whose steps are not capturable, with each solve's f as an
    argument traced inside it, so that one wrapper serves every solve."""
    return f(z)


def iterate(
    method: Method,
    f: Map,
    z: torch.Tensor,
    monitor: Monitor,
    max_steps: int,
    check_every: int | None = None,
    compile_options: dict | None = None,
    check_start: bool = False,
    stop_on_convergence: bool = False,
    graph: bool = False,
    region: Hashable = None,
) -> tuple[int, int]:
    """Run method from z until every sample has stopped or max_steps; returns (nfe, steps).

    The termination test is read on the host after `check_every` steps, or by default where
    the monitor predicts the last running sample to converge: one synchronisation a block.
    With check_start it is also read at z, so that a batch that starts converged takes no step
    and one that does not, started near z* by a prediction, a shorter first block. With
    stop_on_convergence it also reads after every step whether any sample still runs, and ends
    the block where none does.
    With compile_options, each kind of step of a capturable method runs compiled by
    torch.compile with those options (f with it), or else f alone, compiled in `region` (see
    `wrapped`). With graph, the last phase of a capturable method (the one that runs to the
    end) is recorded once as a graph on a device with a recorder (graphs.RECORDERS: CUDA) and
    replayed; elsewhere it runs eagerly.
    """
    if z.shape[0] == 0:
        return 0, 0  # a batch of no samples: nothing to solve, and no reduction to read
    compiled_on_cuda = compile_options is not None and z.device.type == "cuda"
    if compiled_on_cuda:
        # CUDA graph trees (torch.compile's "reduce-overhead") start a new generation at each
        # call of a compiled function unless told where an iteration begins, and a generation
        # invalidates the outputs of the previous one, while each step here takes the previous
        # step's outputs. One generation per solve: its steps record a path of graphs that
        # later solves replay, and what the solve returns is copied out at the end.
        torch.compiler.cudagraph_mark_step_begin()
    phases, step_f = _compiled_steps(method, f, z.device, compile_options, graph, region)
    # init evaluates f at z0 eagerly, where flat_function can read whether f changed its
    # input in place (a traced f reads no version counter): once per solve, not per step.
    carry, nfe, steps = method.init(f, z, monitor)
    restart = getattr(method, "restart", None)
    # Without check_start the first block runs unread: from an uninformed z0 a batch that has
    # converged there is rare enough that a few wasted steps cost less than a synchronisation
    # on every solve. A predicted z0 (Skip DEQs) often meets the tolerance: one read there
    # saves the whole first block, and where it does not, the solve has fewer steps to go.
    monitor.test(method.residual(carry))
    monitor.mark()
    if restart is not None:
        # After the test at z0: a sample that fails there has no better point to restart at.
        monitor.allow_restarts()
    block, since = check_every or (PREDICTED_BLOCK if check_start else UNKNOWN_BLOCK), 0
    if check_start:
        block *= bool(monitor.active.any())
    for phase in phases:
        while block and steps < max_steps:
            size = min(PHASE_BLOCK if phase.pending else block, max_steps - steps)
            taken = 0
            while taken < size:
                carry = phase.step(step_f, carry, monitor)
                taken += 1
                if stop_on_convergence and not bool(monitor.active.any()):
                    break
            steps, since = steps + taken, since + taken
            nfe += taken * phase.evaluations
            if phase.pending is not None and bool(phase.pending(carry, monitor).any()):
                continue
            monitor.test(method.residual(carry), since)
            block, since = monitor.next_block(since, check_every), 0
            if monitor.due and steps < max_steps:
                carry = restart(step_f, carry, monitor.resume(), monitor)
                nfe += 1
            if phase.pending is not None:
                break
    if since:
        # The steps since the last test, which max_steps cut before their check; where the
        # last test was at this point, a test there again would find nothing new.
        monitor.test(method.residual(carry), since)
    if compiled_on_cuda:
        monitor.copy_out()
    return nfe, steps


def _compiled_steps(
    method: Method,
    f: Map,
    device: torch.device,
    compile_options: dict | None,
    graph: bool,
    region: Hashable = None,
) -> tuple[tuple[Phase, ...], Map]:
    """The method's phases and f as `iterate` runs them after init: with compile_options, each
    step of a capturable method compiled in `region` (f with it), else f alone; with graph,
    the last phase of a capturable method recorded as a graph where the device has a
    recorder."""
    phases = method.phases()
    if compile_options is not None:
        if method.capturable:
            phases = tuple(
                replace(p, step=compiled(p.step, compile_options, region)) for p in phases
            )
        else:
            f = partial(wrapped(evaluate, compile_options, region), f)
    recorder = RECORDERS.get(device.type) if graph and method.capturable else None
    if recorder is not None:
        last = phases[-1]
        phases = (*phases[:-1], replace(last, step=GraphedStep(last.step, recorder(device))))
    return phases, f
