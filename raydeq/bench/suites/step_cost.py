"""Cost of a solver step in launches and stalls: aten operations and host syncs per step.

The same for the implicit backward's GMRES, per Arnoldi step (one product with I - J^T).

On an accelerator each aten operation is a kernel launch and each host read of a tensor
(`aten._local_scalar_dense`, behind `.item()`, `bool(t)`, `int(t)`) a stall of the queue, so
small and medium DEQs are bound by these counts rather than by arithmetic. Counted on the CPU
over one whole forward solve (no autograd), divided by its steps. With compile=True on a CPU
the steps run as inductor's fused C++ kernels, which no dispatch mode sees: there the
profiler counts the launches (aten operations and kernels) the host makes.
"""

from __future__ import annotations

import math
import os
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import raydeq
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.report import Section, Target, error_line
from raydeq.bench.harness.timing import part_line
from raydeq.solvers import GMRES, SOLVERS
from raydeq.solvers.gmres import ARNOLDI_CHECK
from raydeq.solvers.solve import GRAPH, make_solver

SYNCS = ("_local_scalar_dense", "item", "is_nonzero")
# What the profiler calls inductor's C++ kernels when they record themselves
# (cpp.enable_kernel_profile): graph_<n>_cpp_fused_<ops>_<k>.
KERNEL = "cpp_fused_"
CPU = torch.device("cpu")


@dataclass(frozen=True)
class StepCostSize:
    """The dense layer's batch and width."""

    batch: int
    dim: int


SIZES = {
    "tiny": StepCostSize(batch=8, dim=16),
    "quick": StepCostSize(batch=64, dim=128),
    "full": StepCostSize(batch=64, dim=128),
}
TOL = 1e-4
# Every counted solve's settings besides its solver and compile=: read as on an accelerator.
SOLVE = {"abstol": TOL, "reltol": 0.0, "max_steps": 1000, "stop_on_convergence": False}
# The targets: at most one host read every four steps, and operations per step
# within the budget of a launch-bound step (f itself takes 4 of them here).
SYNC_LIMIT = 0.25
OPS_LIMITS = {"vcab3": 40, "euler": 30}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> object:
        """Count func, then run it."""
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        """Host reads of tensor values."""
        return sum(self.ops[name] for name in SYNCS)


def dense_layer(
    batch: int, dim: int, seed: int = 0, device: torch.device = CPU
) -> tuple[Callable, torch.Tensor]:
    """The counted problem: f(z) = tanh(W z + x), W = 0.9 * Gaussian / sqrt(dim), z0 = 0."""
    g = torch.Generator().manual_seed(seed)
    w = (0.9 * torch.randn(dim, dim, generator=g) / dim**0.5).to(device)
    x = torch.randn(batch, dim, generator=g).to(device)
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(batch, dim, device=device)


def step_cost(
    solver: str,
    batch: int,
    dim: int,
    seed: int = 0,
    device: torch.device = CPU,
    compile: bool | str = False,
) -> dict[str, float]:
    """Steps, evaluations, aten operations and host syncs per step of one forward solve, read
    as on an accelerator (on a CPU a solve also reads after every step whether any sample
    still runs, which stalls nothing there: stop_on_convergence). The operations are those
    the host dispatches: a replayed CUDA graph (compile="graph") dispatches none."""
    f, z0 = dense_layer(batch, dim, seed, device)
    with torch.no_grad(), OpCounter() as counter:
        sol = raydeq.solve(f, z0, solver=solver, compile=compile, **SOLVE)
    steps = sol.stats.steps
    return {
        "steps": steps,
        "nfe": sol.stats.nfe,
        "ops": sum(counter.ops.values()) / steps,
        "syncs": counter.syncs / steps,
        "converged": bool(sol.stats.converged.all()),
    }


def is_launch(name: str) -> bool:
    """Whether a profiler event is an aten operation or an inductor kernel."""
    return name.startswith("aten::") or KERNEL in name


def outermost(event: FunctionEvent) -> bool:
    """Whether no aten operation or kernel encloses a profiler event: what an operation calls
    is part of its own launch."""
    parent = event.cpu_parent
    while parent is not None:
        if is_launch(parent.name):
            return False
        parent = parent.cpu_parent
    return True


def compiled_step_cost(solver: str, batch: int, dim: int, seed: int = 0) -> dict[str, float]:
    """step_cost's counts with compile=True on a CPU: the launches the host makes per step,
    aten operations (the eager start and checks, and the extern kernels inside a compiled
    step, such as the matrix product) and inductor's fused kernels, counted by the profiler
    over a second solve (the first compiles) with each kernel recording itself. torch.compile's
    caches are cleared before (a step compiled without those records would count no kernel)
    and after (the records cost time)."""
    f, z0 = dense_layer(batch, dim, seed)
    # kineto writes its start and stop, and on a machine without a GPU its failed device
    # probe, to stderr, between the bench's progress lines.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch._inductor import config as inductor_config  # the compile stack: only here

    torch._dynamo.reset()
    try:
        with torch.no_grad(), inductor_config.patch({"cpp.enable_kernel_profile": True}):
            raydeq.solve(f, z0, solver=solver, compile=True, **SOLVE)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sol = raydeq.solve(f, z0, solver=solver, compile=True, **SOLVE)
    finally:
        torch._dynamo.reset()
    events = prof.events()
    launches = [e.name for e in events if is_launch(e.name) and outermost(e)]
    if not any(KERNEL in name for name in launches):
        raise RuntimeError(f"{solver}: no inductor kernel recorded itself, so none was counted")
    steps = sol.stats.steps
    return {
        "steps": steps,
        "nfe": sol.stats.nfe,
        "ops": len(launches) / steps,
        "syncs": sum(e.name == "aten::_local_scalar_dense" for e in events) / steps,
        "converged": bool(sol.stats.converged.all()),
    }


