"""Per-sample termination: the residual test, best-iterate tracking and each sample's status."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raydeq.solvers.options import number

# Most steps between two reads of the termination test on the host: a solve overruns its
# last check by at most this, so it bounds the evaluations a wrong prediction wastes.
MAX_BLOCK = 16
# Steps before the next check where a sample's residual does not fall (no rate to predict
# from): short, so that a diverging or non-finite sample is stopped soon.
UNKNOWN_BLOCK = 4
# Steps before the first check when a predicted z0 (solve's check_start) misses the
# tolerance: a prediction starts near z*. On the trained mnist_dense Skip DEQs (Table 1's
# Tsit5 at lambda_skip 0.01, 2,000 test digits, batch 32 and 128) every batch had converged
# after 3 steps, Skip Reg. DEQ's mostly after 2; 3 cut their test NFE from 25-26 to 19-20,
# where 2 left Skip DEQ at 24-25 (its check after 2 steps predicts at least 2 more). At the
# preset's lambda_skip of 0.2 (500 steps) it is the same: 19 and 20 against 25 and 26.
PREDICTED_BLOCK = 3


class Status(enum.IntEnum):
    """Why a sample's solve ended; UNSOLVED for a state no solve reached (a Neural ODE's
    interval, a warm-up's unrolled steps), which ends where it ends, above the tolerance."""

    CONVERGED = 0
    MAX_STEPS = 1
    NONFINITE = 2
    DIVERGED = 3
    UNSOLVED = 4


def in_range(value: float, dtype: torch.dtype) -> float:
    """value, or dtype's greatest finite number where value is past it: torch cannot make a
    scalar of the state's dtype from a tolerance beyond its range (abstol=1e300 on float32),
    which every finite residual meets as it meets the greatest one."""
    return min(value, torch.finfo(dtype).max)


