"""Neumann (Richardson) iteration for (I - K) x = b, the cheap alternative to GMRES."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydeq.solvers.gmres import LinearOperator, LinearSolveInfo, ScaledLinearSolver


@dataclass(frozen=True)
class Neumann(ScaledLinearSolver):
    """Solve A x = b by x <- x + (b - A x): for A = I - K the Neumann series x = sum_k K^k b.

    Converges when the spectral radius of K = I - A is below 1 (a contractive DEQ); sample b
    stops when ||b - A x|| <= max(atol, rtol ||b||).
    """

    def _solve(
        self,
        A: LinearOperator,
        b: torch.Tensor,
        x0: torch.Tensor | None,
        tol: torch.Tensor,
    ) -> tuple[torch.Tensor, LinearSolveInfo]:
        """Neumann iteration on b of order 1 (see ScaledLinearSolver)."""
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        x, r, matvecs = self._start(A, b, x0)
        beta = r.norm(dim=1)
        for _ in range(self.max_iters):
            active = beta > tol
            if not bool(active.any()):
                break
            x = torch.where(active[:, None], x + r, x)
            iterations += active.long()
            r = b - A(x)
            matvecs += 1
            beta = r.norm(dim=1)
        return x, LinearSolveInfo(iterations, beta <= tol, beta, matvecs)
