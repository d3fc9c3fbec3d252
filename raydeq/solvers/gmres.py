"""Batched, matrix-free, restarted GMRES with per-sample convergence.

Written by hand because torch has no Krylov solver and the adjoint needs one system per sample
solved on vector-Jacobian products (Saad & Schultz 1986; Givens rotations, CGS2 Arnoldi).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch

from raydeq.solvers.batched import combine, dots, history
from raydeq.solvers.graphs import RECORDERS, Replayed
from raydeq.solvers.options import flag, function, integer, number

LinearOperator = Callable[[torch.Tensor], torch.Tensor]

# Arnoldi steps between host reads of whether any sample still runs, on an accelerator: a
# sample that has converged steps on masked (its extra columns are left out of its
# least-squares solve), so a read every 4 steps trades at most 3 operator applications for 3
# synchronisations. A CPU runs each operation as it is issued, so a read there stalls nothing
# and GMRES reads after every step: on the trained mnist_mdeq (batch 2), whose backward
# converges in 2 Arnoldi steps, reading every 4 spent 2 products more, a third of its VJPs.
ARNOLDI_CHECK = 4


# A step whose diagonal entry of R (the distance of A v_j from A's images of the earlier basis
# vectors, never below A's smallest singular value) is within BREAKDOWN * eps of |A v_j| has
# met a Krylov space that A maps into itself singularly (A v_j = 0 is one): b has a part
# outside A's range (the adjoint's I - J^T where J^T u = u for some u). In exact arithmetic
# that step and any restart leave the residual as it was; in rounding its estimate fell to
# 1e-7 (float32) or 1e-16 while x grew by 1e7 to 1e17, and the true residual stayed at or above
# the least-squares minimum. Such steps measured up to 40 eps, those of a regular A with a
# condition number of 1e3 1e4 eps and more (one reads so only above 1 / (BREAKDOWN eps), 3e4
# in float32). Its sample keeps the solve of the steps before it, with their residual (the
# least-squares minimum once they span the whole space), and stops unconverged.
BREAKDOWN = 256


@dataclass
class LinearSolveInfo:
    """Outcome of a batched linear solve: per-sample iterations and convergence, operator calls."""

    iterations: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    matvecs: int


@dataclass(frozen=True)
class ScaledLinearSolver:
    """A batched linear solver that solves each sample's system on b divided by its largest
    |b| (1 where b is 0) and scales x back, exact as A is linear; subclasses solve in `_solve`.

    A float32 2-norm squares its entries, so below about 1e-19 it loses its precision in
    subnormal numbers, below about 1e-23 it is 0, and above about 1e19 it is inf. A sample
    whose softmax has saturated sends back such a gradient (1e-22 to 1e-30, or 0). Unscaled,
    GMRES measured its residual too coarsely to meet its rtol (the batch ran to max_iters: 18
    VJPs instead of 7 or 8), or divided by a norm of 0 and returned NaN: one pass over the
    trained mnist_dense's training digits (batch 32) gave 21 non-finite gradients in 250.
    """

    rtol: float = 1e-5
    atol: float = 0.0
    max_iters: int = 100
    # The dtypes of b it solves in.
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    )

    def __post_init__(self) -> None:
        number("rtol", self.rtol)
        number("atol", self.atol)
        integer("max_iters", self.max_iters)

    def __call__(
        self, A: LinearOperator, b: torch.Tensor, x0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LinearSolveInfo]:
        """Return x and the solve's info; x0 is the initial guess (zeros when None). A batch of
        no samples takes no product with A (GMRES took 2, each a VJP for the implicit adjoint)."""
        A = self._checked(A, b, x0)
        if b.shape[0] == 0:
            # A batch of no samples has nothing to solve: no product with A is taken.
            return torch.zeros_like(b), LinearSolveInfo(
                b.new_zeros(0, dtype=torch.long), b.new_ones(0, dtype=torch.bool), b.new_zeros(0), 0
            )
        scale = b.abs().amax(dim=1, keepdim=True)  # 10x faster than the inf-norm on a CPU
        scale = torch.where(scale > 0, scale, 1.0)
        unit = b / scale
        # The implicit adjoint's warm start is b itself.
        x0 = unit if x0 is b else None if x0 is None else x0 / scale
        atol = self.atol / scale[:, 0] if self.atol else 0.0
        x, info = self._solve(A, unit, x0, torch.clamp_min(self.rtol * unit.norm(dim=1), atol))
        info.residual = info.residual * scale[:, 0]
        return x * scale, info

    def _checked(
        self, A: LinearOperator, b: torch.Tensor, x0: torch.Tensor | None
    ) -> LinearOperator:
        """A, checked to map each x to a matrix of b's shape, once b is checked to be a matrix
        (B, N) of one of `dtypes` and x0 None or a tensor like b: a TypeError or ValueError
        naming the argument, instead of torch's failure deep inside the solve."""
        names = " or ".join(map(str, self.dtypes))
        if not isinstance(b, torch.Tensor) or b.dtype not in self.dtypes:
            got = b.dtype if isinstance(b, torch.Tensor) else type(b).__name__
            raise TypeError(f"b must be a floating tensor of dtype {names}, got {got}")
        if b.dim() != 2 or b.shape[1] == 0:
            raise ValueError(f"b must be a matrix (B, N) with N >= 1, got shape {tuple(b.shape)}")
        like = f"a tensor like b, of shape {tuple(b.shape)} and dtype {b.dtype} on {b.device}"
        if x0 is not None and not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be None or {like}, got {type(x0).__name__}")
        if x0 is not None and x0.shape != b.shape:
            raise ValueError(f"x0 must be None or {like}, got shape {tuple(x0.shape)}")
        if x0 is not None and (x0.dtype, x0.device) != (b.dtype, b.device):
            raise TypeError(f"x0 must be None or {like}, got {x0.dtype} on {x0.device}")
        function("A", A, "x (B, N) -> A x (B, N)")
        return partial(_shaped, A)

    def _solve(
        self,
        A: LinearOperator,
        b: torch.Tensor,
        x0: torch.Tensor | None,
        tol: torch.Tensor,
    ) -> tuple[torch.Tensor, LinearSolveInfo]:
        """The solve of A x = b for b of order 1, sample i stopping once ||b_i - A x_i|| <=
        tol[i], max(atol, rtol ||b_i||) in b's units."""
        raise NotImplementedError

    @staticmethod
    def _start(
        A: LinearOperator, b: torch.Tensor, x0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x0, zeros where None, its residual b - A x0 and the products with A that took (none
        from zeros, whose residual is b)."""
        if x0 is None:
            return torch.zeros_like(b), b, 0
        return x0, b - A(x0), 1


def _shaped(A: LinearOperator, x: torch.Tensor) -> torch.Tensor:
    """A x, or a ValueError where A gives another shape than x's and a TypeError where it
    gives another dtype (which failed in the batched products, "expected scalar type")."""
    y = A(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"A must map x of shape {tuple(x.shape)} to one of that shape, got {got}")
    if y.dtype != x.dtype:
        raise TypeError(f"A must map x of dtype {x.dtype} to one of that dtype, got {y.dtype}")
    return y


@dataclass(frozen=True)
class Krylov:
    """A restart cycle's workspace for m Arnoldi steps on a batch (B, N).

    Per-sample vectors are (B, 1, .) rows, the shape the batched products take and give, and
    each buffer is written through one slice of a flat view: a view is an aten operation,
    dispatched like a kernel, and views were half of a step's operations. q holds the rows of
    Q, the product of the plane reflections so far (Q H = R upper triangular), each as it was
    before its own reflection (row j + 1 is s_j times row j, then -c_j), and s_j just right of
    row j's diagonal; the c_j that scale the rows wait in `cosines` for the end of the cycle,
    where R itself is formed. `w` holds the operator's output for recorded steps (a workspace
    that records them has one). The entries no step writes (H below its subdiagonal, Q right
    of each s_j) stay 0 from the start, and a cycle writes every other entry before it reads
    it, so that one workspace serves any number of cycles.
    """

    basis: torch.Tensor  # (B, m + 1, N), row k written before it is read
    hess: torch.Tensor  # (B, m + 1, m)
    hess_flat: torch.Tensor  # column j: flat entries j, j + m, j + 2 m, ...
    q: torch.Tensor  # (B, m + 1, m + 1)
    q_flat: torch.Tensor
    cosines: torch.Tensor  # (B, m, 1)
    w: torch.Tensor | None  # (B, 1, N)

    @staticmethod
    def new(like: torch.Tensor, m: int, recorded: bool = False) -> Krylov:
        """The workspace for vectors like `like` (B, N), H and Q zero; with `w` if recorded."""
        batch, n = like.shape
        hess = like.new_zeros(batch, m + 1, m)
        q = like.new_zeros(batch, m + 1, m + 1)
        return Krylov(
            basis=history(like, m + 1),
            hess=hess,
            hess_flat=hess.view(batch, 1, (m + 1) * m),
            q=q,
            q_flat=q.view(batch, 1, (m + 1) ** 2),
            cosines=like.new_empty(batch, m, 1),
            w=like.new_empty(batch, 1, n) if recorded else None,
        )

    @property
    def size(self) -> int:
        """m, the most Arnoldi steps a cycle takes."""
        return self.hess.shape[2]

    def row(self, j: int) -> torch.Tensor:
        """Row j of Q up to its diagonal, as step j reads it (B, 1, j + 1)."""
        start = j * (self.size + 1)
        return self.q_flat[:, :, start : start + j + 1]


def arnoldi(k: Krylov, j: int, w: torch.Tensor, row: torch.Tensor, tiny: float) -> torch.Tensor:
    """Arnoldi step j of a cycle in workspace k, given w = A times basis row j (B, 1, N) and
    row j of Q (`Krylov.row`): column j of H and basis row j + 1 by classical Gram-Schmidt done
    twice (CGS2), the plane reflection [[c, s], [s, -c]] that zeroes H's new subdiagonal entry
    under (Q h)_j, and row j + 1 of Q, which it returns. Where both are 0 (a zero column: b =
    0, A b = 0, or a breakdown after the sample has stopped) c is 0 and s is 1, so that the
    step leaves the residual as it was; the steps after a sample stops are left out of its
    solve."""
    m = k.size
    v = k.basis[:, : j + 1]
    h = dots(v, w)
    w = combine(h, v, base=w, alpha=-1.0)
    h2 = dots(v, w)
    w = combine(h2, v, base=w, alpha=-1.0)
    below = j + (j + 1) * m  # flat index of hess[j + 1, j]
    h = torch.add(h, h2, out=k.hess_flat[:, :, j:below:m])
    h_next = torch.linalg.vector_norm(
        w, dim=2, keepdim=True, out=k.hess_flat[:, :, below : below + 1]
    )
    torch.div(w, h_next.clamp_min(tiny), out=k.basis[:, j + 1 : j + 2])
    start = j * (m + 1)
    rotated = (row * h).sum(2, keepdim=True)  # torch.linalg.vecdot's arithmetic
    norm = torch.hypot(rotated, h_next)
    safe = norm.clamp_min(tiny)
    c = torch.div(rotated, safe, out=k.cosines[:, j : j + 1])
    s = torch.div(h_next, safe, out=k.q_flat[:, :, start + j + 1 : start + j + 2])
    s.masked_fill_(norm == 0, 1.0)
    after = start + m + 1
    return torch.cat([row * s, -c], dim=2, out=k.q_flat[:, :, after : after + j + 2])


def kept_steps(
    upper: torch.Tensor, hess: torch.Tensor, steps: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Each sample's steps (of `steps`, at `positions` 0, 1, ...) before its first that broke
    down (see BREAKDOWN), from R = Q H (B, j, j) and H (B, j + 1, j): those it can trust."""
    size = torch.linalg.vector_norm(hess, dim=1)
    broken = upper.diagonal(dim1=1, dim2=2) <= BREAKDOWN * torch.finfo(hess.dtype).eps * size
    return torch.where(broken, positions, steps[:, None]).amin(1)


