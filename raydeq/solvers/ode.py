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
    combination; `Controller.scales` holds the weights)."""
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
    tableau: Tableau,
    weights: tuple[float, float],
) -> tuple[Flow, int]:
    """Evaluate the flow at z0 (recorded with the monitor) and pick the first step size;
    returns the carry and the evaluations of f spent."""
    field = vector_field(f)
    k = field(y)
    residual = norm(k)
    monitor.record(y, residual)
    h, spent = controller.first_step(field, y, k, tableau.order, monitor.termination)
    scales = controller.scales(y, monitor.termination, *weights, tableau.error_order)
    return Flow(y, k, residual, h, controller.memory(residual), scales), 1 + spent


def advance(
    controller: Controller,
    monitor: Monitor,
    c: Flow,
    y_new: torch.Tensor,
    k_new: torch.Tensor,
    e: torch.Tensor,
    error_order: int,
    running: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Flow]:
    """Accept or reject each sample's step and record where each one is (a rejected step
    records its start again, which changes nothing); returns the samples that stay where they
    were (the rejected ones, and with `running` given those that no longer run) and the carry
    at the new points with the next step size."""
    residual = norm(k_new)
    rejected, h, memory = controller.decide(e, c.residual, residual, c.h, c.memory, error_order)
    # On booleans a <= b is ~a | b.
    kept = rejected if running is None else running <= rejected
    y, k, residual = monitor.select(kept, ((c.y, y_new), (c.k, k_new), (c.residual, residual)))
    monitor.record(y, residual)
    return kept, Flow(y, k, residual, h, memory, c.scales)


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
        return *start(f, y, monitor, self.controller, self.tableau, self.weights), 0

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
        e = self.controller.error_ratio(error, h, move_norm, h, y_new, c.scales)
        order = self.tableau.error_order
        return advance(self.controller, monitor, replace(c, h=h), y_new, k_new, e, order)[1]


def adams_weights(last: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights of a VCAB3 step of size h in Newton form, last = t_n - t_n-1: the
    predictor is y + h F_n + h^2 / 2 d1 + w d2 (d1, d2 the first and second divided
    differences of the derivative at t_n), w = h^2 (h / 3 + last / 2) the integral over
    [t_n, t_n + h] of (t - t_n)(t - t_n-1). Returns (h^2, 3 w).

    The same w gives Milne's device: AB3's and AM3's quadratics differ by the cubic through
    all four nodes times (t_n+1 - t_n-2), so y_AM - y_AB = w (d2_new - d2), with d2_new the
    second divided difference at t_n+1.
    """
    h2 = h * h
    return h2, h2 * torch.add(h, last, alpha=1.5)


