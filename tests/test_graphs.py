"""compile="graph": a solver step recorded once per solve and replayed.

A CPU has no CUDA graphs; there the recorder is replaced by a tracer with the same contract
(make_fx: the step's Python runs once, its aten operations are replayed on the same tensors),
which checks what a graph can break: the carry and the monitor's state living in the tensors
the recording read, and the checks between steps that replace the running mask.
"""

import contextlib
import gc
import threading
import weakref

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import raydeq
from raydeq.solvers import GMRES, Status, gmres, graphs

D, B = 6, 5
CAPTURABLE = ["vcab3", "tsit5", "bs3", "euler", "fixed_point"]


class TracedRecorder:
    """A recorder for the CPU: records by tracing (which runs the step, so the tensors it
    wrote are put back, as a capture leaves them) and replays the traced graph."""

    def __init__(self, device: torch.device, shares=None) -> None:
        self.graph = None

    def warm_up(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def record(self, body, written) -> None:
        before = [t.clone() for t in written]
        self.graph = make_fx(lambda: body())()
        for tensor, value in zip(written, before, strict=True):
            tensor.copy_(value)

    def replay(self) -> None:
        self.graph()


@pytest.fixture
def traced(monkeypatch):
    monkeypatch.setitem(graphs.RECORDERS, "cpu", TracedRecorder)
    monkeypatch.setattr(gmres, "WORKSPACES", type(gmres.WORKSPACES)())


def problem(seed: int):
    """f(z) = tanh(W z + x) with samples of different contraction (they stop on different
    steps, so the running mask changes between replays); counts f's Python calls."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    w = (0.9 * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, B)[:, None]
    x.requires_grad_()
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.tanh(z @ w.T + x)

    return f, (w, x), calls


def eager_and_graphed(seed: int, **options) -> list[tuple]:
    """problem(seed) solved with compile=False, then "graph": for each the solution, the
    gradients of sum(z*^2) and the calls of f's Python."""
    out = []
    for compile in (False, "graph"):
        f, params, calls = problem(seed)
        z0 = torch.zeros(B, D, dtype=torch.float64)
        sol = raydeq.solve(f, z0, reltol=0.0, stop_on_convergence=False, compile=compile, **options)
        out.append((sol, torch.autograd.grad(sol.z.square().sum(), params), calls[0]))
    return out


@pytest.mark.parametrize("solver", CAPTURABLE)
@pytest.mark.parametrize("check_every", [None, 1, 3])
def test_a_recorded_step_solves_and_differentiates_as_the_eager_one(traced, solver, check_every):
    """Same steps, NFE, statuses, z* and implicit gradient, bit for bit; and f's Python runs
    only for the steps before the recording, the recording and the attachment of z*."""
    (eager, eager_grads, eager_calls), (graphed, graphed_grads, graphed_calls) = eager_and_graphed(
        0, solver=solver, abstol=1e-9, max_steps=500, check_every=check_every
    )
    assert (graphed.stats.nfe, graphed.stats.steps) == (eager.stats.nfe, eager.stats.steps)
    assert torch.equal(graphed.stats.status, eager.stats.status)
    assert bool(eager.stats.converged.all())
    assert torch.equal(graphed.z, eager.z)
    for a, b in zip(graphed_grads, eager_grads, strict=True):
        assert torch.equal(a, b)
    assert eager_calls == eager.stats.nfe
    assert graphed_calls < eager_calls / 3, (graphed_calls, eager_calls)


@pytest.mark.parametrize("solver", ["vcab3", "euler"])
def test_a_batch_that_runs_to_max_steps_stops_there(traced, solver):
    """Replays stop at max_steps, with the best iterates of the eager solve."""
    (eager, _, _), (graphed, _, _) = eager_and_graphed(1, solver=solver, abstol=1e-14, max_steps=9)
    assert eager.stats.steps == graphed.stats.steps == 9
    assert torch.equal(graphed.z, eager.z) and not bool(graphed.stats.converged.any())


def test_a_sample_the_divergence_test_stops_after_the_recording_stays_stopped(traced):
    """Sample 1's fixed-point iteration z <- M z + c, M = [[0.9, 0.53], [0, 0.9]], has a
    transient: its residual passes divergence=2 times its first on step 7, after the step was
    recorded (step 2), and the check stops it, DIVERGED at z0 = 0. Replays read the limit that
    check set: sample 1 does not run on to its fixed point (53, 10) while sample 0 (M = 0.95 I)
    converges at (20, 20) on step 406."""
    m = torch.tensor([[[0.95, 0.0], [0.0, 0.95]], [[0.9, 0.53], [0.0, 0.9]]], dtype=torch.float64)
    c = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    z0 = torch.zeros(2, 2, dtype=torch.float64)
    options = {
        "solver": "fixed_point",
        "abstol": 1e-9,
        "reltol": 0.0,
        "divergence": 2.0,
        "max_steps": 600,
    }
    with torch.no_grad():
        graphed = raydeq.solve(
            lambda z: (m @ z[:, :, None])[:, :, 0] + c,
            z0,
            check_every=5,
            compile="graph",
            **options,
        )
    assert graphed.stats.status.tolist() == [Status.CONVERGED, Status.DIVERGED]
    assert graphed.stats.steps == 406 and torch.equal(graphed.z[1], z0[1])
    torch.testing.assert_close(graphed.z[0], torch.full((2,), 20.0, dtype=torch.float64))


@pytest.mark.parametrize("adjoint", ["gmres", "unrolled"])
def test_without_a_recorder_and_for_the_unrolled_adjoint_the_steps_run_eagerly(adjoint):
    """A CPU has no recorder: compile="graph" solves as eager; so does an unrolled adjoint,
    whose steps autograd records."""
    (eager, eager_grads, calls), (graphed, graphed_grads, graphed_calls) = eager_and_graphed(
        2, adjoint=adjoint
    )
    assert torch.equal(graphed.z, eager.z) and graphed_calls == calls
    for a, b in zip(graphed_grads, eager_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "variant"),
    [("mnist_dense", "vanilla"), ("mnist_dense", "skip_reg"), ("mnist_mdeq", "skip")],
)
def test_a_model_trains_with_recorded_steps_as_eagerly(traced, name, variant):
    """A model as a layer in training (Skip Reg. checks its predicted start first; the MDEQ's
    state is a tuple of scales and its f draws dropout masks): over three steps the same
    logits, NFE and parameter gradients with compile="graph" as without."""
    from raydeq.bench.harness import models

    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = []
    for compile in (False, "graph"):
        model = models.build(name, variant, torch.device("cpu"), 0, compile=compile)
        for seed in range(3):
            torch.manual_seed(seed)
            model.zero_grad()
            logits, layer = model(images)
            logits.square().sum().backward()
        out.append((logits, layer.stats.nfe, [p.grad for p in model.parameters()]))
    (logits, nfe, grads), (graphed_logits, graphed_nfe, graphed_grads) = out
    assert torch.equal(graphed_logits, logits) and graphed_nfe == nfe
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(graphed_grads, grads, strict=True)
    )


