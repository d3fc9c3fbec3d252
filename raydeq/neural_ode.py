"""The Neural ODE baseline: dz/dt = f(z, x) - z or f(z, x) over [0, t1], output f(z(t1), x).

The form is the paper's reference code's (DeepEquilibriumNetworks.jl: dz/dt = f(z, x) in the
0.2.x `src/layers/neuralode.jl` its experiments ran on, f(z, x) - z in the later
`src/layers/evaluate.jl`; both output f(z(1), x)). It integrates with the continuous DEQ's own
solvers (VCAB3, Tsit5, BS3, Euler; see raydeq/solvers/interval.py), as the paper's baseline
does. The continuous adjoint (Chen et al. 2018) integrates z, its adjoint a = dL/dz and the
parameters' adjoint backwards from t1 with the same solver and tolerances, so no step of the
forward pass is stored; adjoint="backprop" differentiates through the forward steps instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from raydeq.deq import (
    LAYER_CALLS,
    Cell,
    LayerOutput,
    OutputLayer,
    check_modules,
    draw_new_masks,
    held_by_termination,
    initial_state,
    residual_stats,
    settings,
    solver_start,
    variational_dropouts,
    weights_once,
    zero_state_hint,
)
from raydeq.solvers import SolveStats, Termination
from raydeq.solvers.adjoint import gradient_ends, unbatched
from raydeq.solvers.interval import INTERVAL_SOLVERS, Endpoint, integrate
from raydeq.solvers.options import choice, function, integer, number
from raydeq.solvers.state import Structure, outside_compiled_graphs, untransformed, valued

NODE_ADJOINTS = ("continuous", "backprop")
# "f_minus_z": dz/dt = f(z, x) - z (the continuous DEQ's flow); "f": dz/dt = f(z, x).
NODE_DYNAMICS = ("f_minus_z", "f")


@dataclass(frozen=True)
class Problem:
    """One forward pass: f, the batch's flat structure, the interval, solver and tolerances."""

    f: Cell
    structure: Structure
    shape: torch.Size
    t1: float
    dynamics: str
    solver: str
    termination: Termination
    max_steps: int
    # The dtype f takes the state in: a module in half precision its own, while the
    # integration keeps float32; None under autocast, where f takes the float32 state.
    given: torch.dtype | None = None

    def field(
        self, x: Tensor, tensors: dict[str, Tensor] | None = None
    ) -> Callable[[Tensor], Tensor]:
        """dz/dt = f(z, x) - z or f(z, x) (`dynamics`) on the (1, M) row that holds the batch's
        flat (B, N) state; f runs with its parameters and buffers replaced by `tensors` where
        given (torch.func.functional_call)."""
        s = self.structure
        minus_z = self.dynamics == "f_minus_z"
        f = self.f if tensors is None else partial(_called_with, self.f, tensors)

        def flow(row: Tensor) -> Tensor:
            z = row.reshape(self.shape)
            given = z if self.given in (None, z.dtype) else z.to(self.given)
            fz = s.flatten(f(s.unflatten(given), x)).to(z.dtype)
            return (fz - z if minus_z else fz).reshape(1, -1)

        return flow

    def integrate(
        self, field: Callable[[Tensor], Tensor], y: Tensor, t1: float, backward: bool = False
    ) -> Endpoint:
        """Integrate a row from 0 to t1 with the problem's solver and tolerances (`backward`:
        the adjoint's, from t1 back to 0, as its errors say)."""
        return integrate(field, y, t1, self.solver, self.termination, self.max_steps, backward)


def _called_with(f: nn.Module, tensors: dict[str, Tensor], *args: Any) -> Any:
    """f(*args) run with its parameters and buffers replaced by `tensors`."""
    return functional_call(f, tensors, args)


