"""Backward passes for a fixed point z* = f(z*): implicit (GMRES / Neumann), JFB, unrolled.

Each attaches z* to the graph before the solve returns (`evaluations` of f, counted in the
forward statistics) and fills the statistics' backward fields when backward() runs.

The implicit adjoints use the implicit function theorem (the paper's Eq. 6): for the incoming
gradient v = dL/dz*, solve (I - J_f(z*))^T g = v, then one VJP of f at z* maps g to the
parameters and inputs f closes over. No step of the forward solver is backpropagated.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.autograd.forward_ad as fwAD

from raydeq.solvers.gmres import GMRES, LinearOperator, LinearSolveInfo
from raydeq.solvers.linear import Neumann
from raydeq.solvers.options import construct, flag, named
from raydeq.solvers.stats import SolveStats

Map = Callable[[torch.Tensor], torch.Tensor]
LinearSolver = Callable[
    [LinearOperator, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, LinearSolveInfo]
]


# Autograd runs a backward hook in grad mode only under create_graph=True.
SECOND_ORDER = (
    "adjoint='gmres' and adjoint='fixed_point' give first derivatives only: the linear solve "
    "and z* are constants to autograd, so a backward with create_graph=True (a gradient "
    "penalty, a Hessian-vector product) would differentiate a wrong graph; use "
    "adjoint='unrolled' for higher derivatives, and for a Jacobian-vector product (which "
    "torch.autograd.functional.jvp takes by a double backward) torch.autograd.forward_ad"
)

# A backward in the dual level of the forward pass's tangents differentiates the gradient.
FORWARD_OVER_REVERSE = (
    "adjoint='gmres' and adjoint='fixed_point' give first derivatives only: a backward within "
    "the torch.autograd.forward_ad dual level whose tangents f carries (forward-over-reverse, "
    "a Hessian-vector product) would need the tangent of the linear solve; run the backward "
    "after the dual level, or use adjoint='unrolled' for higher derivatives"
)

# A backward or tangent batched by vmap: what makes one, and what to call instead.
BATCHED = {
    "backward": (
        "torch.autograd.grad(is_grads_batched=True), torch.autograd.functional.jacobian("
        "vectorize=True), gradcheck(check_batched_grad=True)",
        "one backward per row (torch.autograd.functional.jacobian's default vectorize=False)",
    ),
    "tangent": (
        "torch.autograd.functional.jacobian(strategy='forward-mode', vectorize=True)",
        "one tangent per torch.autograd.forward_ad dual level, or the reverse-mode jacobian",
    ),
}


# Who cannot take a batched backward or tangent (ImplicitAdjoint), why, and what can.
IMPLICIT = (
    "adjoint='gmres' and adjoint='fixed_point'",
    "their linear solver reads each sample's residual on the host",
    "adjoint='unrolled'",
)


def unbatched(t: torch.Tensor, what: str, who: tuple[str, str, str] = IMPLICIT) -> None:
    """Raise a RuntimeError naming the batched backward or tangent (`what`), `who` cannot take
    it and why, and what to call instead, where t is batched by vmap: the implicit adjoints'
    linear solve failed in torch's batching rules ("Batching rule not implemented for
    aten::div.out") or, for a tangent, detach."""
    functorch = torch._C._functorch
    if functorch.is_legacy_batchedtensor(t) or functorch.is_batchedtensor(t):
        makers, instead = BATCHED[what]
        name, reason, alternative = who
        raise RuntimeError(
            f"{name} cannot take a batched {what} ({makers}, or any vmap over the {what}): "
            f"{reason}; take {instead}, or use {alternative}"
        )


