"""Batched, matrix-free, restarted GMRES with per-sample convergence.

Written by hand because torch has no Krylov solver and the adjoint needs one system per sample
solved on vector-Jacobian products (Saad & Schultz 1986; Givens rotations, CGS2 Arnoldi).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from raydeq.solvers.batched import combine, dots

LinearOperator = Callable[[torch.Tensor], torch.Tensor]

# Arnoldi steps between host reads of whether any sample still runs: a sample that has
# converged steps on masked (its extra columns are left out of its least-squares solve), so
# a read every 4 steps trades at most 3 operator applications for 3 synchronisations.
ARNOLDI_CHECK = 4


@dataclass
class LinearSolveInfo:
    """Outcome of a batched linear solve: per-sample iterations and convergence, operator calls."""

    iterations: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    matvecs: int


@dataclass(frozen=True)
class GMRES:
    """Solve A x = b for a batch (B, N): sample b stops when ||b - A x|| <= max(atol, rtol ||b||).

    `restart` is the Krylov dimension between restarts and `max_iters` bounds the Arnoldi steps
    (operator applications) per sample; the 2-norm is used, as in scipy.sparse.linalg.gmres.
    """

    rtol: float = 1e-5
    atol: float = 0.0
    restart: int = 20
    max_iters: int = 100

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"rtol={self.rtol!r} and atol={self.atol!r} must be >= 0")
        if self.restart < 1 or self.max_iters < 1:
            raise ValueError(
                f"restart={self.restart!r} and max_iters={self.max_iters!r} must be >= 1"
            )

    def __call__(
        self, A: LinearOperator, b: torch.Tensor, x0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LinearSolveInfo]:
        """Return x and the solve's info; x0 is the initial guess (zeros when None)."""
        batch = b.shape[0]
        tol = torch.clamp_min(self.rtol * b.norm(dim=1), self.atol)
        iterations = torch.zeros(batch, dtype=torch.long, device=b.device)
        if x0 is None:
            x, r, matvecs = torch.zeros_like(b), b, 0
        else:
            x, r, matvecs = x0, b - A(x0), 1
        beta = r.norm(dim=1)
        active = beta > tol
        # Not read before the first cycle: a batch that starts solved (b = 0, or an exact x0)
        # is rare, and takes ARNOLDI_CHECK masked steps.
        total = 0
        while total < self.max_iters:
            correction, cycle, steps, estimate, finished = self._cycle(
                A, r, beta, tol, active, self.max_iters - total
            )
            x = x + correction
            iterations += cycle
            total += steps
            matvecs += steps
            if finished or not bool((active & (estimate > tol)).any()):
                # The Arnoldi estimate is the residual norm of x (exact in exact arithmetic):
                # trusting it when every sample has stopped saves a product with A.
                beta = estimate
                break
            r = b - A(x)
            matvecs += 1
            beta = r.norm(dim=1)
            active = beta > tol
            if not bool(active.any()):
                break
        return x, LinearSolveInfo(iterations, beta <= tol, beta, matvecs)

    def _cycle(
        self,
        A: LinearOperator,
        r: torch.Tensor,
        beta: torch.Tensor,
        tol: torch.Tensor,
        active: torch.Tensor,
        budget: int,
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, bool]:
        """One restart cycle from residual r: correction to x, per-sample steps, Arnoldi steps,
        the per-sample estimate of the new residual norm, and whether a read found every
        sample stopped (the caller reads that itself after a full cycle)."""
        batch, n = r.shape
        m = min(self.restart, budget)
        tiny = torch.finfo(r.dtype).tiny
        basis = r.new_empty(batch, m + 1, n)  # column k is written before it is read
        torch.div(r, beta.clamp_min(tiny)[:, None], out=basis[:, 0])
        hess = r.new_zeros(batch, m + 1, m)
        # Rows of Q, the product of the plane reflections so far (Q H = R upper triangular).
        # A new reflection only needs row j of Q applied to the new column, and row j + 1 of Q
        # times beta is the residual: R itself is formed once, at the end of the cycle.
        q = r.new_zeros(batch, m + 1, m + 1)
        q[:, 0, 0] = 1.0
        # Column j: row j + 1 of Q times beta, +- the residual norm after j + 1 steps. Each
        # sample's own stopping step is read from it at the end, so that a step spends no
        # operation on per-sample counters.
        estimates = r.new_empty(batch, m)
        j, finished = 0, False
        while j < m and not finished:
            w = A(basis[:, j])
            v = basis[:, : j + 1]
            h = dots(v, w)
            w = combine(h, v, base=w, alpha=-1.0)
            h2 = dots(v, w)
            w = combine(h2, v, base=w, alpha=-1.0)
            column = hess[:, :, j]
            h = torch.add(h, h2, out=column[:, : j + 1])
            h_next = torch.linalg.vector_norm(w, dim=1, out=column[:, j + 1])
            torch.div(w, h_next.clamp_min(tiny)[:, None], out=basis[:, j + 1])
            row = q[:, j, : j + 1]
            # The reflection [[c, s], [s, -c]] that zeroes h_next under (Q h)_j. Where both
            # are 0 (a zero column: b = 0, or a breakdown after the sample has stopped) c and
            # s are 0; the steps after a sample stops are left out of its solve.
            rotated = torch.linalg.vecdot(row, h)
            safe = torch.hypot(rotated, h_next).clamp_min_(tiny)
            c, s = rotated / safe, h_next / safe
            torch.mul(row, s[:, None], out=q[:, j + 1, : j + 1])
            row.mul_(c[:, None])
            q[:, j, j + 1] = s
            torch.neg(c, out=q[:, j + 1, j + 1])
            torch.mul(q[:, j + 1, 0], beta, out=estimates[:, j])
            j += 1
            if j % ARNOLDI_CHECK == 0 and j < m:
                finished = not bool(_running(estimates[:, :j], tol, active).any())
        # A sample stops at its first step whose estimate is not above tol (converged, or NaN).
        stopped = ~(estimates[:, :j].abs() > tol[:, None])
        steps = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, j) * active
        last = estimates[:, :j].gather(1, (steps - 1).clamp_min(0)[:, None])[:, 0].abs()
        estimate = torch.where(active, last, beta)
        used = torch.arange(j, device=r.device)[None, :] < steps[:, None]
        upper = torch.bmm(q[:, :j, : j + 1], hess[:, : j + 1, :j])
        eye = torch.eye(j, dtype=r.dtype, device=r.device).expand_as(upper)
        upper = torch.where(used[:, None, :] & used[:, :, None], upper, eye)
        rhs = torch.where(used, beta[:, None] * q[:, :j, 0], 0.0)
        y = torch.linalg.solve_triangular(upper, rhs[:, :, None], upper=True)[:, :, 0]
        return combine(y, basis[:, :j]), steps, j, estimate, finished


def _running(estimates: torch.Tensor, tol: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The samples of `active` whose every step's residual estimate is still above tol."""
    return active & (estimates.abs() > tol[:, None]).all(1)
