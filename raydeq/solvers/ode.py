"""Adaptive ODE solvers that integrate dz/dt = f(z) - z from t=0 until each sample is steady.

Written by hand because no library integrates a batch with one step size per sample and stops
each sample at its own steady state (torchdiffeq and friends share one time grid per solve).
Each is an init and a step for the driver (driver.py); a step reads nothing on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from raydeq.solvers.control import Controller
from raydeq.solvers.driver import Phase
from raydeq.solvers.tableau import BS3, Tableau
from raydeq.solvers.termination import Monitor, norm

Field = Callable[[torch.Tensor], torch.Tensor]
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def vector_field(f: Field) -> Field:
    """The steady-state flow dz/dt = f(z) - z (the paper's Eq. 4) of a map f."""
    return lambda z: f(z) - z


@dataclass(frozen=True)
class Flow:
    """A steady-state solve's carry: point, f - z there and its norm, next step size, the
    PI controller's memory, the error-ratio scales; (B, 1) columns per sample."""

    y: torch.Tensor
    k: torch.Tensor
    residual: torch.Tensor
    h: torch.Tensor
    memory: torch.Tensor
    scales: tuple[torch.Tensor, float, float]


def combination(weights: tuple[float, ...], rows: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """sum of weight * row over a tableau row's nonzero weights, returned as (sum / w, w) with
    w the first nonzero weight: the first row needs no product, and callers fold w into a
    per-sample factor they apply anyway (the step size, an error scale)."""
    pairs = [(w, row) for w, row in zip(weights, rows, strict=True) if w]
    first, total = pairs[0]
    for w, row in pairs[1:]:
        total = torch.add(total, row, alpha=w / first)
    return total, first


def rk_step(
    field: Field, tableau: Tableau, y: torch.Tensor, k: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One explicit FSAL Runge-Kutta step of size h (B, 1): new point, f - z there, and the
    local error and the step over h, each divided by its tableau's first weight (see
    combination; `Solver.scales` holds the weights)."""
    ks = [k]
    y_stage, move = y, k
    for row in tableau.a:
        move, weight = combination(row, ks)
        y_stage = torch.addcmul(y, move, h, value=weight)
        ks.append(field(y_stage))
    return y_stage, ks[-1], combination(tableau.b_error, ks)[0], move


def first_weights(tableau: Tableau) -> tuple[float, float]:
    """The factored-out weights of a tableau's error and last (step) row."""
    return next(w for w in tableau.b_error if w), next(w for w in tableau.a[-1] if w)


def start(
    f: Field,
    y: torch.Tensor,
    monitor: Monitor,
    controller: Controller,
    order: int,
    weights: tuple[float, float],
) -> tuple[Flow, int]:
    """Evaluate the flow at z0 (recorded with the monitor) and pick the first step size;
    returns the carry and the evaluations of f spent."""
    field = vector_field(f)
    k = field(y)
    residual = norm(k)
    monitor.record(y, residual)
    h, spent = controller.first_step(field, y, k, order, monitor.termination)
    scales = controller.scales(y, monitor.termination, *weights)
    return Flow(y, k, residual, h, controller.memory(residual), scales), 1 + spent


def advance(
    controller: Controller,
    monitor: Monitor,
    c: Flow,
    y_new: torch.Tensor,
    k_new: torch.Tensor,
    e: torch.Tensor,
    error_order: int,
) -> tuple[torch.Tensor, Flow]:
    """Accept or reject each sample's step and record the accepted points; returns the
    rejections and the carry at the accepted points with the next step size."""
    residual = norm(k_new)
    rejected, h, memory = controller.decide(e, c.residual, residual, c.h, c.memory, error_order)
    monitor.record(y_new, residual, skip=rejected)
    y, k, residual = (
        torch.where(rejected, old, new)
        for old, new in ((c.y, y_new), (c.k, k_new), (c.residual, residual))
    )
    return rejected, Flow(y, k, residual, h, memory, c.scales)


class RungeKutta:
    """Adaptive FSAL Runge-Kutta steady-state solve: tsit5 (5th order), bs3 (3rd order) or
    euler (1st order)."""

    capturable = True

    def __init__(self, tableau: Tableau, controller: Controller) -> None:
        self.tableau = tableau
        self.controller = controller
        self.weights = first_weights(tableau)

    def init(self, f: Field, y: torch.Tensor, monitor: Monitor) -> tuple[Flow, int, int]:
        """Evaluate the flow at z0 and pick the first step (no step taken yet)."""
        return *start(f, y, monitor, self.controller, self.tableau.order, self.weights), 0

    def phases(self) -> tuple[Phase, ...]:
        """One kind of step, of len(a) evaluations."""
        return (Phase(self.step, len(self.tableau.a)),)

    def residual(self, c: Flow) -> torch.Tensor:
        """||f(y) - y|| at each sample's current point."""
        return c.residual

    def step(self, f: Field, c: Flow, monitor: Monitor) -> Flow:
        """One controlled step per sample; those that have stopped take a zero step (error 0),
        which leaves them where they are."""
        h = c.h * monitor.active
        y_new, k_new, error, move = rk_step(vector_field(f), self.tableau, c.y, c.k, h)
        # Euler's step is h (f - z): its norm is the residual's, at hand.
        move_norm = (lambda: c.residual) if move is c.k else (lambda: norm(move))
        e = self.controller.error_ratio(h, error, move_norm, y_new, c.scales)
        order = self.tableau.error_order
        return advance(self.controller, monitor, replace(c, h=h), y_new, k_new, e, order)[1]


def adams_coefficients(
    older: torch.Tensor, last: torch.Tensor, h: torch.Tensor
) -> tuple[Triple, Triple, torch.Tensor]:
    """Per-sample coefficients of a VCAB3 step of size h on the derivative history
    (F_n-2, F_n-1, F_n), spaced older = t_n-1 - t_n-2 and last = t_n - t_n-1.

    Returns the AB3 predictor's weights, the history's weights in y_AM - y_AB (Milne's
    device), and AM3's weight of the new derivative. The weights are the integrals over
    [t_n, t_n + h] of the quadratic Lagrange bases through AB3's nodes (t_n-2, t_n-1, t_n) and
    AM3's (t_n-1, t_n, t_n + h), in closed form; each rule's weights sum to h, which gives its
    middle one.
    """
    a, b = last, older + last
    h2 = h * h
    third = h2 * h / 3
    ab_old = torch.addcmul(third, a, h2, value=0.5) / (b * older)
    ab_mid = torch.addcmul(third, b, h2, value=0.5) / (a * older).neg()
    ab_new = h - ab_old - ab_mid
    ha = h + a
    am_old = third / (a * ha) * -0.5
    am_new = h * torch.add(a, h, alpha=2 / 3) / ha * 0.5
    am_n = h - am_old - am_new
    milne = (ab_old.neg(), am_old - ab_mid, am_n - ab_new)
    return (ab_old, ab_mid, ab_new), milne, am_new


def adams_move(
    field: Field,
    y: torch.Tensor,
    history: Triple,
    gaps: tuple[torch.Tensor, torch.Tensor],
    h: torch.Tensor,
) -> Triple:
    """An AB3 step of size h from y on the derivative history: the new point, the field there
    and y_AM - y_AB (Milne's device; the local error is about 9/10 of it)."""
    ab, milne, new_weight = adams_coefficients(*gaps, h)
    y_new = y
    for w, row in zip(ab, history, strict=True):
        y_new = torch.addcmul(y_new, row, w)
    k_new = field(y_new)
    difference = k_new * new_weight
    for w, row in zip(milne, history, strict=True):
        difference = torch.addcmul(difference, row, w)
    return y_new, k_new, difference


@dataclass(frozen=True)
class Adams:
    """VCAB3's carry: the flow, f - z at the last three accepted points (oldest first), the
    two step sizes between them, and the accepted start-up steps per sample."""

    flow: Flow
    adams_scales: tuple[torch.Tensor, float, float]
    history: Triple
    gaps: tuple[torch.Tensor, torch.Tensor]
    accepted: torch.Tensor


class VCAB3:
    """Variable-coefficient Adams-Bashforth 3 with a BS3 start-up: one f evaluation per step.

    The predictor integrates the quadratic through the last three derivatives over each
    sample's own step; Milne's device (the 3rd-order Adams-Moulton corrector through the new
    derivative, error ~ 9/10 (y_AM - y_AB)) estimates the local error from that same evaluation.
    The BS3 start-up steps are capped at startup_h_max, the Adams steps at the controller's
    h_max (AB3's stability region is much smaller than BS3's).
    """

    capturable = True

    capturable = True

    def __init__(self, controller: Controller, startup_h_max: float = float("inf")) -> None:
        self.controller = controller
        self.startup = replace(controller, h_max=startup_h_max)
        self.weights = first_weights(BS3)

    def init(self, f: Field, y: torch.Tensor, monitor: Monitor) -> tuple[Adams, int, int]:
        """Evaluate the flow at z0 and pick the first (BS3) step."""
        flow, nfe = start(f, y, monitor, self.startup, BS3.order, self.weights)
        # Distinct tensors, though equal: a compiled step is specialised on aliasing.
        ones = torch.ones_like(flow.h)
        history = (flow.k, flow.k.clone(), flow.k.clone())
        # The error is 0.9 (y_AM - y_AB) (Milne), the step y_new - y itself.
        scales = self.controller.scales(y, monitor.termination, error=0.9, move=1.0)
        accepted = torch.zeros_like(ones, dtype=torch.long)
        return Adams(flow, scales, history, (ones, ones.clone()), accepted), nfe, 0

    def phases(self) -> tuple[Phase, ...]:
        """BS3 steps until each running sample has accepted two, then Adams steps."""
        return (
            Phase(self.startup_step, len(BS3.a), pending=self.starting),
            Phase(self.adams_step, 1),
        )

    def residual(self, c: Adams) -> torch.Tensor:
        """||f(y) - y|| at each sample's current point."""
        return c.flow.residual

    @staticmethod
    def starting(c: Adams, monitor: Monitor) -> torch.Tensor:
        """The running samples with fewer than two accepted start-up steps."""
        return monitor.active & (c.accepted < 2)

    def startup_step(self, f: Field, c: Adams, monitor: Monitor) -> Adams:
        """A BS3 step that also fills the derivative history; samples with two accepted
        steps already take a zero step (error 0), which leaves them where they are."""
        flow = c.flow
        starting = self.starting(c, monitor)
        h = flow.h * starting
        y_new, k_new, error, move = rk_step(vector_field(f), BS3, flow.y, flow.k, h)
        e = self.startup.error_ratio(h, error, lambda: norm(move), y_new, flow.scales)
        rejected, new = advance(self.startup, monitor, replace(flow, h=h), y_new, k_new, e, 2)
        moved = starting > rejected
        new = replace(new, h=torch.where(moved | rejected, new.h, flow.h))
        return self._shift(c, new, moved, h, c.accepted + moved)

    def adams_step(self, f: Field, c: Adams, monitor: Monitor) -> Adams:
        """One AB3 step with its Milne error estimate; samples that have stopped take a zero
        step and keep their history."""
        flow = c.flow
        running = monitor.active
        h = flow.h.clamp_max(self.controller.h_max).mul_(running)
        y_new, k_new, difference = adams_move(vector_field(f), flow.y, c.history, c.gaps, h)
        e = self.controller.error_ratio(
            None, difference, lambda: norm(y_new - flow.y), y_new, c.adams_scales
        )
        rejected, new = advance(self.controller, monitor, replace(flow, h=h), y_new, k_new, e, 3)
        return self._shift(c, new, running > rejected, h, c.accepted)

    @staticmethod
    def _shift(
        c: Adams, flow: Flow, moved: torch.Tensor, h: torch.Tensor, accepted: torch.Tensor
    ) -> Adams:
        """Shift the derivative history of the samples that moved (f - z at their new point
        enters, the oldest leaves) and their step sizes."""
        old, mid, new = c.history
        history = (
            torch.where(moved, mid, old),
            torch.where(moved, new, mid),
            torch.where(moved, flow.k, new),
        )
        gaps = (torch.where(moved, c.gaps[1], c.gaps[0]), torch.where(moved, h, c.gaps[1]))
        return Adams(flow, c.adams_scales, history, gaps, accepted)