def _tensors_of(f: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers f runs with now (under torch.func.functional_call, the
    call's), by name."""
    return {**dict(f.named_parameters()), **dict(f.named_buffers())}


def _replaced(f: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """tensors, or None where they are f's own (f runs as it is, without functional_call's
    cost of swapping every tensor on each evaluation)."""
    own = _tensors_of(f)
    return None if all(own.get(n) is t for n, t in tensors.items()) else tensors


@dataclass
class Record:
    """What a forward pass hands to its backward: the forward integration's counts, and the
    statistics the backward adds its vector-Jacobian products to.

    It holds no tensor: the backward's node and the output's hook refer to it, and a tensor of
    the graph held here would close a reference cycle through autograd's graph, which Python's
    collector cannot see, and keep each step's graph alive for good.
    """

    nfe: int = 0
    path_nfe: int = 0
    steps: int = 0
    stats: SolveStats | None = None

    def count(self, end: Endpoint) -> Tensor:
        """Take the counts of a forward integration; returns its state at t1."""
        self.nfe, self.path_nfe, self.steps = end.nfe, end.path_nfe, end.steps
        return end.y


# A module's mode and the mask it holds: what f's evaluations depend on besides their inputs.
Dropout = tuple[nn.Module, bool, Tensor | None]


def _dropouts(f: nn.Module) -> list[Dropout]:
    """The mode and mask of each variational dropout in f, as they are now."""
    return [(m, m.training, m.mask) for m in variational_dropouts(f)]


@contextmanager
def _as_held(dropouts: list[Dropout]) -> Iterator[None]:
    """Give each variational dropout the mode and mask it held (f as a forward pass ran it),
    and the ones it holds now back afterwards: a later forward pass draws new masks, and a
    backward must differentiate the f its forward pass integrated."""
    now = [(m, m.training, m.mask) for m, _, _ in dropouts]
    try:
        for m, training, mask in dropouts:
            m.training, m.mask = training, mask
        yield
    finally:
        for m, training, mask in now:
            m.training, m.mask = training, mask


SECOND_ORDER = (
    "adjoint='continuous' gives first derivatives only: its backward integrates the adjoint "
    "system without a graph, so a backward with create_graph=True (a gradient penalty, a "
    "Hessian-vector product) would differentiate a wrong graph; use adjoint='backprop' for "
    "higher derivatives"
)


# What the continuous adjoint cannot differentiate batched (solvers.adjoint.unbatched).
CONTINUOUS = (
    "adjoint='continuous'",
    "its backward integration reads its step sizes on the host",
    "adjoint='backprop'",
)
FORWARD_MODE = (
    "adjoint='continuous' gives no forward-mode derivative (torch.autograd.forward_ad, "
    "torch.autograd.functional.jacobian(strategy='forward-mode')): it integrates the adjoint "
    "system backwards in time; use adjoint='backprop', which carries the tangents through "
    "the solver's steps, or a reverse-mode jacobian"
)


class ContinuousAdjoint(torch.autograd.Function):
    """z(t1) in the forward pass; in the backward pass, [z, a, g] integrated from t1 back to 0
    by ds = -dt: dz/ds = -F(z), da/ds = a^T dF/dz, dg/ds = a^T dF/d(x, params), with F the
    forward field (problem.field: f(z, x) - z or f(z, x)), a(t1) the incoming gradient and
    g(t1) = 0; g(0) is the gradient of x and the parameters. Each backward evaluation is one f
    and one vector-Jacobian product, counted in stats.backward_nvjp; f runs with the
    parameters and buffers of the forward pass (those of a torch.func.functional_call, which
    has put f's own back by then), its variational dropouts with the forward's modes and
    masks."""

    @staticmethod
    def forward(
        ctx: Any,
        problem: Problem,
        record: Record,
        y0: Tensor,
        x: Tensor,
        names: tuple[str, ...],
        *params: Tensor,
    ) -> Tensor:
        """Integrate to t1 (its counts go to `record`); returns z(t1). params are f's trained
        tensors, called `names` in f."""
        y1 = record.count(problem.integrate(problem.field(x), y0, problem.t1))
        ctx.problem, ctx.record, ctx.names = problem, record, names
        # f's other tensors as they are now: frozen parameters and buffers.
        ctx.constants = {n: t for n, t in _tensors_of(problem.f).items() if n not in names}
        # The masks the integration drew, which a later forward pass replaces.
        ctx.dropouts = _dropouts(problem.f)
        # The backward evaluates f again: under the forward's autocast, as its f ran.
        device = y0.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(y1, x, *params)
        return y1

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """Integrate the adjoint system back to 0 and return the gradients it accumulated."""
        if torch.is_grad_enabled():  # create_graph=True: autograd runs a backward in grad mode
            raise RuntimeError(SECOND_ORDER)
        unbatched(grad_y, "backward", CONTINUOUS)
        y1, x, *params = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(), *params]
        sizes = [y1.numel(), y1.numel(), *(t.numel() for t in inputs)]
        problem: Problem = ctx.problem
        tensors = _replaced(
            problem.f, {**ctx.constants, **dict(zip(ctx.names, params, strict=True))}
        )
        field = problem.field(inputs[0], tensors)

        def augmented(row: Tensor) -> Tensor:
            z, a, *_ = row.split(sizes, dim=1)
            with torch.enable_grad():
                z = z.detach().requires_grad_()
                flow = field(z)
                # Within the caller's parametrize.cached(), every evaluation shares the weights
                # computed on entry (weights_once), and with them their graph.
                vjps = torch.autograd.grad(
                    flow,
                    [z, *inputs],
                    a,
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            return torch.cat([-flow.detach(), *(v.reshape(1, -1) for v in vjps)], dim=1)

        zeros = [torch.zeros(1, t.numel(), dtype=y1.dtype, device=y1.device) for t in inputs]
        start = torch.cat([y1, grad_y, *zeros], dim=1)
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled), _as_held(ctx.dropouts):
            end = problem.integrate(augmented, start, problem.t1, backward=True)
        ctx.record.stats.backward_nvjp += end.nfe
        grads = end.y.split(sizes, dim=1)[1:]
        shaped = [g.reshape(t.shape) for g, t in zip(grads, [y1, *inputs], strict=True)]
        return None, None, *shaped[:2], None, *shaped[2:]

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> Tensor:
        """Refuse forward mode, naming the adjoint that gives it (torch's own error named
        neither the layer nor an alternative)."""
        raise RuntimeError(FORWARD_MODE)


def check_differentiated(fz: Tensor, differentiated: tuple[Tensor, ...], x: Tensor) -> None:
    """Raise a ValueError where the output f(z(t1), x), flat, depends on a tensor needing a
    gradient that the continuous adjoint does not differentiate, beside z(t1), f's argument x
    and f's trained parameters (`differentiated`): a tensor f closes over (an attribute set
    from another layer's output, or from x) got its gradient from the output's evaluation of f
    alone, silently (an encoder's weights feeding f's attribute 3% off backprop's, x's 1.6%)."""
    for end in gradient_ends(fz, differentiated):
        if isinstance(end, Tensor):
            what = "x itself" if end is x else f"a tensor of shape {tuple(end.shape)}"
            raise ValueError(
                "adjoint='continuous' differentiates f's parameters and its argument x alone, "
                f"but f(z, x) also depends on {what} needing a gradient through a tensor f "
                "closes over (an attribute set from another layer's output or from x), whose "
                "gradient would miss the integration; give that tensor to the layer within x, "
                "make it a parameter of f, or use adjoint='backprop'"
            )


def check_settings(
    f: object, t1: float, dynamics: str, solver: str, adjoint: str, max_steps: int
) -> None:
    """Raise for a Neural ODE setting out of its range, naming it and what is allowed (set on
    the layer after it was made, t1 = -1 integrated nothing and dynamics = "F" took dz/dt = f,
    silently)."""
    number("t1", t1, "(0, inf)")
    choice("dynamics", dynamics, NODE_DYNAMICS)
    choice("solver", solver, INTERVAL_SOLVERS)
    choice("adjoint", adjoint, NODE_ADJOINTS)
    integer("max_steps", max_steps)
    function("f", f, LAYER_CALLS["f"])
    if adjoint == "continuous" and not isinstance(f, nn.Module):
        raise TypeError(
            f"adjoint='continuous' needs f as an nn.Module, got {type(f).__name__}: its "
            "backward differentiates f.parameters(); wrap f in a module or use "
            "adjoint='backprop'"
        )


class NeuralODE(OutputLayer):
    """Neural ODE baseline: integrate dz/dt = F(z) from z(0) = 0 over [0, t1], output f(z(t1), x).

    f is the cell f(z, x) -> z, an nn.Module (adjoint="continuous" differentiates its
    parameters) or, with adjoint="backprop", any other callable.
    dynamics picks F: "f_minus_z" (default) f(z, x) - z, the continuous DEQ's flow and the
    later reference library's (DeepEquilibriumNetworks.jl v1 `src/layers/evaluate.jl`); "f"
    f(z, x), the paper's experiments (reference 0.2.x `src/layers/neuralode.jl`). As there, the
    output is one more evaluation f(z(t1), x), differentiated by autograd (the adjoint receives
    dL/dz(t1) through it). solver is one of the continuous DEQ's solvers (INTERVAL_SOLVERS),
    with accuracy-controlled steps over the fixed interval; abstol / reltol are its RMS
    tolerances. adjoint="continuous" (the paper's baseline) trains by the continuous adjoint
    (ContinuousAdjoint), "backprop" by backpropagating through the accepted steps; the former
    differentiates x and f's parameters, and refuses an f that closes over another tensor
    needing a gradient (check_differentiated). stats.nfe counts forward evaluations of f (the
    output's included), stats.steps the steps (rejected ones too), stats.backward_nvjp after
    backward() the vector-Jacobian products of f (the output's, then the continuous adjoint's
    evaluations of the augmented system, each also evaluating f, or for backprop the
    evaluations on the accepted steps but the field at t1).
    stats.residual is ||f(z(t1), x) - z(t1)|| from the output's evaluation and converged
    applies the DEQ test with abstol / reltol to it. skip_loss and jac_loss are 0. Raises
    IntegrationError (a RuntimeError) when an integration needs more than max_steps steps,
    its step size falls too small to move t (a solution that blows up before t1), or the
    norms of a finite state overflow (entries past about 1e19 in float32).
    Each forward pass draws new masks for f's variational dropouts, and in training mode
    refuses a dropout drawing one at every evaluation of f (nn.Dropout), as DEQ does; repr
    names every setting;
    abstol and reltol set on the layer later are checked and integrated with as given.
    Module backward hooks are refused (OutputLayer): hook out.z's tensors instead.
    """

    abstol = held_by_termination("abstol")
    reltol = held_by_termination("reltol")

    def __init__(
        self,
        f: Cell,
        t1: float = 1.0,
        dynamics: str = "f_minus_z",
        solver: str = "vcab3",
        adjoint: str = "continuous",
        abstol: float = 1e-3,
        reltol: float = 1e-3,
        max_steps: int = 10_000,
    ) -> None:
        super().__init__()
        check_settings(f, t1, dynamics, solver, adjoint, max_steps)
        self.f = f
        self.t1 = float(t1)
        self.dynamics = dynamics
        self.solver = solver
        self.adjoint = adjoint
        self.termination = Termination(abstol, reltol)
        self.max_steps = max_steps

    def extra_repr(self) -> str:
        """The settings the layer integrates with, for its repr."""
        return settings(
            t1=self.t1,
            dynamics=self.dynamics,
            solver=self.solver,
            adjoint=self.adjoint,
            abstol=self.termination.abstol,
            reltol=self.termination.reltol,
            max_steps=self.max_steps,
        )

    @outside_compiled_graphs("NeuralODE", "f.compile() compiles the cell's evaluations")
    def forward(self, x: Tensor) -> LayerOutput:
        """Integrate to t1 with new dropout masks and return f(z(t1), x) with its statistics;
        the settings are checked as at construction, as each may be set on the layer after."""
        untransformed(type(self).__name__)
        check_settings(self.f, self.t1, self.dynamics, self.solver, self.adjoint, self.max_steps)
        if isinstance(x, Tensor):
            valued("x", x)
        if self.training:
            check_modules(self.f, None)
        draw_new_masks(self)
        with zero_state_hint(self.f, x), weights_once(self, norms_once=False):
            return self._integrate(x)

    def _integrate(self, x: Tensor) -> LayerOutput:
        """The forward pass."""
        z0 = initial_state(self.f, x)
        structure = Structure.of(z0)
        flat = structure.flatten(z0)
        problem = Problem(
            self.f,
            structure,
            flat.shape,
            self.t1,
            self.dynamics,
            self.solver,
            self.termination,
            self.max_steps,
            None if torch.is_autocast_enabled(x.device.type) else structure.dtype,
        )
        record = Record()
        row = solver_start(flat).reshape(1, -1)
        adjoint = self.adjoint == "continuous" and torch.is_grad_enabled()
        trained = {n: p for n, p in self.f.named_parameters() if p.requires_grad} if adjoint else {}
        if flat.shape[0] == 0:
            y = row  # a batch of no samples: nothing to integrate
        elif adjoint:
            y = ContinuousAdjoint.apply(problem, record, row, x, tuple(trained), *trained.values())
        else:
            y = record.count(problem.integrate(problem.field(x), row, self.t1))
        z = structure.unflatten(y.reshape(flat.shape).to(problem.given or y.dtype))
        # x through a node of its own, which tells f's argument from x reached otherwise.
        argument = x.view_as(x) if adjoint else x
        fz = self.f(z, argument)
        record.stats = residual_stats(z, fz, self.termination, record.nfe + 1, record.steps)
        if adjoint:
            check_differentiated(structure.flatten(fz), (y, argument, *trained.values()), x)
        if y.requires_grad:
            y.register_hook(partial(_count_backward, record, self.adjoint == "backprop"))
        zero = x.new_zeros(())
        return LayerOutput(z=fz, z0=z0, stats=record.stats, skip_loss=zero, jac_loss=zero)


def _count_backward(record: Record, through_steps: bool, grad: Tensor) -> None:
    """Record the output's vector-Jacobian product, and with backprop those through the
    accepted steps: one per evaluation on them but the field at t1, which no step uses."""
    record.stats.backward_nvjp += 1 + (record.path_nfe - 1 if through_steps else 0)
