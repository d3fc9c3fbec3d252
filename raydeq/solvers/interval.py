"""Integration over a fixed interval [0, t1] with the continuous solvers' methods.

The steady-state solves (ode.py) stop each sample at its own steady state; a Neural ODE takes
every sample to the same time t1. Here the state is one (1, M) row, so the whole batch (and,
for the continuous adjoint, the parameters' adjoint with it) shares each step, as in
torchdiffeq; the steps are controlled for accuracy (plain PI control, no steady-state rules)
and the last one is cut to land on t1. VCAB3, Tsit5, BS3 and Euler use the tableaus and the
Adams step of the steady-state solvers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from raydeq.solvers.control import Controller
from raydeq.solvers.ode import adams_move, divided_differences, first_weights, rk_step
from raydeq.solvers.options import choice
from raydeq.solvers.tableau import BS3, EULER, TSIT5, Tableau
from raydeq.solvers.termination import Termination, norm

Field = Callable[[torch.Tensor], torch.Tensor]
INTERVAL_SOLVERS = ("vcab3", "tsit5", "bs3", "euler")
# A step under this many spacings of the floats at t cannot advance t to any purpose: the
# controller has shrunk it at a singularity, and the remaining steps would leave t in place
# (scipy's solve_ivp stops at the same bound).
STUCK_ULPS = 10


class IntegrationError(RuntimeError):
    """An integration that cannot reach t1: out of max_steps, at a step too small to move t,
    or where its norms overflow."""


@dataclass(frozen=True)
class Point:
    """A method's carry at an accepted point: the state, the field there, the error-ratio
    scales, and for VCAB3 the Adams steps' scales, the first and second divided differences of
    the field, the step that led to the point and the accepted steps so far."""

    y: torch.Tensor
    k: torch.Tensor
    scales: tuple[torch.Tensor, float, float]
    adams_scales: tuple[torch.Tensor, float, float] | None = None
    differences: tuple[torch.Tensor, ...] = ()
    last: torch.Tensor | None = None
    accepted: int = 0


@dataclass(frozen=True)
class Endpoint:
    """The state at t1 and the field there; evaluations of the field (all, and those on the
    accepted steps, which a backward pass through the steps differentiates) and steps."""

    y: torch.Tensor
    k: torch.Tensor
    nfe: int
    path_nfe: int
    steps: int


class RungeKuttaInterval:
    """An explicit FSAL Runge-Kutta pair: tsit5, bs3 or euler."""

    def __init__(self, tableau: Tableau) -> None:
        self.tableau = tableau
        self.order = tableau.order
        self.weights = first_weights(tableau)

    def start(self, y: torch.Tensor, k: torch.Tensor, ctl: Controller, term: Termination) -> Point:
        """The carry at the initial point."""
        return Point(y, k, ctl.scales(y, term, *self.weights, self.tableau.error_order))

    def step(
        self, field: Field, p: Point, h: torch.Tensor, ctl: Controller
    ) -> tuple[Point, torch.Tensor, int, int]:
        """A step of size h: the new point, its error ratio, evaluations and error order."""
        y_new, k_new, error, move = rk_step(field, self.tableau, p.y, p.k, h)
        e = ctl.error_ratio(error, h, lambda: norm(move), h, y_new, p.scales)
        return replace(p, y=y_new, k=k_new), e, len(self.tableau.a), self.tableau.error_order


class AdamsInterval:
    """VCAB3: two BS3 steps give the divided differences, then Adams-Bashforth 3 steps with
    Milne's error estimate, one evaluation each."""

    order = BS3.order

    def __init__(self) -> None:
        self.startup = RungeKuttaInterval(BS3)

    def start(self, y: torch.Tensor, k: torch.Tensor, ctl: Controller, term: Termination) -> Point:
        """The BS3 carry plus zero divided differences (the two start-up steps replace them)."""
        first = self.startup.start(y, k, ctl, term)
        # The error is 0.9 (y_AM - y_AB) = 0.3 (3 w) (d2_new - d2) (ode.adams_weights), the
        # step y_new - y itself.
        adams_scales = ctl.scales(y, term, 0.3, 1.0, error_order=3)
        differences = (torch.zeros_like(k), torch.zeros_like(k))
        last = torch.ones_like(y[:, :1])
        return replace(first, adams_scales=adams_scales, differences=differences, last=last)

    def step(
        self, field: Field, p: Point, h: torch.Tensor, ctl: Controller
    ) -> tuple[Point, torch.Tensor, int, int]:
        """A BS3 start-up step or an Adams step; the divided differences move to the new
        point."""
        if p.accepted < 2:
            new, e, spent, error_order = self.startup.step(field, p, h, ctl)
            differences = divided_differences(new.k, p.k, p.differences[0], h, p.last)
        else:
            y_new, k_new, w3 = adams_move(field, p.y, p.k, p.differences, p.last, h)
            differences = divided_differences(k_new, p.k, p.differences[0], h, p.last)
            error = differences[1] - p.differences[1]
            e = ctl.error_ratio(error, w3, lambda: norm(y_new - p.y), None, y_new, p.adams_scales)
            new, spent, error_order = replace(p, y=y_new, k=k_new), 1, 3
        shifted = replace(new, differences=differences, last=h, accepted=p.accepted + 1)
        return shifted, e, spent, error_order


