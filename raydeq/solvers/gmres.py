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
        total = 0
        while total < self.max_iters:
            active = beta > tol
            if not bool(active.any()):
                break
            correction, cycle, steps, estimate = self._cycle(
                A, r, beta, tol, active, self.max_iters - total
            )
            x = x + correction
            iterations += cycle
            total += steps
            matvecs += steps
            if bool((estimate <= tol).all()):
                # The Arnoldi estimate is the residual norm of x (exact in exact arithmetic):
                # trusting it when every sample has converged saves a product with A.
                beta = estimate
                break
            r = b - A(x)
            matvecs += 1
            beta = r.norm(dim=1)
        return x, LinearSolveInfo(iterations, beta <= tol, beta, matvecs)

    def _cycle(
        self,
        A: LinearOperator,
        r: torch.Tensor,
        beta: torch.Tensor,
        tol: torch.Tensor,
        active: torch.Tensor,
        budget: int,
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """One restart cycle from residual r: correction to x, per-sample steps, Arnoldi steps
        and the per-sample estimate of the new residual norm."""
        batch, n = r.shape
        m = min(self.restart, budget)
        tiny = torch.finfo(r.dtype).tiny
        basis = r.new_empty(batch, m + 1, n)  # column k is written before it is read
        torch.div(r, beta.clamp_min(tiny)[:, None], out=basis[:, 0])
        hess = r.new_zeros(batch, m + 1, m)
        # Rows of Q, the product of the Givens rotations so far (Q H = R upper triangular).
        # A new rotation only needs row j of Q applied to the new column, and row j + 1 of Q
        # times beta is the residual: R itself is formed once, at the end of the cycle.
        q = r.new_zeros(batch, m + 1, m + 1)
        q[:, 0, 0] = 1.0
        steps = torch.zeros(batch, dtype=torch.long, device=r.device)
        estimate = beta
        j = 0
        while j < m:
            w = A(basis[:, j])
            v = basis[:, : j + 1]
            h = dots(v, w)
            w = combine(h, v, base=w, alpha=-1.0)
            h2 = dots(v, w)
            w = combine(h2, v, base=w, alpha=-1.0)
            column = hess[:, :, j]
            h = torch.add(h, h2, out=column[:, : j + 1])
            h_next = torch.linalg.vector_norm(w, dim=1)
            column[:, j + 1] = h_next
            torch.div(w, h_next.clamp_min(tiny)[:, None], out=basis[:, j + 1])
            row = q[:, j, : j + 1]
            # The rotation [[c, s], [-s, c]] that zeroes h_next under (Q h)_j; the identity
            # where both are 0.
            rotated = (row * h).sum(1)
            norm = torch.hypot(rotated, h_next)
            safe = norm.clamp_min(tiny)
            c, s = torch.where(norm > 0, rotated / safe, 1.0), h_next / safe
            torch.mul(row, s.neg()[:, None], out=q[:, j + 1, : j + 1])
            row.mul_(c[:, None])
            q[:, j, j + 1] = s
            q[:, j + 1, j + 1] = c
            steps += active
            residual = beta * q[:, j + 1, 0].abs()
            estimate = torch.where(active, residual, estimate)
            active = active & (residual > tol)
            j += 1
            if j % ARNOLDI_CHECK == 0 and not bool(active.any()):
                break
        used = torch.arange(j, device=r.device)[None, :] < steps[:, None]
        upper = torch.bmm(q[:, :j, : j + 1], hess[:, : j + 1, :j])
        eye = torch.eye(j, dtype=r.dtype, device=r.device).expand_as(upper)
        upper = torch.where(used[:, None, :] & used[:, :, None], upper, eye)
        rhs = torch.where(used, beta[:, None] * q[:, :j, 0], 0.0)
        y = torch.linalg.solve_triangular(upper, rhs[:, :, None], upper=True)[:, :, 0]
        return combine(y, basis[:, :j]), steps, j, estimate