@pytest.mark.parametrize("restart", [3, 20])
def test_recorded_arnoldi_steps_solve_as_the_eager_ones(traced, monkeypatch, restart):
    """GMRES with graph=True over four solves of one shape, restarted or not, needing more
    steps as they go: x and its info as eager GMRES's bit for bit; the Python of each Arnoldi
    step j runs twice at most (its warm-up and its recording), every later run replays."""
    calls = [0]
    step = gmres.arnoldi

    def counted(*args):
        calls[0] += 1
        return step(*args)

    monkeypatch.setattr(gmres, "arnoldi", counted)
    g = torch.Generator().manual_seed(4)
    a = torch.eye(D, dtype=torch.float64) - 0.5 * torch.randn(B, D, D, generator=g) / D**0.5
    python = {False: 0, True: 0}
    for rtol in (1e-3, 1e-6, 1e-9, 1e-12):
        b = torch.randn(B, D, generator=g, dtype=torch.float64)
        results = []
        for graph in (False, True):
            calls[0] = 0
            solver = GMRES(rtol=rtol, restart=restart, max_iters=60, graph=graph)
            results.append(solver(lambda u: (a @ u[:, :, None])[:, :, 0], b, b))
            python[graph] += calls[0]
        (x, info), (graphed_x, graphed_info) = results
        assert torch.equal(graphed_x, x) and bool(info.converged.all())
        assert graphed_info.matvecs == info.matvecs
        assert torch.equal(graphed_info.iterations, info.iterations)
        assert torch.equal(graphed_info.residual, info.residual)
    ((_, steps),) = gmres.WORKSPACES.values()
    assert python[True] == sum(min(step.calls, 2) for step in steps.values())
    assert sum(step.calls for step in steps.values()) == python[False] > python[True]


