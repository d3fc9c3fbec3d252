"""raydeq's steady-state solve against torchdiffeq (dopri5) on the same f and tolerance.

torchdiffeq has no steady-state stop: a user either integrates to a fixed end time or stops
at an event ||f(z) - z|| = tol (odeint_event), which costs an evaluation of f per check. Both
are given their best absolute tolerance in hindsight, and the fixed end time its best value
in hindsight (the first time on a fine grid at which every sample meets the tolerance). The
fixed end time is also given to adaptive_heun, torchdiffeq's low-order pair (Heun with an
Euler estimate), for comparison with raydeq's euler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_event

from raydeq.bench.harness.cases import Outcome, forward_case, raydeq_forward
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.problems import SpectralProblem, Spectrum
from raydeq.bench.harness.report import MISSED, Section, Target
from raydeq.bench.harness.timing import Case, measure, part_line, ratio, time_call
from raydeq.training.console import Progress


@dataclass(frozen=True)
class TorchDiffEqSize:
    """The spectral problem, the timed repeats, and the time grid that finds the end time."""

    spectrum: Spectrum
    repeats: int
    grid: int


SIZES = {
    "tiny": TorchDiffEqSize(Spectrum(dim=16, batch=2, slow_eig=0.8), repeats=1, grid=50),
    "quick": TorchDiffEqSize(Spectrum(dim=256, batch=32), repeats=5, grid=400),
    "full": TorchDiffEqSize(Spectrum(dim=512, batch=128), repeats=9, grid=1000),
}
SOLVERS = ("vcab3", "tsit5", "bs3", "euler")
TOL = 1e-4
ATOL_FACTORS = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3)
MAX_STEPS = 20000
FIXED_TIME_METHODS = ("dopri5", "adaptive_heun")
# The event's residual, a hair under TOL: odeint_event bisects the crossing to within atol in
# time and returns the middle of that bracket, on either side of the crossing, so an event at
# TOL itself missed TOL by the residual's change over half the bracket in about half the
# runs, which the search then dropped for a costlier atol.
EVENT_LEVEL = (1 - 1e-3) * TOL


def field(problem: SpectralProblem) -> Callable[[Tensor, Tensor], Tensor]:
    """dz/dt = f(z) - z in torchdiffeq's (t, z) signature."""
    return lambda t, z: problem.f(z) - z


def steady_event(problem: SpectralProblem) -> Callable[[Tensor, Tensor], Tensor]:
    """Event function: worst RMS residual minus EVENT_LEVEL, paying one (counted) evaluation
    of f."""
    return lambda t, z: (problem.f(z) - z).pow(2).mean(1).sqrt().max() - EVENT_LEVEL


