"""The DEQ layer (vanilla, Skip DEQ, Skip Reg. DEQ, Jacobian regularisation).

It and the Neural ODE (neural_ode.py) take an `f` called as f(z, x) and return a
`LayerOutput`; a training step adds `lambda_skip * out.skip_loss + lambda_jac * out.jac_loss`
to its loss and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from types import MethodType
from typing import NoReturn

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from raydeq.solvers import ADJOINTS, SOLVERS, SolveStats, Termination, solve
from raydeq.solvers.adjoint import IMPLICIT_ADJOINTS, needs_gradient_beside
from raydeq.solvers.options import choice, flag, function, integer
from raydeq.solvers.solve import Solution, check_compile, check_options
from raydeq.solvers.state import (
    State,
    Structure,
    contained,
    outside_compiled_graphs,
    untransformed,
    valued,
)
from raydeq.solvers.termination import Monitor, Status, norm

INITS = ("zeros", "skip", "skip_reg")
# What a layer calls: its cell f(z, x) -> z and a Skip DEQ's predictor g(x) -> z0, each an
# nn.Module or any other callable.
Cell = Callable[[State, Tensor], State]
Predictor = Callable[[Tensor], State]
# How a layer calls the modules it is given, as an error for one that cannot be called says.
LAYER_CALLS = {"f": "f(z, x) -> z, e.g. an nn.Module", "skip": "g(x) -> z0, e.g. an nn.Module"}


@dataclass
class LayerOutput:
    """What `DEQ` and `NeuralODE` return (the fields of the public API)."""

    z: State
    z0: State
    stats: SolveStats
    skip_loss: Tensor
    jac_loss: Tensor


def check_init(init: str, skip: object) -> None:
    """Raise a TypeError for a skip that cannot be called, a ValueError for an init that is
    none of INITS, or one that does not match skip: a predictor for init="skip" and only for
    it (a typo as deq.init = "Skip" made the layer solve from zeros, init="skip" set without
    skip failed in calling None)."""
    choice("init", init, INITS)
    if skip is not None:
        function("skip", skip, LAYER_CALLS["skip"])
    if init == "skip" and skip is None:
        raise ValueError("init='skip' needs a predictor module: pass skip=g with g(x) -> z0")
    if init != "skip" and skip is not None:
        raise ValueError(f"skip= is only used with init='skip', got init={init!r}")


def check_training(jac_reg: bool, pretrain_steps: int, pretrain_depth: int) -> None:
    """Raise a TypeError for a jac_reg that is no bool, a ValueError for a warm-up of a
    negative number of steps or a depth below 1 (set on the layer later, jac_reg="no"
    estimated the Jacobian and pretrain_depth=0 failed in the solver, given no state to
    judge)."""
    flag("jac_reg", jac_reg)
    integer("pretrain_steps", pretrain_steps, 0)
    integer("pretrain_depth", pretrain_depth)


def _tensors(z: State) -> tuple[Tensor, ...]:
    """The tensors of a single or multiscale state."""
    return (z,) if isinstance(z, Tensor) else tuple(z)


def _rebuilt(z: State, tensors: list[Tensor]) -> State:
    """tensors in the container of z: its list, tuple or named tuple type (one tensor for a
    tensor), so that f reads a state it made as it made it."""
    return tensors[0] if isinstance(z, Tensor) else contained(type(z), tensors)


def _detach(z: State) -> State:
    """A copy of the state cut from the autograd graph, with the same structure."""
    return _rebuilt(z, [t.detach() for t in _tensors(z)])


def variational_dropouts(module: nn.Module) -> list[nn.Module]:
    """The modules in module that hold a mask drawn once per forward pass, found by their
    class's `draws_mask_per_pass` (models.layers.VariationalDropout2d's, so that the layer
    needs no model), not by a `mask` attribute, which in a cell may be a setting of f (a
    padding mask)."""
    return [m for m in module.modules() if getattr(type(m), "draws_mask_per_pass", False)]


def draw_new_masks(module: nn.Module) -> None:
    """Discard the masks of module's variational dropouts, so that the forward pass about to
    run draws its own: a layer called on its own would otherwise drop the same units of every
    batch (of one shape) for good."""
    for m in variational_dropouts(module):
        m.mask = None


# Dropouts that draw a new mask at every call, i.e. at every evaluation of f within a solve.
FRESH_MASK_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


# Norms that normalise by the batch's statistics in training mode (or always, without
# running statistics), so that f couples the samples of a batch; a lazy one becomes its
# BatchNorm at its first forward pass, which is checked before it.
BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


# What a dropout drawing a new mask at each evaluation does to a solve or an integration.
ANOTHER_F = (
    "so that f is another function at each evaluation (a DEQ's f has no fixed point, and a "
    "Neural ODE's step control shrinks its steps to follow the noise)"
)
# The dropout that f may hold, which both dropout refusals name.
ONCE_PER_PASS = (
    "raydeq.models.layers.VariationalDropout2d(p), whose mask is drawn once per forward pass"
)


def _inner_dropout(m: nn.Module) -> float:
    """The rate of the dropout m applies within its own forward in training mode, a new mask
    at every call (attention weights, between an RNN's layers; torch applies an RNN's only
    between two of its layers), else 0."""
    if isinstance(m, nn.MultiheadAttention) or (isinstance(m, nn.RNNBase) and m.num_layers > 1):
        return m.dropout
    return 0.0


def _refusal(name: str, m: nn.Module, implicit: str | None) -> str | None:
    """Why f's submodule m (called name) cannot be solved, else None: a dropout drawing a new
    mask at every evaluation (f then has no fixed point), or under the implicit adjoint named
    `implicit`, which solves each sample's system alone, a norm by the batch's statistics."""
    if isinstance(m, FRESH_MASK_DROPOUTS) and m.training and m.p > 0:
        return (
            f"{name} is {m} in training mode, which draws a new mask at every evaluation "
            f"of f, {ANOTHER_F}; use {ONCE_PER_PASS}, or apply the dropout outside f"
        )
    if m.training and _inner_dropout(m) > 0:
        return (
            f"{name} is {m} in training mode with dropout={_inner_dropout(m)}, which draws a "
            f"new mask at every evaluation of f, {ANOTHER_F}; build it with "
            f"dropout=0.0 and drop out outside f (or with {ONCE_PER_PASS})"
        )
    if implicit and isinstance(m, BATCH_NORMS) and (m.training or m.running_mean is None):
        return (
            f"{name} is {m} normalising by the batch's statistics, which couples the samples "
            f"of a batch, while adjoint={implicit!r} solves each sample's system "
            "(I - J)^T g = v alone and would give wrong gradients; use a per-sample norm "
            "(nn.GroupNorm, nn.LayerNorm), the BatchNorm in eval mode with running statistics, or "
            "adjoint='unrolled' or 'jfb'"
        )
    return None


def check_modules(f: object, implicit: str | None) -> None:
    """Raise a ValueError naming the first submodule of f that cannot be solved (_refusal):
    a dropout drawing a new mask at every call (nn.Dropout in training mode) made a solve run
    to max_steps and a Neural ODE take 59 times the evaluations, and a BatchNorm by the
    batch's statistics gave GMRES gradients 15% off;
    `implicit` names the implicit adjoint that will differentiate the solve, if any."""
    if not isinstance(f, nn.Module):
        return
    for name, m in f.named_modules(prefix="f"):
        reason = _refusal(name, m, implicit)
        if reason is not None:
            raise ValueError(reason)


def _parametrizations(module: nn.Module) -> list[tuple[nn.Module, str, nn.ModuleList]]:
    """Each parametrized tensor of module's submodules: (submodule, name, parametrizations)."""
    return [
        (m, name, chain)
        for m in module.modules()
        if parametrize.is_parametrized(m)
        for name, chain in m.parametrizations.items()
    ]