def arnoldi_step_cost(batch: int, dim: int, seed: int = 0) -> dict[str, float]:
    """Products, aten operations and host syncs per product of one GMRES solve of the implicit
    backward's system (I - J_f(z*))^T g = v at the dense layer's fixed point, at rtol TOL,
    from g = v as the implicit adjoint starts it, read as on an accelerator (every
    ARNOLDI_CHECK steps; on a CPU GMRES reads after every step, which stalls nothing there)."""
    f, z0 = dense_layer(batch, dim, seed)
    z = raydeq.solve(f, z0, abstol=TOL / 10, reltol=0.0).z.requires_grad_()
    fz = f(z)
    v = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))

    def operator(u: torch.Tensor) -> torch.Tensor:
        return u - torch.autograd.grad(fz, z, u, retain_graph=True)[0]

    with OpCounter() as counter:
        _, info = GMRES(rtol=TOL, check_every=ARNOLDI_CHECK)(operator, v, v)
    return {
        "steps": info.matvecs,
        "ops": sum(counter.ops.values()) / info.matvecs,
        "syncs": counter.syncs / info.matvecs,
        "converged": bool(info.converged.all()),
    }


def add_solver(section: Section, solver: str, label: str, cost: dict[str, float]) -> None:
    """A solver's row and its targets: syncs per step, and ops per step where OPS_LIMITS
    sets one."""
    section.add(
        solver=label,
        steps=cost["steps"],
        NFE=cost["nfe"],
        **{"ops per step": cost["ops"], "syncs per step": cost["syncs"]},
        converged=cost["converged"],
    )
    section.targets.append(Target(f"{label}: syncs per step", cost["syncs"], SYNC_LIMIT))
    if solver in OPS_LIMITS:
        section.targets.append(Target(f"{label}: ops per step", cost["ops"], OPS_LIMITS[solver]))


def run(ctx: Context) -> Section:
    """Count every solver's operations and syncs per step."""
    size = ctx.pick(SIZES)
    batch, dim = size.batch, size.dim
    section = Section(
        name="step_cost",
        title="Aten operations and host syncs per solver step",
        columns=["solver", "steps", "NFE", "ops per step", "syncs per step", "converged"],
        notes=[
            f"f(z) = tanh(W z + x), batch {batch}, width {dim}, float32, abstol {TOL:g}, "
            "reltol 0, no autograd, read as on an accelerator (stop_on_convergence=False); one "
            "forward solve counted with a TorchDispatchMode "
            "(f's own 4 operations included); syncs = aten._local_scalar_dense, item, "
            "is_nonzero. gmres (backward): the implicit backward's solve (I - J^T) g = v at "
            f"the layer's fixed point, rtol {TOL:g}, from g = v, read every {ARNOLDI_CHECK} "
            "Arnoldi steps as on an accelerator (on a CPU it reads after every step); steps = "
            "products with I - J^T (the residual at v, then one per Arnoldi step), each with its "
            "vector-Jacobian product's operations. On a GPU the capturable solvers are also "
            'counted with compile="graph" on the device: the operations the host dispatches '
            "(a replayed step dispatches none; the start, one eager step, the recording and the "
            "checks do). On a CPU they are also counted with compile=True (inductor's C++ "
            "kernels, which no dispatch mode sees), by the profiler over a second solve: the "
            "launches, aten operations (the eager start and checks, the matrix product inside "
            "a step) and fused kernels; syncs = aten._local_scalar_dense.",
        ],
    )
    # The solvers whose steps compile= captures: on a GPU compile="graph" records each as a
    # CUDA graph (one launch a replayed step), on a CPU compile=True fuses each into kernels.
    captured = ctx.device.type in ("cuda", "cpu")
    compiled = [s for s in SOLVERS if captured and make_solver(s, {}).capturable]
    parts = len(SOLVERS) + len(compiled) + 1
    for number, solver in enumerate(SOLVERS, 1):
        part_line(f"[step_cost] counting {solver}", number, parts)
        add_solver(section, solver, solver, step_cost(solver, batch, dim, ctx.seed))
    for number, solver in enumerate(compiled, len(SOLVERS) + 1):
        if ctx.device.type == "cuda":
            label = f'{solver}, compile="graph"'
            count = partial(step_cost, solver, batch, dim, ctx.seed, ctx.device, compile=GRAPH)
        else:
            label = f"{solver}, compile=True"
            count = partial(compiled_step_cost, solver, batch, dim, ctx.seed)
        part_line(f"[step_cost] counting {label}", number, parts)
        try:
            cost = count()
        except Exception as err:  # a compile or capture that fails here must not lose the section
            traceback.print_exc()
            section.add(solver=label)
            error = f"failed: {error_line(err)}"
            section.targets.append(
                Target(f"{label}: syncs per step", math.inf, SYNC_LIMIT, detail=error)
            )
            continue
        add_solver(section, solver, label, cost)
    part_line("[step_cost] counting gmres (backward)", parts, parts)
    cost = arnoldi_step_cost(batch, dim, ctx.seed)
    section.add(
        solver="gmres (backward)",
        steps=cost["steps"],
        NFE=None,
        **{"ops per step": cost["ops"], "syncs per step": cost["syncs"]},
        converged=cost["converged"],
    )
    section.targets.append(Target("gmres: syncs per Arnoldi step", cost["syncs"], SYNC_LIMIT))
    return section