def divided_differences(
    k_new: torch.Tensor, k: torch.Tensor, d1: torch.Tensor, h: torch.Tensor, last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second divided differences of the derivative at t_n+1 = t_n + h, from
    F_n+1 = k_new, F_n = k, the first at t_n and last = t_n - t_n-1."""
    d1_new = (k_new - k) / h
    return d1_new, (d1_new - d1) / (h + last)


def adams_move(
    field: Field,
    y: torch.Tensor,
    k: torch.Tensor,
    differences: tuple[torch.Tensor, torch.Tensor],
    last: torch.Tensor,
    h: torch.Tensor,
) -> Triple:
    """An AB3 step of size h from y (field k, divided differences d1, d2 there, last step
    `last`): the new point, the field there and 3 w of `adams_weights` (Milne's error is
    0.3 (3 w) (d2_new - d2))."""
    d1, d2 = differences
    h2, w3 = adams_weights(last, h)
    y_new = torch.addcmul(y, k, h)
    y_new = torch.addcmul(y_new, d1, h2, value=0.5)
    y_new = torch.addcmul(y_new, d2, w3, value=1 / 3)
    return y_new, field(y_new), w3


@dataclass(frozen=True)
class Adams:
    """VCAB3's carry: the flow, the first and second divided differences of f - z at the
    last accepted point, the step that led to it, and the accepted start-up steps per
    sample."""

    flow: Flow
    adams_scales: tuple[torch.Tensor, float, float]
    differences: tuple[torch.Tensor, torch.Tensor]
    last: torch.Tensor
    accepted: torch.Tensor


class VCAB3:
    """Variable-coefficient Adams-Bashforth 3 with a BS3 start-up: one f evaluation per step.

    The predictor integrates the quadratic through the last three derivatives over each
    sample's own step, in Newton form (divided differences, updated once per step instead
    of a weight per derivative); Milne's device (the 3rd-order Adams-Moulton corrector
    through the new derivative, error ~ 9/10 (y_AM - y_AB)) estimates the local error from
    that same evaluation. The BS3 start-up steps are capped at startup_h_max, the Adams steps
    at the controller's h_max (AB3's stability region is much smaller than BS3's).
    """

    capturable = True

    def __init__(self, controller: Controller, startup_h_max: float = float("inf")) -> None:
        self.controller = controller
        self.startup = replace(controller, h_max=startup_h_max)
        self.weights = first_weights(BS3)

    def init(self, f: Field, y: torch.Tensor, monitor: Monitor) -> tuple[Adams, int, int]:
        """Evaluate the flow at z0 and pick the first (BS3) step."""
        flow, nfe = start(f, y, monitor, self.startup, BS3, self.weights)
        # The error is 0.9 (y_AM - y_AB) = 0.3 (3 w) (d2_new - d2) (see adams_weights), the
        # step y_new - y itself.
        scales = self.controller.scales(y, monitor.termination, 0.3, 1.0, error_order=3)
        # Placeholders until two start-up steps are accepted (any finite values: the first
        # accepted step overwrites d1 and the second d2), distinct tensors: a compiled step
        # is specialised on aliasing.
        differences = (torch.zeros_like(flow.k), torch.zeros_like(flow.k))
        accepted = torch.zeros_like(flow.h, dtype=torch.long)
        return Adams(flow, scales, differences, torch.ones_like(flow.h), accepted), nfe, 0

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
        """A BS3 step that also updates the divided differences; samples with two accepted
        steps already take a zero step (error 0), which leaves them where they are, and keep
        their step size, capped for the Adams steps, and their PI memory."""
        flow = c.flow
        starting = self.starting(c, monitor)
        h = flow.h * starting
        y_new, k_new, error, move = rk_step(vector_field(f), BS3, flow.y, flow.k, h)
        e = self.startup.error_ratio(error, h, lambda: norm(move), h, y_new, flow.scales)
        rejected, new = advance(self.startup, monitor, replace(flow, h=h), y_new, k_new, e, 2)
        kept = starting <= rejected
        accepted = c.accepted + ~kept
        h_next = torch.where(starting | rejected, new.h, flow.h)
        h_next = torch.where(accepted < 2, h_next, self.controller.capped(h_next))
        # A zero step's error 0 is no error estimate: the PI memory stays the last step's.
        memory = torch.where(starting, new.memory, flow.memory)
        # Divided by the unmasked step, never 0 (a zero step would give 0 / 0, and NaN
        # gradients through the samples that keep their differences).
        differences = divided_differences(k_new, flow.k, c.differences[0], flow.h, c.last)
        return self._shift(
            c, monitor, replace(new, h=h_next, memory=memory), kept, differences, flow.h, accepted
        )

    def adams_step(self, f: Field, c: Adams, monitor: Monitor) -> Adams:
        """One AB3 step with its Milne error estimate. Every sample steps (a batch is evaluated
        whole); those that have stopped keep their point and differences, as rejected ones do.

        The step's length for step_rtol is its leading term h ||f(z) - z||, at hand: the
        Adams terms are O(h^2) corrections to it."""
        flow = c.flow
        d1, d2 = c.differences
        y_new, k_new, w3 = adams_move(
            vector_field(f), flow.y, flow.k, c.differences, c.last, flow.h
        )
        differences = divided_differences(k_new, flow.k, d1, flow.h, c.last)
        e = self.controller.error_ratio(
            differences[1] - d2, w3, lambda: flow.residual, flow.h, y_new, c.adams_scales
        )
        kept, new = advance(self.controller, monitor, flow, y_new, k_new, e, 3, monitor.active)
        return self._shift(c, monitor, new, kept, differences, flow.h, c.accepted)

    @staticmethod
    def _shift(
        c: Adams,
        monitor: Monitor,
        flow: Flow,
        kept: torch.Tensor,
        differences: tuple[torch.Tensor, torch.Tensor],
        h: torch.Tensor,
        accepted: torch.Tensor,
    ) -> Adams:
        """Take the divided differences at the new point and the step h to it, except for the
        samples `kept` where they were."""
        (d1, d2), (d1_new, d2_new) = c.differences, differences
        d1, d2, last = monitor.select(kept, ((d1, d1_new), (d2, d2_new), (c.last, h)))
        return Adams(flow, c.adams_scales, (d1, d2), last, accepted)