@contextmanager
def weights_once(module: nn.Module, norms_once: bool) -> Iterator[None]:
    """Within, each parametrized weight of module is the one computed on entry, in the
    caller's grad mode, where all are weight norms (pure functions of their g and v) and
    `norms_once` (a DEQ whose f runs eagerly): torch computed them again at every access, 6 of
    the 40 operations of an evaluation of mnist_mdeq's f (12 of cifar10_large's 119), each a
    kernel launch on a GPU (0.16 of about 8 ms on one CPU core, at batch 32).
    Computed on entry, not at the first access, which may lie within the solve's no_grad and
    would leave the gradient without them. Another parametrization (a spectral norm's power
    iteration steps at each access) and compiled steps, which compute the weights within
    their kernels, are as they were; the weights are computed anew at each forward pass,
    after any optimizer step. Within the caller's own parametrize.cached(), which keeps each
    weight as first computed, every parametrized weight is computed on entry whatever
    `norms_once`: first computed within a solve's no_grad (or a Neural ODE's continuous
    adjoint), a spectral norm's, an orthogonal map's or a Neural ODE's weight norm was kept
    without its graph, and its parameters got no gradient through the solve, silently."""
    tensors = _parametrizations(module)
    weight_norms = all(len(c) == 1 and isinstance(c[0], _WeightNorm) for _, _, c in tensors)
    if not (tensors and (parametrize._cache_enabled or (norms_once and weight_norms))):
        yield
        return
    with parametrize.cached():
        for m, name, _ in tensors:
            getattr(m, name)
        yield