def interval_method(solver: str) -> RungeKuttaInterval | AdamsInterval:
    """The fixed-interval method of a continuous solver's name."""
    choice("solver", solver, INTERVAL_SOLVERS)
    if solver == "vcab3":
        return AdamsInterval()
    return RungeKuttaInterval({"tsit5": TSIT5, "bs3": BS3, "euler": EULER}[solver])


def integrate(
    field: Field,
    y: torch.Tensor,
    t1: float,
    solver: str,
    termination: Termination,
    max_steps: int,
    backward: bool = False,
) -> Endpoint:
    """Integrate dy/dt = field(y) from y(0) = y, a (1, M) row, to t1 with adaptive steps.

    A step is accepted when its local error is at most abstol sqrt(M) + reltol ||y_new|| (an
    RMS tolerance on the whole row). The step size is read on the host after each step (one
    synchronisation a step). Raises IntegrationError after max_steps steps short of t1, or at a
    step too small to move t (STUCK_ULPS), which more steps would repeat. `backward` marks an
    integration from t1 back to 0 in s = t1 - t (a continuous adjoint's), whose errors name
    the time t = t1 - s it reached and that it runs back (see `_at`).
    """
    at = partial(_at, t1, backward)
    method = interval_method(solver)
    controller = Controller()
    k = field(y)
    h, spent = controller.first_step(field, y, k, method.order, termination)
    point = method.start(y, k, controller, termination)
    if overflowed(point):
        raise IntegrationError(overflow_message(solver, at(0.0), y.dtype))
    memory = controller.memory(h)
    step_size, t, nfe, path_nfe, steps = float(h), 0.0, 1 + spent, 1, 0
    while t < t1:
        if steps == max_steps:
            raise IntegrationError(
                f"the {solver} integration reached {at(t)} in max_steps="
                f"{max_steps} steps; raise max_steps or loosen abstol / reltol"
            )
        last = step_size >= t1 - t
        if not last and step_size < STUCK_ULPS * math.ulp(t):
            raise IntegrationError(
                f"the {solver} integration's step size fell to {step_size:.3g} at {at(t)}, too "
                "small to move t (its solution may blow up there); max_steps "
                "cannot help"
            )
        h = torch.full_like(y[:, :1], t1 - t if last else step_size)
        new, e, spent, error_order = method.step(field, point, h, controller)
        rejected, h_next, memory = controller.decide(
            e, norm(point.k), norm(new.k), h, memory, error_order
        )
        nfe, steps = nfe + spent, steps + 1
        # Both decisions in one read of the host: one synchronisation a step.
        was_rejected, next_size = torch.cat([rejected.to(h_next.dtype), h_next], 1)[0].tolist()
        if not was_rejected:
            point, t, path_nfe = new, t1 if last else t + step_size, path_nfe + spent
        if not math.isfinite(next_size) and overflowed(new):
            raise IntegrationError(overflow_message(solver, at(t), y.dtype))
        step_size = next_size
    if overflowed(point):
        raise IntegrationError(overflow_message(solver, at(t), y.dtype))
    return Endpoint(point.y, point.k, nfe, path_nfe, steps)


def overflowed(point: Point) -> bool:
    """Whether the norms of a finite state or field overflow (squares of entries past the
    square root of the dtype's range, about 1e19 in float32): the error ratio is then 0 or
    NaN, and the steps go uncontrolled. Read at the start, at the end and at a step size that
    is not finite, not on every step. A state or field that is itself NaN or inf ends the
    integration as a NaN output, which training counts as a non-finite step."""
    values = torch.isfinite(point.y).all() & torch.isfinite(point.k).all()
    norms = torch.isfinite(norm(point.y)).all() & torch.isfinite(norm(point.k)).all()
    return bool(values > norms)


def _at(t1: float, backward: bool, s: float) -> str:
    """Where an integration stopped, at s in its own variable: the time t it reached, for a
    backward one t1 - s, so that a continuous adjoint's error names the time of the forward
    pass it came back to."""
    if backward:
        return f"t={t1 - s:.6g} on its way back from t1={t1:g} to 0"
    return f"t={s:.6g} of t1={t1:g}"


def overflow_message(solver: str, at: str, dtype: torch.dtype) -> str:
    """Why an integration stops where its norms overflow (see overflowed), `at` saying where
    (`_at`)."""
    limit = math.sqrt(torch.finfo(dtype).max)
    return (
        f"the {solver} integration's state or field at {at} is finite but "
        f"its norms overflow (entries past about {limit:.0e} in {dtype}), which leaves its "
        "steps without error control; scale the problem down or integrate in float64"
    )
