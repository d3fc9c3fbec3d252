"""`solve`: find z* = f(z*) for a batch, by integrating to steady state or by root finding."""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.autograd.forward_ad as fwAD

from raydeq.solvers.adjoint import (
    ImplicitAdjoint,
    in_dual_level,
    make_adjoint,
    tangent_without_graph,
    with_tangent,
)
from raydeq.solvers.control import Controller
from raydeq.solvers.discrete import Anderson, Broyden, FixedPoint
from raydeq.solvers.driver import Method, evaluate, iterate, wrapped
from raydeq.solvers.graphs import RECORDERS
from raydeq.solvers.ode import VCAB3, RungeKutta
from raydeq.solvers.options import choice, construct, flag, function, integer, option_dict
from raydeq.solvers.state import (
    State,
    Structure,
    flat_function,
    outside_compiled_graphs,
    untransformed,
)
from raydeq.solvers.stats import SolveStats
from raydeq.solvers.tableau import BS3, EULER, TSIT5
from raydeq.solvers.termination import Monitor, Termination

CONTINUOUS = ("vcab3", "tsit5", "bs3", "euler")
DISCRETE = ("broyden", "anderson", "fixed_point")
SOLVERS = CONTINUOUS + DISCRETE
ADJOINTS = ("gmres", "fixed_point", "jfb", "unrolled")


@dataclass
class Solution:
    """The fixed point (structured like z0) and the statistics of the solve: z* itself, or
    where the solve attaches it to the graph through f (grad mode, an implicit or Jacobian-free
    adjoint, or an unrolled one for a sample whose z* is still z0) f(z*), one evaluation past
    it; stats.residual and stats.converged are z*'s. `image` is f(z*) of every sample with its
    graph where the solve evaluated it (z itself for an implicit or Jacobian-free adjoint),
    else None."""

    z: State
    stats: SolveStats
    image: State | None = None


