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


@dataclass
class LinearSolveInfo:
    """Outcome of a batched linear solve: per-sample iterations and convergence, operator calls."""

    iterations: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    matvecs: int


def _givens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, s, r) per sample with [[c, s], [-s, c]] (a, b) = (r, 0); the identity where a = b = 0."""
    r = torch.hypot(a, b)
    nonzero = r > 0
    return torch.where(nonzero, a / r, 1.0), torch.where(nonzero, b / r, 0.0), r


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
        basis[:, 0] = r / beta.clamp_min(tiny)[:, None]
        hess = r.new_zeros(batch, m + 1, m)
        # The product of the Givens rotations so far, applied to each new Hessenberg column
        # as one batched product instead of j sequential rotations; its first column times
        # beta is the rotated right-hand side, whose last entry is the residual norm.
        rotations = torch.eye(m + 1, dtype=r.dtype, device=r.device).repeat(batch, 1, 1)
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
            h = h + h2
            h_next = w.norm(dim=1)
            torch.div(w, h_next.clamp_min(tiny)[:, None], out=basis[:, j + 1])
            h = dots(rotations[:, : j + 1, : j + 1], h)
            c, sn, rho = _givens(h[:, j], h_next)
            # Rotate rows j and j + 1 of the product; row j + 1 is still e_j+1.
            row = rotations[:, j, : j + 1]
            torch.mul(row, sn.neg()[:, None], out=rotations[:, j + 1, : j + 1])
            row.mul_(c[:, None])
            rotations[:, j, j + 1] = sn
            rotations[:, j + 1, j + 1] = c
            hess[:, : j + 1, j] = h
            hess[:, j, j] = rho
            steps += active
            residual = beta * rotations[:, j + 1, 0].abs()
            estimate = torch.where(active, residual, estimate)
            active = active & (residual > tol)
            j += 1
            if not bool(active.any()):
                break
        used = torch.arange(j, device=r.device)[None, :] < steps[:, None]
        upper = hess[:, :j, :j]
        eye = torch.eye(j, dtype=r.dtype, device=r.device).expand_as(upper)
        upper = torch.where(used[:, None, :] & used[:, :, None], upper, eye)
        rhs = torch.where(used, beta[:, None] * rotations[:, :j, 0], 0.0)
        y = torch.linalg.solve_triangular(upper, rhs[:, :, None], upper=True)[:, :, 0]
        return combine(y, basis[:, :j]), steps, j, estimate
