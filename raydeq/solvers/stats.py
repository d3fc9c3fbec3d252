"""Statistics of one solve, filled by the forward solver and, after backward(), the adjoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydeq.solvers.termination import Monitor, Status


@dataclass
class SolveStats:
    """Forward evaluations, steps, per-sample residual/convergence/status; backward VJPs and
    per-sample convergence of the adjoint solve once backward() has run."""

    nfe: int
    steps: int
    residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    backward_nvjp: int = 0
    backward_converged: torch.Tensor | None = None

    @staticmethod
    def from_monitor(monitor: Monitor, nfe: int, steps: int) -> SolveStats:
        """Collect the statistics a solver's monitor holds at the end of a solve."""
        status = monitor.codes
        return SolveStats(
            nfe=nfe,
            steps=steps,
            residual=monitor.best_residual.detach(),
            converged=status == int(Status.CONVERGED),
            status=status,
        )

    @property
    def unconverged_fraction(self) -> float:
        """Fraction of samples that did not meet the tolerance."""
        return float(unconverged(self.converged))

    @property
    def backward_unconverged_fraction(self) -> float | None:
        """Fraction of samples whose adjoint solve did not converge (stopped at its max_iters,
        or where GMRES's Krylov space broke down), once backward() has run an implicit adjoint
        (None before, and for the other adjoints)."""
        if self.backward_converged is None:
            return None
        return float(unconverged(self.backward_converged))


def unconverged(converged: torch.Tensor) -> torch.Tensor:
    """The fraction of samples not converged, on the device (a training step reads it with
    its other metrics)."""
    return (~converged).float().mean()