# Steady-state step control, per continuous solver. A steady state needs each step to be a
# controlled move, not an accurate path: local errors up to 0.4 of the step length are
# accepted (Controller.step_rtol; from 0.5 on, and with the integral controller, Euler cycled
# above the tolerance on multiscale DEQs at initialisation), and so is any step that cuts
# the residual to 0.7 of its start (Controller.contraction: on a contractive layer a unit
# Euler step, one fixed-point iteration, has a local error of about half its length).
# Near z*, the flow dz/dt = f(z) - z of a layer with ||J_f|| <= r has the eigenvalues
# h (lambda - 1), |lambda| <= r, in the disk of radius h r around -h; the cap h_max (with
# Tsit5's step_rtol) keeps that disk where the method damps every mode, for r up to 0.99, so
# that the steps are limited by stability instead of cycling at its edge (BS3 without a cap
# stalled at 1e-6):
# - euler: R(z) = 1 + z; h = 1 maps the disk onto |R| <= r, fixed-point iteration; its
#   contraction rule finds it, no cap is needed.
# - bs3: real stability limit -2.51; h_max = 1.25 keeps the fast end of the disk, -1.25 (1 + r),
#   inside it for every contraction (r < 1): max |R| over the disk is 0.88 at r = 0.9, 0.94 at
#   0.95 and 0.99 at 0.99 (the slow end). On layers whose Jacobian at z* has an eigenvalue near
#   -r (J = -r I, or a symmetric J with eigenvalues spread over [-r, r]) a larger cap cycles
#   just above the tolerance until max_steps: 1.4 did in 130 of 369 solves of random
#   contractions of radius 0.5 to 0.9 (|R| = 1.26 at -2.66), and 1.3, tuned for r <= 0.9, in
#   133 of 360 solves at r = 0.95 and 0.99 (|R| = 1.04 at -2.54 for r = 0.95). It costs 2
#   evaluations on the trained dense MNIST model (33 where 1.3 took 31; tests/test_ode.py
#   draws these spectra).
# - tsit5: real stability limit -3.51; h_max = 3.0 lets a slow real mode (eigenvalue 0.97)
#   converge in few steps. The complex and negative modes of a wider disk are held inside the
#   region by a stricter step_rtol of 0.1, against which the error estimate rises steeply
#   past z = -2.8 (relative to the step it is 0.25 there, 0.44 at -3.0, 1.5 at -3.3). A first
#   step of 1.8: its 6 evaluations per step make a short first step costly.
# - The contraction rule asks the same fall of the residual per evaluation of f, 0.7: 0.7^3
#   per BS3 step (3 evaluations), 0.7^6 per Tsit5 step. Per step, 0.7 held Tsit5 where the
#   error control would have shrunk h. On spectra of radius 0.5 that step was h = 2.1, where
#   the residual fell 0.57 per step against 0.41 at h = 1.8, and Tsit5 took up to 6.7x the
#   fixed-point evaluations at tolerance 1e-10. Now it takes at most 4.5x, and BS3 3.4x
#   (widths 8 to 16, tolerances 1e-3 to 1e-10).
# - vcab3: AB3's real stability interval is only [-6/11, 0]. The Adams steps take h_max = 0.5,
#   which their error estimate (Milne's device) then holds inside the region: uncapped, the
#   first Adams step inherited the start-up's h of about 2 and the next dozen steps were
#   mostly rejected (30 evaluations where 24 do at d=128, tolerance 1e-3; 0.7 took 25); 0.4
#   held a slow real mode (eigenvalue 0.97) to small steps (205 evaluations where 167 do).
#   Its BS3 start-up, two accepted steps per sample, keeps the cap of 1.4 it was tuned with
#   (VCAB3_STARTUP_H_MAX) and a contraction of 0.7 per step: two steps cannot cycle, and a
#   predicted z0 (Skip DEQs) often converges within them. With a start-up cap of 1.2 the
#   digits experiment's Skip Reg. DEQ (mnist_dense's lambda_skip 0.2) takes the same test
#   evaluations, 12 and 13 (seeds 0 and 1), and 15.2 and 15.9 per training step where 1.4
#   takes 14.7 and 15.5 (at lambda_skip 1.0, an explicit layer, 7.25 test evaluations
#   against 6.5).
# Each first step is of the flow's own time scale, 1 (1.8 for tsit5), instead of the one
# picked from the problem, whose extra evaluation and timid start cost more than they save.
# The caps hold for contractions. On a layer that is none but whose flow is stable (J_f(z*)
# with eigenvalues below 1, some below -1, where fixed-point iteration diverges) the fast end
# of the disk lies further out, and the error estimate alone held an RK method's h at the
# edge of its stability region: the PI controller settles there with the error at its
# tolerance and the fastest mode neither decays nor grows, so the residual stays constant
# until max_steps. After a step whose residual did not fall their step-size factor is
# multiplied by 0.7 (Controller.stalled_factor). On 96 solves of such layers (symmetric J
# with eigenvalues spread over [-r, 0.9] or all at -r, r = 1.2 to 4, tolerances 1e-3 to
# 1e-10) BS3 stalled in all, Euler in 27 and Tsit5 in 12; with the rule none does. On 72 with
# complex spectra (random W shifted to eigenvalues of real part up to 0.9, radius 1.5 and 3)
# BS3 failed in 33, Tsit5 in 15 and Euler in 24; with the rule only Euler fails, in 12 (its
# stability disk holds oscillatory modes to tiny steps). Capping the factor at 0.7 instead
# left Euler failing in 18 there: where the residual rises along the flow itself, every step
# was capped and h shrank to 0.
# On contractions the residual falls on every step and nothing changes (the evaluations of
# tests/test_ode.py's spectra and of the trained dense MNIST model are the same). On the
# two-scale MNIST MDEQ at initialisation (6 seeds, 100 steps) BS3 and Tsit5 converge for 5
# seeds instead of 2 and 0, Euler for 3 instead of 2; VCAB3, which converged on all 168
# solves above without the rule, keeps its 5 seeds there without it.
STEADY_STATE = {"step_rtol": 0.4, "contraction": 0.7, "h0": 1.0}
RUNGE_KUTTA = STEADY_STATE | {"stalled_factor": 0.7}
CONTROLLER_DEFAULTS = {
    "euler": RUNGE_KUTTA,
    "bs3": RUNGE_KUTTA | {"h_max": 1.25, "contraction": 0.7**3},
    "tsit5": RUNGE_KUTTA | {"step_rtol": 0.1, "h0": 1.8, "h_max": 3.0, "contraction": 0.7**6},
    "vcab3": STEADY_STATE | {"h_max": 0.5},
}
VCAB3_STARTUP_H_MAX = 1.4
# The step-size controller's options that only an adaptive kind ("pi", "i") reads.
ADAPTIVE_ONLY = (
    "safety",
    "min_factor",
    "max_factor",
    "step_rtol",
    "contraction",
    "h_max",
    "stalled_factor",
)
# compile= value that records each solve's step as a graph (graphs.py) instead of compiling.
GRAPH = "graph"