def test_an_arnoldi_step_whose_recording_failed_is_recorded_again_not_replayed(traced, monkeypatch):
    """GMRES keeps its recorded steps per batch shape: after a recording that failed (the
    device out of memory mid-capture, which leaves a graph of part of the step), the next
    solve of that shape records the step again and solves as eager GMRES, where it replayed
    what the failed recording had left."""
    failures = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]

    class Flaky(TracedRecorder):
        def record(self, body, written) -> None:
            if failures:
                raise failures.pop()
            super().record(body, written)

    monkeypatch.setitem(graphs.RECORDERS, "cpu", Flaky)
    g = torch.Generator().manual_seed(8)
    a = torch.eye(D, dtype=torch.float64) - 0.5 * torch.randn(B, D, D, generator=g) / D**0.5
    b = torch.randn(B, D, generator=g, dtype=torch.float64)

    def solve(graph: bool):
        return GMRES(rtol=1e-4, graph=graph)(lambda u: (a @ u[:, :, None])[:, :, 0], b, b)

    solve(True)
    with pytest.raises(RuntimeError, match=r"could not record .* \(CUDA out of memory\. "):
        solve(True)
    (x, info), (eager_x, eager_info) = solve(True), solve(False)
    assert torch.equal(x, eager_x) and bool(info.converged.all())
    assert info.matvecs == eager_info.matvecs


def test_repeated_backward_passes_replay_and_match_eager(traced):
    """Three training steps of a solve with compile="graph": the same gradients as eager."""
    f, params, _ = problem(5)
    for _ in range(3):
        grads = []
        for compile in (False, "graph"):
            sol = raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), compile=compile)
            grads.append(torch.autograd.grad(sol.z.square().sum(), params))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
    assert gmres.WORKSPACES and all(len(steps) for _, steps in gmres.WORKSPACES.values())


@pytest.mark.parametrize("solver", CAPTURABLE)
def test_a_recorded_solve_leaves_the_callers_z0_unchanged(traced, solver):
    """The recorded step writes its carry into buffers of its own, never into z0."""
    f, _, _ = problem(6)
    z0 = torch.full((B, D), 0.25, dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(f, z0, solver="euler", compile="graph", abstol=1e-9)
    assert sol.stats.steps > 2 and bool(sol.stats.converged.all())
    assert torch.equal(z0, torch.full((B, D), 0.25, dtype=torch.float64))


def test_a_recorded_solves_recording_is_freed_when_the_solve_returns(monkeypatch):
    """Each solve's recording (on a GPU a CUDA graph and its memory pool) goes as the solve
    returns, without Python's cycle collector: its step was in a reference cycle, so over
    many solves the recordings stayed until a collection found them."""
    made = []

    class Watched:
        """Replays by running the step again: a trace would leave cycles of its own."""

        def __init__(self, device: torch.device, shares=None) -> None:
            self.body = None
            made.append(weakref.ref(self))

        def warm_up(self) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

        def record(self, body, written) -> None:
            self.body = body

        def replay(self) -> None:
            self.body()

    monkeypatch.setitem(graphs.RECORDERS, "cpu", Watched)
    f, _, _ = problem(6)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            with torch.no_grad():
                sol = raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), compile="graph")
            assert sol.stats.steps > 2 and bool(sol.stats.converged.all())
        alive = [ref for ref in made if ref() is not None]
    finally:
        gc.enable()
    assert len(made) == 3 and alive == []


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_a_solver_with_a_growing_history_runs_eagerly_under_graph(traced, solver):
    """Anderson's and Broyden's steps change shape as their history grows: compile="graph"
    records none of them and solves as eager, with f's Python run on every evaluation."""
    (eager, eager_grads, eager_calls), (graphed, graphed_grads, graphed_calls) = eager_and_graphed(
        7, solver=solver, abstol=1e-9, max_steps=100
    )
    assert bool(eager.stats.converged.all())
    assert (graphed.stats.nfe, graphed.stats.steps) == (eager.stats.nfe, eager.stats.steps)
    assert torch.equal(graphed.z, eager.z) and graphed_calls == eager_calls
    for a, b in zip(graphed_grads, eager_grads, strict=True):
        assert torch.equal(a, b)


