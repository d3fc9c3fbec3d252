"""Step-size control of the steady-state ODE solvers: acceptance and the next step, per sample.

Every quantity is a (B, 1) column and the whole decision is a dozen small tensor operations
without a host read, so that a step can be queued (or captured) as it stands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raydeq.solvers.options import choice, number
from raydeq.solvers.termination import Termination, add_scaled, in_range, norm

Field = Callable[[torch.Tensor], torch.Tensor]


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
    up to that fraction of the step's own length ||z_new - z|| (for VCAB3 its leading term
    h ||f(z) - z||, which costs no operation): a steady state needs each step
    to be a controlled move, not an accurate path, so far from it the steps need not resolve
    the transient to abstol. contraction > 0 also accepts, whatever its local error, a step
    whose residual ||f(z_new) - z_new|| is at most that fraction of the residual where it
    started, and does not shrink h after it (the step-size rule of pseudo-transient
    continuation: while the residual falls fast the steps are doing their job).
    stalled_factor < 1 multiplies the factor h changes by after a step whose residual did not
    fall: near z* the error estimate alone holds h at the edge of the method's stability
    region, where the PI controller settles with the error at its tolerance and the fastest
    mode neither decays nor grows (see STEADY_STATE in solve.py); a product, not a cap, so
    that small accurate steps still grow where the residual rises along the flow itself (a
    cap shrank them to 0 there).

    h_max caps the step: near the steady state the error estimate no longer limits h (the
    residual, and with it the error, shrinks), so without a cap h grows until the method is
    unstable on the flow's fastest modes and the residual stalls; see STEADY_STATE in
    solve.py.
    """

    kind: str = "pi"
    h0: float | None = None
    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    step_rtol: float = 0.0
    contraction: float = 0.0
    h_max: float = float("inf")
    stalled_factor: float = 1.0

    def __post_init__(self) -> None:
        choice("kind", self.kind, ("pi", "i", "fixed"))
        if self.kind == "fixed" and self.h0 is None:
            raise ValueError("kind='fixed' needs the step size h0")
        if self.h0 is not None:
            number("h0", self.h0, "(0, inf)")
        number("h_max", self.h_max, "(0, inf]")
        # The error ratio's unit, safety^(1 / (b - a)), is 5e16 at 0.1 for Tsit5's PI
        # exponents and past float32's range (3e38) below 0.005.
        number("safety", self.safety, "[0.1, 1]")
        number("min_factor", self.min_factor, "(0, 1]")
        number("max_factor", self.max_factor, "[1, inf)")
        number("step_rtol", self.step_rtol, "[0, 1)")
        number("contraction", self.contraction, "[0, 1)")
        number("stalled_factor", self.stalled_factor, "(0, 1]")

    def capped(self, h: torch.Tensor) -> torch.Tensor:
        """h at most h_max, as decide caps an adaptive step; with kind="fixed" h itself,
        which stays h0, and without a cap h itself (no operation)."""
        if self.kind == "fixed" or self.h_max == float("inf"):
            return h
        return h.clamp_max(self.h_max)

    def first_step(
        self, field: Field, y: torch.Tensor, k: torch.Tensor, order: int, term: Termination
    ) -> tuple[torch.Tensor, int]:
        """The first step size per sample (B, 1), at most h_max as every step (an h0 above
        it, such as a solver's default beside a smaller h_max, is cut to it), and the
        evaluations of f spent choosing it. A contiguous column, as the steps' own: one made
        like y[:, :1] keeps y's row stride where B is 1, which a compiled step traces apart."""
        if self.h0 is not None:
            return self.capped(y.new_full((y.shape[0], 1), self.h0)), 0
        with torch.no_grad():
            return self.capped(initial_step(field, y, k, order, term)), 1

    def exponents(self, error_order: int) -> tuple[float, float]:
        """The controller's exponents (a, b) for a local error of order error_order."""
        k = error_order + 1
        return (0.7 / k, 0.4 / k) if self.kind == "pi" else (1 / k, 0.0)

    def unit(self, error_order: int) -> float:
        """The value that error_ratio returns for a local error exactly at the tolerance:
        safety^(1 / (b - a)) rather than 1, so that safety * e^-a * e_prev^b is e'^-a * e'_prev^b
        of e' = unit * e, and no step spends an operation on the safety factor."""
        a, b = self.exponents(error_order)
        return self.safety ** (1 / (b - a)) if self.kind != "fixed" else 1.0

    def memory(self, like: torch.Tensor) -> torch.Tensor:
        """The PI term's memory before the first step, e'_prev^b at e_prev = 1: safety^(b / (b -
        a)), which is the same for every order (a and b are both multiples of 1 / k)."""
        return torch.full_like(like, self.unit(1) ** self.exponents(1)[1])

    def error_ratio(
        self,
        error: torch.Tensor,
        error_scale: torch.Tensor,
        move_norm: Callable[[], torch.Tensor],
        move_scale: torch.Tensor | None,
        y_new: torch.Tensor,
        scales: tuple[torch.Tensor, float, float],
    ) -> torch.Tensor:
        """Local error error_scale * ||error|| over sqrt(N) abstol + step_rtol * move_scale *
        move_norm() + reltol * ||y_new|| (2-norms: RMS tolerances), in units of `unit` (see
        there), move_scale * move being the step z_new - z (move_scale None: move_norm() is
        the step's norm itself). move_norm is called only with step_rtol set; a method that
        has the norm already passes it.

        `scales` holds the three terms' weights relative to the error's (see `scales`). A
        norm-wise scale instead of an element-wise one: three reductions and four (B, 1)
        operations per step. Step-size decisions are not differentiated: an unrolled backward
        sees a fixed step sequence.
        """
        floor, step_weight, rel_weight = scales
        with torch.no_grad():
            scale = floor
            if step_weight and move_scale is None:
                scale = torch.add(scale, move_norm(), alpha=step_weight)
            elif step_weight:
                scale = torch.addcmul(scale, move_scale, move_norm(), value=step_weight)
            if rel_weight:
                scale = add_scaled(scale, norm(y_new), rel_weight)
            return torch.mul(error_scale, norm(error)).div_(scale)

    def scales(
        self, like: torch.Tensor, term: Termination, error: float, move: float, error_order: int
    ) -> tuple[torch.Tensor, float, float]:
        """The weights of error_ratio's scale for an error of order error_order and a move
        given as multiples `error` and `move` of the vectors the method passes (its
        combinations' factored-out weights): the abstol floor as a contiguous (B, 1) column, the
        step_rtol and reltol weights; the floor is at least the dtype's smallest normal number,
        so that a zero error over a zero scale (abstol=0 at a zero state that does not move) is
        a ratio of 0, a perfect step, rather than 0 / 0, a NaN step size, at no cost per step."""
        weight = abs(error) * self.unit(error_order)
        floor = in_range(term.abstol * like.shape[1] ** 0.5 / weight, like.dtype)
        floor = max(floor, torch.finfo(like.dtype).tiny)
        rel_weight = in_range(term.reltol / weight, like.dtype)
        floor_column = like.new_full((like.shape[0], 1), floor)
        return floor_column, self.step_rtol * abs(move) / weight, rel_weight

    def decide(
        self,
        e: torch.Tensor,
        residual: torch.Tensor,
        residual_new: torch.Tensor,
        h: torch.Tensor,
        memory: torch.Tensor,
        error_order: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reject or accept each sample's step from its error ratio e (in units of `unit`)
        and residual norms before and after; returns (rejected, next h, PI memory). A NaN
        error is not rejected: the step is taken, and the termination test stops the
        sample."""
        if self.kind == "fixed":
            return torch.zeros_like(e, dtype=torch.bool), h, memory
        with torch.no_grad():
            a, b = self.exponents(error_order)
            unit = self.unit(error_order)
            rejected = e > unit
            # e = 0 (a zero step) gives an infinite factor, clamped to max_factor.
            factor = e.pow(-a)
            if b:
                factor = factor.mul_(memory)
            factor = factor.clamp_(self.min_factor, self.max_factor)
            if self.contraction:
                contracting = residual_new <= residual * self.contraction
                # On booleans a > b is a & ~b.
                rejected = rejected > contracting
                # max(factor, 1) where contracting (True promotes to 1), factor elsewhere.
                factor = torch.maximum(factor, contracting)
            if self.stalled_factor < 1:
                stalled = residual_new >= residual
                factor = torch.where(stalled, factor * self.stalled_factor, factor)
            h_next = torch.mul(h, factor)
            if self.h_max < float("inf"):
                h_next = h_next.clamp_max_(self.h_max)
            if b:
                # e^b of the last accepted step; capped at the tolerance so that a rejected
                # step never grows h.
                kept = e.clamp(1e-4 * unit, unit).pow_(b)
                memory = torch.where(rejected, memory, kept)
            return rejected, h_next, memory


def initial_step(
    field: Field, y: torch.Tensor, k: torch.Tensor, order: int, term: Termination
) -> torch.Tensor:
    """Starting step per sample (Hairer, Norsett & Wanner, Sec. II.4), (B, 1); one evaluation
    of f. Unlike theirs, a sample at y = 0 (d0 < 1e-5, a vanilla DEQ's z0) takes h1 alone,
    without the cap of 100 h0, which there is 100 times the probe step 1e-6: from z0 = 0 the
    first step is h1 (0.06 on a small tanh layer) where Hairer's would be at most 1e-4. Where
    the scale abstol + reltol |y| is 0 (abstol = 0 at a zero of y) the heuristic gives 0 / 0 or
    a zero step; there it takes its own fallback step, 1e-6."""
    scale = term.abstol + term.reltol * y.abs()
    d0, d1 = rms_column(y / scale), rms_column(k / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1.clamp_min(1e-30))
    k1 = field(y + h0 * k)
    d2 = rms_column((k1 - k) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(
        dmax <= 1e-15,
        (h0 * 1e-3).clamp_min(1e-6),
        (0.01 / dmax.clamp_min(1e-30)) ** (1 / (order + 1)),
    )
    h = torch.where(d0 < 1e-5, h1, torch.minimum(100 * h0, h1))
    # NaN compares false.
    return torch.where(h > 0, h, 1e-6)


def rms_column(x: torch.Tensor) -> torch.Tensor:
    """RMS over each sample's features, as a (B, 1) column."""
    return norm(x) * x.shape[1] ** -0.5