def event_run(problem: SpectralProblem, atol: float) -> Callable[[Callable, Tensor], Tensor]:
    """run(f, z0) for forward_case: odeint_event with a steady-state event, from a start time
    made here rather than in the timed call."""
    t0 = torch.zeros((), dtype=problem.x.dtype, device=problem.x.device)

    def run(f: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
        try:
            _, path = odeint_event(
                field(problem),
                z0,
                t0,
                event_fn=steady_event(problem),
                method="dopri5",
                rtol=0.0,
                atol=atol,
                options={"max_num_steps": MAX_STEPS},
            )
        except AssertionError:
            return torch.full_like(z0, float("nan"))
        return path[-1]

    return run


def fixed_time_run(problem: SpectralProblem, method: str, atol: float, t1: float) -> Callable:
    """run(f, z0) for forward_case: odeint over [0, t1], whose time points are made here rather
    than in the timed call (on a GPU a copy to the device that waits for it)."""
    t = torch.tensor([0.0, t1], dtype=problem.x.dtype, device=problem.x.device)

    def run(f: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
        return odeint(field(problem), z0, t, method=method, rtol=0.0, atol=atol)[-1]

    return run


def first_steady_time(
    problem: SpectralProblem, method: str, atol: float, horizon: float, grid: int
) -> float:
    """The first time on a grid over [0, horizon] at which every sample meets TOL (inf if none)."""
    t = torch.linspace(0, horizon, grid, dtype=problem.x.dtype, device=problem.x.device)
    with torch.no_grad():
        path = odeint(field(problem), problem.z0(), t, method=method, rtol=0.0, atol=atol)
    for time, z in zip(t.tolist(), path, strict=True):
        if float(problem.residual(z).max()) <= TOL:
            return time
    return math.inf


def tried(run: str) -> Iterator[float]:
    """ATOL_FACTORS, each said on stderr as it is tried where it begins 5 s or more after the
    line before (`console.Progress`): adaptive_heun's took 10 s at --quick on 2 busy cores,
    and the full size's problem is twice as wide with 4 times the batch."""
    return Progress(f"[torchdiffeq] trying {run}'s atols", len(ATOL_FACTORS)).over(ATOL_FACTORS)


def best_fixed_time(
    problem: SpectralProblem, method: str, horizon: float, grid: int
) -> tuple[float, float] | None:
    """(atol, end time) of the fewest-NFE odeint run that meets TOL, None if no atol does."""
    best = None
    for factor in tried(f"{method} odeint"):
        atol = factor * TOL
        t1 = first_steady_time(problem, method, atol, horizon, grid)
        if math.isfinite(t1):
            case = forward_case(problem, fixed_time_run(problem, method, atol, t1))
            outcome = time_call(case(), problem.x.device)[1]
            if outcome.residual <= TOL and (best is None or outcome.nfe < best[0]):
                best = (outcome.nfe, atol, t1)
    return best[1:] if best else None


def best_event_atol(problem: SpectralProblem) -> float | None:
    """The atol of the fewest-NFE odeint_event run that meets TOL, None if no atol does."""
    best = None
    for factor in tried("dopri5 odeint_event"):
        case = forward_case(problem, event_run(problem, factor * TOL))
        outcome = time_call(case(), problem.x.device)[1]
        if outcome.residual <= TOL and (best is None or outcome.nfe < best[0]):
            best = (outcome.nfe, factor * TOL)
    return best[1] if best else None


def peer_cases(
    problem: SpectralProblem, horizon: float, grid: int
) -> tuple[dict[str, Case], dict[str, tuple[float, float | None]]]:
    """torchdiffeq's cases at their best settings in hindsight, and (atol, end time) of each."""
    cases: dict[str, Case] = {}
    settings: dict[str, tuple[float, float | None]] = {}
    searches = 1 + len(FIXED_TIME_METHODS)
    part_line("[torchdiffeq] choosing dopri5 odeint_event's atol in hindsight", 1, searches)
    atol = best_event_atol(problem)
    if atol is not None:
        settings["torchdiffeq dopri5 odeint_event"] = (atol, None)
        cases["torchdiffeq dopri5 odeint_event"] = forward_case(problem, event_run(problem, atol))
    for number, method in enumerate(FIXED_TIME_METHODS, 2):
        what = f"[torchdiffeq] choosing {method} odeint's end time and atol in hindsight"
        part_line(what, number, searches)
        best = best_fixed_time(problem, method, horizon, grid)
        if best:
            settings[f"torchdiffeq {method} odeint"] = best
            cases[f"torchdiffeq {method} odeint"] = forward_case(
                problem, fixed_time_run(problem, method, *best)
            )
    return cases, settings


def run(ctx: Context) -> Section:
    """NFE and time of raydeq's continuous solvers and of torchdiffeq's best settings."""
    size = ctx.pick(SIZES)
    spec = size.spectrum
    problem = SpectralProblem(spec, ctx.device, torch.float32, ctx.seed)
    rho = problem.spectral_radius()
    start = float(problem.residual(problem.z0()).max())
    horizon = 2 * math.log(start / TOL) / (1 - rho)
    section = Section(
        name="torchdiffeq",
        title="Steady state: raydeq vs torchdiffeq",
        columns=["library", "method", "atol", "end time", "NFE", "time ms", "max residual"],
        notes=[
            __doc__.split("\n\n")[1].replace("\n", " "),
            f"f(z) = W tanh(z) + x, width {spec.dim}, batch {spec.batch}, float32, spectral "
            f"radius of J_f(z*) {rho:.3f}; target: worst RMS residual {TOL:g}. raydeq: abstol "
            f"{TOL:g}, reltol 0, no tuning. torchdiffeq: rtol 0, atol in "
            f"{', '.join(f'{a:g}' for a in ATOL_FACTORS)} x {TOL:g}; NFE counts every "
            "evaluation of f, the event function's included.",
        ],
    )
    cases = {
        f"raydeq {name}": forward_case(problem, raydeq_forward(name, TOL, MAX_STEPS))
        for name in SOLVERS
    }
    peers, settings = peer_cases(problem, horizon, size.grid)
    cases |= peers
    timings = measure(cases, ctx.device, size.repeats, label="[torchdiffeq] timing")
    outcomes: dict[str, Outcome] = {}
    for label, t in timings.items():
        outcomes[label] = outcome = t.value
        library, method = label.split(" ", 1)
        atol, t1 = settings.get(label, (TOL, None))
        section.add(
            library=library,
            method=method,
            atol=atol,
            **{"end time": t1, "NFE": outcome.nfe, "time ms": 1e3 * t.median},
            **{"max residual": outcome.residual},
        )
    # Only solves that meet the target count, as for torchdiffeq's settings: a solver that
    # stopped early (diverged, non-finite) would otherwise win on its few evaluations.
    met = [(o.nfe, k) for k, o in outcomes.items() if k.startswith("raydeq") and o.residual <= TOL]
    ours = min(met, default=None)
    for label, how in (("odeint", "best end time and atol"), ("odeint_event", "best atol")):
        peer = outcomes.get(f"torchdiffeq dopri5 {label}")
        if ours is None:  # raydeq did not solve the problem: a FAIL, whatever torchdiffeq did
            measured, detail = MISSED, "TOL not met by any raydeq solver"
        elif peer is None:
            measured, detail = None, "TOL not met by torchdiffeq"
        else:
            measured, detail = ratio(ours[0], peer.nfe), f"{ours[1]}: {ours[0]} vs {peer.nfe} NFE"
        section.targets.append(
            Target(
                f"raydeq best NFE / torchdiffeq dopri5 {label} NFE ({how} in hindsight)",
                measured,
                0.5,
                detail=detail,
            )
        )
    section.timings = {k: t.seconds for k, t in timings.items()}
    return section