# Workspaces kept for recorded Arnoldi steps (GMRES.graph), with each step's recording, per
# batch shape, m, dtype and device: a recording reads and writes its workspace's addresses.
# The last few shapes are kept (a training run has one or two: its batch and its last one).
WORKSPACES: OrderedDict[tuple, tuple[Krylov, dict[int, Replayed]]] = OrderedDict()
KEPT_WORKSPACES = 4


# The keys of the kept workspaces a cycle is using: a GMRES run inside another's operator (a
# nested DEQ's adjoint, within a VJP of the outer f) or beside it in another thread takes a
# workspace of its own (a next copy of the key) instead of overwriting the other's basis.
IN_USE: set[tuple] = set()
IN_USE_LOCK = threading.Lock()


@contextlib.contextmanager
def recorded_workspace(like: torch.Tensor, m: int) -> Iterator[tuple[Krylov, dict[int, Replayed]]]:
    """The kept workspace for vectors like `like` and m steps that no cycle is using, with its
    recorded steps, held for the caller's cycle."""
    shape = (*like.shape, m, like.dtype, like.device)
    with IN_USE_LOCK:
        key = next(k for k in ((*shape, copy) for copy in itertools.count()) if k not in IN_USE)
        if key not in WORKSPACES:
            WORKSPACES[key] = Krylov.new(like, m, recorded=True), {}
            if len(WORKSPACES) > KEPT_WORKSPACES:
                WORKSPACES.popitem(last=False)
        WORKSPACES.move_to_end(key)
        IN_USE.add(key)
        workspace = WORKSPACES[key]
    try:
        yield workspace
    finally:
        with IN_USE_LOCK:
            IN_USE.discard(key)


