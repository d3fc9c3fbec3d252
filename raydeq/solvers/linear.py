"""Neumann (Richardson) iteration for (I - K) x = b, the cheap alternative to GMRES."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydeq.solvers.gmres import LinearOperator, LinearSolveInfo, ScaledLinearSolver
from raydeq.solvers.options import number

# A sample whose residual has grown past this many times its smallest has met a series that
# diverges (K with an eigenvalue of modulus above 1 there): it stops, as a forward solve stops
# a sample whose residual grows past `divergence` (1e4) times its first.
DIVERGENCE = 1e4
# A sample whose smallest residual is within `resolution` ||b|| and has not fallen in this
# many iterations has met the rounding of A's products: it stops, unconverged.
STALL = 5


@dataclass(frozen=True)
class Neumann(ScaledLinearSolver):
    """Solve A x = b by x <- x + (b - A x): for A = I - K the Neumann series x = sum_k K^k b.

    Converges when the spectral radius of K = I - A is below 1 (a contractive DEQ); sample b
    stops when ||b - A x|| <= max(atol, rtol ||b||), or once its residual has grown past
    DIVERGENCE times its smallest. Each sample returns its iterate of smallest residual: where
    the series diverges (the adjoint of a layer that does not contract at z*), its last
    iterate after max_iters grew by the spectral radius to the power max_iters, and the
    implicit gradient of the batch's shared weights with it.
    `resolution` is the relative rounding of A's products (raydeq.solve sets it to the epsilon
    of a float16 or bfloat16 f, or of the caller's autocast): a sample whose smallest residual
    is within resolution ||b|| and has not fallen for STALL iterations stops there,
    unconverged, where an rtol below it ran the batch to max_iters.
    """

    resolution: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        number("resolution", self.resolution)

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
        best_x, best = x, beta
        unchanged = torch.zeros_like(iterations)  # iterations since the smallest residual
        rounding = self.resolution * b.norm(dim=1)
        for _ in range(self.max_iters):
            # NaN compares false: a sample whose residual is not finite stops too.
            active = (beta > tol) & (beta <= DIVERGENCE * best)
            active &= (unchanged < STALL) | (best > rounding)
            if not bool(active.any()):
                break
            x = torch.where(active[:, None], x + r, x)
            iterations += active.long()
            r = b - A(x)
            matvecs += 1
            beta = r.norm(dim=1)
            better = beta < best
            unchanged = torch.where(better, 0, unchanged + 1)
            best_x, best = torch.where(better[:, None], x, best_x), torch.where(better, beta, best)
        return best_x, LinearSolveInfo(iterations, best <= tol, best, matvecs)