def norm(x: torch.Tensor) -> torch.Tensor:
    """2-norm of each sample of a (B, N) matrix as a (B, 1) column, the solvers' scalar shape
    (a column broadcasts against the state without a reshaping view)."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)


def add_scaled(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """a + weight * b: one operation eagerly (alpha=); under torch.compile a product, whose
    weight, where it changes from solve to solve (a tolerance's), is traced as an input from
    its second value on, where alpha= made it a constant and each new tolerance compiled the
    steps again."""
    if torch.compiler.is_compiling():
        return a + weight * b
    return torch.add(a, b, alpha=weight)


def scaled_norm(x: torch.Tensor) -> torch.Tensor:
    """norm(x) computed on x over its largest magnitude per sample, so that it keeps its
    precision where the squares of x are subnormal and is not 0 where they underflow (in
    float32 entries below about 1e-19 and 3e-23: 64 entries of 1e-22 gave 7.92e-22, of 2.5e-23
    0, where this gives 8e-22 and 2e-22)."""
    largest = x.abs().amax(dim=1, keepdim=True)
    return norm(x / largest.clamp_min(torch.finfo(x.dtype).tiny)) * largest


@dataclass(frozen=True)
class Termination:
    """Sample b has converged once ||f(z_b) - z_b|| <= abstol + reltol * ||z_b|| (RMS norms).

    A sample whose residual is not finite stops with Status.NONFINITE, and one whose residual
    exceeds `divergence` times its first residual stops with Status.DIVERGED (relative to the
    first, not the best, so that a quasi-Newton transient near convergence is not mistaken).
    A tolerance past the state dtype's range acts as its greatest finite number, which every
    finite residual meets.
    """

    abstol: float = 1e-3
    reltol: float = 1e-3
    divergence: float = 1e4

    def __post_init__(self) -> None:
        number("abstol", self.abstol)
        number("reltol", self.reltol)
        if self.abstol == 0 and self.reltol == 0:
            raise ValueError("abstol and reltol cannot both be 0: the solve could never stop")
        number("divergence", self.divergence, "(1, inf]")


class Monitor:
    """Per sample: the best iterate and its residual and whether it still runs, recorded on
    every step in a few tensor operations without a host synchronisation; and, at each
    check, why the stopped samples stopped and how many steps to take before the next check.

    Norms are plain 2-norms in (B, 1) columns (the tolerances scaled by sqrt(features) once).
    A converged sample stops on the step it converges (the solvers freeze the samples that
    no longer run); a diverged or non-finite one at the next check.

    `reads`: a host read of a tensor costs nothing here (a CPU, which runs each operation as
    it is issued), so that `select` may read whether its mask is uniform.

    With `allow_restarts`, a sample that fails the divergence test for the first time is
    stopped as before, but the check's read (`next_block`) also says so (`due`), and `resume`
    runs it again, for its solver to restart from its best iterate; from then on it also
    fails the test at a check where its best residual has not fallen over the UNKNOWN_BLOCK or
    more steps since it was last so judged (or restarted); one that max_steps stops first ends
    MAX_STEPS. One that stops again ends NONFINITE where either stop was for a non-finite
    residual.
    """

    # The attributes a solver step reads and replaces (record): a step recorded as a CUDA graph
    # writes them back into the tensors it read (graphs.GraphedStep), where the checks between
    # steps replaced them.
    STEPPED = ("best_z", "best_norm", "active", "limit")

    def __init__(self, z0: torch.Tensor, termination: Termination, reads: bool = False) -> None:
        batch, features = z0.shape
        self.termination = termination
        self.reads = reads
        self.to_rms = features**-0.5  # 2-norm -> RMS norm
        # abstol as a 2-norm, at most the dtype's greatest finite number: one past it compares
        # as inf with the residuals, which an infinite residual then met.
        self.abstol_norm = in_range(termination.abstol / self.to_rms, z0.dtype)
        self.reltol = in_range(termination.reltol, z0.dtype)
        self.best_z = z0
        self.best_norm = torch.full((batch, 1), float("inf"), dtype=z0.dtype, device=z0.device)
        self.divergence_bound: torch.Tensor | None = None
        self.status = torch.full((batch, 1), int(Status.MAX_STEPS), device=z0.device)
        self.active = torch.ones(batch, 1, dtype=torch.bool, device=z0.device)
        # abstol_norm per sample, inf for one that a test stopped: without reltol a step finds
        # the samples that run in one comparison of their best residual with it.
        self.limit = torch.full_like(self.best_norm, self.abstol_norm)
        self.checked_log = self.best_norm
        # With restarts: NaN per sample while it has its restart left (`spare`, spent by
        # `resume`), and for the samples that failed the last test with it (`restarting`),
        # else 0 (a tensor: a scalar 0 costs each check one operation): next_block's one read
        # propagates the NaN, so that they cost no read of their own, and a check one
        # operation more.
        self.spare: torch.Tensor | None = None
        self.restarting = torch.zeros_like(self.best_norm)
        self.due = False
        # From the first resume on, per sample: the status it first stopped with (DIVERGED for
        # the others), the best residual its progress is measured from and the steps taken
        # since then, NaN for a sample not resumed (which no count of steps then judges).
        self.restarted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def allow_restarts(self) -> None:
        """Give each sample one restart: its first failure of the divergence test makes the
        next read `due`, and `resume` runs it again."""
        self.spare = torch.full_like(self.best_norm, float("nan"))

    def resume(self) -> torch.Tensor:
        """Run again the samples that failed the last test with their restart left, as (B, 1)
        mask of them, for their solver to restart them; called where `due`."""
        samples = self.restarting.isnan()
        if self.restarted is None:
            diverged = torch.full_like(self.status, int(Status.DIVERGED))
            self.restarted = diverged, self.best_norm, torch.full_like(self.best_norm, math.nan)
        first, best, taken = self.restarted
        self.restarted = (
            torch.where(samples, self.status, first),
            torch.where(samples, self.best_norm, best),
            torch.where(samples, 0.0, taken),
        )
        self.spare = torch.where(samples, 0.0, self.spare)
        self.status = torch.where(samples, int(Status.MAX_STEPS), self.status)
        self.active = self.active | samples
        self.limit = self.limit.masked_fill(samples, self.abstol_norm)
        self.due = False
        return samples

    def record(self, z: torch.Tensor, r: torch.Tensor) -> None:
        """Record iterate z with residual 2-norm r (B, 1) and stop the samples whose best
        iterate meets the tolerance there, so that a converged sample's result meets its own
        tolerance (with reltol a worse point of larger norm can meet a larger one): a sample's
        result does not depend on the batch it is solved in. A point recorded again (a
        rejected step keeps the last one) changes nothing. Comparisons with NaN are false: a
        non-finite residual is never better, so an overflowed norm never converges."""
        better = r < self.best_norm
        self.best_z, self.best_norm = self.select(better, ((z, self.best_z), (r, self.best_norm)))
        self.active = self._running(self.best_z, self.best_norm)

    def select(
        self, mask: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """torch.where(mask, a, b) for each pair (a, b) of a (B, 1) mask. With `reads`, a mask
        that is the same for every sample (none rejected, none stopped yet) gives every a or
        every b without a select: on a CPU torch.where is a scalar loop, 5x an add, and the
        selects of the state were a quarter of an Euler step's own time on the trained
        mnist_dense at batch 256, whose samples all converge on the same step. The result is
        the same tensor values either way."""
        if self.reads:
            count = int(mask.sum())
            if count in (0, mask.shape[0]):
                return [a if count else b for a, b in pairs]
        return [torch.where(mask, a, b) for a, b in pairs]

    def test(self, current: torch.Tensor, steps: int = 0) -> None:
        """Stop the running samples that diverged or went non-finite, given each one's residual
        2-norm at its current point (B, 1) after `steps` steps since the last test, with that
        status; no host synchronisation."""
        if self.divergence_bound is None:
            # Finite, so that an infinite residual fails it where divergence or the first
            # residual is infinite.
            bound = self.termination.divergence * current
            self.divergence_bound = bound.clamp_max_(torch.finfo(current.dtype).max)
        # NaN compares false, so a non-finite residual also fails the bound; a norm is >= 0,
        # so it is finite exactly where it is below infinity, and NONFINITE + 1 is DIVERGED.
        within = current <= self.divergence_bound
        if self.restarted is not None:
            # A restarted sample whose best has not fallen over UNKNOWN_BLOCK steps or more has
            # diverged again: where there is no root to find, it would only repeat its steps.
            # Not over fewer (a check_every of 1, a block max_steps cut short): a quasi-Newton
            # step often rises where the next falls, and how few depends on the checks.
            first, best, taken = self.restarted
            taken = taken + steps
            judged = taken >= UNKNOWN_BLOCK
            within = within > (judged & (self.best_norm >= best))
            best = torch.where(judged, self.best_norm, best)
            self.restarted = first, best, torch.where(judged, 0.0, taken)
        failing = self.active > within
        if self.spare is not None:
            # failing as the 0 elsewhere: a tensor, where a scalar 0 is one operation more.
            self.restarting = torch.where(failing, self.spare, failing)
        code = (current < float("inf")) + int(Status.NONFINITE)
        if self.restarted is not None:
            # A sample whose f overflowed, restarted at z0, repeats its steps and stops again
            # before they overflow: its restart did not change why it stops.
            code = torch.minimum(code, self.restarted[0])
        self.status = torch.where(failing, code, self.status)
        self.active = self.active > failing
        self.limit = self.limit.masked_fill(failing, math.inf)

    def mark(self) -> None:
        """Start measuring the residual's rate of decrease from here (no host read)."""
        self.checked_log = self.best_norm.log()

    def next_block(self, steps: int, every: int | None = None) -> int:
        """Steps to take before the next test, 0 when no sample runs: the solve's one host
        synchronisation per check. `every` steps, or by default where the slowest running
        sample is predicted to converge at its residual's rate over the `steps` since the
        last mark. Where a sample failed the last test with its restart left, `due`, and the
        block is `every` or UNKNOWN_BLOCK."""
        if every:
            if self.spare is None:
                block = every * bool(self.active.any())
            else:
                block = every * (self._read(self.active + self.restarting) > 0)
            self.mark()
            return block
        return self._predict(steps)

    def _read(self, value: torch.Tensor) -> float:
        """The check's read: value's largest entry on the host; NaN, which marks a sample to
        restart (`restarting`), makes the restart `due` and is read as running."""
        largest = float(value.amax())
        self.due = largest != largest
        return math.inf if self.due else largest

    def _running(self, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Whether each running sample still runs at its best iterate z with residual r (B, 1):
        it stops once r <= abstol + reltol * ||z|| (2-norms). Without reltol that is r above
        its limit, which a stopped sample's inf never is (r, a best residual, is never NaN).
        With it, r - reltol * ||z|| <= limit, which is false where both are infinite (inf -
        inf is NaN), as at a non-finite z0 that no finite residual has replaced, so that such a
        sample runs on; the sum's test r <= limit + reltol * ||z||, as many operations, is
        true there (inf <= inf)."""
        if not self.reltol:
            return r > self.limit
        # On booleans a > b is a & ~b.
        return self.active > (add_scaled(r, norm(z), -self.reltol) <= self.limit)

    def _tolerance(self, z: torch.Tensor) -> torch.Tensor | float:
        """abstol + reltol * ||z|| per sample, as a 2-norm."""
        if not self.reltol:
            return self.abstol_norm
        return norm(z).mul_(self.reltol).add_(self.abstol_norm)

    @torch.no_grad()
    def _predict(self, since: int) -> int:
        """Steps until the slowest running sample converges at its rate over the `since` (at
        least 1: a block takes a step) steps since the mark, in [1, MAX_BLOCK] (UNKNOWN_BLOCK
        where its residual does not fall), 0 if none runs; marks the residuals for the next
        prediction."""
        best_log = self.best_norm.log()
        fall, self.checked_log = best_log - self.checked_log, best_log
        tol = self._tolerance(self.best_z)
        to_go = (math.log(tol) if isinstance(tol, float) else tol.log()) - best_log
        # Intervals of `since` steps to go at the rate since the last check: positive where a
        # running sample's residual fell (to_go < 0 for a running sample, fall < 0), NaN or
        # <= 0 where no rate is known, which maps to UNKNOWN_BLOCK (2.5 steps: ceil and +1
        # give 4).
        checks = to_go / fall
        checks = torch.where(checks > 0, checks, (UNKNOWN_BLOCK - 1.5) / since)
        slowest = self._read(torch.where(self.active, checks, self.restarting))
        if slowest == 0:
            return 0
        if self.due:
            return UNKNOWN_BLOCK
        # One step of margin: the rate still improves as a transient dies out, so the
        # prediction runs short more often than long. At most twice the steps since the last
        # check: early rates, from the transient, predict too many steps more often than
        # too few.
        limit = min(MAX_BLOCK, max(UNKNOWN_BLOCK, 2 * since))
        return int(min(max(math.ceil(min(since * slowest, limit)) + 1, 1), limit))

    @torch.no_grad()
    def refuse_overflowed(self) -> None:
        """End NONFINITE the samples that converged where their state's 2-norm overflowed to
        inf (float32 past about 1.8e19), which every finite residual met through reltol's
        share of it, and that miss the tolerance with norms that do not overflow: once at the
        end of a solve, with no host read."""
        if not self.reltol:
            return
        z = self.best_z.detach()
        stopped = (self.status == int(Status.MAX_STEPS)) > self.active
        tolerance = scaled_norm(z * self.reltol) + self.abstol_norm
        missed = stopped & norm(z).isinf() & (self.best_norm > tolerance)
        self.status = torch.where(missed, int(Status.NONFINITE), self.status)

    @torch.no_grad()
    def remeasure(self, f: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Measure again, with norms that do not underflow, the samples that converged on a
        residual 2-norm of 0 where a tolerance below the square root of the dtype's smallest
        normal number made that the test (abstol 0: z* = 0 in float32 converged at about
        1e-23, where the squares underflow); those that miss the tolerance then run no more
        and end as MAX_STEPS with their residual. Returns the evaluations of f spent (0 or 1):
        once at the end of a solve, not per step."""
        if self.abstol_norm >= torch.finfo(self.best_z.dtype).tiny ** 0.5:
            return 0
        suspect = (self.best_norm == 0) & (self.codes == int(Status.CONVERGED))[:, None]
        if not bool(suspect.any()):
            return 0
        z = self.best_z.detach()
        residual = scaled_norm(f(z) - z)
        failed = suspect & (residual > self.reltol * scaled_norm(z) + self.abstol_norm)
        self.best_norm = torch.where(suspect, residual, self.best_norm)
        self.active = self.active | failed
        return 1

    def copy_out(self) -> None:
        """Copy what a solve returns (best iterate, residual, status) into tensors of its own:
        under CUDA graphs these are outputs in the graphs' memory, which the next solve's
        replays overwrite."""
        self.best_z, self.best_norm, self.status, self.active = (
            t.clone() for t in (self.best_z, self.best_norm, self.status, self.active)
        )

    @property
    def best_residual(self) -> torch.Tensor:
        """RMS residual of each sample's best iterate, (B,)."""
        return self.best_norm[:, 0] * self.to_rms

    @property
    def codes(self) -> torch.Tensor:
        """Why each sample's solve ended (Status codes, (B,)); MAX_STEPS for those running.
        A sample that stopped without a failure status converged."""
        converged = (self.status == int(Status.MAX_STEPS)) > self.active
        return torch.where(converged, int(Status.CONVERGED), self.status)[:, 0]