def settings(**values: object) -> str:
    """A layer's settings as `name=value` pairs for its repr (nn.Module.extra_repr)."""
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


def solver_start(z: State) -> State:
    """z0 cut from the graph in at least float32: under autocast x and f(0, x) are bfloat16 or
    float16, and the solver keeps its state in float32 (it casts f's outputs back to it)."""
    tensors = _tensors(z)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return _rebuilt(z, [t.detach().to(dtype) for t in tensors])


def _in_dtype(z: State, dtype: torch.dtype) -> State:
    """The state z in dtype, with its graph."""
    return _rebuilt(z, [t.to(dtype) for t in _tensors(z)])


def _start(z0: State, zeros: State, device: str) -> State:
    """Where a layer's solve (or warm-up) starts: z0 cut from the graph in the zero state's
    dtype and container, so that z* has them whatever the predictor or f(0, x) gave; under
    autocast in the solver's float32 (a module in half precision takes its own dtype, and
    solve keeps its state in float32 all the same)."""
    dtype = _tensors(zeros)[0].dtype
    start = _rebuilt(zeros, [t.detach().to(dtype) for t in _tensors(z0)])
    return solver_start(start) if torch.is_autocast_enabled(device) else start


def _defines_initial_state(f: Cell) -> bool:
    """Whether f has its own zero state, a method initial_state(x)."""
    return callable(getattr(f, "initial_state", None))


def _zero_state(f: Cell, x: Tensor) -> State:
    """f.initial_state(x) where f defines it, else zeros_like(x), unchecked."""
    return f.initial_state(x) if _defines_initial_state(f) else torch.zeros_like(x)


def initial_state(f: Cell, x: Tensor) -> State:
    """The all-zero state for input x: `f.initial_state(x)` if f defines it, else zeros_like(x);
    a ValueError for a state none of whose parts has a feature dimension, which the solver
    would read as a batch of one-value samples (x of shape (D,), which f's layers take as one
    sample; a (B,) part beside parts with features is a per-sample scalar, and solved as
    one), and a TypeError for an x that is no tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor (B, ...), got {type(x).__name__}")
    z = _zero_state(f, x)
    shapes = _shapes(z)
    if all(len(shape) < 2 for shape in shapes):
        raise ValueError(
            f"x of shape {tuple(x.shape)} gives a state of shapes {shapes}: a state needs a "
            "batch dimension and, in one part at least, a feature dimension (B, N, ...), "
            "where 1-D parts alone would be solved as B samples of one value each; give one "
            "sample as x[None], or a part of one value per sample as (B, 1)"
        )
    return z


def _takes_zero_state(f: Cell, x: Tensor) -> bool:
    """Whether f(z0, x) runs from the zero state z0, f.initial_state(x) or else zeros_like(x),
    and gives a state of z0's shapes (tried without a graph, only after an error)."""
    try:
        with torch.no_grad():
            zeros = _zero_state(f, x)
            return _shapes(f(zeros, x)) == _shapes(zeros)
    except Exception:
        return False


def dtype_note(f: Callable, x: Tensor, x_name: str = "x", f_name: str = "f") -> str | None:
    """A note naming x's dtype and f's floating parameters' where they differ, else None (x
    and f called by the names the caller gave them); converting f to x's dtype is named only
    for a floating x, as an integer f could not be trained."""
    params = f.parameters() if isinstance(f, nn.Module) else ()
    dtypes = sorted({str(p.dtype) for p in params if p.is_floating_point()} - {str(x.dtype)})
    if not dtypes:
        return None
    convert = f" or convert {f_name} ({f_name}.to({x.dtype}))" if x.is_floating_point() else ""
    return (
        f"{x_name} is {x.dtype} but {f_name}'s parameters are {', '.join(dtypes)}: give "
        f"{x_name} in {f_name}'s dtype ({x_name}.to({dtypes[0]})){convert}"
    )