def make_solver(name: str, options: dict, max_steps: int | None = None) -> Method:
    """The forward solver named by `solver=`, built with its options; given max_steps, a
    solver with a history (anderson's m, broyden's memory) keeps no more of it than a solve of
    max_steps steps fills."""
    choice("solver", name, SOLVERS)
    if name in CONTINUOUS:
        what = f"solver={name!r}"
        fixed_step_only(options)
        controller = construct(
            "solver_options", what, Controller, {**CONTROLLER_DEFAULTS.get(name, {}), **options}
        )
        if name == "vcab3":
            return VCAB3(controller, VCAB3_STARTUP_H_MAX)
        return RungeKutta({"tsit5": TSIT5, "bs3": BS3, "euler": EULER}[name], controller)
    method = {"fixed_point": FixedPoint, "anderson": Anderson, "broyden": Broyden}[name]
    made = construct("solver_options", f"solver={name!r}", method, options)
    if max_steps is None or isinstance(made, FixedPoint):
        return made
    return made.within(max_steps)


def fixed_step_only(options: dict) -> None:
    """Raise ValueError for a controller option given beside kind="fixed", whose steps all
    stay h0 and are all accepted, so that the option would change nothing."""
    if options.get("kind") != "fixed":
        return
    unused = [key for key in ADAPTIVE_ONLY if key in options]
    if unused:
        key = unused[0]
        raise ValueError(
            f"solver_options.{key}={options[key]!r} is not used with kind='fixed', which keeps "
            "every step at h0; give kind 'pi' or 'i' for it, or remove it"
        )


def check_options(
    solver: str,
    adjoint: str,
    solver_options: dict | None,
    adjoint_options: dict | None,
    compile: bool | dict | str = False,
) -> None:
    """Build the solver and the adjoint once with their options and read compile=, so that a
    bad name or value raises its ValueError (a value of the wrong type its TypeError) where a
    layer or a config is made, not at its first solve."""
    make_solver(solver, option_dict("solver_options", solver_options))
    make_adjoint(adjoint, option_dict("adjoint_options", adjoint_options))
    check_compile(compile)


def check_compile(compile: bool | dict | str) -> None:
    """Raise a TypeError for a compile= of none of the types it takes, a ValueError for one
    that is none of True, False, "graph" and a dict of options torch.compile takes."""
    compile_options(compile, torch.device("cpu"))
    if isinstance(compile, dict):
        wrapped(evaluate, compile)  # torch.compile checks its options when it wraps


