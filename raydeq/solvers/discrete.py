"""Root finders for z = f(z): damped fixed-point iteration, Anderson acceleration, Broyden.

All are batched with per-sample histories and small per-sample linear algebra (batched matmul),
so no sample's update ever mixes with another's. Each is an init and a step for the driver
(driver.py); the evaluation at z0 counts as their first step. Samples that have stopped stay
where they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raydeq.solvers.batched import combine, dots, history, put
from raydeq.solvers.driver import Phase
from raydeq.solvers.options import integer, number
from raydeq.solvers.termination import Monitor, norm

Map = Callable[[torch.Tensor], torch.Tensor]

# Broyden skips a secant pair whose dg is within this many eps (||f(z)|| + ||z||): about the
# rounding of f(z) - z at its two points, which then makes up all of dg.
ROUNDING = 4.0


@dataclass(frozen=True)
class Iterate:
    """A point, f there, f - z and its norm (B, 1)."""

    z: torch.Tensor
    fz: torch.Tensor
    g: torch.Tensor
    residual: torch.Tensor


def evaluate(f: Map, z: torch.Tensor, monitor: Monitor) -> Iterate:
    """f at z, recorded with the monitor."""
    fz = f(z)
    g = fz - z
    residual = norm(g)
    monitor.record(z, residual)
    return Iterate(z, fz, g, residual)


class FixedPoint:
    """z <- (1 - damping) z + damping f(z)."""

    capturable = True

    def __init__(self, damping: float = 1.0) -> None:
        number("damping", damping, "(0, 1]")
        self.damping = damping

    def init(self, f: Map, z: torch.Tensor, monitor: Monitor) -> tuple[Iterate, int, int]:
        """f at z0: one evaluation, one step."""
        return evaluate(f, z, monitor), 1, 1

    def phases(self) -> tuple[Phase, ...]:
        """One evaluation per step."""
        return (Phase(self.step, 1),)

    @staticmethod
    def residual(c: Iterate) -> torch.Tensor:
        """||f(z) - z|| at the current point."""
        return c.residual

    def step(self, f: Map, c: Iterate, monitor: Monitor) -> Iterate:
        """One (damped) iteration."""
        z = c.fz if self.damping == 1 else torch.add(c.z, c.g, alpha=self.damping)
        (z,) = monitor.select(monitor.active, ((z, c.z),))
        return evaluate(f, z, monitor)


@dataclass(frozen=True)
class Mixing:
    """Anderson's carry: the current iterate, ring buffers of the last m f(z), f(z) - z (and
    z, for beta < 1), the count of iterates so far (known on the host), and constants made
    once rather than on every step: the right-hand side of ones (B, m, 1) and the identity
    (m, m), whose row i is the weights of the plain step from slot i."""

    now: Iterate
    fs: torch.Tensor
    gs: torch.Tensor
    xs: torch.Tensor | None
    count: int
    ones: torch.Tensor
    eye: torch.Tensor


class Anderson:
    """Anderson acceleration (type II) with memory m, Tikhonov regularisation lam, mixing beta.

    Each step solves, per sample, min ||sum_i alpha_i g_i|| subject to sum_i alpha_i = 1 over
    the last m residuals g_i = f(z_i) - z_i, then mixes
    z = sum_i alpha_i (beta f(z_i) + (1 - beta) z_i). lam is relative to the mean of diag(G G^T).
    Its history grows over the first m steps, so its steps are not capturable (f is).
    """

    capturable = False

    def __init__(self, m: int = 5, lam: float = 1e-4, beta: float = 1.0) -> None:
        integer("m", m)
        number("lam", lam)
        number("beta", beta, "(0, 1]")
        self.m, self.lam, self.beta = m, lam, beta

    def within(self, max_steps: int) -> Anderson:
        """This method with its history sized for a solve of at most max_steps steps, which
        stores fewer than max_steps iterates: the same iterates, in less memory."""
        return Anderson(min(self.m, max_steps), self.lam, self.beta)

    def init(self, f: Map, z: torch.Tensor, monitor: Monitor) -> tuple[Mixing, int, int]:
        """f at z0 and empty buffers (a slot is written before it is first read)."""
        batch = z.shape[0]
        fs, gs = history(z, self.m), history(z, self.m)
        xs = history(z, self.m) if self.beta != 1 else None
        ones = z.new_ones(batch, self.m, 1)
        eye = torch.eye(self.m, dtype=z.dtype, device=z.device)
        return Mixing(evaluate(f, z, monitor), fs, gs, xs, 0, ones, eye), 1, 1

    def phases(self) -> tuple[Phase, ...]:
        """One evaluation per step."""
        return (Phase(self.step, 1),)

    @staticmethod
    def residual(c: Mixing) -> torch.Tensor:
        """||f(z) - z|| at the current point."""
        return c.now.residual

    def step(self, f: Map, c: Mixing, monitor: Monitor) -> Mixing:
        """Store the current iterate, mix the history, evaluate f at the mixed point."""
        z = c.now.z
        slot = c.count % self.m
        fs, gs = put(c.fs, slot, c.now.fz), put(c.gs, slot, c.now.g)
        xs = put(c.xs, slot, z) if c.xs is not None else None
        n = min(c.count + 1, self.m)
        # Each view below is an aten operation, dispatched like a kernel: per-sample weights
        # are kept as (B, 1, n) rows, the shape the batched products take and give.
        # Two slices, not one shared: with autograd, gs's gradient adds the same terms in
        # the same order as before, so that unrolled gradients stay bitwise the same.
        gram = torch.bmm(gs[:, :n], gs[:, :n].mT)
        ridge = gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)
        eye = c.eye if n == self.m else c.eye[:n, :n]
        gram = gram + ridge.mul_(self.lam)[:, :, None] * eye
        ones = _first(c.ones, n)
        alpha, ok = _mixing_weights(gram, ones)
        if alpha.requires_grad:
            # Solved again with the identity where the system is singular: an unrolled
            # backward through the singular solve gives NaN there, not the plain step's 0.
            alpha = _mixing_weights(torch.where(ok, gram, eye), ones)[0]
        plain = c.eye[slot] if n == self.m else c.eye[slot, :n]
        alpha = torch.where(ok, alpha, plain)
        mixed = combine(alpha, _first(fs, n))
        if xs is not None:
            mixed = self.beta * mixed + (1 - self.beta) * combine(alpha, _first(xs, n))
        (z,) = monitor.select(monitor.active, ((mixed[:, 0], z),))
        return Mixing(evaluate(f, z, monitor), fs, gs, xs, c.count + 1, c.ones, c.eye)


def _mixing_weights(gram: torch.Tensor, ones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anderson's weights alpha = w / sum(w), gram w = 1, as (B, 1, n) rows, and where they
    are usable (B, 1, 1): elsewhere the system is singular and the step falls back to the
    plain step z = f(z)."""
    weights, info = torch.linalg.solve_ex(gram, ones)
    weights = weights.mT
    alpha = weights / weights.sum(2, keepdim=True)
    # |alpha| < inf is isfinite(alpha) in fewer operations (NaN compares false).
    ok = (info.view(-1, 1, 1) == 0) & (alpha.abs() < float("inf")).all(2, keepdim=True)
    return alpha, ok