def _shape_note(f: Cell, x: Tensor) -> str:
    """A note naming x's shape, which f may not take (an input of another feature size fails
    in f's first product as a state of another shape does), and for an f without
    `initial_state` the zeros_like(x) state it started from and the method it may need."""
    shape = tuple(x.shape)
    if _defines_initial_state(f):
        return (
            f"f fails on x of shape {shape} from its own initial_state(x): x may not be the "
            "input f expects (check x's feature sizes against f's)"
        )
    return (
        f"the state started as zeros_like(x), of shape {shape}: x may not be the input f "
        "expects (check x's feature sizes against f's), or f's state is not shaped like its "
        "input, and f needs a method initial_state(x) returning the zero state"
    )


@contextmanager
def zero_state_hint(f: Cell, x: Tensor) -> Iterator[None]:
    """Add to an error raised within a note, for an f that does not take its zero state
    (initial_state(x), or zeros_like(x) without one) to a state of its shape: one naming x's
    dtype and f's where they differ (f fails in its own product, on any state), else one
    naming x's shape, which f may not take, and for an f without `initial_state` that method
    (a cell whose state is not shaped like its input fails inside its own first product). An
    error of an f that does (an integration past max_steps, running out of memory) gets no
    note, and a TypeError (an integer x whose zeros_like state is no floating one) only the
    note on dtypes."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError) as err:
        if isinstance(x, Tensor) and not _takes_zero_state(f, x):
            # A TypeError (a state of integers, an f returning no tensor) is no shape's doing.
            shape = None if isinstance(err, TypeError) else _shape_note(f, x)
            note = dtype_note(f, x) or shape
            if note:
                err.add_note(note)
        raise


def residual_stats(
    z: State, fz: State, termination: Termination, nfe: int, steps: int
) -> SolveStats:
    """Statistics of a state z reached without the solver, from its image fz = f(z, x), judged
    in at least float32 as a solve's (in half precision the residual's norm and the tolerance
    round to three digits); a sample above the tolerance is UNSOLVED, as no max_steps stopped
    it."""
    structure = Structure.of(z)
    flat = widened(structure.flatten(_detach(z)))
    monitor = Monitor(flat, termination)
    residual = norm(widened(structure.flatten(_detach(fz))) - flat)
    monitor.record(flat, residual)
    monitor.test(residual)
    stats = SolveStats.from_monitor(monitor, nfe, steps)
    running = stats.status == int(Status.MAX_STEPS)
    stats.status = stats.status.masked_fill(running, int(Status.UNSOLVED))
    return stats


def counting_vjps(z: State, stats: SolveStats, nvjp: int) -> State:
    """z, whose backward adds the nvjp vector-Jacobian products it passes through (an unrolled
    warm-up's evaluations of f) to stats.backward_nvjp: one hook on the flat state, which a
    backward reaches once."""
    if not any(t.requires_grad for t in _tensors(z)):
        return z
    structure = Structure.of(z)
    flat = structure.flatten(z)
    flat = flat.view_as(flat)
    flat.register_hook(partial(_add_vjps, stats, nvjp))
    return structure.unflatten(flat)


def _add_vjps(stats: SolveStats, nvjp: int, grad: Tensor) -> None:
    """Count nvjp backward vector-Jacobian products in stats."""
    stats.backward_nvjp += nvjp


def widened(t: Tensor) -> Tensor:
    """t in at least float32 (float64 stays float64), for a sum over a batch or a loss: a
    float16 state has more elements than float16's largest value (65504), and a loss summed
    in float16 overflows to inf."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hutchinson_jacobian_loss(f: Callable[[State], State], z: State) -> Tensor:
    """Estimate ||J_f(z)||_F^2 / dim with one Gaussian probe eps: ||eps^T J_f||^2 / dim.

    E[||eps^T J||^2] = ||J||_F^2 (Hutchinson); dim counts every element of the batch, so for an f
    acting per sample this is the batch mean of ||J_b||_F^2 / dim_b. Differentiable (double
    backward) in the parameters and inputs f closes over when grad mode is on, and without a
    graph where none needs a gradient; z itself is treated as a constant; 0 for a batch of no
    samples. Raises RuntimeError under torch.inference_mode(), which has no VJP.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "jac_reg=True estimates the Jacobian from a vector-Jacobian product, which "
            "torch.inference_mode() rules out: evaluate under torch.no_grad() instead, or build "
            "the layer with jac_reg=False"
        )
    differentiable = torch.is_grad_enabled()
    inputs = [t.detach().requires_grad_() for t in _tensors(z)]
    # The loss is differentiated twice, which the fused attention kernels (flash,
    # memory-efficient) cannot be: this one evaluation of f attends with the math kernel.
    kernel = sdpa_kernel(SDPBackend.MATH) if differentiable else nullcontext()
    with torch.enable_grad(), kernel:
        out = _tensors(f(_rebuilt(z, inputs)))
        probes = [torch.randn_like(t) for t in out]
        vjps = _probed_vjps(out, probes, inputs, differentiable)
    loss = sum(widened(v).pow(2).sum() for v in vjps) / max(sum(t.numel() for t in inputs), 1)
    # Without a gradient where nothing f closes over needs one, as a torch module's output.
    return loss if needs_gradient_beside(loss, tuple(inputs)) else loss.detach()


def _probed_vjps(
    out: tuple[Tensor, ...], probes: list[Tensor], inputs: list[Tensor], differentiable: bool
) -> tuple[Tensor, ...]:
    """eps^T J_f for each input part; a part of f's output without a graph (a constant) has a
    zero Jacobian, so it adds nothing rather than failing autograd."""
    live = [(o, p) for o, p in zip(out, probes, strict=True) if o.requires_grad]
    if not live:
        return tuple(torch.zeros_like(t) for t in inputs)
    outputs, eps = zip(*live, strict=True)
    return torch.autograd.grad(
        outputs, inputs, eps, create_graph=differentiable, materialize_grads=True
    )


def _form(z: object) -> str:
    """What holds a state's tensors, for comparing a predicted state with the zero state: a
    predictor's one tensor in a list, or a list for a tensor, failed inside f's first layer."""
    if isinstance(z, Tensor):
        return "one tensor"
    if isinstance(z, list | tuple) and all(isinstance(t, Tensor) for t in z):
        return f"a list or tuple of {len(z)} tensors"
    return f"a {type(z).__name__}"


def _shapes(z: State) -> list[tuple[int, ...]]:
    """The shape of each tensor of a state, for messages and comparisons."""
    return [tuple(t.shape) for t in _tensors(z)]


def skip_loss(z: State, z0: State) -> Tensor:
    """The paper's L1 skip loss mean |f(z*, x) - z0| over every element (z holds f(z*, x));
    0 for a batch of no samples, whose mean over no element would be NaN.

    Both sides stay in the graph, as in the paper's joint objective: the gradient trains the
    producer of z0 (g, or f through f(0, x)) and, by the implicit adjoint of z*, f itself.
    """
    pairs = list(zip(_tensors(z), _tensors(z0), strict=True))
    total = sum(widened(a - b).abs().sum() for a, b in pairs)
    return total / max(sum(b.numel() for _, b in pairs), 1)


def _count_loaded(layer: DEQ, incompatible_keys: object) -> None:
    """Read a loaded call count again before the next call: it may lie within the warm-up."""
    layer._calls_read = 0


def _recomputing() -> bool:
    """Whether this forward pass runs within a backward pass: torch.utils.checkpoint's
    recomputation of a call already counted, which counted again had ended the warm-up early
    and, at its last call, solved where the call had unrolled (other gradients)."""
    return torch._C._current_graph_task_id() != -1


def _hook_refusal(layer: nn.Module, method: str) -> TypeError:
    """The error for a module backward hook on a layer returning a LayerOutput, naming the
    tensor hooks that see the gradients it would."""
    return TypeError(
        f"{type(layer).__name__}.{method} cannot hook this layer: its forward returns a "
        "LayerOutput, not a tensor, and torch calls a module's backward hooks on tensor "
        "outputs only; hook the tensors instead: out.z.register_hook(fn) receives dL/dz* "
        "(one hook per part of a multiscale z), x.register_hook(fn) dL/dx, or hook the "
        "module that takes out.z"
    )


def held_by_termination(name: str) -> property:
    """A layer's tolerance `name` read from and set through its Termination, which checks
    it: set on the layer as a plain attribute (deq.abstol = 1e-6), it was one that no solve
    read, which went on at the tolerance the layer was built with."""

    def get(layer: nn.Module) -> float:
        return getattr(layer.termination, name)

    def set_(layer: nn.Module, value: float) -> None:
        layer.termination = replace(layer.termination, **{name: value})

    return property(get, set_, doc=f"The layer's {name}, held by its Termination.")


class OutputLayer(nn.Module):
    """A module whose forward returns a LayerOutput: torch never called a full backward hook
    or pre-hook of it (warning at each call) and register_backward_hook's failed the forward
    pass, so registering either is refused, naming the tensor hooks to use."""

    def register_full_backward_hook(self, hook: Callable, prepend: bool = False) -> NoReturn:
        """Refuse: torch would never call it (see the class docstring)."""
        raise _hook_refusal(self, "register_full_backward_hook")

    def register_full_backward_pre_hook(self, hook: Callable, prepend: bool = False) -> NoReturn:
        """Refuse: torch would never call it (see the class docstring)."""
        raise _hook_refusal(self, "register_full_backward_pre_hook")

    def register_backward_hook(self, hook: Callable) -> NoReturn:
        """Refuse: the forward pass would fail (see the class docstring)."""
        raise _hook_refusal(self, "register_backward_hook")


class DEQ(OutputLayer):
    """Deep equilibrium layer: z* = f(z*, x) by an ODE solver (continuous DEQ) or a root finder.

    f, the cell f(z, x) -> z, and skip, the predictor g(x) -> z0, are nn.Modules or any other
    callables; only a module is the layer's submodule (its parameters, its train/eval mode,
    the dropout and BatchNorm checks and new dropout masks below), not one a plain function
    closes over.

    init picks the initial guess z0: "zeros" (vanilla), "skip" (z0 = skip(x), an explicit
    predictor trained by skip_loss), "skip_reg" (z0 = f(0, x), no extra parameters). skip_loss
    is mean |f(z*, x) - z0|: its gradient trains the predictor g ("skip") or f through
    z0 = f(0, x) ("skip_reg") towards the equilibrium, and f (via z*) towards the guess; at a
    large weight the latter makes f ignore z, a one-step DEQ. The solver starts from z0
    detached, in the zero state's dtype and container (z* comes back in them): the main
    loss's gradient does not depend on z0.

    jac_reg adds the Hutchinson estimate of ||J_f(z*)||_F^2 / dim as jac_loss in training mode
    (0 in eval mode: a training penalty, whose extra f and VJP would otherwise cost every
    prediction, and draw random probes there). While the
    layer's training-mode call count is below pretrain_steps, f is unrolled pretrain_depth times
    from z0 and backpropagated through instead of being solved (MDEQ's warm-up).
    stats.nfe counts f's evaluations by the solver, plus the one giving z0 for "skip_reg" and,
    with adjoint="unrolled", the one giving skip_loss its f(z*, x); stats.backward_nvjp the
    VJPs of f a backward takes through the solve's adjoint, the warm-up's unrolled evaluations
    and that f(z*, x), not the one through skip_reg's z0 = f(0, x). jac_reg's evaluation of f
    and its VJPs count in neither. A BatchNorm in f updates its running statistics at each
    evaluation in training mode: stats.nfe times per forward pass, once more with jac_reg.
    compile= is solve's: f and the solver steps run through torch.compile (True, or a dict of
    its options), or each solve records its step as a CUDA graph and replays it ("graph").
    solve refuses an f that changes its input in place, under compile= too.
    Each forward pass draws new masks for f's variational dropouts, in or outside a model; a
    dropout that draws one at every evaluation of f (nn.Dropout) is refused in training mode,
    and under an implicit adjoint with grad enabled, which solves each sample's system alone,
    a BatchNorm normalising by the batch's statistics (in training mode, or in any mode
    without running statistics), which couples them.
    repr names every setting the layer was built with; abstol, reltol and divergence set on it
    later (deq.abstol = 1e-6) are checked and solved with as given, and so is compile
    (deq.compile = True sets compile_mode; deq.compile() is still nn.Module's). Module
    backward hooks are refused (OutputLayer): hook out.z's tensors instead.
    """

    abstol = held_by_termination("abstol")
    reltol = held_by_termination("reltol")
    divergence = held_by_termination("divergence")

    def __init__(
        self,
        f: Cell,
        init: str = "zeros",
        skip: Predictor | None = None,
        solver: str = "vcab3",
        adjoint: str = "gmres",
        abstol: float = 1e-3,
        reltol: float = 1e-3,
        max_steps: int = 100,
        divergence: float = 1e4,
        jac_reg: bool = False,
        pretrain_steps: int = 0,
        pretrain_depth: int = 10,
        solver_options: dict | None = None,
        adjoint_options: dict | None = None,
        compile: bool | dict | str = False,
    ) -> None:
        super().__init__()
        function("f", f, LAYER_CALLS["f"])
        check_init(init, skip)
        choice("solver", solver, SOLVERS)
        choice("adjoint", adjoint, ADJOINTS)
        integer("max_steps", max_steps)
        check_training(jac_reg, pretrain_steps, pretrain_depth)
        check_options(solver, adjoint, solver_options, adjoint_options, compile)
        self.f = f
        self.skip = skip
        self.init = init
        self.solver = solver
        self.adjoint = adjoint
        self.termination = Termination(abstol, reltol, divergence)
        self.max_steps = max_steps
        self.jac_reg = jac_reg
        self.pretrain_steps = pretrain_steps
        self.pretrain_depth = pretrain_depth
        self.solver_options = dict(solver_options or {})
        self.adjoint_options = dict(adjoint_options or {})
        self.compile_mode = compile  # not `compile`, nn.Module's method
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._calls_read = 0  # the call count last read: the count is at least this
        self.register_load_state_dict_post_hook(_count_loaded)

    @property
    def compile(self) -> Callable[..., None]:
        """nn.Module's compile, bound to the layer: layer.compile() compiles its forward."""
        return MethodType(nn.Module.compile, self)

    @compile.setter
    def compile(self, value: bool | dict | str) -> None:
        """Set the solves' compile= (compile_mode), checked as the constructor checks it: set
        as a plain attribute, it hid nn.Module's compile method and no solve read it."""
        check_compile(value)
        self.compile_mode = value

    def extra_repr(self) -> str:
        """The settings the layer solves with, for its repr."""
        t = self.termination
        return settings(
            init=self.init,
            solver=self.solver,
            adjoint=self.adjoint,
            abstol=t.abstol,
            reltol=t.reltol,
            max_steps=self.max_steps,
            divergence=t.divergence,
            jac_reg=self.jac_reg,
            pretrain_steps=self.pretrain_steps,
            pretrain_depth=self.pretrain_depth,
            solver_options=self.solver_options,
            adjoint_options=self.adjoint_options,
            compile=self.compile_mode,
        )

    def _guess(self, x: Tensor) -> tuple[State, State]:
        """z0 for input x according to `init` (with its graph, for skip_loss) and the zero
        state, whose dtype and container the solve keeps; init and skip, jac_reg and the
        warm-up's settings are checked as at construction, as each may be set on the layer
        after it is made."""
        check_init(self.init, self.skip)
        check_training(self.jac_reg, self.pretrain_steps, self.pretrain_depth)
        zeros = initial_state(self.f, x)
        Structure.of(zeros)  # one dtype, or refused naming each part's
        if self.init == "skip":
            z0 = self.skip(x)
            if _form(z0) != _form(zeros):
                raise ValueError(
                    f"skip(x) must give the state as f's zero state holds it, {_form(zeros)}, "
                    f"got {_form(z0)}"
                )
            expected, got = _shapes(zeros), _shapes(z0)
            if got != expected:
                raise ValueError(f"skip(x) must give the state's shapes {expected}, got {got}")
            return z0, zeros
        if self.init == "skip_reg":
            return self.f(zeros, x), zeros
        return zeros, zeros

    def pretraining(self) -> bool:
        """Whether this call unrolls f: training mode, fewer than pretrain_steps calls so far
        (the count is read on the host, a synchronisation on a GPU, only while it may lie within
        the warm-up: it only grows, so the count last read bounds it until a state dict is
        loaded, and a pretrain_steps set above that bound later reads it again); a
        recomputation (_recomputing) decides as the call it repeats did, before that call was
        counted."""
        if not self.training or self.pretrain_steps <= self._calls_read:
            return False
        self._calls_read = int(self.step) - int(_recomputing())
        return self._calls_read < self.pretrain_steps

    @outside_compiled_graphs("DEQ", "DEQ(compile=True) compiles f and the solver's steps")
    def forward(self, x: Tensor) -> LayerOutput:
        """Solve for the equilibrium of f(., x) with new dropout masks; see the class
        docstring for the outputs."""
        untransformed(type(self).__name__)
        if isinstance(x, Tensor):
            valued("x", x)
        grads = self.adjoint in IMPLICIT_ADJOINTS and torch.is_grad_enabled()
        implicit = self.adjoint if grads else None
        if self.training or implicit:
            check_modules(self.f, implicit)
        draw_new_masks(self)
        with zero_state_hint(self.f, x), weights_once(self, self.compile_mode is False):
            return self._solve(x)

    def _image(self, fx: Callable[[State], State], sol: Solution) -> State:
        """f(z*, x) for skip_loss, so that every adjoint measures the same loss on the same z*:
        the solve's image where it evaluated one (an implicit or Jacobian-free adjoint's z,
        which attaches z* through f; an unrolled one's where a sample stayed at z0, whose z is
        f(z0) there); else, for an unrolled one, whose z is z* itself, one more evaluation
        (counted in nfe, its VJP in backward_nvjp). Without a graph (evaluation) z, z* for
        every adjoint, at no cost."""
        if self.init == "zeros" or not torch.is_grad_enabled():
            return sol.z
        if sol.image is not None:
            return sol.image
        sol.stats.nfe += 1
        image = fx(sol.z)
        # One hook on the first part: under autocast the parts of a state may differ in dtype.
        first = _tensors(image)[0]
        if first.requires_grad:
            first.register_hook(partial(_add_vjps, sol.stats, 1))
        return image

    def _unroll(
        self, fx: Callable[[State], State], start: State, extra_nfe: int
    ) -> tuple[State, SolveStats]:
        """The warm-up's z: f applied pretrain_depth times from the solve's start, backpropagated
        through, each image in the start's dtype as the solver keeps it (so that z has the
        dtype of the z* that follows), with statistics judged on its last step."""
        dtype = _tensors(start)[0].dtype
        z_prev, z = None, start
        for _ in range(self.pretrain_depth):
            z_prev, z = z, _in_dtype(fx(z), dtype)
        depth = self.pretrain_depth
        stats = residual_stats(z_prev, z, self.termination, depth + extra_nfe, depth)
        return counting_vjps(z, stats, depth), stats

    def _equilibrium(self, fx: Callable[[State], State], start: State, extra_nfe: int) -> Solution:
        """z* and its statistics from `solve`, started at `start` with the layer's settings."""
        t = self.termination
        return solve(
            fx,
            start,
            solver=self.solver,
            adjoint=self.adjoint,
            abstol=t.abstol,
            reltol=t.reltol,
            max_steps=self.max_steps,
            divergence=t.divergence,
            solver_options=self.solver_options,
            adjoint_options=self.adjoint_options,
            compile=self.compile_mode,
            initial_nfe=extra_nfe,
            check_start=self.init != "zeros",
        )

    def _solve(self, x: Tensor) -> LayerOutput:
        """The forward pass."""
        z0, zeros = self._guess(x)
        extra_nfe = 1 if self.init == "skip_reg" else 0
        start = _start(z0, zeros, x.device.type)

        def fx(z: State) -> State:
            return self.f(z, x)

        if self.pretraining():
            z, stats = self._unroll(fx, start, extra_nfe)
            image = z
        else:
            sol = self._equilibrium(fx, start, extra_nfe)
            z, stats, image = sol.z, sol.stats, self._image(fx, sol)
        if self.training and not _recomputing():
            self.step += 1
        zero = x.new_zeros(())
        return LayerOutput(
            z=z,
            z0=z0,
            stats=stats,
            skip_loss=zero if self.init == "zeros" else skip_loss(image, z0),
            jac_loss=hutchinson_jacobian_loss(fx, z) if self.jac_reg and self.training else zero,
        )
