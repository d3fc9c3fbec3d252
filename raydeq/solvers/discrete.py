"""Root finders for z = f(z): damped fixed-point iteration, Anderson acceleration, Broyden.

All are batched with per-sample histories and small per-sample linear algebra (batched matmul),
so no sample's update ever mixes with another's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raydeq.solvers.batched import combine, dots, put
from raydeq.solvers.termination import Monitor

Map = Callable[[torch.Tensor], torch.Tensor]


class FixedPoint:
    """z <- (1 - damping) z + damping f(z)."""

    def __init__(self, damping: float = 1.0) -> None:
        if not 0 < damping <= 1:
            raise ValueError(f"damping={damping!r} must be in (0, 1]")
        self.damping = damping

    def __call__(
        self, f: Map, z: torch.Tensor, monitor: Monitor, max_steps: int
    ) -> tuple[int, int]:
        """Iterate until every sample converges or max_steps; returns (nfe, steps)."""
        nfe = 0
        for _ in range(max_steps):
            fz = f(z)
            nfe += 1
            residual = fz - z
            monitor.update(z, residual)
            if not monitor.running():
                break
            # Stopped samples step on unmasked: the monitor holds their result.
            z = fz if self.damping == 1 else z + self.damping * residual
        return nfe, nfe


class Anderson:
    """Anderson acceleration (type II) with memory m, Tikhonov regularisation lam, mixing beta.

    Each step solves, per sample, min ||sum_i alpha_i g_i|| subject to sum_i alpha_i = 1 over
    the last m residuals g_i = f(z_i) - z_i, then mixes
    z = sum_i alpha_i (beta f(z_i) + (1 - beta) z_i). lam is relative to the mean of diag(G G^T).
    """

    def __init__(self, m: int = 5, lam: float = 1e-4, beta: float = 1.0) -> None:
        if m < 1:
            raise ValueError(f"m={m!r} must be >= 1")
        if lam < 0:
            raise ValueError(f"lam={lam!r} must be >= 0")
        if not 0 < beta <= 1:
            raise ValueError(f"beta={beta!r} must be in (0, 1]")
        self.m, self.lam, self.beta = m, lam, beta

    def __call__(
        self, f: Map, z: torch.Tensor, monitor: Monitor, max_steps: int
    ) -> tuple[int, int]:
        """Iterate until every sample converges or max_steps; returns (nfe, steps)."""
        batch, dim = z.shape
        # Ring buffers of the last m iterates (z only for mixing, beta < 1); a slot is written
        # before it is first read.
        fs, gs = z.new_empty(batch, self.m, dim), z.new_empty(batch, self.m, dim)
        xs = z.new_empty(batch, self.m, dim) if self.beta != 1 else None
        eye = torch.eye(self.m, dtype=z.dtype, device=z.device)
        ones = z.new_ones(batch, self.m, 1)
        slots = torch.arange(self.m, device=z.device)
        nfe = 0
        for _ in range(max_steps):
            fz = f(z)
            g = fz - z
            monitor.update(z, g)
            slot, nfe = nfe % self.m, nfe + 1
            if not monitor.running():
                break
            fs, gs = put(fs, slot, fz), put(gs, slot, g)
            if self.beta != 1:
                xs = put(xs, slot, z)
            n = min(nfe, self.m)
            gram = torch.bmm(gs[:, :n], gs[:, :n].transpose(1, 2))
            gram = (
                gram
                + self.lam
                * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None].clamp_min(1e-30)
                * eye[:n, :n]
            )
            weights, info = torch.linalg.solve_ex(gram, ones[:, :n])
            alpha = weights[:, :, 0] / weights[:, :, 0].sum(1, keepdim=True)
            # A singular system falls back to the plain step z = f(z).
            ok = (info == 0)[:, None] & alpha.isfinite().all(1, keepdim=True)
            alpha = torch.where(ok, alpha, (slots[:n] == slot).to(z.dtype))
            # Stopped samples step on unmasked: the monitor holds their result.
            z = combine(alpha, fs[:, :n])
            if self.beta != 1:
                z = self.beta * z + (1 - self.beta) * combine(alpha, xs[:, :n])
        return nfe, nfe


class Broyden:
    """Limited-memory 'good' Broyden on g(z) = f(z) - z, per sample, unit step.

    The inverse Jacobian of g is kept as -I + U V^T with at most `memory` rank-one terms per
    sample; each step adds u = (dz - H dg) / (dz^T H dg) and v^T = dz^T H (Sherman-Morrison),
    replacing the oldest term once `memory` are held. A step whose dz^T H dg is below
    sqrt(eps) ||dz^T H|| ||dg|| (lost in rounding) leaves H unchanged.
    """

    def __init__(self, memory: int = 30) -> None:
        if memory < 1:
            raise ValueError(f"memory={memory!r} must be >= 1")
        self.memory = memory

    def __call__(
        self, f: Map, z: torch.Tensor, monitor: Monitor, max_steps: int
    ) -> tuple[int, int]:
        """Iterate until every sample converges or max_steps; returns (nfe, steps)."""
        batch, dim = z.shape
        # Ring buffers of the rank-one terms; a slot is written before it is first read.
        us, vs = z.new_empty(batch, self.memory, dim), z.new_empty(batch, self.memory, dim)
        g = f(z) - z
        nfe = 1
        monitor.update(z, g)
        update = g  # -H g with H = -I
        tiny = torch.finfo(z.dtype).eps ** 0.5
        while nfe < max_steps and monitor.running():
            # Samples that have stopped keep stepping: their state is never read again (the
            # monitor holds their result) and no operation mixes samples, so nothing is masked
            # but a degenerate update of a running sample.
            z_new = z + update
            g_new = f(z_new) - z_new
            nfe += 1
            monitor.update(z_new, g_new)
            dz, dg = update, g_new - g
            used = min(nfe - 2, self.memory)
            u_used, v_used = us[:, :used], vs[:, :used]
            v = self._apply_transposed(u_used, v_used, dz)
            # n = dz - H dg, the numerator of Sherman-Morrison's u.
            n = self._apply(u_used, v_used, dg, sign=-1.0) + dz
            denom = torch.linalg.vecdot(v, dg)[:, None]
            # Skip the rank-one update where v . dg is lost in rounding: its huge u would throw
            # the next step far off (seen in float32 at width 1024).
            floor = tiny * torch.linalg.vector_norm(v, dim=1) * torch.linalg.vector_norm(dg, dim=1)
            ok = (denom.abs() > floor[:, None]) & torch.isfinite(denom)
            scale = torch.where(ok, denom.reciprocal(), 0.0)
            u = n * scale
            # The next step -H' g_new with H' = H + u v^T (minus the evicted term), from the
            # last step -H g = dz instead of applying all rank-one terms again:
            # -H' g_new = dz - H dg - u (v . g_new) = n (1 - scale (v . g_new)) [+ evicted].
            update = n * (1 - scale * torch.linalg.vecdot(v, g_new)[:, None])
            slot = (nfe - 2) % self.memory
            if nfe - 2 >= self.memory:
                u_old, v_old = us[:, slot], vs[:, slot]
                update = torch.addcmul(update, u_old, torch.linalg.vecdot(v_old, g_new)[:, None])
            us, vs = put(us, slot, u), put(vs, slot, v)
            z, g = z_new, g_new
        return nfe, nfe

    @staticmethod
    def _apply(
        u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, sign: float = 1.0
    ) -> torch.Tensor:
        """sign (-I + U V^T) x per sample, with the rank-one terms as rows of u and v (B, k, N)."""
        if u.shape[1] == 0:
            return -sign * x
        return combine(dots(v, x), u, base=x, alpha=sign, beta=-sign)

    @staticmethod
    def _apply_transposed(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x^T (-I + U V^T) per sample, as a (B, N) matrix."""
        if u.shape[1] == 0:
            return -x
        return combine(dots(u, x), v, base=x, beta=-1.0)