@dataclass
class ImplicitAdjoint:
    """Implicit differentiation with a matrix-free linear solver on VJPs of f at z*.

    With warm_start the incoming gradient v is the initial guess (exact when J = 0). From 0,
    GMRES searches a space that holds the one it searches from v with the same products, so
    within one restart cycle it never needs more of them (on 8 test batches of the trained
    mnist_dense and of mnist_mdeq, whose max_iters is at most the restart of 20, each took the
    same number both ways); a solve that restarts goes on from other iterates, and from 0 it
    took one product more in 28 of 100 random systems of width 64 (rtol 1e-8, restart 20).
    The answers differ within the tolerance, and at max_iters, and training follows:
    mnist_mdeq's Vanilla Continuous DEQ trained from 0 reached 44.0% test accuracy after its
    250 steps against 61.2% from v, at 22 forward evaluations per solve instead of 8 (one seed
    of a run that rounding alone moves by tens of points:
    benchmarks/results/2026-12-02-mnist_mdeq-rounding-spread.md).
    """

    linear_solver: LinearSolver = field(default_factory=GMRES)
    warm_start: bool = True
    differentiates_solver = False
    evaluations = 1  # f(z*), which attaches z* to the graph

    def __post_init__(self) -> None:
        solver = self.linear_solver
        if isinstance(solver, type) or not callable(solver):
            raise TypeError(
                f"linear_solver={reprlib.repr(solver)} must be a linear solver such as GMRES() "
                "or Neumann(), an instance called as solver(A, b, x0) -> (x, info)"
            )
        flag("warm_start", self.warm_start)

    def recorded(self) -> ImplicitAdjoint:
        """This adjoint with GMRES's Arnoldi steps recorded as graphs (GMRES.graph); another
        linear solver runs as it is."""
        if not isinstance(self.linear_solver, GMRES):
            return self
        return replace(self, linear_solver=replace(self.linear_solver, graph=True))

    def rounding_in(self, dtype: torch.dtype) -> ImplicitAdjoint:
        """This adjoint with Neumann's resolution at least the epsilon of `dtype`, the one f
        computes in, whose VJPs round at it; another linear solver runs as it is."""
        solver = self.linear_solver
        eps = torch.finfo(dtype).eps
        if not isinstance(solver, Neumann) or solver.resolution >= eps:
            return self
        return replace(self, linear_solver=replace(solver, resolution=eps))

    def attach(
        self, f: Map, z_star: torch.Tensor, z0: torch.Tensor, stats: SolveStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return f(z*) whose backward solves the adjoint system instead of differentiating f,
        as the attached z* and as f's image of z*.

        The hook sits on a view of f(z*) so that the VJPs it takes of f(z*) do not re-enter it.
        f is given a copy of z*, so that one changing its input in place is refused by the
        solver's check (f_flat) rather than by autograd, which refuses it on a leaf. Where
        nothing else f(z*) depends on needs a gradient (frozen parameters, an x without one),
        f(z*) is returned without a graph, as a torch module's output is there.
        Within a torch.autograd.forward_ad dual level, where f closes over dual tensors, the
        output's tangent is the implicit one (`tangent`), not f's at a constant z*.
        """
        z_star = z_star.detach().requires_grad_()
        with torch.enable_grad():
            fz = f(z_star.clone())
        tangent = self.tangent(f, z_star.detach(), fz, stats)
        if not needs_gradient_beside(fz, (z_star,)):
            out = with_tangent(fz.detach(), tangent)
            return out, out
        z_out = fz.view_as(fz)

        def vjp(u: torch.Tensor) -> torch.Tensor:
            product = torch.autograd.grad(
                fz, z_star, u, retain_graph=True, allow_unused=True, materialize_grads=True
            )[0]
            if fwAD.unpack_dual(product).tangent is not None:
                raise RuntimeError(FORWARD_OVER_REVERSE)
            return product

        def solve_adjoint(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None:  # an undefined gradient, a zero one: g = 0, left undefined
                return None
            if torch.is_grad_enabled():
                raise RuntimeError(SECOND_ORDER)
            unbatched(v, "backward")
            v = v.to(fz.dtype)
            # A backward() called inside torch.autocast runs this hook under it, where GMRES's
            # products would come out in half precision beside its float32 workspace.
            with torch.autocast(v.device.type, enabled=False):
                g, info = self.linear_solver(
                    lambda u: u - vjp(u), v, v if self.warm_start else None
                )
            stats.backward_nvjp += info.matvecs + 1
            stats.backward_converged = info.converged
            return g

        z_out.register_hook(solve_adjoint)
        out = with_tangent(z_out, tangent)
        return out, out

    def tangent(
        self, f: Map, z_star: torch.Tensor, fz: torch.Tensor, stats: SolveStats
    ) -> torch.Tensor | None:
        """The forward-mode tangent of z*, or None outside a dual level or where f closes over
        no dual tensor: z*' solves (I - J_f(z*)) z*' = b, b the tangent of f(z*) at a constant
        z* (what the closed-over tangents give), by the linear solver on Jacobian-vector
        products. f at a dual z* with tangent u has the tangent J u + b, so each product is one
        evaluation of f, counted in stats.nfe. Without this the tangent was b alone, or none
        where f(z*) needed no gradient: silently wrong (torch.autograd.functional.jacobian
        with strategy="forward-mode" was off by up to 1.17 in an entry of dz*/dx on a tanh
        layer of width 6, unrolled's within 3e-10)."""
        b = fwAD.unpack_dual(fz).tangent
        if b is None:
            return None
        unbatched(b, "tangent")
        b = b.detach()  # computed in grad mode: its own graph reaches z*

        def jvp(u: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return fwAD.unpack_dual(f(fwAD.make_dual(z_star.clone(), u))).tangent - b

        with torch.autocast(b.device.type, enabled=False):
            dz, info = self.linear_solver(lambda u: u - jvp(u), b, b if self.warm_start else None)
        stats.nfe += info.matvecs
        return dz


class JacobianFree:
    """Jacobian-free backprop (Fung et al. 2022): take g = v, i.e. drop (I - J)^-T."""

    differentiates_solver = False
    evaluations = 1  # f(z*), which attaches z* to the graph

    def tangent(
        self, f: Map, z_star: torch.Tensor, fz: torch.Tensor, stats: SolveStats
    ) -> torch.Tensor | None:
        """f's forward-mode tangent at a constant z*, the approximation g = v makes."""
        return fwAD.unpack_dual(fz).tangent

    def attach(
        self, f: Map, z_star: torch.Tensor, z0: torch.Tensor, stats: SolveStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return f(z*) backpropagated through one application of f, as the attached z* and
        as f's image of z*; the counting hook sits on a view, so that an f returning a tensor
        it closes over leaves that tensor unhooked."""
        with torch.enable_grad():
            z_out = f(z_star.detach())
        if z_out.requires_grad:
            z_out = z_out.view_as(z_out)
            z_out.register_hook(lambda v: _count(stats, 1, v))
        return z_out, z_out


class Unrolled:
    """Backpropagation through every step of the forward solver (its graph is kept)."""

    differentiates_solver = True
    evaluations = 0

    def __init__(self) -> None:
        self.stats: SolveStats | None = None

    def counting(self, f: Map) -> Map:
        """f, each of whose outputs adds one VJP to the solve's statistics when a backward
        passes through it: the evaluations a backward reaches, not the caller's initial_nfe,
        the last one (whose output only measures the residual), one that picks the first step
        or a step left out of every sample's path."""

        def counted(z: torch.Tensor) -> torch.Tensor:
            out = f(z)
            if out.requires_grad:
                out = out.view_as(out)
                out.register_hook(self._add_vjp)
            return out

        return counted

    def _add_vjp(self, v: torch.Tensor) -> None:
        """Count one backward VJP of f."""
        self.stats.backward_nvjp += 1

    def attach(
        self, f: Map, z_star: torch.Tensor, z0: torch.Tensor, stats: SolveStats
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return z* as the solver left it, and f's image of z* where it evaluated one (else
        None); the VJPs its backward takes are counted in stats.
        The samples whose z* is still z0 (met the tolerance there, or never improved on it),
        which no step reaches, and a batch of no samples, which takes no step, are f(z*)
        instead (one more evaluation, counted in stats.nfe): without it their backward reached
        f's parameters through no evaluation, and a batch without a graph failed in autograd
        ("element 0 of tensors does not require grad") or, on the paths that select each
        step's samples, gave zero gradients; now each gives one evaluation's, in any batch.
        That evaluation, of every sample, is the image: kept on the adjoint, which the graph's
        counting hooks hold, it would close a cycle through autograd's graph that no garbage
        collection frees."""
        self.stats = stats
        stayed = (z_star == z0).all(dim=1, keepdim=True)
        if z_star.shape[0] > 0 and not bool(stayed.any()):
            return z_star, None
        stats.nfe += 1
        image = f(z_star)
        return torch.where(stayed, image, z_star), image


def in_dual_level() -> bool:
    """Whether a torch.autograd.forward_ad dual level is open (torch keeps it in a module
    attribute, -1 outside one; it has no public reader)."""
    return fwAD._current_level >= 0


def tangent_without_graph(
    backward: ImplicitAdjoint | JacobianFree, f: Map, z_star: torch.Tensor, stats: SolveStats
) -> torch.Tensor:
    """z* with the tangent `backward` gives it where nothing attaches z* to autograd's graph
    (under no_grad, in a dual level), from one more evaluation of f at z* (counted in
    stats.nfe); z* itself where f closes over no dual tensor."""
    fz = f(z_star)
    stats.nfe += 1
    return with_tangent(z_star, backward.tangent(f, z_star, fz, stats))


def with_tangent(out: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
    """out with its forward-mode tangent replaced by `tangent` (out itself where None)."""
    if tangent is None:
        return out
    return fwAD.make_dual(fwAD.unpack_dual(out).primal, tangent)


def needs_gradient_beside(out: torch.Tensor, leaves: tuple[torch.Tensor, ...]) -> bool:
    """Whether out's graph reaches a tensor needing a gradient other than `leaves`, or a custom
    autograd.Function's node (`gradient_ends`): found after a few nodes where f has a trainable
    parameter; the whole of f's graph is walked only where none is found."""
    return any(True for _ in gradient_ends(out, leaves))


def gradient_ends(
    out: torch.Tensor, stops: tuple[torch.Tensor, ...]
) -> Iterator[torch.Tensor | torch.autograd.graph.Node]:
    """What out's graph reaches that may need a gradient, walking no further than the tensors
    `stops` (a stop with a graph ends the walk at its node, a leaf is not yielded): each leaf
    needing a gradient, from its gradient accumulator, which every graph ends in, and each
    custom autograd.Function's node, whose backward may accumulate gradients the graph does not
    show (torch.utils.checkpoint with use_reentrant=True), walked past. An out that is itself a
    leaf needing a gradient (an f returning a parameter or x as it is) has no graph to walk."""
    if out.grad_fn is None:
        if out.requires_grad and not any(out is stop for stop in stops):
            yield out
        return
    ends = {stop.grad_fn for stop in stops if stop.grad_fn is not None}
    stack = [out.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in ends:
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            yield node
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and not any(variable is stop for stop in stops):
            yield variable
        stack.extend(next_node for next_node, _ in node.next_functions)


def _count(stats: SolveStats, nvjp: int, v: torch.Tensor) -> torch.Tensor:
    """Add nvjp backward VJPs to stats, passing the gradient through."""
    stats.backward_nvjp += nvjp
    return v


Adjoint = ImplicitAdjoint | JacobianFree | Unrolled
# The adjoints that solve a linear system per sample (ImplicitAdjoint).
IMPLICIT_ADJOINTS = ("gmres", "fixed_point")


def make_adjoint(name: str, options: dict) -> Adjoint:
    """The adjoint named by `adjoint=`."""
    what = f"adjoint={name!r}"
    if name in IMPLICIT_ADJOINTS:
        options = dict(options)
        warm_start = options.pop("warm_start", True)
        kind = GMRES if name == "gmres" else Neumann
        linear = construct("adjoint_options", what, kind, options, ("warm_start",))
        with named("adjoint_options", {"warm_start": warm_start}):
            return ImplicitAdjoint(linear, warm_start)
    return construct("adjoint_options", what, JacobianFree if name == "jfb" else Unrolled, options)