@outside_compiled_graphs("raydeq.solve", "its compile=True compiles f and the solver's steps")
def solve(
    f: Callable[[State], State],
    z0: State,
    solver: str = "vcab3",
    adjoint: str = "gmres",
    abstol: float = 1e-3,
    reltol: float = 1e-3,
    max_steps: int = 100,
    divergence: float = 1e4,
    solver_options: dict | None = None,
    adjoint_options: dict | None = None,
    check_every: int | None = None,
    compile: bool | dict | str = False,
    initial_nfe: int = 0,
    check_start: bool = False,
    stop_on_convergence: bool | None = None,
) -> Solution:
    """Solve z* = f(z*) per sample, starting from z0 (a tensor (B, ...) or a list of them).

    Continuous solvers ("vcab3", "tsit5", "bs3", "euler") integrate dz/dt = f(z) - z from t=0
    and stop each sample once ||f(z) - z|| <= abstol + reltol * ||z|| (RMS norms over each
    sample's features, all parts of a list of tensors together), the same test the discrete
    solvers ("broyden", "anderson", "fixed_point") use; the step-size control of the
    continuous ones uses the same abstol and reltol (each also accepts local errors up to 0.4
    of the step length, 0.1 for "tsit5", step_rtol, and any step that cuts the residual to 0.7
    of its start per evaluation of f, contraction).
    Samples that do not converge within max_steps return their best iterate; non-finite or
    diverging (residual > divergence x its first, at z0) samples stop early; `stats.status`
    says which.

    The backward pass: "gmres" / "fixed_point" solve (I - J)^T g = v at z* (implicit
    function theorem), "jfb" takes g = v, "unrolled" backpropagates through the solver steps
    (the one for higher derivatives: the implicit adjoints raise under create_graph=True).
    Options of the solver (e.g. m for anderson; kind="pi"|"i"|"fixed", h0, step_rtol and
    contraction for the ODE solvers' step-size controller) and of the adjoint (rtol, atol,
    max_iters and warm_start for "gmres" and "fixed_point", restart and check_every for
    "gmres" alone, resolution for "fixed_point" alone, at least the epsilon of the dtype f
    computes in; "jfb" and "unrolled" take none) go in solver_options / adjoint_options.
    `stats.nfe` counts every evaluation of f, including the one that attaches z* to the graph
    and the initial_nfe evaluations the caller spent making z0 (Skip Reg. DEQ's f(0, x)).

    No step reads a tensor on the host: the termination test is read after `check_every`
    steps, or by default where the slowest sample is predicted to converge (so a solve may
    take a few steps past the last sample's convergence; stats.steps and stats.nfe count
    them); check_start=True also reads it at z0 (one more synchronisation), for a z0 that is
    a prediction and may already meet the tolerance (Skip DEQs): a batch that does takes no
    step, and one that does not a first block of 3 steps instead of 4 (VCAB3's first block
    is its two start-up steps either way).
    stop_on_convergence=True also reads after every step whether any sample still runs, and
    stops at the step the last one converges; by default (None) on a CPU, which runs each
    operation as it is issued, so that a read stalls nothing there; on a CPU, run eagerly, the
    steps then also read whether a per-sample select (a rejected step, a stopped sample) has
    anything to select, and skip it where not. Each sample's z* is the same either way (a
    sample stops on the step it converges); only the steps the batch spends after that differ.
    An f that changes its input (the solver's own iterate) in place is refused with a
    ValueError, which gives examples of such operations (z.relu_(), z += x) and their
    out-of-place forms; it cannot name the one f used (a sigmoid_ reads the same).
    A float16 or bfloat16 z0 is solved in float32; f sees the state, and z* comes back, in
    z0's dtype.
    compile=True runs f and each solver step through torch.compile (mode "reduce-overhead",
    CUDA graphs, on a GPU; inductor's C++ kernels on a CPU; "anderson" and "broyden", whose
    steps are not capturable, compile f alone), all but the first evaluation of f, at z0, which
    runs eagerly to see an in-place change of its input; a dict gives torch.compile's options.
    compile="graph" records the step of a capturable solver (the continuous ones, fixed_point)
    once per solve as a CUDA graph, after one eager step, and replays it for the steps after
    (VCAB3: its Adams steps), and the backward's GMRES replays each Arnoldi step from the
    second backward of a batch shape on (GMRES.graph); on a CPU all runs eagerly.
    """
    _check_arguments(
        f, adjoint, max_steps, check_every, initial_nfe, check_start, stop_on_convergence
    )
    termination = Termination(abstol, reltol, divergence)
    method = make_solver(solver, option_dict("solver_options", solver_options), max_steps)
    backward = make_adjoint(adjoint, option_dict("adjoint_options", adjoint_options))
    structure = Structure.of(z0)
    z = structure.flatten(z0)
    device = z.device.type
    f_flat, own_precision = outside_autocast(flat_function(f, structure), device)
    # A float16 or bfloat16 state rounds at about the tolerances themselves (float16's epsilon
    # is 1e-3), and the backward's small triangular solve has no half-precision kernel on a
    # CPU: the solve keeps its state in float32, as the layers do under autocast.
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    attach = torch.is_grad_enabled()
    # Forward-mode tangents (a torch.autograd.forward_ad dual level) through the solver's
    # steps, for the adjoint that differentiates them; the others give z* its own tangent
    # after the steps, and would discard the steps'. Outside a dual level forward mode stays
    # as the caller set it, for an f that opens a dual level of its own.
    tangents = backward.differentiates_solver
    dual = in_dual_level()
    record_graph = attach and backward.differentiates_solver
    if record_graph:
        f_flat = backward.counting(f_flat)
    # Dynamo's guards tell no dual input from a plain one, so steps carrying tangents would
    # run the version compiled for a solve without them, whose inductor kernels refuse them
    # ("Trying to use forward AD with addmm_out"): they run eagerly, and record no graph.
    eager_tangents = dual and tangents
    options = compile_options(compile, z.device)
    if eager_tangents:
        options = None
    # A step recorded as a graph must not depend on autograd's record of the solve; a device
    # without a recorder (a CPU) runs compile="graph" eagerly, as compile=False.
    graph = compile == GRAPH and not (record_graph or eager_tangents) and device in RECORDERS
    if graph and isinstance(backward, ImplicitAdjoint):
        backward = backward.recorded()
    if isinstance(backward, ImplicitAdjoint):
        backward = backward.rounding_in(computing_dtype(structure.dtype, device))
    if stop_on_convergence is None:
        stop_on_convergence = device == "cpu"
    with (
        torch.set_grad_enabled(record_graph),
        own_precision(),
        fwAD._set_fwd_grad_enabled(tangents) if dual else nullcontext(),
    ):
        start = z if record_graph else z.detach()
        if dual and tangents and not record_graph:  # detach dropped z0's tangent as well
            start = with_tangent(start, fwAD.unpack_dual(z).tangent)
        # Selects read their masks only where a read stalls nothing: a CPU, run eagerly.
        eager = options is None and not graph
        reads = stop_on_convergence and eager and device == "cpu"
        monitor = Monitor(start, termination, reads=reads)
        nfe, steps = iterate(
            method,
            f_flat,
            start,
            monitor,
            max_steps,
            check_every,
            options,
            check_start,
            stop_on_convergence,
            graph,
            compile_region(solver, method, f, structure.dtype, z.device, record_graph),
        )
        monitor.refuse_overflowed()
        nfe += monitor.remeasure(f_flat)
    spent = backward.evaluations if attach else 0
    stats = SolveStats.from_monitor(monitor, initial_nfe + nfe + spent, steps)
    image = None
    with own_precision():
        z_star = monitor.best_z
        if attach:
            z_star, image = backward.attach(f_flat, z_star, start, stats)
        elif dual and not tangents:
            z_star = tangent_without_graph(backward, f_flat, z_star, stats)
    z = structure.unflatten(z_star.to(structure.dtype))
    if image is not None:
        image = z if image is z_star else structure.unflatten(image.to(structure.dtype))
    return Solution(z, stats, image)