def test_a_step_that_cannot_be_recorded_says_which_option_to_change(monkeypatch):
    """A recording that fails (f reading the host, say) names compile='graph' and the way out."""

    class Refusing(TracedRecorder):
        def record(self, body, written) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setitem(graphs.RECORDERS, "cpu", Refusing)
    f, _, _ = problem(0)
    with pytest.raises(RuntimeError, match="compile='graph' could not record a solver step"):
        raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), compile="graph")


def test_a_failed_recording_names_the_first_line_of_its_cause(monkeypatch):
    """The message quotes the recorder's error, its first line only, and chains it."""
    cause = RuntimeError("operation not permitted when stream is capturing\nstack trace here")

    class Refusing(TracedRecorder):
        def record(self, body, written) -> None:
            raise cause

    monkeypatch.setitem(graphs.RECORDERS, "cpu", Refusing)
    f, _, _ = problem(0)
    with pytest.raises(RuntimeError) as failure:
        raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), compile="graph")
    message = str(failure.value)
    assert "(operation not permitted when stream is capturing)" in message
    assert "stack trace" not in message and failure.value.__cause__ is cause


def test_the_step_cost_benchmark_counts_a_graphed_solve(traced):
    """step_cost's compile="graph" count (a GPU row) solves as the eager one; on a CPU the
    traced stand-in's replays dispatch their operations, a CUDA graph's do not."""
    from raydeq.bench.suites.step_cost import step_cost

    eager, graphed = (step_cost("euler", 8, 16, compile=c) for c in (False, "graph"))
    assert (graphed["steps"], graphed["nfe"]) == (eager["steps"], eager["nfe"])
    assert graphed["converged"] and graphed["syncs"] == eager["syncs"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["vcab3", "euler"])