def _first(buffer: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a ring buffer (B, k, N): the buffer itself once it is full, so that
    a full buffer costs no slicing view."""
    return buffer if n == buffer.shape[1] else buffer[:, :n]


@dataclass(frozen=True)
class Secant:
    """Broyden's carry: the current iterate, the next update -H g, ring buffers of the
    rank-one terms u, v and the count of updates so far (known on the host)."""

    now: Iterate
    update: torch.Tensor
    us: torch.Tensor
    vs: torch.Tensor
    count: int


class Broyden:
    """Limited-memory 'good' Broyden on g(z) = f(z) - z, per sample, unit step.

    The inverse Jacobian of g is kept as -I + U V^T with `memory` slots of rank-one terms per
    sample, filled in turn: step k puts u = (dz - H dg) / (dz^T H dg) and v^T = dz^T H
    (Sherman-Morrison) in slot k mod `memory`, replacing the term there (the oldest, unless
    a skipped step kept it). A step whose dz^T H dg is below sqrt(eps) ||dz^T H|| ||dg||
    (lost in rounding), or whose ||dg|| is within ROUNDING eps (||f(z)|| + ||z||) (the
    rounding of g itself, at a residual as small as the dtype holds), is skipped: its slot
    keeps its term (none before the slots are first filled) and H is unchanged. Its
    rank-one terms grow over the first `memory` steps, so its steps are not capturable (f is).
    """

    capturable = False

    def __init__(self, memory: int = 30) -> None:
        integer("memory", memory)
        self.memory = memory

    def within(self, max_steps: int) -> Broyden:
        """This method with its rank-one terms sized for a solve of at most max_steps steps,
        which makes fewer than max_steps updates: the same iterates, in less memory."""
        return Broyden(min(self.memory, max_steps))

    def init(self, f: Map, z: torch.Tensor, monitor: Monitor) -> tuple[Secant, int, int]:
        """f at z0; the first update is -H g = g with H = -I."""
        # Ring buffers of the rank-one terms; a slot is written before it is first read.
        us, vs = history(z, self.memory), history(z, self.memory)
        now = evaluate(f, z, monitor)
        return Secant(now, now.g, us, vs, 0), 1, 1

    def phases(self) -> tuple[Phase, ...]:
        """One evaluation per step."""
        return (Phase(self.step, 1),)

    @staticmethod
    def residual(c: Secant) -> torch.Tensor:
        """||f(z) - z|| at the current point."""
        return c.now.residual

    def step(self, f: Map, c: Secant, monitor: Monitor) -> Secant:
        """A unit quasi-Newton step and the rank-one update of H."""
        (z,) = monitor.select(monitor.active, ((c.now.z + c.update, c.now.z),))
        new = evaluate(f, z, monitor)
        g_new = new.g
        dz, dg = c.update, g_new - c.now.g
        used = min(c.count, self.memory)
        u_used, v_used = c.us[:, :used], c.vs[:, :used]
        v = self._apply_transposed(u_used, v_used, dz)
        # n = dz - H dg, the numerator of Sherman-Morrison's u.
        n = self._apply_negated(u_used, v_used, dg) + dz
        denom = torch.linalg.vecdot(v, dg)[:, None]
        # Skip the rank-one update where v . dg is lost in rounding: its huge u would throw
        # the next step far off (seen in float32 at width 1024).
        eps = torch.finfo(dz.dtype).eps
        dg_norm = norm(dg)
        floor = eps**0.5 * norm(v) * dg_norm
        # Skip it too where dg is rounding: at a tolerance below the dtype's reach (1e-11 in
        # float32) such updates drove the iterates from the floor until they diverged.
        noise = (norm(new.fz) + norm(new.z)).mul_(ROUNDING * eps)
        # |denom| < inf is isfinite(denom) from the same |denom| (NaN compares false).
        size = denom.abs()
        ok = (size > floor) & (size < float("inf")) & (dg_norm > noise)
        # 1 / denom where ok, else 0; denom is replaced before the division, not after, so
        # that a skipped update (denom 0 once a sample has stopped) back-propagates 0, not
        # 0 * inf = NaN, through an unrolled backward.
        scale = ok / torch.where(ok, denom, 1.0)
        u = n * scale
        # The next step -H' g_new with H' = H + u v^T (minus the evicted term), from the
        # last step -H g = dz instead of applying all rank-one terms again:
        # -H' g_new = dz - H dg - u (v . g_new) = n - u (v . g_new) [+ evicted].
        update = torch.addcmul(n, u, torch.linalg.vecdot(v, g_new)[:, None], value=-1.0)
        slot = c.count % self.memory
        if c.count >= self.memory:
            # A skipped update keeps the slot's term, so that H stays as it was.
            u_old, v_old = c.us[:, slot], c.vs[:, slot]
            evicted = torch.linalg.vecdot(v_old, g_new)[:, None] * ok
            update = torch.addcmul(update, u_old, evicted)
            u, v = torch.where(ok, u, u_old), torch.where(ok, v, v_old)
        us, vs = put(c.us, slot, u), put(c.vs, slot, v)
        return Secant(new, update, us, vs, c.count + 1)

    @staticmethod
    def restart(f: Map, c: Secant, samples: torch.Tensor, monitor: Monitor) -> Secant:
        """The (B, 1) mask `samples` back at their best iterates with H = -I, f evaluated
        there (once, for the batch): in float32 a contracting layer's sample could end
        DIVERGED where its updates had gone wrong. Their next update is -H g = g, as at z0."""
        z = torch.where(samples, monitor.best_z, c.now.z)
        new, now = evaluate(f, z, monitor), c.now
        fz, g, residual = (
            torch.where(samples, a, b)
            for a, b in ((new.fz, now.fz), (new.g, now.g), (new.residual, now.residual))
        )
        rows = samples[:, :, None]
        us, vs = torch.where(rows, 0.0, c.us), torch.where(rows, 0.0, c.vs)
        update = torch.where(samples, g, c.update)
        return Secant(Iterate(z, fz, g, residual), update, us, vs, c.count)

    @staticmethod
    def _apply_negated(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-H x = (I - U V^T) x per sample, with the rank-one terms as rows of u and v (B, k, N)."""
        if u.shape[1] == 0:
            return x
        return combine(dots(v, x), u, base=x, alpha=-1.0)

    @staticmethod
    def _apply_transposed(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x^T (-I + U V^T) per sample, as a (B, N) matrix."""
        if u.shape[1] == 0:
            return -x
        return combine(dots(u, x), v, base=x, beta=-1.0)