def _check_arguments(
    f: object,
    adjoint: str,
    max_steps: int,
    check_every: int | None,
    initial_nfe: int,
    check_start: bool,
    stop_on_convergence: bool | None,
) -> None:
    """Raise a TypeError or ValueError naming the first of solve's own arguments that is not
    allowed, or a RuntimeError where solve runs under a torch.func transform (`untransformed`),
    before any evaluation of f (the solver's and adjoint's options are checked as they are
    built)."""
    function("f", f, "z -> f(z), a state like z0")
    untransformed("raydeq.solve")
    choice("adjoint", adjoint, ADJOINTS)
    integer("max_steps", max_steps)
    if check_every is not None:
        integer("check_every", check_every)
    integer("initial_nfe", initial_nfe, 0)
    flag("check_start", check_start)
    flag("stop_on_convergence", stop_on_convergence, none=True)


def compile_region(
    solver: str,
    method: Method,
    f: Callable,
    dtype: torch.dtype,
    device: torch.device,
    grad: bool,
) -> Hashable:
    """The kind of solve whose compiled versions dynamo keeps apart from other kinds'
    (driver.wrapped): each part makes versions of its own anyway, so that a process that
    alternates them compiles no more often, and no kind runs eagerly for the others' versions.
    The solver where its steps are compiled (Euler, BS3 and Tsit5 share one step function,
    their tableaus constants in it), not where f alone is (Anderson, Broyden); the state's
    dtype and device, whether the solve records autograd's graph, and f's code."""
    return (solver if method.capturable else None, dtype, device, grad, code_of(f))


def code_of(f: Callable) -> object:
    """What dynamo's guards know f by: a function's or bound method's code (a partial's
    function's), else f's type (a module, whose type fixes its forward's code)."""
    while isinstance(f, partial):
        f = f.func
    return getattr(f, "__code__", type(f))


def outside_autocast(
    f: Callable[[torch.Tensor], torch.Tensor], device: str
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], AbstractContextManager]]:
    """f under the caller's autocast, and the context that turns it off for the solver's own
    arithmetic (Anderson's and Broyden's batched products, GMRES's triangular solve), which
    stays in the state's float32; f itself and no context where no autocast is on."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return f, nullcontext

    def autocast_f(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=dtype):
            return f(z)

    return autocast_f, partial(torch.autocast, device, enabled=False)


def autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype of the caller's autocast on `device`, None where none is on."""
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    return torch.get_autocast_dtype(device)


def computing_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """The dtype f computes in: the state's, or the caller's autocast's where it is on and
    coarser."""
    amp = autocast_dtype(device)
    return dtype if amp is None else max(dtype, amp, key=lambda d: torch.finfo(d).eps)


def compile_options(compile: bool | dict | str, device: torch.device) -> dict | None:
    """torch.compile's options for `compile=`: None to run eagerly (or to record the steps as
    graphs, compile="graph"); CUDA graphs on a GPU."""
    allowed = f"True, False, {GRAPH!r} or a dict of torch.compile options"
    if not isinstance(compile, bool | dict | str):
        raise TypeError(f"compile={reprlib.repr(compile)} must be {allowed}")
    if isinstance(compile, str) and compile != GRAPH:
        raise ValueError(f"compile={compile!r} must be {allowed}")
    if isinstance(compile, dict):
        return compile
    if compile in (False, GRAPH):
        return None
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}