def test_cuda_graph_steps_solve_and_differentiate_as_eager(solver):
    """On a GPU: over repeated solves (each records its own graph) the same NFE, z* and
    gradient as eager, with f's Python run only before the replays."""
    _, params, _ = problem(3)
    w, x = (p.detach().cuda().float().requires_grad_() for p in params)
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.tanh(z @ w.T + x)

    def run(compile):
        calls[0] = 0
        sol = raydeq.solve(
            f, torch.zeros_like(x), solver=solver, abstol=1e-5, reltol=0.0, compile=compile
        )
        (grad,) = torch.autograd.grad(sol.z.square().sum(), [w])
        return sol.stats.nfe, sol.z.detach().clone(), grad, calls[0]

    nfe, z, grad, eager_calls = run(False)
    assert eager_calls == nfe
    for _ in range(3):
        graphed = run("graph")
        assert graphed[0] == nfe and graphed[3] < eager_calls / 3
        torch.testing.assert_close(graphed[1], z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graphed[2], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_graphed_solve_dispatches_few_operations_per_step_on_a_gpu():
    """step_cost's problem (batch 64, width 128) on a GPU: the host dispatches at most
    OPS_LIMITS's operations per step (40 VCAB3, 30 Euler) when its steps are replayed graphs."""
    from raydeq.bench.suites.step_cost import OPS_LIMITS, step_cost

    cuda = torch.device("cuda")
    for solver, limit in OPS_LIMITS.items():
        eager = step_cost(solver, 64, 128, device=cuda)
        graphed = step_cost(solver, 64, 128, device=cuda, compile="graph")
        assert (graphed["steps"], graphed["nfe"]) == (eager["steps"], eager["nfe"])
        assert graphed["ops"] <= limit < eager["ops"], (solver, graphed, eager)


def test_a_nested_solves_recorded_adjoint_keeps_the_outer_ones_workspace(traced):
    """An f that solves a DEQ of the outer state's shape runs the inner adjoint's GMRES inside
    each product of the outer one: recorded, both get the eager gradients, bit for bit."""
    g = torch.Generator().manual_seed(7)
    w, v = (
        (0.5 * torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5).requires_grad_()
        for _ in range(2)
    )
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    tight = {"abstol": 1e-10, "reltol": 0.0, "adjoint_options": {"rtol": 1e-10}}

    def gradients(compile):
        def f(z):
            u = z @ w.T + x
            inner = raydeq.solve(
                lambda y: torch.tanh(y @ v.T + u),
                torch.zeros_like(u),
                solver="anderson",
                compile=compile,
                **tight,
            )
            return torch.tanh(inner.z)

        sol = raydeq.solve(f, torch.zeros_like(x), solver="anderson", compile=compile, **tight)
        return torch.autograd.grad(sol.z.square().sum(), (w, v))

    eager = gradients(False)
    for _ in range(2):
        for a, b in zip(gradients("graph"), eager, strict=True):
            assert torch.equal(a, b)
    assert not gmres.IN_USE and len(gmres.WORKSPACES) == 2


class FakeStream:
    """A stream of a CUDA-less machine: waits on nothing."""

    def __init__(self, device=None) -> None:
        self.device = device

    def wait_stream(self, other) -> None:
        pass


class FakeGraph:
    """A CUDA graph of a CUDA-less machine: its capture runs nothing."""

    def capture_begin(self, pool=None, capture_error_mode="global") -> None:
        pass

    def capture_end(self) -> None:
        pass

    def pool(self) -> None:
        return None


def test_a_capture_keeps_the_side_stream_from_other_threads(monkeypatch):
    """A capture records whatever any thread queues on its stream: another thread's warm-up
    on the device's side stream waits until the capture has ended, instead of joining it."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(graphs.CudaGraphRecorder, "STREAMS", {})
    device = torch.device("cuda")
    capturing, warming = threading.Event(), threading.Event()
    seen = []

    def body():
        capturing.set()
        seen.append(warming.wait(timeout=0.5))

    def warm_up():
        capturing.wait()
        with graphs.CudaGraphRecorder(device).warm_up():
            warming.set()

    other = threading.Thread(target=warm_up)
    other.start()
    graphs.CudaGraphRecorder(device).record(body, [])
    other.join()
    assert seen == [False] and warming.is_set()


def test_work_after_a_warm_up_that_raised_waits_for_the_side_stream(monkeypatch):
    """A warm-up that raises has queued kernels on the side stream that write the step's
    buffers: the device's stream still waits for them, so that work queued after the error
    (the next backward pass, writing the same GMRES workspace) cannot run before them."""
    waits = []

    class Recorded(FakeStream):
        def wait_stream(self, other) -> None:
            waits.append((self, other))

    current = Recorded(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "Stream", Recorded)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(graphs.CudaGraphRecorder, "STREAMS", {})
    recorder = graphs.CudaGraphRecorder(torch.device("cuda"))
    with pytest.raises(torch.OutOfMemoryError), recorder.warm_up():
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert waits == [(recorder.stream, current), (current, recorder.stream)]