@dataclass(frozen=True)
class GMRES(ScaledLinearSolver):
    """Solve A x = b for a batch (B, N): sample b stops when ||b - A x|| <= max(atol, rtol ||b||).

    `restart` is the Krylov dimension between restarts and `max_iters` bounds the Arnoldi steps
    per sample, one operator application each (the residual at x0 and after each cycle that
    leaves a sample running take one more: 22 at most for max_iters=20 = restart from x0); the
    2-norm is used, as in scipy.sparse.linalg.gmres.
    `check_every` is the number of Arnoldi steps between reads of whether any sample still runs
    (None: 1 on a CPU, ARNOLDI_CHECK elsewhere); it changes the products spent, and x only by
    rounding (a longer cycle adds zero-weighted basis vectors to each sample's sum).
    With `graph`, on a device with a recorder (graphs.RECORDERS: CUDA) each Arnoldi step j
    after the operator is recorded once on a workspace kept per shape and replayed by later
    solves (its first solve runs it eagerly, the second records it); elsewhere it runs
    eagerly. A sample whose b has a part outside a singular A's range stops unconverged where
    its Krylov space breaks down (see BREAKDOWN).
    """

    restart: int = 20
    check_every: int | None = None
    graph: bool = False
    # Its least-squares solve's triangular solve has no half-precision kernel.
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float64)

    def __post_init__(self) -> None:
        super().__post_init__()
        integer("restart", self.restart)
        if self.check_every is not None:
            integer("check_every", self.check_every)
        flag("graph", self.graph)

    def _solve(
        self,
        A: LinearOperator,
        b: torch.Tensor,
        x0: torch.Tensor | None,
        tol: torch.Tensor,
    ) -> tuple[torch.Tensor, LinearSolveInfo]:
        """GMRES on b of order 1 (see ScaledLinearSolver)."""
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        x, r, matvecs = self._start(A, b, x0)
        beta = r.norm(dim=1)
        active = beta > tol
        # Not read before the first cycle: a batch that starts solved (b = 0, or an exact x0)
        # is rare, and takes `every` masked steps.
        every = self.check_every or (1 if b.device.type == "cpu" else ARNOLDI_CHECK)
        total = 0
        # Samples whose Krylov space has not broken down (see BREAKDOWN): a restart of one
        # that has leaves its residual as it was, so it stops there.
        running = torch.ones_like(active)
        while total < self.max_iters:
            correction, cycle, steps, estimate, whole, finished = self._cycle(
                A, r, beta, tol, active, self.max_iters - total, every
            )
            x = x + correction
            iterations += cycle
            total += steps
            matvecs += steps
            running &= whole
            if finished or not bool((active & running & (estimate > tol)).any()):
                # The Arnoldi estimate is the residual norm of x (exact in exact arithmetic):
                # trusting it when every sample has stopped saves a product with A. Rounding
                # x0 + correction moves the true residual by about eps ||A|| ||x0||, far below
                # tol from 0 or b (the implicit adjoint's starts); from a guess 1e5 times the
                # solution a float32 solve at rtol 1e-4 reads converged 200x above tol.
                beta = estimate
                break
            r = b - A(x)
            matvecs += 1
            beta = r.norm(dim=1)
            active = (beta > tol) & running
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
        every: int,
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, bool]:
        """One restart cycle from residual r, read every `every` steps: correction to x,
        per-sample steps, Arnoldi steps, the per-sample estimate of the new residual norm,
        whether each sample kept all its steps (one that broke down keeps the correction and
        estimate of the steps before: see BREAKDOWN), and whether a read found every sample
        stopped (the caller reads that itself after a full cycle)."""
        m = min(self.restart, budget)
        graphed = self.graph and r.device.type in RECORDERS
        held = (
            recorded_workspace(r, m) if graphed else contextlib.nullcontext((Krylov.new(r, m), {}))
        )
        with held as (k, recorded):
            return self._cycle_in(k, recorded, graphed, A, r, beta, tol, active, every)

    def _cycle_in(
        self,
        k: Krylov,
        recorded: dict[int, Replayed],
        graphed: bool,
        A: LinearOperator,
        r: torch.Tensor,
        beta: torch.Tensor,
        tol: torch.Tensor,
        active: torch.Tensor,
        every: int,
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, bool]:
        """`_cycle` in workspace k, whose Arnoldi steps are `recorded` where `graphed`."""
        m = k.size
        tiny = torch.finfo(r.dtype).tiny
        beta_column, tol_column = beta[:, None], tol[:, None]
        u = torch.div(r, beta_column.clamp_min(tiny), out=k.basis[:, 0])
        row = k.row(0).fill_(1.0)
        # Column 0 of rows 1, 2, ...: times beta, +- the residual norm after 1, 2, ... steps.
        # Each sample's own stopping step is read from it at the end, so that a step spends no
        # operation on per-sample counters.
        first = k.q[:, 1:, 0]
        j, finished = 0, False
        while j < m and not finished:
            w = A(u)[:, None]
            if graphed:
                k.w.copy_(w)
                if j not in recorded:
                    # A step's scratch dies within it (its results are the workspace's), so
                    # every step of a workspace records into step 0's memory pool.
                    shares = recorded[0].recorder if recorded else None
                    recorder = RECORDERS[r.device.type](r.device, shares)
                    step = partial(arnoldi, k, j, k.w, k.row(j), tiny)
                    recorded[j] = Replayed(step, (k.basis, k.hess, k.q, k.cosines), recorder)
                recorded[j]()
            else:
                row = arnoldi(k, j, w, row, tiny)
            j += 1
            u = k.basis[:, j]
            if j % every == 0 and j < m:
                # The newest estimate alone: each is the last times |s| <= 1, so a sample whose
                # estimate has fallen to tol stays there, and one that did not run (beta <= tol)
                # starts there.
                finished = not bool(((first[:, j - 1 : j] * beta_column).abs() > tol_column).any())
        # The residual norms before and after each step (column 0 of Q's rows 0, 1, ... times
        # beta). A sample stops at its first step whose estimate is not above tol (converged,
        # or NaN, which every later estimate repeats): since estimates never grow, as many
        # steps as the estimates above tol, its start's included.
        estimates = k.q[:, : j + 1, 0] * beta_column
        steps = (estimates.abs() > tol_column).sum(1).clamp_max_(j) * active
        # Row i of Q: c_i times q's row i up to the diagonal, and s_i just right of it (flat
        # entry i (m + 2) + 1). The zeros further right are scaled by 1, not c_i, so that they
        # stay +0 (c_i 0 would be -0 where c_i < 0) and R is the one a per-step scaling gives.
        left = torch.ones(j, j + 1, dtype=torch.bool, device=r.device).tril()
        k.q[:, :j, : j + 1].mul_(torch.where(left, k.cosines[:, :j], 1.0))
        upper = torch.bmm(k.q[:, :j, : j + 1], k.hess[:, : j + 1, :j])
        positions = torch.arange(j, device=r.device)
        kept = kept_steps(upper, k.hess[:, : j + 1, :j], steps, positions)
        estimate = estimates.gather(1, kept[:, None])[:, 0].abs()
        used = positions[None, :] < kept[:, None]
        eye = torch.eye(j, dtype=r.dtype, device=r.device).expand_as(upper)
        upper = torch.where(used[:, None, :] & used[:, :, None], upper, eye)
        rhs = torch.where(used, beta_column * k.q[:, :j, 0], 0.0)
        y = torch.linalg.solve_triangular(upper, rhs[:, :, None], upper=True)[:, :, 0]
        return combine(y, k.basis[:, :j]), steps, j, estimate, kept == steps, finished
