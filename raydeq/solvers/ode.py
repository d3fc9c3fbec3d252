"""Adaptive ODE solvers that integrate dz/dt = f(z) - z from t=0 until each sample is steady.

Written by hand because no library integrates a batch with one step size per sample and stops
each sample at its own steady state (torchdiffeq and friends share one time grid per solve).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from raydeq.solvers.termination import Monitor, Termination, all_set_on_host, rms

Field = Callable[[torch.Tensor], torch.Tensor]


def vector_field(f: Field) -> Field:
    """The steady-state flow dz/dt = f(z) - z (the paper's Eq. 4) of a map f."""
    return lambda z: f(z) - z


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit FSAL Runge-Kutta pair (last stage = f at the new point)."""

    a: tuple[tuple[float, ...], ...]
    b_error: tuple[float, ...]
    order: int
    error_order: int


# Euler, with its difference to the trapezoidal rule, h/2 (k_new - k), as the error estimate:
# one evaluation of f per step. At h = 1 a step is one fixed-point iteration z <- f(z).
EULER = Tableau(a=((1.0,),), b_error=(-1 / 2, 1 / 2), order=1, error_order=1)

# Bogacki-Shampine 3(2).
BS3 = Tableau(
    a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    order=3,
    error_order=2,
)

# Tsitouras 5(4) (Tsitouras 2011, Comput. Math. Appl. 62:770).
_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
)
TSIT5 = Tableau(
    a=(
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.897153057105493, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ),
        _TSIT5_B,
    ),
    b_error=(
        0.09646076681806523 - 0.09468075576583946,
        0.01 - 0.009183565540343254,
        0.4798896504144996 - 0.4877705284247616,
        1.379008574103742 - 1.234297566930479,
        -3.290069515436081 + 2.7077123499835256,
        2.324710524099774 - 1.866628418170587,
        -1 / 66,
    ),
    order=5,
    error_order=4,
)


@dataclass(frozen=True)
class Controller:
    """PI step-size controller (Hairer & Wanner II.4, Gustafsson): h *= safety * e^-a * e_prev^b
    with a = 0.7 / k, b = 0.4 / k for a local error of order k.

    The proportional term damps the step-size oscillation of an explicit method at its
    stability limit near the steady state; with less of it (b = 0.3 / k) BS3 can cycle there
    without ever meeting the steady-state tolerance.

    With kind="i" it is the plain integral controller (b = 0); with kind="fixed" every step is
    accepted and h stays h0 (for convergence-order studies). h0 is the first step; None picks
    it from the problem (one extra evaluation of f). step_rtol > 0 also accepts a local error
    up to that fraction of the step's own length ||z_new - z||: a steady state needs each step
    to be a controlled move, not an accurate path, so far from it the steps need not resolve
    the transient to abstol. contraction > 0 also accepts, whatever its local error, a step
    whose residual ||f(z_new) - z_new|| is at most that fraction of the residual where it
    started, and does not shrink h after it (the step-size rule of pseudo-transient
    continuation: while the residual falls fast the steps are doing their job). h_max caps
    the step: near the steady state the error estimate no longer limits h (the residual, and
    with it the error, shrinks), so without a cap h grows until the method is unstable on
    the flow's fastest modes and the residual stalls; see STEADY_STATE in solve.py.
    """

    kind: str = "pi"
    h0: float | None = None
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    step_rtol: float = 0.0
    contraction: float = 0.0
    h_max: float = float("inf")

    def __post_init__(self) -> None:
        if self.kind not in ("pi", "i", "fixed"):
            raise ValueError(f"kind={self.kind!r} is not one of 'pi', 'i', 'fixed'")
        if self.kind == "fixed" and self.h0 is None:
            raise ValueError("kind='fixed' needs the step size h0")
        if self.h0 is not None and not self.h0 > 0:
            raise ValueError(f"h0={self.h0!r} must be > 0")
        if not self.h_max > 0:
            raise ValueError(f"h_max={self.h_max!r} must be > 0")
        for name in ("step_rtol", "contraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} must be in [0, 1)")

    def first_step(
        self, field: Field, y: torch.Tensor, k: torch.Tensor, order: int, term: Termination
    ) -> tuple[torch.Tensor, int]:
        """The first step size per sample and the evaluations of f spent choosing it."""
        if self.h0 is not None:
            return torch.full_like(y[:, 0], self.h0).detach(), 0
        with torch.no_grad():
            return initial_step(field, y, k, order, term), 1

    def judge(
        self,
        monitor: Monitor,
        active: torch.Tensor,
        error: torch.Tensor,
        y_new: torch.Tensor,
        k_new: torch.Tensor,
        previous: torch.Tensor,
        error_order: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Accept or reject each active sample's step, record accepted points (and those whose
        error is NaN, which the monitor stops as non-finite; an infinite error is a rejected
        step) with the monitor; returns (within tolerance, for every sample; accepted; step-size
        factor; error kept for the PI term)."""
        within, rejected, norm = self.accepts(error), error > 1.0, None
        if self.contraction:
            norm = torch.linalg.vector_norm(k_new, dim=1)
            contracting = norm <= self.contraction * monitor.residual_norm
            # On booleans a > b is a & ~b.
            within, rejected = within | contracting, rejected > contracting
        accept = active & within
        # The active samples whose step is not rejected (accepted or with a NaN error).
        monitor.update(y_new, k_new, active if self.kind == "fixed" else active > rejected, norm)
        factor = self.factor(error, previous, accept, error_order)
        if self.contraction:
            factor = torch.where(contracting, factor.clamp_min(1.0), factor)
        return within, accept, factor, torch.where(accept, error.clamp_min(1e-4), previous)

    def accepts(self, error: torch.Tensor) -> torch.Tensor:
        """Which samples' steps are accepted, given their scaled error norms."""
        return error <= 1.0 if self.kind != "fixed" else torch.ones_like(error, dtype=torch.bool)

    def factor(
        self, error: torch.Tensor, previous: torch.Tensor, accept: torch.Tensor, error_order: int
    ) -> torch.Tensor:
        """Step-size factor per sample from the scaled error norm of this and the last step."""
        if self.kind == "fixed":
            return torch.ones_like(error)
        k = error_order + 1
        error = error.clamp_min(1e-10)
        root = error.pow(-1 / k)
        accepted = error.pow(-0.7 / k).mul_(previous.pow(0.4 / k)) if self.kind == "pi" else root
        factor = torch.where(accept, accepted, root.clamp_max(1 / self.safety)).mul_(self.safety)
        return factor.nan_to_num_(self.min_factor).clamp_(self.min_factor, self.max_factor)


def error_norm(
    error: torch.Tensor,
    y: torch.Tensor,
    y_new: torch.Tensor,
    term: Termination,
    step_rtol: float = 0.0,
) -> torch.Tensor:
    """Local error per sample, scaled by abstol + reltol * max(|y|, |y_new|) (RMS norm), plus
    step_rtol * ||y_new - y|| where that is set (see Controller).

    The RMS norm's 1 / sqrt(N) goes into the scale (tolerances times sqrt(N)): each step
    computes this, so it is written in few tensor operations. Step-size decisions are not
    differentiated: an unrolled backward sees a fixed step sequence.
    """
    if error.requires_grad or y_new.requires_grad:
        error, y, y_new = error.detach(), y.detach(), y_new.detach()
    root_n = y.shape[1] ** 0.5
    size = torch.maximum(y.abs(), y_new.abs())
    if step_rtol:
        abstol = torch.linalg.vector_norm(y_new - y, dim=1).mul_(step_rtol)
        abstol = abstol.add_(term.abstol * root_n)[:, None]
        scale = torch.add(abstol, size, alpha=term.reltol * root_n)
    else:
        scale = size.mul_(term.reltol * root_n).add_(term.abstol * root_n)
    return torch.linalg.vector_norm(error / scale, dim=1)


def initial_step(
    field: Field, y: torch.Tensor, k: torch.Tensor, order: int, term: Termination
) -> torch.Tensor:
    """Starting step per sample (Hairer, Norsett & Wanner, Sec. II.4); one evaluation of f."""
    scale = term.abstol + term.reltol * y.abs()
    d0, d1 = rms(y / scale), rms(k / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1.clamp_min(1e-30))
    k1 = field(y + h0[:, None] * k)
    d2 = rms((k1 - k) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        (h0 * 1e-3).clamp_min(1e-6),
        (0.01 / dmax.clamp_min(1e-30)) ** (1 / (order + 1)),
    )
    return torch.where(d0 < 1e-5, h1, torch.minimum(100 * h0, h1))


def rk_step(
    field: Field, tableau: Tableau, y: torch.Tensor, k: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One explicit FSAL Runge-Kutta step of size h (B,): new point, f there, and the local
    error over h (scaled per sample by h only in its norm, which saves a full-width product)."""
    ks = [k]
    step = h[:, None]
    y_stage = y
    for row in tableau.a:
        y_stage = torch.addcmul(y, combination(row, ks), step)
        ks.append(field(y_stage))
    return y_stage, ks[-1], combination(tableau.b_error, ks)


def combination(weights: tuple[float, ...], rows: list[torch.Tensor]) -> torch.Tensor:
    """sum of weight * row over a tableau row's nonzero weights (constants shared by the batch):
    the per-sample step size multiplies the sum once instead of each weight."""
    total = None
    for w, row in zip(weights, rows, strict=True):
        if not w:
            continue
        if total is None:
            total = row if w == 1 else row * w
        else:
            total = torch.add(total, row, alpha=w)
    assert total is not None, "a tableau row has a nonzero weight"
    return total


def weighted_sum(
    base: torch.Tensor | None, terms: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """base + sum of weight * row over terms, with per-sample weights (B,) and rows (B, N), as
    a chain of fused multiply-adds (a step's few stages or history terms need no stacking)."""
    total = base
    for weight, row in terms:
        w = weight[:, None]
        total = row * w if total is None else torch.addcmul(total, row, w)
    assert total is not None
    return total


def start(
    field: Field, y: torch.Tensor, monitor: Monitor, controller: Controller, order: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Evaluate the flow at z0 (its residual is recorded) and pick the first step size
    (none, when every sample has converged already).

    Returns (f(z0) - z0, h, evaluations of f spent).
    """
    k = field(y)
    monitor.update(y, k)
    if not monitor.running():
        return k, torch.zeros_like(y[:, 0]), 1
    h, spent = controller.first_step(field, y, k, order, monitor.termination)
    return k, h, 1 + spent


def move_rows(
    move: torch.Tensor, new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """Per tensor pair, the new rows for the samples in `move` (B,) and the old ones elsewhere.

    Solvers pass in `move` the accepted samples and may include those that had stopped before
    the step (their state is no longer read), so that the usual step, where no running sample
    is rejected, needs no select (checked where that is free, see all_set_on_host).
    """
    if all_set_on_host(move):
        return new
    return tuple(
        torch.where(move.view(-1, *[1] * (n.dim() - 1)), n, o)
        for n, o in zip(new, old, strict=True)
    )


class RungeKutta:
    """Adaptive FSAL Runge-Kutta steady-state solve: tsit5 (5th order), bs3 (3rd order) or
    euler (1st order)."""

    def __init__(self, tableau: Tableau, controller: Controller) -> None:
        self.tableau = tableau
        self.controller = controller

    def __call__(
        self, f: Field, y: torch.Tensor, monitor: Monitor, max_steps: int
    ) -> tuple[int, int]:
        """Integrate until every sample is steady or max_steps; returns (nfe, steps)."""
        field = vector_field(f)
        t = self.tableau
        term = monitor.termination
        k, h, nfe = start(field, y, monitor, self.controller, t.order)
        previous = torch.ones_like(h)
        steps = 0
        while steps < max_steps and monitor.running():
            active = monitor.active
            step = torch.where(active, h, 0.0)
            y_new, k_new, error_rate = rk_step(field, t, y, k, step)
            nfe += len(t.a)
            steps += 1
            err = step * error_norm(error_rate, y, y_new, term, self.controller.step_rtol)
            within, _, factor, previous = self.controller.judge(
                monitor, active, err, y_new, k_new, previous, t.error_order
            )
            # Stopped samples took a zero step (error 0): moving them changes nothing.
            y, k = move_rows(within, (y_new, k_new), (y, k))
            h = (h * factor).clamp_max(self.controller.h_max)
        return nfe, steps


Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def adams_coefficients(
    older: torch.Tensor, last: torch.Tensor, h: torch.Tensor
) -> tuple[Triple, Triple, torch.Tensor]:
    """Per-sample coefficients (B,) of a VCAB3 step of size h on the derivative history
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


class VCAB3:
    """Variable-coefficient Adams-Bashforth 3 with a BS3 start-up: one f evaluation per step.

    The predictor integrates the quadratic through the last three derivatives over each
    sample's own step; Milne's device (the 3rd-order Adams-Moulton corrector through the new
    derivative, error ~ 9/10 (y_AM - y_AB)) estimates the local error from that same evaluation.
    The BS3 start-up steps are capped at startup_h_max, the Adams steps at the controller's
    h_max (AB3's stability region is much smaller than BS3's).
    """

    def __init__(self, controller: Controller, startup_h_max: float = float("inf")) -> None:
        self.controller = controller
        self.startup_h_max = startup_h_max

    def __call__(
        self, f: Field, y: torch.Tensor, monitor: Monitor, max_steps: int
    ) -> tuple[int, int]:
        """Integrate until every sample is steady or max_steps; returns (nfe, steps)."""
        field = vector_field(f)
        term = monitor.termination
        k, h, nfe = start(field, y, monitor, self.controller, BS3.order)
        previous = torch.ones_like(h)
        history = (k, k, k)
        gaps = (torch.ones_like(h), torch.ones_like(h))
        accepted = torch.zeros_like(h, dtype=torch.long)
        steps = 0
        while steps < max_steps and bool((monitor.active & (accepted < 2)).any()):
            running = monitor.active
            active = running & (accepted < 2)
            step = torch.where(active, h, 0.0)
            y_new, k_new, error_rate = rk_step(field, BS3, y, k, step)
            nfe += len(BS3.a)
            steps += 1
            err = step * error_norm(error_rate, y, y_new, term, self.controller.step_rtol)
            _, accept, factor, previous = self.controller.judge(
                monitor, active, err, y_new, k_new, previous, BS3.error_order
            )
            y, k, history, gaps = self._advance(
                accept | ~running, y_new, k_new, y, history, gaps, h
            )
            accepted = accepted + accept.long()
            h = torch.where(active, h * factor, h).clamp_max(self.startup_h_max)
        h = h.clamp_max(self.controller.h_max)
        while steps < max_steps and monitor.running():
            active = monitor.active
            step = torch.where(active, h, 0.0)  # stopped samples stay where they are
            ab, milne, new_weight = adams_coefficients(*gaps, step)
            y_new = weighted_sum(y, zip(ab, history, strict=True))
            k_new = field(y_new)
            nfe += 1
            steps += 1
            difference = weighted_sum(
                None, zip((*milne, new_weight), (*history, k_new), strict=True)
            )
            err = 0.9 * error_norm(difference, y, y_new, term, self.controller.step_rtol)
            within, _, factor, previous = self.controller.judge(
                monitor, active, err, y_new, k_new, previous, 3
            )
            # Stopped samples took a zero step (error 0): moving them changes nothing.
            y, k, history, gaps = self._advance(within, y_new, k_new, y, history, gaps, h)
            h = (h * factor).clamp_max(self.controller.h_max)
        return nfe, steps

    @staticmethod
    def _advance(
        move: torch.Tensor,
        y_new: torch.Tensor,
        k_new: torch.Tensor,
        y: torch.Tensor,
        history: Triple,
        gaps: tuple[torch.Tensor, torch.Tensor],
        h: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, Triple, tuple[torch.Tensor, torch.Tensor]]:
        """Move the samples in `move` to their new point and shift their derivative history.

        history holds f - z at the last three accepted points, oldest first, as three (B, N)
        tensors (a shift copies nothing); gaps the two step sizes between them.
        """
        y, *rest = move_rows(
            move, (y_new, history[1], history[2], k_new, gaps[1], h), (y, *history, *gaps)
        )
        return y, rest[2], (rest[0], rest[1], rest[2]), (rest[3], rest[4])
