"""Per-sample termination: the residual test, best-iterate tracking and each sample's status."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Status(enum.IntEnum):
    """Why a sample's solve ended."""

    CONVERGED = 0
    MAX_STEPS = 1
    NONFINITE = 2
    DIVERGED = 3


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over the features of each sample of a (B, N) matrix: the solver norm."""
    return torch.linalg.vector_norm(x, dim=1) * x.shape[1] ** -0.5


def all_set_on_host(mask: torch.Tensor) -> bool:
    """Whether every entry of mask is set, read on the host only where that is free (CPU);
    False on an accelerator, where the read would stall the queue: callers then take the
    general path, which is right either way."""
    return mask.device.type == "cpu" and bool(mask.all())


@dataclass(frozen=True)
class Termination:
    """Sample b has converged once ||f(z_b) - z_b|| <= abstol + reltol * ||z_b|| (RMS norms).

    A sample whose residual is not finite stops with Status.NONFINITE, and one whose residual
    exceeds `divergence` times its first residual stops with Status.DIVERGED (relative to the
    first, not the best, so that a quasi-Newton transient near convergence is not mistaken).
    """

    abstol: float = 1e-3
    reltol: float = 1e-3
    divergence: float = 1e4

    def __post_init__(self) -> None:
        for name in ("abstol", "reltol"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        if self.abstol == 0 and self.reltol == 0:
            raise ValueError("abstol and reltol cannot both be 0: the solve could never stop")
        if not self.divergence > 1:
            raise ValueError(f"divergence={self.divergence!r} must be > 1")


class Monitor:
    """Tracks, per sample, the best iterate, its residual, whether it still runs and why not.

    Norms are kept as plain 2-norms (the tolerances scaled by sqrt(features) once) and the
    status is decided when read, so that recording an iterate costs few operations.
    """

    def __init__(self, z0: torch.Tensor, termination: Termination) -> None:
        batch, features = z0.shape
        self.termination = termination
        self.to_rms = features**-0.5  # 2-norm -> RMS norm
        self.abstol_norm = termination.abstol / self.to_rms  # abstol as a 2-norm
        self.best_z = z0
        self.best_norm = torch.full((batch,), float("inf"), dtype=z0.dtype, device=z0.device)
        self.divergence_bound: torch.Tensor | None = None
        self.stop_norm = torch.zeros_like(self.best_norm)
        self.stop_tol = torch.zeros_like(self.best_norm)
        self.residual_norm = torch.full_like(self.best_norm, float("inf"))
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)

    def update(
        self,
        z: torch.Tensor,
        residual: torch.Tensor,
        mask: torch.Tensor | None = None,
        norm: torch.Tensor | None = None,
    ) -> None:
        """Record iterate z with residual vector f(z) - z for the samples selected by mask, a
        subset of the active ones (all of them when None); norm is ||f(z) - z|| per sample
        where the caller has it already. residual_norm keeps it for each sample's last record.

        The first call (every solver makes it for all samples at z0) fixes the divergence bound.

        Comparisons with NaN are false, so a non-finite residual is never "better", never
        "converged" and never "diverged"; it only stops the sample (Status.NONFINITE).
        A solver step calls this once, so it is written in few tensor operations.
        """
        t = self.termination
        r = torch.linalg.vector_norm(residual, dim=1) if norm is None else norm
        if self.divergence_bound is None:
            self.divergence_bound = t.divergence * r
        self.residual_norm = r if mask is None else torch.where(mask, r, self.residual_norm)
        mask = self.active if mask is None else mask
        better = mask & (r < self.best_norm)
        # The usual step, where every sample improved, needs no full-width select.
        if all_set_on_host(better):
            self.best_z = z
        else:
            self.best_z = torch.where(better[:, None], z, self.best_z)
        self.best_norm = torch.where(better, r, self.best_norm)
        tol = (
            torch.linalg.vector_norm(z, dim=1).mul_(t.reltol).add_(self.abstol_norm)
            if t.reltol
            else self.abstol_norm
        )
        # A sample runs on while its residual is finite, above tol and within the bound; on
        # booleans, mask > running is mask & ~running.
        stop = mask > ((r > tol) & (r <= self.divergence_bound))
        self.stop_norm = torch.where(stop, r, self.stop_norm)
        self.stop_tol = torch.where(stop, tol, self.stop_tol)
        self.active = self.active ^ stop

    @property
    def best_residual(self) -> torch.Tensor:
        """RMS residual of each sample's best iterate."""
        return self.best_norm * self.to_rms

    @property
    def status(self) -> torch.Tensor:
        """Why each sample's solve ended (Status codes); MAX_STEPS for those still running."""
        stopped = int(Status.NONFINITE) + self.stop_norm.isfinite().long()
        code = torch.where(self.active, int(Status.MAX_STEPS), stopped)
        converged = ~self.active & (self.stop_norm <= self.stop_tol)
        return torch.where(converged, int(Status.CONVERGED), code)

    def running(self) -> bool:
        """Whether any sample still runs: the one host synchronisation a solver step makes."""
        return bool(self.active.any())
