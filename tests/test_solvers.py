"""Forward fixed points against scipy, gradients against a dense implicit-function reference."""

import collections
import math
import re
from functools import partial

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import raydeq
from raydeq.bench.harness.problems import SpectralProblem, Spectrum
from raydeq.bench.suites.step_cost import OpCounter
from raydeq.solvers import SOLVERS, Status
from raydeq.solvers import options as construct_options
from raydeq.solvers.termination import Monitor, Termination

D, B = 6, 3


def problem(seed: int = 0, contraction: float = 0.8, dtype=torch.float64):
    """A random contractive DEQ cell f(z) = tanh(W z + U x + b) with its parameters."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, D, generator=g, dtype=dtype)
    w = contraction * w / torch.linalg.matrix_norm(w, 2)
    u = torch.randn(D, D, generator=g, dtype=dtype)
    b = torch.randn(D, generator=g, dtype=dtype)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    params = [p.requires_grad_() for p in (w, u, b, x)]

    def f(z):
        w, u, b, x = params
        return torch.tanh(z @ w.T + x @ u.T + b)

    return f, params


def tight(solver: str, **kwargs) -> dict:
    """Steady state to 1e-10 (RMS residual); the ODE solvers' local error follows it."""
    return {"abstol": 1e-10, "reltol": 0.0, "max_steps": 5000} | kwargs


def scipy_fixed_point(f, z_shape) -> np.ndarray:
    """Per-sample root of f(z) - z by scipy.optimize.root (hybr)."""
    out = []
    for i in range(z_shape[0]):

        def g(v, i=i):
            z = torch.zeros(z_shape, dtype=torch.float64)
            z[i] = torch.from_numpy(v)
            with torch.no_grad():
                return (f(z)[i] - z[i]).numpy()

        out.append(scipy.optimize.root(g, np.zeros(z_shape[1]), tol=1e-14).x)
    return np.stack(out)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_scipy_root(solver, seed):
    f, _ = problem(seed)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(f, z0, solver=solver, **tight(solver))
    assert bool(sol.stats.converged.all())
    assert (sol.stats.status == Status.CONVERGED).all()
    np.testing.assert_allclose(sol.z.numpy(), scipy_fixed_point(f, (B, D)), atol=1e-8, rtol=0)


def ift_reference(f, params, v):
    """Gradient by the implicit function theorem with an explicit Jacobian and a dense solve."""
    z0 = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        z = raydeq.solve(f, z0, solver="broyden", abstol=1e-14, reltol=0.0, max_steps=500).z
    us = []
    for i in range(B):
        jac = torch.autograd.functional.jacobian(lambda zi, i=i: f_row(f, z, zi, i), z[i])
        us.append(torch.linalg.solve((torch.eye(D, dtype=z.dtype) - jac).T, v[i]))
    u = torch.stack(us)
    z = z.requires_grad_(False)
    return torch.autograd.grad(f(z), params, u)


def f_row(f, z, zi, i):
    """f evaluated with sample i replaced by zi, sample i of the output (f is per-sample)."""
    rows = [zi if j == i else z[j].detach() for j in range(B)]
    return f(torch.stack(rows))[i]


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_gradients_match_dense_reference(solver, adjoint):
    f, params = problem(3)
    v = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    sol = raydeq.solve(
        f,
        torch.zeros(B, D, dtype=torch.float64),
        solver=solver,
        adjoint=adjoint,
        adjoint_options={"rtol": 1e-13, "max_iters": 500},
        **tight(solver),
    )
    grads = torch.autograd.grad((sol.z * v).sum(), params)
    expected = ift_reference(f, params, v)
    for got, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
    assert sol.stats.backward_nvjp > 1
    assert bool(sol.stats.backward_converged.all())


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point", "unrolled"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_a_half_precision_state_is_solved_in_float32_and_returned_as_given(dtype, rtol, adjoint):
    """The backward's triangular solve has no half kernel on a CPU: a float16 z0 ended in a
    NotImplementedError there; and half precision rounds at about the tolerances themselves.
    f still sees the state in half precision."""
    f, params = problem(3)
    half = [p.detach().to(dtype).requires_grad_() for p in params]

    def f_half(z):
        assert z.dtype == dtype  # f is called in the dtype it was given the state in
        w, u, b, x = half
        return torch.tanh(z @ w.T + x @ u.T + b)

    v = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    sol = raydeq.solve(f_half, torch.zeros(B, D, dtype=dtype), adjoint=adjoint, abstol=1e-4)
    assert sol.z.dtype == dtype and bool(sol.stats.converged.all())
    grads = torch.autograd.grad((sol.z.float() * v.float()).sum(), half)
    if adjoint == "unrolled":  # backprop through the same steps, which stop short of z*
        exact = raydeq.solve(
            f, torch.zeros(B, D, dtype=torch.float64), adjoint=adjoint, abstol=1e-4
        )
        expected = torch.autograd.grad((exact.z * v).sum(), params)
    else:
        expected = ift_reference(f, params, v)
    for got, ref in zip(grads, expected, strict=True):
        assert got.dtype == dtype
        assert float((got.double() - ref).norm() / ref.norm()) < rtol


@pytest.mark.parametrize(
    ("dtype", "amp"), [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_the_neumann_adjoint_of_a_half_precision_f_stops_at_its_rounding(dtype, amp):
    """A float16 or bfloat16 f (its state, or the caller's autocast) rounds its VJPs above
    fixed_point's default rtol of 1e-5: every backward ran to its 100 VJPs (102). Each sample
    now stops 5 iterations after its smallest residual once that is within the dtype's
    epsilon, with the same gradient, 0.05% (float16) to 0.4% (bfloat16) from float64's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g, dtype=torch.float64)
    w = 0.8 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(8, 32, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 32, generator=g, dtype=torch.float64)
    exact = raydeq.solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros(8, 32, dtype=torch.float64))
    (expected,) = torch.autograd.grad((exact.z * v).sum(), x)
    w_half, x_half = w.to(dtype), x.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        sol = raydeq.solve(
            lambda z: torch.tanh(z @ w_half.T + x_half),
            torch.zeros(8, 32, dtype=dtype),
            adjoint="fixed_point",
        )
    (grad,) = torch.autograd.grad((sol.z.double() * v).sum(), x_half)
    assert sol.stats.backward_nvjp <= 25
    assert not bool(sol.stats.backward_converged.all())
    eps = torch.finfo(torch.float16 if dtype == torch.float16 else torch.bfloat16).eps
    assert float((grad.double() - expected).norm() / expected.norm()) < eps / 1.5


def test_jfb_is_one_vjp_of_f_at_the_fixed_point():
    f, params = problem(4)
    v = torch.randn(B, D, dtype=torch.float64)
    sol = raydeq.solve(
        f,
        torch.zeros(B, D, dtype=torch.float64),
        solver="anderson",
        adjoint="jfb",
        abstol=1e-12,
        reltol=0.0,
        max_steps=500,
    )
    grads = torch.autograd.grad((sol.z * v).sum(), params)
    expected = torch.autograd.grad(f(sol.z.detach()), params, v)
    for got, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)  # z* known to 1e-12
    assert sol.stats.backward_nvjp == 1


def test_unrolled_backpropagates_through_the_iterations():
    f, params = problem(5)
    z0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, D, dtype=torch.float64)
    steps = 7
    sol = raydeq.solve(
        f, z0, solver="fixed_point", adjoint="unrolled", abstol=1e-300, reltol=0.0, max_steps=steps
    )
    z = z0
    for _ in range(steps - 1):
        z = f(z)
    torch.testing.assert_close(sol.z, z, rtol=0, atol=0)
    got = torch.autograd.grad((sol.z * v).sum(), [*params, z0])
    ref = torch.autograd.grad((z * v).sum(), [*params, z0])
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
def test_unrolled_gradient_approaches_the_implicit_one(solver):
    """Backpropagating through a converged solve gives the implicit function theorem's
    gradient; samples stop at different steps, and a stopped sample's frozen steps (Broyden's
    skipped updates included) must pass a zero gradient, not NaN."""
    f, params = problem(6)
    v = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z0 = torch.zeros(B, D, dtype=torch.float64)
    sol = raydeq.solve(f, z0, solver=solver, adjoint="unrolled", **tight(solver))
    got = torch.autograd.grad((sol.z * v).sum(), params)
    for a, b in zip(got, ift_reference(f, params, v), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def dual_problem(params, tangents, requires_grad: bool):
    """problem()'s f on dual copies of its parameters carrying `tangents` (call within a
    torch.autograd.forward_ad dual level), with the parameters' graph or without one."""
    duals = [
        fwAD.make_dual(p if requires_grad else p.detach(), t)
        for p, t in zip(params, tangents, strict=True)
    ]

    def f(z):
        w, u, b, x = duals
        return torch.tanh(z @ w.T + x @ u.T + b)

    return f


def test_an_f_that_takes_its_own_forward_mode_derivative_is_solved_as_written():
    """An f that opens a torch.autograd.forward_ad dual level of its own (a directional
    derivative of a potential, here of tanh: 1 - tanh^2) got no tangent inside a solve, which
    turned forward mode off for its steps, and solved to a wrong z*; outside a dual level a
    solve leaves forward mode as it finds it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)

    def f(z):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(torch.tanh(fwAD.make_dual(z, torch.ones_like(z)))).tangent
        return 0.5 * tangent * z + 0.1 * x

    sol = raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), abstol=1e-12, reltol=0.0)
    assert sol.stats.converged.all()
    expected = 0.5 * (1 - torch.tanh(sol.z) ** 2) * sol.z + 0.1 * x
    torch.testing.assert_close(sol.z, expected, rtol=0, atol=1e-10)
    seen = []  # a caller that turned forward mode off: its f sees it off
    with fwAD._set_fwd_grad_enabled(False):
        raydeq.solve(lambda z: seen.append(torch._C._is_fwd_grad_enabled()) or 0.5 * z, x)
    assert seen and not any(seen)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("solver", ["vcab3", "broyden", "fixed_point"])
def test_unrolled_forward_mode_carries_the_initial_guess_tangent(solver, grad):
    """adjoint="unrolled" differentiates z* through z0 as well: under no_grad within a
    torch.autograd.forward_ad dual level the solve detached z0 from its tangent (a z0 =
    tanh(x) guess, three steps of a width-6 tanh layer: 0.25 to 0.63 off central differences,
    within 1e-8 with grad enabled); the steps now start from z0 with its tangent."""
    g = torch.Generator().manual_seed(0)
    w = 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
    x, t = torch.randn(2, B, D, generator=g, dtype=torch.float64)

    def run(x):
        f = lambda z: torch.tanh(z @ w + x)  # noqa: E731
        return raydeq.solve(f, torch.tanh(x), solver=solver, adjoint="unrolled", max_steps=3)

    eps = 1e-6
    expected = (run(x + eps * t).z - run(x - eps * t).z) / (2 * eps)
    with fwAD.dual_level(), torch.set_grad_enabled(grad):
        sol = run(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(sol.z).tangent
    assert sol.stats.steps == 3
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("graph", ["without", "with", "no_grad"])
@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point", "unrolled", "jfb"])
@pytest.mark.parametrize("solver", ["vcab3", "broyden"])
def test_forward_mode_tangents_are_the_implicit_ones(solver, adjoint, graph):
    """Under torch.autograd.forward_ad the implicit adjoints gave z* no tangent where f needed
    no gradient and f's own one at a constant z* where it did, silently; the tangent now
    solves (I - J) z*' = b by the linear solver on Jacobian-vector products: <v, z*'> is the
    dense implicit-function reference's <dL/dparams, params'> (for "jfb" its own gradient's,
    the same approximation in either mode; "unrolled" propagates tangents through the
    steps), and a backward in the same dual level still gives the implicit gradient. The
    other adjoints' solver steps carried tangents they discard: a dual solve of a width-128
    tanh layer (batch 64, one thread) took 145 ms where the solve without tangents took 17;
    now 29. Under no_grad, where nothing attaches z*, z* carried the tangents of the steps
    (Broyden's quasi-Newton ones included); it now gets the adjoint's own."""
    f, params = problem(4)
    g = torch.Generator().manual_seed(5)
    tangents = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    v = torch.randn(B, D, generator=g, dtype=torch.float64)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    options = {"rtol": 1e-13, "max_iters": 500} if adjoint in ("gmres", "fixed_point") else {}

    def run(f):
        return raydeq.solve(
            f, z0, solver=solver, adjoint=adjoint, adjoint_options=options, **tight(solver)
        )

    plain = run(f)
    expected = (
        torch.autograd.grad((plain.z * v).sum(), params)
        if adjoint == "jfb"
        else ift_reference(f, params, v)
    )
    carried = []  # per evaluation of f in the dual level: whether its output had a tangent

    def counted(z):
        out = dual_f(z)
        carried.append(fwAD.unpack_dual(out).tangent is not None)
        return out

    with fwAD.dual_level(), torch.set_grad_enabled(graph != "no_grad"):
        dual_f = dual_problem(params, tangents, graph == "with")
        sol = run(counted)
        tangent = fwAD.unpack_dual(sol.z).tangent
        if graph == "with" and adjoint in ("gmres", "fixed_point"):
            with pytest.raises(RuntimeError, match="forward-over-reverse.*'unrolled'"):
                torch.autograd.grad((sol.z * v).sum(), params, retain_graph=True)
    grads = torch.autograd.grad((sol.z * v).sum(), params) if graph == "with" else expected
    projected = sum((e * t).sum() for e, t in zip(expected, tangents, strict=True)).item()
    assert (v * tangent).sum().item() == pytest.approx(projected, rel=1e-7)
    for got, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
    # The solver's steps carry tangents only for the adjoint that differentiates them: the
    # others evaluate f on the plain solve's path without any, and f(z*) with them.
    assert carried.count(False) == (0 if adjoint == "unrolled" else plain.stats.nfe - 1)


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point"])
def test_a_batched_backward_or_tangent_is_refused_naming_it_and_gradcheck_passes(adjoint):
    """A backward batched by vmap (jacobian(vectorize=True), is_grads_batched=True) failed in
    torch's batching rules ("Batching rule not implemented for aten::div.out" in GMRES,
    "aten::is_nonzero" in Neumann) and a batched tangent (jacobian(strategy="forward-mode"))
    in "aten::detach"; both are refused naming what batched them and what works. gradcheck,
    whose undefined output gradient reached the adjoint as None ("'NoneType' object has no
    attribute 'to'"), passes, and the jacobian the messages name is the unrolled one's."""
    f, params = problem(6)
    x = params[3]
    w, u, b = (p.detach() for p in params[:3])

    def z_star(x: torch.Tensor, adjoint: str = adjoint) -> torch.Tensor:
        options = {"rtol": 1e-13} if adjoint != "unrolled" else {}
        return raydeq.solve(
            lambda z: torch.tanh(z @ w.T + x @ u.T + b),
            torch.zeros(B, D, dtype=torch.float64),
            solver="fixed_point",
            adjoint=adjoint,
            adjoint_options=options,
            **tight(""),
        ).z

    jacobian = torch.autograd.functional.jacobian
    with pytest.raises(RuntimeError, match=r"cannot take a batched backward \(.*is_grads_batched"):
        jacobian(z_star, x, vectorize=True)
    with pytest.raises(RuntimeError, match=r"batched tangent \(.*forward-mode.*'unrolled'"):
        jacobian(z_star, x, vectorize=True, strategy="forward-mode")
    unrolled = jacobian(partial(z_star, adjoint="unrolled"), x, vectorize=True)
    torch.testing.assert_close(jacobian(z_star, x), unrolled, rtol=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(z_star, (x,))


def z_star_of(w: torch.Tensor, z0: torch.Tensor, adjoint: str) -> torch.Tensor:
    """z* = tanh(W z*) by fixed-point iteration with `adjoint`."""
    return raydeq.solve(lambda z: torch.tanh(z @ w.T), z0, solver="fixed_point", adjoint=adjoint).z


def test_unrolled_second_derivatives_match_finite_differences(central_difference):
    """A gradient penalty phi = ||dL/dw||^2 differentiated once more (create_graph=True):
    through the unrolled steps its directional derivative matches central differences of phi
    computed with the implicit gradient; the implicit adjoints refuse, naming the one that
    works, instead of differentiating a graph that holds z* and the linear solve constant,
    and name forward mode for torch.autograd.functional.jvp's double backward."""
    f, params = problem(7)
    w = params[0]
    v = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z0 = torch.zeros(B, D, dtype=torch.float64)

    def penalty(adjoint: str, create_graph: bool) -> torch.Tensor:
        options = {} if adjoint == "unrolled" else {"rtol": 1e-13, "max_iters": 500}
        sol = raydeq.solve(
            f, z0, solver="fixed_point", adjoint=adjoint, adjoint_options=options, **tight("")
        )
        (grad,) = torch.autograd.grad((sol.z * v).sum(), [w], create_graph=create_graph)
        return grad.pow(2).sum()

    (hessian_term,) = torch.autograd.grad(penalty("unrolled", True), [w])
    expected = central_difference(lambda: penalty("gmres", False).item(), w, direction)
    assert (hessian_term * direction).sum().item() == pytest.approx(expected, rel=1e-6)
    for adjoint in ("gmres", "fixed_point"):
        with pytest.raises(RuntimeError, match="first derivatives only.*'unrolled'"):
            penalty(adjoint, True)
        # A Jacobian-vector product by a double backward is pointed to forward mode.
        with pytest.raises(RuntimeError, match=r"functional\.jvp.*torch\.autograd\.forward_ad"):
            torch.autograd.functional.jvp(partial(z_star_of, z0=z0, adjoint=adjoint), w, w)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_multiscale_state(solver):
    """A list state with two shapes, in float32, without the caller flattening anything."""
    g = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(8, 8, generator=g) / 8**0.5
    c = 0.5 * torch.randn(3, 3, generator=g) / 3
    x = torch.randn(4, 8, generator=g)

    def f(z):
        z1, z2 = z
        return [torch.tanh(z1 @ a + x + z2.mean((1, 2))[:, None]), torch.tanh(c @ z2 + 0.1)]

    z0 = [torch.zeros(4, 8), torch.zeros(4, 3, 5)]
    with torch.no_grad():
        sol = raydeq.solve(f, z0, solver=solver, abstol=1e-5, reltol=1e-5, max_steps=1000)
    assert [t.shape for t in sol.z] == [t.shape for t in z0]
    assert all(t.dtype == torch.float32 for t in sol.z)
    assert bool(sol.stats.converged.all())
    fz = f(sol.z)
    assert max(float((a - b).abs().max()) for a, b in zip(fz, sol.z, strict=True)) < 1e-4


@pytest.mark.parametrize("tolerances", [{"abstol": 1e300}, {"reltol": 1e300}, {"abstol": 1e38}])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_tolerance_past_float32_s_range_solves_a_float32_state_as_a_float64_one(
    solver, tolerances
):
    """abstol=1e300 (or 1e38, whose scaled floor is past the range) failed in torch's
    full_like on a float32 state; every sample now meets it where a float64 solve does."""
    f, _ = problem()

    def f32(z):
        return f(z.double()).float()

    with torch.no_grad():
        wide = raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), solver, **tolerances)
        narrow = raydeq.solve(f32, torch.zeros(B, D), solver, **tolerances)
    assert narrow.stats.status.tolist() == [Status.CONVERGED] * B
    assert narrow.stats.nfe == wide.stats.nfe
    torch.testing.assert_close(narrow.z.double(), wide.z, rtol=0, atol=1e-4)


def test_samples_stop_on_their_own():
    """An easy and a hard sample: the easy one stops first and its state then stays fixed."""
    scales = torch.tensor([[0.1], [0.95]], dtype=torch.float64)
    calls = []

    def f(z):
        calls.append(z.clone())
        return scales * z + 1.0

    with torch.no_grad():
        sol = raydeq.solve(
            f,
            torch.zeros(2, 3, dtype=torch.float64),
            solver="fixed_point",
            abstol=1e-10,
            reltol=0.0,
            max_steps=1000,
        )
    torch.testing.assert_close(sol.z, (1 / (1 - scales)).expand(2, 3), rtol=0, atol=1e-8)
    easy = [float(c[0, 0]) for c in calls]
    first_stop = next(i for i in range(1, len(easy)) if easy[i] == easy[i - 1])
    assert all(e == easy[first_stop] for e in easy[first_stop:])
    assert first_stop < len(calls) / 3


def test_best_iterate_and_status_when_not_converging():
    """A non-contractive map: max_steps is reported per sample and the best iterate returned."""
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: -z + 1.0,
            torch.zeros(2, 2),
            solver="fixed_point",
            abstol=1e-6,
            reltol=0.0,
            max_steps=10,
        )
    assert not bool(sol.stats.converged.any())
    assert (sol.stats.status == Status.MAX_STEPS).all()
    torch.testing.assert_close(sol.stats.residual, torch.ones(2))


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_values_stop_with_a_status(solver):
    """Sample 1's f is NaN from its first evaluation: it stops as non-finite at its start 0
    with an infinite residual, while sample 0 (f = z / 2 + 1) reaches its fixed point 2 as it
    does solved alone, the NaN beside it changing none of its steps."""

    def f(z):
        out = z / 2 + 1.0
        out[1] = float("nan")
        return out

    options = {"solver": solver, "abstol": 1e-8, "reltol": 0.0, "max_steps": 500}
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(f, z0, **options)
        alone = raydeq.solve(lambda z: z / 2 + 1.0, z0[:1], **options)
    assert int(sol.stats.status[1]) == Status.NONFINITE
    assert torch.isfinite(sol.z).all()
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.NONFINITE]
    assert torch.equal(sol.z[1], z0[1]) and float(sol.stats.residual[1]) == float("inf")
    torch.testing.assert_close(sol.z[:1], alone.z, rtol=0, atol=0)
    torch.testing.assert_close(sol.stats.residual[:1], alone.stats.residual, rtol=0, atol=0)
    assert sol.stats.steps == alone.stats.steps
    # f(z) - z = (2 - z) / 2: the RMS distance to 2 is twice the residual, within abstol.
    assert float((sol.z[0] - 2).square().mean().sqrt()) <= 2e-8


def test_anderson_falls_back_to_the_plain_step_when_its_system_is_singular():
    """In one dimension the residual history has rank one, so without regularisation the
    mixing system is singular from the second step on; the sample still converges."""
    z0 = torch.zeros(3, 1, dtype=torch.float64)
    sol = raydeq.solve(
        lambda z: 0.5 * z + 1.0,
        z0,
        solver="anderson",
        abstol=1e-10,
        reltol=0.0,
        solver_options={"lam": 0.0},
    )
    assert bool(sol.stats.converged.all())
    torch.testing.assert_close(sol.z, torch.full_like(z0, 2.0), rtol=0, atol=1e-9)


def test_anderson_s_plain_step_after_a_singular_system_backpropagates_as_fixed_point():
    """With lam=0 a one-dimensional history is singular from the second step on, so every
    step is the plain one and the iterates are fixed-point iteration's: an unrolled gradient
    through them is fixed-point iteration's, 3 / (1 - a)^2 at the fixed point, not NaN."""
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    grads = {}
    for solver, options in (("anderson", {"lam": 0.0}), ("fixed_point", {})):
        sol = raydeq.solve(
            lambda z: a * z + 1.0,
            torch.zeros(3, 1, dtype=torch.float64),
            solver=solver,
            adjoint="unrolled",
            abstol=1e-10,
            reltol=0.0,
            solver_options=options,
        )
        (grads[solver],) = torch.autograd.grad(sol.z.sum(), a)
    torch.testing.assert_close(grads["anderson"], grads["fixed_point"], rtol=1e-12, atol=0)
    assert float(grads["anderson"]) == pytest.approx(12.0, rel=1e-7)


def test_broyden_converges_where_an_update_is_lost_in_float32_rounding():
    """Sample 180 of this float32 problem meets a v . dg of -2e-8: updating with it diverged."""
    problem = SpectralProblem(Spectrum(dim=1024, batch=256), torch.device("cpu"))
    with torch.no_grad():
        sol = raydeq.solve(problem.f, problem.z0(), solver="broyden", abstol=1e-5, reltol=0.0)
    assert (sol.stats.status == Status.CONVERGED).all()
    assert float(problem.residual(sol.z).max()) <= 1e-5
    assert sol.stats.nfe <= 30


def test_broyden_restarts_a_sample_that_diverges_on_a_contraction_and_it_converges():
    """Started 1e-7 away from 0 (seed 10), sample 51 of the problem above stalled near 3e-5,
    then diverged and ended DIVERGED after 47 evaluations, though f = W tanh(z) + x with
    ||W|| <= 0.97 is a contraction. It now restarts once from its best iterate with H = -I
    and converges, within residual / (1 - 0.97) of z* found by Newton's method in float64."""
    problem = SpectralProblem(Spectrum(dim=1024, batch=256), torch.device("cpu"))
    z0 = 1e-7 * torch.randn(256, 1024, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        sol = raydeq.solve(problem.f, z0, solver="broyden", abstol=1e-5, reltol=0.0)
    assert (sol.stats.status == Status.CONVERGED).all()
    exact = SpectralProblem(Spectrum(dim=1024, batch=256), torch.device("cpu"), torch.float64)
    w, z = exact.weight, sol.z.double()
    assert float(torch.linalg.eigvalsh(w).abs().max()) <= 0.97
    residual = exact.residual(z)
    assert float(residual.max()) <= 1e-5
    star, x, eye = z[51], exact.x[51], torch.eye(1024, dtype=torch.float64)
    for _ in range(4):
        jacobian = w * (1 - torch.tanh(star).square()) - eye
        star = star - torch.linalg.solve(jacobian, w @ torch.tanh(star) + x - star)
    assert float((w @ torch.tanh(star) + x - star).abs().max()) < 1e-13
    error = float((z[51] - star).square().mean().sqrt())
    assert error <= float(residual[51]) / (1 - 0.97)


@pytest.mark.parametrize("check_every", [None, 4])
def test_broyden_stops_a_sample_whose_best_does_not_fall_after_its_restart(check_every):
    """g(z) = z^2 + 1 has no real root: from 0 Broyden's residual passes 1e4 times the first
    (DIVERGED there before). Restarted at its best iterate, z0, with H = -I, it takes the same
    steps, its best falls no more, and it stops DIVERGED at the next check: 5 evaluations
    more, 1 at the restart and 4 steps."""
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z)
        return z * z + z + 1

    with torch.no_grad():
        sol = raydeq.solve(
            f, torch.zeros(4, 8), solver="broyden", max_steps=1000, check_every=check_every
        )
    assert sol.stats.status.tolist() == [Status.DIVERGED] * 4
    restarts = [i for i, z in enumerate(points) if i and not z.any()]
    assert len(restarts) == 1
    first, last = (float(torch.linalg.vector_norm(z * z + 1)) for z in (points[0], points[-6]))
    assert last > 1e4 * first
    assert sol.stats.nfe == len(points) == restarts[0] + 5


@pytest.mark.parametrize("check_every", [None, 4])
def test_a_restarted_sample_whose_f_went_non_finite_still_ends_nonfinite(check_every):
    """f = z^2 + z + 1, NaN where |z| > 10 (0 * log(10 - |z|)): from 0 Broyden's 15th point is
    156, where f is NaN, and the sample stopped NONFINITE. Restarted at its best iterate, z0,
    it repeats its steps and stops again at the next check, 5 evaluations later, before they
    reach 156: it ended DIVERGED, which hid that f had gone non-finite. It ends NONFINITE."""
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(float(z))
        return z * z + z + 1 + 0 * torch.log(10 - z.abs())

    with torch.no_grad():
        sol = raydeq.solve(
            f,
            torch.zeros(1, 1, dtype=torch.float64),
            solver="broyden",
            max_steps=1000,
            check_every=check_every,
        )
    assert sol.stats.status.tolist() == [Status.NONFINITE]
    overflow = next(i for i, z in enumerate(points) if abs(z) > 10)
    assert overflow == 14 and all(abs(z) <= 10 for z in points[overflow + 3 :])
    assert points[overflow + 3] == 0.0  # the restart, at z0
    assert sol.stats.nfe == len(points) == overflow + 3 + 5


def test_a_restarted_sample_is_not_restarted_again_when_another_sample_restarts():
    """Broyden restarts a sample once. Sample 0 (f = 0.95 z + 0.5 sin z + 1) restarts at one
    check and converges at its 21st step alone; beside sample 1 (f = 0.9 z + 2 sin(3z) + 1),
    which restarts at a later check, it was restarted again there, from its best iterate
    with H = -I, and ended DIVERGED. With a fixed check_every, which makes the checks the same
    in any batch, it now takes the same steps in the batch as alone and converges."""
    points: list[list[float]] = [[], []]

    def f(z: torch.Tensor) -> torch.Tensor:
        for row, value in zip(points, z[:, 0].tolist(), strict=True):
            row.append(value)
        a, b, c = torch.tensor([[0.95, 0.5, 1.0], [0.9, 2.0, 3.0]], dtype=z.dtype).T[:, :, None]
        return a * z + b * torch.sin(c * z) + 1

    def solve(batch: int) -> raydeq.Solution:
        z0 = torch.zeros(batch, 1, dtype=torch.float64)
        with torch.no_grad():
            return raydeq.solve(
                lambda z: f(torch.cat([z, z0[:1]]) if batch == 1 else z)[:batch],
                z0,
                solver="broyden",
                abstol=1e-12,
                reltol=0.0,
                divergence=2.0,
                check_every=4,
            )

    def path(row: list[float]) -> list[float]:
        """The points of a row, each once where it is evaluated again at once (a stopped
        sample, or one the others' restart evaluates where it is)."""
        return [z for i, z in enumerate(row) if i == 0 or z != row[i - 1]]

    alone = solve(1)
    own = path(points[0])
    points[0], points[1] = [], []
    both = solve(2)
    assert both.stats.status.tolist() == [Status.CONVERGED, Status.CONVERGED]
    assert path(points[0]) == own
    assert len(set(own)) == len(own) - 1  # its one restart, at an earlier point
    assert len(set(points[1])) < len(path(points[1]))  # sample 1 restarted too
    z = float(both.z[0])
    assert float(alone.z[0]) == z and abs(0.5 * math.sin(z) + 1 - 0.05 * z) <= 1e-12


def sine_residual(z: float) -> float:
    """|f(z) - z| of f(z) = 0.5 z + 2 sin(3z) + 1, the problem of the restart tests below."""
    return abs(2 * math.sin(3 * z) + 1 - 0.5 * z)


def solve_sine(**options) -> tuple[raydeq.Solution, list[float]]:
    """Broyden on f(z) = 0.5 z + 2 sin(3z) + 1 from 0 under divergence=2, abstol 1e-12, and
    the points f was evaluated at, in order."""
    points: list[float] = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(float(z))
        return 0.5 * z + 2 * torch.sin(3 * z) + 1

    z0 = torch.zeros(1, 1, dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(
            f, z0, solver="broyden", abstol=1e-12, reltol=0.0, divergence=2.0, **options
        )
    return sol, points


@pytest.mark.parametrize("max_steps, status", [(10, Status.MAX_STEPS), (14, Status.CONVERGED)])
def test_a_restarted_sample_still_improving_at_max_steps_ends_max_steps(max_steps, status):
    """f(z) = 0.5 z + 2 sin(3z) + 1 from 0 under divergence=2: Broyden's residuals are 1,
    0.78, 0.58, 6.8, 2.5, and at the check there it restarts from its best iterate (the third,
    0.58), then falls to 0.0093 at the 10th step and converges at the 14th. Cut at 10 steps it
    ended DIVERGED though its best had fallen at every check since the restart: the end of the
    solve tested its last point a second time, where its best had not fallen since the first.
    It now ends MAX_STEPS with that best, and the restart is one evaluation more."""
    sol, points = solve_sine(max_steps=max_steps)
    first = [sine_residual(z) for z in points[:5]]
    assert first[4] > 2 * first[0] and points[5] == points[2] == min(points[:5], key=sine_residual)
    assert sol.stats.status.tolist() == [status]
    assert sol.stats.nfe == len(points) == max_steps + 1
    assert float(sol.stats.residual[0]) == pytest.approx(sine_residual(float(sol.z)), rel=1e-9)
    assert float(sol.stats.residual[0]) <= (1e-12 if status == Status.CONVERGED else 0.01)


@pytest.mark.parametrize("check_every", [None, 4])
def test_a_sample_restarted_where_max_steps_cuts_its_next_block_ends_max_steps(check_every):
    """The problem above restarts at the check after its 5th point from its best, 0.575; its
    next point is 1.176 and the one after 0.567. With max_steps 6, one step was left of the
    block after the restart, and at that cut block's test its best had not fallen: it ended
    DIVERGED, where with max_steps 7 to 13 it ends MAX_STEPS and with 14 it converges. How
    many steps max_steps leaves of a block depends on where the batch's checks fell (the same
    sample of a 4-feature sine problem converged alone and ended DIVERGED beside another). A
    restarted sample is now stopped for a best that has not fallen only over 4 steps or more,
    and ends MAX_STEPS with its best."""
    sol, points = solve_sine(max_steps=6, check_every=check_every)
    residuals = [round(sine_residual(z), 3) for z in points]
    assert residuals == [1.0, 0.782, 0.575, 6.772, 2.493, 0.575, 1.176]
    assert points[5] == points[2]  # the restart, at its best iterate
    assert sol.stats.status.tolist() == [Status.MAX_STEPS]
    assert sol.stats.nfe == len(points) == 7 and sol.stats.steps == 6
    assert float(sol.stats.residual[0]) == pytest.approx(sine_residual(points[2]), rel=1e-12)
    assert float(sol.z[0, 0]) == points[2]


def test_a_restarted_sample_is_judged_over_several_steps_at_check_every_1():
    """The problem above at check_every=1 restarts after its 4th point (6.77) from its best,
    0.575; its next point is 1.18 and the three after fall to 0.12. Each single step was
    judged: the first one, above its best, ended it DIVERGED after 6 evaluations, where at
    check_every 2, 3 and by default it converges (a float32 sample of a width-128 spectral
    contraction, seed 37, restarted likewise and ended DIVERGED only at check_every=1). A
    restarted sample's best must now fall over UNKNOWN_BLOCK (4) steps, and it converges at
    its 13th step, with one evaluation more for the restart."""
    sol, points = solve_sine(check_every=1)
    residuals = [round(sine_residual(z), 3) for z in points[:9]]
    assert residuals == [1.0, 0.782, 0.575, 6.772, 0.575, 1.176, 0.567, 0.216, 0.12]
    assert points[4] == points[2]  # the restart, at its best iterate
    assert sol.stats.status.tolist() == [Status.CONVERGED]
    assert sol.stats.nfe == len(points) == 14 and sol.stats.steps == 13
    assert sine_residual(float(sol.z[0, 0])) <= 1e-12


def test_broyden_below_float32_s_reach_runs_to_max_steps_at_its_floor_not_diverged():
    """abstol 1e-11 cannot be met in float32: once the residual is at its rounding floor
    (about 1e-8), the secant pairs measure rounding, and updating H with them drove the
    iterates away until every sample stopped as DIVERGED. Like fixed-point iteration, each
    sample now runs to max_steps, its best iterate within 1e-7 of z = f(z) in float64."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    w32, x32 = w.float(), x.float()
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: torch.tanh(z @ w32.T + x32),
            torch.zeros(8, 16),
            solver="broyden",
            abstol=1e-11,
            reltol=0.0,
            max_steps=200,
        )
    assert sol.stats.status.tolist() == [Status.MAX_STEPS] * 8 and sol.stats.steps == 200
    z = sol.z.double()
    residual = (torch.tanh(z @ w.T + x) - z).square().mean(1).sqrt()
    assert float(residual.max()) < 1e-7 and float(sol.stats.residual.max()) < 1e-7


def test_divergence_stops_the_sample():
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: 3 * z + 1,
            torch.zeros(1, 2),
            solver="fixed_point",
            divergence=100.0,
            max_steps=1000,
        )
    assert int(sol.stats.status[0]) == Status.DIVERGED
    assert sol.stats.steps < 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "rk4"}, "solver='rk4' is not one of 'vcab3'"),
        ({"adjoint": "magic"}, "adjoint='magic' is not one of 'gmres'"),
        ({"abstol": -1.0}, "abstol=-1.0 must be a number >= 0"),
        ({"max_steps": 0}, "max_steps=0 must be an integer >= 1"),
        ({"solver": "anderson", "solver_options": {"m": 0}}, "m=0 must be an integer >= 1"),
        ({"solver_options": {"h0": 0}}, "h0=0 must be a number > 0"),
        ({"solver_options": {"kind": "pid"}}, "kind='pid' is not one of"),
        ({"solver_options": {"step_rtol": 1.5}}, "step_rtol=1.5 must be a number in [0, 1)"),
        ({"solver_options": {"contraction": 1.0}}, "contraction=1.0 must be a number in [0, 1)"),
        (
            {"solver": "euler", "solver_options": {"m": 5}},
            "solver='euler' takes no option 'm'; its options are kind, h0, safety",
        ),
        (
            {"adjoint": "fixed_point", "adjoint_options": {"restart": 5}},
            "adjoint='fixed_point' takes no option 'restart'; its options are rtol, atol, "
            "max_iters, resolution, warm_start",
        ),
        (
            {"adjoint": "jfb", "adjoint_options": {"warm_start": False}},
            "adjoint='jfb' takes no option 'warm_start'; its options are none",
        ),
        ({"abstol": float("inf")}, "abstol=inf must be a finite number >= 0"),
        ({"compile": "yes"}, "compile='yes' must be True, False, 'graph' or a dict of torch"),
        (
            {"compile": {"mode": "fast"}},
            "compile={'mode': 'fast'}: Unrecognized mode=fast, should be one of: default",
        ),
        ({"compile": {"fast": True}}, "compile={'fast': True}: "),
        ({"abstol": 0.0, "reltol": 0.0}, "abstol and reltol cannot both be 0"),
        ({"divergence": 1.0}, "divergence=1.0 must be a number > 1"),
        (
            {"solver_options": {"stalled_factor": 1.5}},
            "stalled_factor=1.5 must be a number in (0, 1]",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        raydeq.solve(lambda z: z, torch.zeros(1, 2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "anderson", "solver_options": {"m": 2.5}}, "m=2.5 must be an integer >= 1"),
        ({"adjoint_options": {"max_iters": "10"}}, "max_iters='10' must be an integer >= 1"),
        ({"adjoint_options": {"warm_start": "no"}}, "warm_start='no' must be True or False"),
        ({"reltol": "1e-3"}, "reltol='1e-3' must be a number >= 0"),
        ({"max_steps": True}, "max_steps=True must be an integer >= 1"),
        ({"solver_options": 5}, "solver_options=5 must be a dict of options or None"),
        ({"adjoint_options": [1]}, "adjoint_options=[1] must be a dict of options or None"),
        ({"stop_on_convergence": 1}, "stop_on_convergence=1 must be True, False or None"),
        ({"check_start": "yes"}, "check_start='yes' must be True or False"),
        ({"compile": 1}, "compile=1 must be True, False, 'graph' or a dict of torch"),
    ],
)
def test_arguments_of_the_wrong_type_are_a_type_error_naming_them(kwargs, message):
    """A value of the wrong type (a string for a tolerance, 2.5 for a count, 1 for a flag)
    was a ValueError here and a TypeError in GMRES and the layers' inputs; every one is a
    TypeError now, a value of the right type out of range a ValueError."""
    with pytest.raises(TypeError, match=re.escape(message)):
        raydeq.solve(lambda z: z, torch.zeros(1, 2), **kwargs)


def test_unknown_option_names_of_mixed_types_are_named():
    """Option names that do not sort together (a YAML key read as a number) are still named
    in the one-line refusal, not lost in a TypeError from comparing them."""
    message = "solver='anderson' takes no option 'mm', 1; its options are m, lam, beta"
    with pytest.raises(ValueError, match=re.escape(message)):
        raydeq.solve(
            lambda z: z, torch.zeros(1, 2), solver="anderson", solver_options={1: 2, "mm": 3}
        )


def test_an_error_that_names_no_given_option_is_not_put_under_the_options_key():
    """Only an error naming one of the given options ("m=0 ...") is re-raised under the key
    that holds them; another ValueError keeps its own message, not a made-up option name."""
    with pytest.raises(ValueError, match=r"^solver_options\.m=0 must be"):
        with construct_options.named("solver_options", {"m": 0}):
            raise ValueError("m=0 must be at least 1")
    with pytest.raises(ValueError, match=r"^the state is not finite$"):
        with construct_options.named("solver_options", {"m": 0}):
            raise ValueError("the state is not finite")


def test_bad_states_are_named():
    with pytest.raises(TypeError, match="z0 must be a tensor .* got <class 'NoneType'>"):
        raydeq.solve(lambda z: z, None)
    with pytest.raises(TypeError, match="f=None must be callable: z -> f"):
        raydeq.solve(None, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating point"):
        raydeq.solve(lambda z: z, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="share the batch size"):
        raydeq.solve(lambda z: z, [torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match=r"f must return a state of the shapes of z0"):
        raydeq.solve(lambda z: z[:, :2], torch.zeros(2, 3))
    with pytest.raises(TypeError, match="f must return a state like z0 .* got int"):
        raydeq.solve(lambda z: 3, torch.zeros(2, 3))
    with pytest.raises(
        ValueError, match=re.escape("z0 has no features to solve for: shapes [(2, 0)]")
    ):
        raydeq.solve(lambda z: z, torch.zeros(2, 0))


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_batch_of_no_samples_takes_no_step_and_differentiates(solver):
    w = torch.randn(3, 3, requires_grad=True)

    def f(z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.tanh(z[0] @ w.T + 1), 0.5 * z[1]]

    for adjoint in ("gmres", "fixed_point"):
        z0 = [torch.zeros(0, 3), torch.zeros(0, 2, 2)]
        sol = raydeq.solve(f, z0, solver=solver, adjoint=adjoint)
        assert [t.shape for t in sol.z] == [t.shape for t in z0] and sol.stats.steps == 0
        assert sol.stats.converged.shape == (0,)
        (grad,) = torch.autograd.grad(sol.z[0].sum(), w)
        assert torch.equal(grad, torch.zeros(3, 3))


@pytest.mark.parametrize(
    ("solver", "options"),
    [("anderson", {"m": 30}), ("anderson", {"m": 30, "beta": 0.7}), ("broyden", {})],
)
@pytest.mark.parametrize("adjoint", ["gmres", "unrolled"])
def test_a_history_longer_than_max_steps_is_sized_by_max_steps(
    monkeypatch, solver, options, adjoint
):
    """Anderson's m and Broyden's memory (30 each here) sized their per-sample buffers where
    a solve of max_steps = 6 stores at most 5 iterates: 30 rows each, now 6, with the same
    iterates, statistics and gradients bit for bit as the 30-row buffers give."""
    from raydeq.solvers import batched, discrete

    rows = []

    def recorded(like: torch.Tensor, n: int) -> torch.Tensor:
        rows.append(n)
        return batched.history(like, n)

    def run() -> tuple[list[torch.Tensor], int, list[int]]:
        f, params = problem(7)
        rows.clear()
        sol = raydeq.solve(
            f, torch.zeros(B, D, dtype=torch.float64), solver, adjoint,
            abstol=1e-12, reltol=0.0, max_steps=6, solver_options=options,
        )  # fmt: skip
        grads = torch.autograd.grad(sol.z.square().sum(), params)
        values = [sol.z, sol.stats.residual, sol.stats.status, *grads]
        return values, sol.stats.nfe + 1000 * sol.stats.backward_nvjp, list(rows)

    monkeypatch.setattr(discrete, "history", recorded)
    sized, sized_counts, sized_rows = run()
    method = discrete.Anderson if solver == "anderson" else discrete.Broyden
    monkeypatch.setattr(method, "within", lambda self, max_steps: self, raising=False)
    full, full_counts, full_rows = run()
    buffers = 3 if options.get("beta") else 2
    assert (sized_rows, full_rows) == ([6] * buffers, [30] * buffers)
    assert sized_counts == full_counts and not full[0].isnan().any()
    for a, b in zip(sized, full, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("adjoint", raydeq.solvers.ADJOINTS)
def test_a_batch_of_no_samples_counts_the_one_product_its_backward_takes(adjoint):
    """With no sample the backward's only vector-Jacobian product is the one autograd takes
    through f(z*); the implicit adjoints reported 3 (GMRES) and 2 (Neumann), products their
    linear solve took on no sample, where every adjoint now reports that one."""
    w = torch.randn(3, 3, requires_grad=True)
    sol = raydeq.solve(lambda z: torch.tanh(z @ w.T + 1), torch.zeros(0, 3), adjoint=adjoint)
    (grad,) = torch.autograd.grad(sol.z.sum(), w)
    assert torch.equal(grad, torch.zeros(3, 3))
    assert (sol.stats.nfe, sol.stats.backward_nvjp) == (1, 1)


@pytest.mark.parametrize("adjoint", raydeq.solvers.ADJOINTS)
def test_z_star_needs_a_gradient_where_something_f_closes_over_does(adjoint):
    """An implicit adjoint's z* needed a gradient where nothing f closes over did (a constant
    W, z0 without one), unlike a torch function's output, and a backward then solved the
    adjoint system for nothing; now it needs one where W does, as for every adjoint."""
    w = 0.5 * torch.eye(3) + 0.1
    for trained in (False, True):
        w.requires_grad_(trained)
        sol = raydeq.solve(lambda z: torch.tanh(z @ w.T + 1), torch.zeros(2, 3), adjoint=adjoint)
        assert sol.z.requires_grad == trained == (w @ torch.ones(3)).requires_grad


@pytest.mark.parametrize("adjoint", raydeq.solvers.ADJOINTS)
def test_an_f_returning_a_leaf_that_needs_a_gradient_passes_it_one(adjoint):
    """An f returning a tensor it closes over as it is (z* = x, x a leaf needing a gradient)
    gave an implicit adjoint's z* without a graph, its backward failing ('element 0 of tensors
    does not require grad') where dz*/dx = I; z* now passes x the incoming gradient."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, dtype=torch.float64)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    sol = raydeq.solve(lambda z: x, zeros, solver="fixed_point", adjoint=adjoint)
    assert torch.equal(sol.z, x)
    (grad,) = torch.autograd.grad(sol.z, x, v)
    torch.testing.assert_close(grad, v, rtol=0, atol=1e-12)


def test_jacobian_free_counts_only_the_backwards_through_its_own_solve():
    """The Jacobian-free adjoint hooked f(z*) itself, so an f returning x as it is left its
    counting hook on x: a backward through a second solve, then one through x alone, counted
    1 and then 2 VJPs in a first solve no backward went through; each now counts its own."""
    x = torch.randn(2, 3, requires_grad=True)
    first, second = (
        raydeq.solve(lambda z: x, torch.zeros(2, 3), solver="fixed_point", adjoint="jfb")
        for _ in range(2)
    )
    second.z.sum().backward()
    (2 * x).sum().backward()
    assert (first.stats.backward_nvjp, second.stats.backward_nvjp) == (0, 1)


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_unrolled_batch_of_no_samples_differentiates_as_the_implicit_adjoints_do(solver):
    """With no sample the solver takes no step, and the unrolled z* had no graph: its backward
    failed in autograd ('element 0 of tensors does not require grad') where every other
    adjoint gives zero gradients; it now gives them too, from its one evaluation of f."""
    w = torch.randn(3, 3, requires_grad=True)
    sol = raydeq.solve(lambda z: torch.tanh(z @ w.T + 1), torch.zeros(0, 3), solver, "unrolled")
    assert sol.z.shape == (0, 3) and (sol.stats.nfe, sol.stats.steps) == (1, 0)
    (grad,) = torch.autograd.grad(sol.z.sum(), w)
    assert torch.equal(grad, torch.zeros(3, 3)) and sol.stats.backward_nvjp == 1


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("stop_on_convergence", [True, False])
def test_an_unrolled_sample_converged_at_z0_differentiates_through_one_evaluation(
    solver, stop_on_convergence
):
    """A sample whose z0 meets the tolerance takes no step and its unrolled z* was z0 itself:
    a batch of such samples had no graph, so that its backward failed in autograd ('element 0
    of tensors does not require grad'), or gave zero gradients where each step selects its
    samples; each such sample is now f(z0), whose gradient is that of a loop of one
    evaluation, alone or in a batch with samples that step."""
    f, params = problem(4)
    zeros = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        fixed = raydeq.solve(f, zeros, solver="fixed_point", **tight("fixed_point")).z
    mixed = torch.cat([fixed[:1], zeros[1:]])
    for z0, check_start in ((fixed, True), (fixed, False), (mixed, False)):
        sol = raydeq.solve(
            f,
            z0,
            solver=solver,
            adjoint="unrolled",
            abstol=1e-6,
            reltol=0.0,
            check_start=check_start,
            stop_on_convergence=stop_on_convergence,
        )
        assert bool(sol.stats.converged[0])
        one_evaluation = f(z0)[0]
        torch.testing.assert_close(sol.z[0], one_evaluation, rtol=0, atol=0)
        got = torch.autograd.grad(sol.z[0].sum(), params)
        expected = torch.autograd.grad(one_evaluation.sum(), params)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
            assert e.abs().max() > 0.1


def test_contractive_dense_deq_vcab3_needs_fewer_evaluations_than_tsit5():
    """A contraction of spectral norm 0.9: d=128, batch 32, tolerance 1e-3."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=g)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(32, 128, generator=g)
    nfe = {}
    for solver in ("vcab3", "tsit5"):
        with torch.no_grad():
            sol = raydeq.solve(
                lambda z: torch.tanh(z @ w.T + x),
                torch.zeros(32, 128),
                solver=solver,
                abstol=1e-3,
                reltol=1e-3,
            )
        assert bool(sol.stats.converged.all())
        nfe[solver] = sol.stats.nfe
    assert nfe["vcab3"] < nfe["tsit5"], nfe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_smoke(solver):
    f, params = problem(0, dtype=torch.float64)
    cuda = [p.detach().cuda().requires_grad_() for p in params]
    w, u, b, x = cuda
    sol = raydeq.solve(
        lambda z: torch.tanh(z @ w.T + x @ u.T + b),
        torch.zeros_like(x),
        solver=solver,
        **tight(solver),
    )
    sol.z.sum().backward()
    assert sol.z.device.type == "cuda" and bool(sol.stats.converged.all())
    ref = raydeq.solve(f, torch.zeros(B, D, dtype=torch.float64), solver=solver, **tight(solver))
    ref.z.sum().backward()
    torch.testing.assert_close(sol.z.cpu(), ref.z.detach(), rtol=0, atol=1e-8)
    torch.testing.assert_close(w.grad.cpu(), params[0].grad, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["vcab3", "euler", "anderson"])
def test_cuda_graphs_solve_and_differentiate_as_eager(solver):
    """compile=True on a GPU (torch.compile's "reduce-overhead", CUDA graphs): over repeated
    solves (compile, record, replay) the same NFE, z* and gradient as eager; no graph output is
    read after a later replay has overwritten it."""
    f, params = problem(1, dtype=torch.float32)
    w, u, b, x = (p.detach().cuda().requires_grad_() for p in params)

    def run(compile: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
        sol = raydeq.solve(
            lambda z: torch.tanh(z @ w.T + x @ u.T + b),
            torch.zeros_like(x),
            solver=solver,
            abstol=1e-5,
            reltol=0.0,
            compile=compile,
        )
        (grad,) = torch.autograd.grad(sol.z.square().sum(), [w])
        return sol.stats.nfe, sol.z.detach().clone(), grad

    nfe, z, grad = run(compile=False)
    for _ in range(4):
        compiled = run(compile=True)
        assert compiled[0] == nfe
        torch.testing.assert_close(compiled[1], z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled[2], grad, rtol=1e-3, atol=1e-5)


def test_state_stays_float32_under_autocast():
    """f computing in bfloat16 (autocast) does not change the solver's float32 state. With
    z* = tanh(z* / 2 + x) elementwise, dz*/dx = s / (1 - s / 2) for s = 1 - tanh^2 at z*: the
    gradient matches it to bfloat16's precision (1.6% at worst)."""
    w = 0.5 * torch.eye(8)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sol = raydeq.solve(lambda z: torch.tanh(z @ w + x), torch.zeros(4, 8), abstol=1e-2)
    assert sol.z.dtype == torch.float32
    sol.z.sum().backward()
    assert x.grad.dtype == torch.float32
    s = 1 - torch.tanh(sol.z.detach() / 2 + x.detach()).square()
    torch.testing.assert_close(x.grad, s / (1 - s / 2), rtol=0.2, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_under_autocast_only_f_computes_in_bfloat16_and_the_gmres_backward_runs(solver):
    """Under the caller's bfloat16 autocast the solver's own products (Anderson's and Broyden's
    batched ones) stay float32: z* and the gradient are those of an f that autocasts itself,
    to the bit, where Anderson's mixing had made the state bfloat16 and GMRES's triangular
    solve failed on it."""
    f, params = problem(dtype=torch.float32)

    def f_autocast(z):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return f(z)

    results = []
    for fn, amp in ((f, True), (f_autocast, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            sol = raydeq.solve(fn, torch.zeros(B, D), solver=solver, max_steps=20)
        results.append((sol.z, *torch.autograd.grad(sol.z.sum(), params)))
    for got, expected in zip(*results, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_step_reads_the_host_at_most_once_every_four_steps(solver):
    """No step synchronises with the host: the termination test is read every few steps (step_cost's
    problem: dense tanh layer, batch 64, width 128, abstol 1e-4)."""
    from raydeq.bench.suites.step_cost import SYNC_LIMIT, step_cost

    cost = step_cost(solver, batch=64, dim=128)
    assert cost["converged"]
    assert cost["syncs"] <= SYNC_LIMIT, cost


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_step_runs_on_a_gpu_without_reading_the_host(solver):
    """Each kind of step, on a CUDA state simulated without a GPU (torch's fake tensors, which
    have devices and shapes but no values): a host read raises there, and so does a tensor of
    another device mixed in (a constant made on the CPU), which a CPU test cannot see."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from raydeq.solvers.solve import make_solver

    method = make_solver(solver, {})
    with FakeTensorMode():
        w, x = torch.randn(D, D, device="cuda"), torch.randn(B, D, device="cuda")
        f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
        z0 = torch.zeros(B, D, device="cuda")
        monitor = Monitor(z0, Termination(1e-4, 1e-4))
        carry, _, _ = method.init(f, z0, monitor)
        for phase in method.phases():
            for _ in range(3):
                carry = phase.step(f, carry, monitor)
                monitor.test(method.residual(carry))
        assert monitor.best_z.device.type == "cuda" and monitor.status.device.type == "cuda"


class HostCopies(TorchDispatchMode):
    """Counts the copies of a CPU tensor to a CUDA device: torch waits for the device's queued
    work before each one (a blocking copy), as a host read does."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[1] if func is torch.ops.aten.copy_.default else args[0]
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            self.copies += source.device.type == "cpu" and out.device.type == "cuda"
        return out


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_step_recorded_for_an_unrolled_backward_copies_nothing_from_the_host(solver):
    """Each kind of step with autograd recording it (adjoint="unrolled"), on a simulated CUDA
    state: no tensor is made on the CPU and copied to the device, a copy that waits for the
    device like a host read (the ring buffers of Anderson and Broyden took their slot from
    one on every write)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from raydeq.solvers.solve import make_solver

    method = make_solver(solver, {})
    with FakeTensorMode():
        w = torch.randn(D, D, device="cuda", requires_grad=True)
        x = torch.randn(B, D, device="cuda")
        f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
        z0 = torch.zeros(B, D, device="cuda")
        monitor = Monitor(z0, Termination(1e-4, 1e-4))
        carry, _, _ = method.init(f, z0, monitor)
        with HostCopies() as counter:
            for phase in method.phases():
                for _ in range(3):
                    carry = phase.step(f, carry, monitor)
        assert monitor.best_z.requires_grad
    assert counter.copies == 0


@pytest.mark.parametrize("solver", ["vcab3", "euler", "fixed_point", "anderson"])
def test_a_compiled_solve_matches_the_eager_one(solver):
    """compile= captures f and each solver step with torch.compile; the dynamo backend "eager"
    traces and replays the captured graphs without generating code (inductor's C++ build takes
    seconds per step function; the next test runs it once), which is what a capture can
    break."""
    f, params = problem(7)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = raydeq.solve(f, z0, solver=solver, **tight(solver))
        compiled = raydeq.solve(f, z0, solver=solver, compile={"backend": "eager"}, **tight(solver))
    assert compiled.stats.nfe == eager.stats.nfe
    torch.testing.assert_close(compiled.z, eager.z, rtol=0, atol=1e-12)
    assert bool(compiled.stats.converged.all())


def test_compile_true_on_a_cpu_runs_inductors_kernels_and_solves_as_eager():
    """compile=True on a CPU compiles each step with torch.compile's default backend, inductor
    (C++ kernels; a few seconds for Euler's one kind of step): the same NFE, z* and gradient
    as eager, in float64."""
    from torch._inductor import metrics

    f, params = problem(3)
    z0 = torch.zeros(B, D, dtype=torch.float64)

    def run(compile: bool) -> tuple[raydeq.Solution, torch.Tensor]:
        sol = raydeq.solve(f, z0, solver="euler", compile=compile, **tight("euler"))
        (grad,) = torch.autograd.grad(sol.z.square().sum(), params[:1])
        return sol, grad

    torch._dynamo.reset()
    metrics.reset()
    eager, grad = run(compile=False)
    compiled, compiled_grad = run(compile=True)
    assert metrics.generated_kernel_count > 0
    assert compiled.stats.nfe == eager.stats.nfe and bool(compiled.stats.converged.all())
    torch.testing.assert_close(compiled.z, eager.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(compiled_grad, grad, rtol=1e-9, atol=1e-12)


def test_a_compiled_solve_carries_tangents_after_one_without_them():
    """adjoint="unrolled" carries forward-mode tangents through its steps; with compile=True
    a solve in a torch.autograd.forward_ad dual level reused the steps compiled for the same f
    outside one (dynamo's guards tell no dual input apart), and inductor's kernels there
    refuse tangents ("Trying to use forward AD with addmm_out that does not support it",
    20 s of C++ builds to show here). Steps carrying tangents now run eagerly: no graph
    compiled without tangents runs on one, and the tangent is the eager one, in float64."""
    g = torch.Generator().manual_seed(2)
    w = 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
    x, t = torch.randn(2, B, D, generator=g, dtype=torch.float64)
    mixed = []  # per call of a compiled graph: whether it met tangents it was compiled without

    def dual(tensors) -> bool:
        return any(fwAD.unpack_dual(a).tangent is not None for a in tensors if torch.is_tensor(a))

    def backend(graph, example_inputs):
        compiled_dual = dual(example_inputs)

        def run(*args):
            mixed.append(dual(args) and not compiled_dual)
            return graph.forward(*args)

        return run

    def run(x: torch.Tensor, compile: bool | dict) -> raydeq.Solution:
        def f(z):
            return torch.tanh(z @ w + x)

        z0 = torch.zeros(B, D, dtype=torch.float64)
        return raydeq.solve(f, z0, solver="euler", adjoint="unrolled", compile=compile, max_steps=4)

    torch._dynamo.reset()
    with torch.no_grad():
        run(x, compile={"backend": backend})
        with fwAD.dual_level():
            sol = run(fwAD.make_dual(x, t), compile={"backend": backend})
            compiled = fwAD.unpack_dual(sol.z).tangent
            eager = fwAD.unpack_dual(run(fwAD.make_dual(x, t), compile=False).z).tangent
    assert mixed and not any(mixed)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def test_the_step_cost_benchmark_counts_the_launches_of_a_compiled_step_on_a_cpu():
    """step_cost's compile=True row on a CPU: the solve takes the eager one's steps, NFE and
    host reads, and launches (aten operations and inductor's kernels, which recorded
    themselves: the count raises otherwise) a fraction of its operations, within OPS_LIMITS."""
    from raydeq.bench.suites.step_cost import OPS_LIMITS, compiled_step_cost, step_cost

    eager, compiled = step_cost("euler", 64, 128), compiled_step_cost("euler", 64, 128)
    assert {k: compiled[k] for k in ("steps", "nfe", "syncs", "converged")} == {
        k: eager[k] for k in ("steps", "nfe", "syncs", "converged")
    }
    assert 1 <= compiled["ops"] < eager["ops"] / 3
    assert compiled["ops"] <= OPS_LIMITS["euler"]


@pytest.mark.parametrize("solver", ["vcab3", "tsit5", "bs3", "euler", "fixed_point"])
def test_a_capturable_step_is_one_graph_that_every_step_and_later_solve_reuses(solver):
    """What a CUDA graph needs, checked without a GPU: with fullgraph=True each kind of step
    traces into one graph without a break (no host read, no branch on a tensor's value), and
    no step or later solve of the same shapes traces again (no per-step Python state): one
    graph per phase, f traced inside it, over three solves."""
    from raydeq.solvers.solve import make_solver

    f, params = problem(7)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    with torch.no_grad():
        for _ in range(3):
            sol = raydeq.solve(
                f,
                z0,
                solver=solver,
                compile={"backend": backend, "fullgraph": True},
                **tight(solver),
            )
            assert bool(sol.stats.converged.all()) and sol.stats.steps > 10
    method = make_solver(solver, {})
    assert method.capturable and len(graphs) == len(method.phases())


def assert_traced_solve_matches_eager(f, z0: torch.Tensor, **options) -> None:
    """A solve compiled with the aot_eager backend (dynamo's tracing, no C++ build) converges
    with the eager solve's NFE and z*."""
    with torch.no_grad():
        eager = raydeq.solve(f, z0, **options)
        sol = raydeq.solve(f, z0, compile={"backend": "aot_eager"}, **options)
    assert sol.stats.nfe == eager.stats.nfe and bool(sol.stats.converged.all())
    torch.testing.assert_close(sol.z, eager.z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["vcab3", "euler"])
def test_a_compiled_step_traces_again_for_no_more_than_one_new_tolerance(solver):
    """A tolerance reached the compiled steps as a constant (the reltol weight as `alpha=`),
    so every new abstol / reltol traced each step again: a Tune trial process, which runs the
    trials of a search one after another, traced anew for each and fell back to eager past
    dynamo's recompile limit (8). Like a new batch size, a second tolerance now traces one
    step taking it as an input, which every later one reuses (aot_eager: the tracing, with
    no C++ build)."""
    from torch._dynamo.utils import counters

    from raydeq.solvers.solve import make_solver

    f, _ = problem(7)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    phases = len(make_solver(solver, {}).phases())
    torch._dynamo.reset()
    counters.clear()
    traced = []
    try:
        for tol in (1e-6, 2e-6, 3e-6, 4e-6, 5e-6):
            assert_traced_solve_matches_eager(f, z0, solver=solver, abstol=tol, reltol=tol)
            traced.append(counters["frames"]["total"])
    finally:
        torch._dynamo.reset()
    assert traced == [phases, 2 * phases, 2 * phases, 2 * phases, 2 * phases]


@pytest.mark.parametrize("solver", ["vcab3", "euler"])
def test_a_batch_of_one_traces_each_compiled_step_once(solver):
    """The first step size h0 was a column made like z[:, :1], which keeps z's row stride
    where B is 1, and without an h_max to cap it (Euler's defaults) the first step of a batch
    of one saw a stride that the later steps' computed h does not have: Euler's step traced
    twice for it (2 of dynamo's 8 versions per step function, each an inductor build). It
    now traces once, after the first batch size and the dynamic one a second size makes:
    three graphs per kind of step over the batch sizes 4, 3, 1, 2, 1 (aot_eager: the tracing,
    with no C++ build)."""
    from torch._dynamo.utils import counters

    from raydeq.solvers.solve import make_solver

    g = torch.Generator().manual_seed(0)
    w = 0.5 * torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    phases = len(make_solver(solver, {}).phases())
    torch._dynamo.reset()
    counters.clear()
    traced = []
    try:
        for batch in (4, 3, 1, 2, 1):
            x = torch.randn(batch, D, generator=g, dtype=torch.float64)

            def f(z, x=x):
                return torch.tanh(z @ w + x)

            z0 = torch.zeros(batch, D, dtype=torch.float64)
            assert_traced_solve_matches_eager(f, z0, solver=solver, abstol=1e-8, reltol=0.0)
            traced.append(counters["frames"]["total"])
    finally:
        torch._dynamo.reset()
    assert traced == [phases, 2 * phases, 3 * phases, 3 * phases, 3 * phases]


def test_a_step_function_is_wrapped_by_torch_compile_once_for_every_solve():
    """Each solve builds its method anew; its compiled steps share one torch.compile wrapper
    per step function and options (making one costs about 1 ms), bound to that solve's method."""
    from raydeq.solvers.driver import compiled
    from raydeq.solvers.solve import make_solver

    first, second = make_solver("vcab3", {}), make_solver("vcab3", {})
    options = {"backend": "eager"}
    startup, adams = (compiled(p.step, options) for p in first.phases())
    again = compiled(second.phases()[1].step, options)
    assert again.func is adams.func and again.args == (second,) and adams.args == (first,)
    assert startup.func is not adams.func
    assert compiled(first.phases()[1].step, {"backend": "aot_eager"}).func is not adams.func


def test_solves_of_other_solvers_dtypes_and_fs_each_keep_their_compiled_steps():
    """Dynamo keeps at most 8 compiled versions of a code object (recompile_limit), and Euler,
    BS3 and Tsit5 share RungeKutta.step: 3 solvers x 2 dtypes x 2 functions f made 12 versions
    of it in one process, and from the 9th on every step of every such solve ran eagerly. Each
    kind of solve now compiles into a region of its own: all 12 solves run each step through
    their compiled graph (one graph call per step: no break, no fallback) and match eager."""
    from torch._dynamo.utils import counters

    graph_calls = []

    def backend(graph, example_inputs):
        def run(*args):
            graph_calls.append(1)
            return graph.forward(*args)

        return run

    def tanh_f(w, x):
        return lambda z: torch.tanh(z @ w.T + x)

    def sin_f(w, x):
        return lambda z: torch.sin(z @ w.T + x)

    torch._dynamo.reset()
    counters.clear()
    try:
        for make in (tanh_f, sin_f):
            for dtype in (torch.float32, torch.float64):
                g = torch.Generator().manual_seed(1)
                w = torch.randn(D, D, generator=g, dtype=dtype)
                w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
                f = make(w, torch.randn(B, D, generator=g, dtype=dtype))
                z0 = torch.zeros(B, D, dtype=dtype)
                for solver in ("euler", "bs3", "tsit5"):
                    with torch.no_grad():
                        eager = raydeq.solve(f, z0, solver=solver, abstol=1e-5, reltol=0.0)
                        before = len(graph_calls)
                        sol = raydeq.solve(
                            f,
                            z0,
                            solver=solver,
                            abstol=1e-5,
                            reltol=0.0,
                            compile={"backend": backend},
                        )
                    what = (make.__name__, dtype, solver)
                    assert len(graph_calls) - before == sol.stats.steps > 0, what
                    assert sol.stats.nfe == eager.stats.nfe, what
                    assert bool(sol.stats.converged.all()), what
                    atol = 1e-12 if dtype == torch.float64 else 1e-6
                    torch.testing.assert_close(sol.z, eager.z, rtol=0, atol=atol)
        assert counters["frames"]["ok"] == 12
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_a_compiled_f_adds_no_torch_compile_wrapper_per_solve(solver):
    """A method whose steps are not capturable runs f alone through torch.compile: a wrapper
    made per solve was kept by dynamo's cache of backends for good (one more each solve, a
    training run's hundreds of thousands); one wrapper now serves every solve."""
    from torch._dynamo import eval_frame

    f, params = problem(7)
    z0 = torch.zeros(B, D, dtype=torch.float64)

    def backends_after(solves: int) -> int:
        for _ in range(solves):
            with torch.no_grad():
                sol = raydeq.solve(f, z0, solver=solver, compile={"backend": "eager"})
            assert bool(sol.stats.converged.all())
        return len(eval_frame.cached_backends)

    torch._dynamo.reset()
    assert backends_after(2) == backends_after(4)


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point", "jfb", "unrolled"])
def test_statistics_are_complete_when_solve_returns(adjoint, counted_vjp):
    """nfe counts every evaluation of f the solve made (the one attaching z* included) as a
    Python int on return; the adjoint fills the backward fields on backward()."""
    from raydeq.solvers.adjoint import Unrolled, make_adjoint

    f, params = problem(8)
    calls = []

    def counted(z):
        calls.append(z.shape[0])
        return counted_vjp.apply(f(z))

    sol = raydeq.solve(counted, torch.zeros(B, D, dtype=torch.float64), adjoint=adjoint)
    assert isinstance(sol.stats.nfe, int) and isinstance(sol.stats.steps, int)
    assert sol.stats.nfe == len(calls)
    assert sol.stats.backward_nvjp == 0
    assert sol.stats.backward_unconverged_fraction is None
    counted_vjp.calls = 0
    (sol.z * 1.0).sum().backward()
    assert sol.stats.nfe == len(calls)
    assert sol.stats.backward_nvjp >= 1
    # The VJPs of f on backward: those taken (through the steps, fewer than the evaluations).
    assert sol.stats.backward_nvjp == counted_vjp.calls
    implicit = adjoint in ("gmres", "fixed_point")
    assert sol.stats.backward_unconverged_fraction == (0.0 if implicit else None)
    assert isinstance(make_adjoint("unrolled", {}), Unrolled)


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_unrolled_backward_counts_the_vjps_of_f_it_takes(solver, counted_vjp):
    """adjoint="unrolled" counts in backward_nvjp the VJPs of f its backward takes, as counted
    on f's outputs: not the caller's initial_nfe, the last evaluation (its output only
    measures the residual) or the one that picks the first step (h0=None), where it counted
    one per evaluation."""
    f, _ = problem(3)
    calls = []

    def counted(z):
        calls.append(z.shape[0])
        return counted_vjp.apply(f(z))

    options = {"h0": None} if solver in raydeq.solvers.CONTINUOUS else {}
    z0 = torch.zeros(B, D, dtype=torch.float64)
    sol = raydeq.solve(
        counted, z0, solver=solver, adjoint="unrolled", initial_nfe=2, solver_options=options
    )
    sol.z.sum().backward()
    assert sol.stats.nfe == len(calls) + 2
    assert 0 < counted_vjp.calls < len(calls)
    assert sol.stats.backward_nvjp == counted_vjp.calls


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_check_interval_changes_no_result(solver):
    """Each sample stops on the step it converges, whatever the interval between host reads
    of the termination test: reading after every step gives the same z and residuals."""
    f, _ = problem(9)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        every = raydeq.solve(f, z0, solver=solver, check_every=1, **tight(solver))
        predicted = raydeq.solve(f, z0, solver=solver, stop_on_convergence=False, **tight(solver))
    torch.testing.assert_close(predicted.z, every.z, rtol=0, atol=0)
    torch.testing.assert_close(predicted.stats.residual, every.stats.residual, rtol=0, atol=0)
    assert (predicted.stats.status == every.stats.status).all()
    assert predicted.stats.steps >= every.stats.steps


@pytest.mark.parametrize("solver", SOLVERS)
def test_on_a_cpu_a_solve_ends_at_the_step_its_last_sample_converges(solver):
    """A CPU read stalls nothing, so there a solve also reads after every step whether any
    sample still runs: the same z as the accelerator's schedule, in the steps of reading the
    whole test after every step, where the predicted schedule can run past the convergence."""
    f, _ = problem(9)
    z0 = torch.zeros(B, D, dtype=torch.float64)
    with torch.no_grad():
        cpu = raydeq.solve(f, z0, solver=solver, **tight(solver))
        every = raydeq.solve(f, z0, solver=solver, check_every=1, **tight(solver))
        blocks = raydeq.solve(f, z0, solver=solver, stop_on_convergence=False, **tight(solver))
    assert bool(cpu.stats.converged.all())
    torch.testing.assert_close(cpu.z, blocks.z, rtol=0, atol=0)
    assert (cpu.stats.steps, cpu.stats.nfe) == (every.stats.steps, every.stats.nfe)
    assert cpu.stats.steps <= blocks.stats.steps


@pytest.mark.parametrize("reads", [False, True])
def test_a_monitor_selects_as_torch_where(reads):
    """Monitor.select gives torch.where(mask, a, b) for every pair; where host reads are free,
    a mask that is the same for every sample returns the pair's own tensors, with no select."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    ra, rb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    monitor = Monitor(a, Termination(), reads=reads)
    for rows in ([True] * 4, [False] * 4, [True, False, False, True]):
        mask = torch.tensor(rows)[:, None]
        with OpCounter() as counter:
            got = monitor.select(mask, ((a, b), (ra, rb)))
        for value, (x, y) in zip(got, ((a, b), (ra, rb)), strict=True):
            torch.testing.assert_close(value, torch.where(mask, x, y), rtol=0, atol=0)
        uniform = reads and len(set(rows)) == 1
        assert counter.ops["where"] == (0 if uniform else 2)
        if uniform:
            assert got[0] is (a if rows[0] else b)


def test_a_record_without_reltol_finds_the_samples_that_run_in_one_comparison():
    """Monitor.record at reltol 0 costs four operations (the better point, its two selects
    and one comparison with the per-sample limit); a sample that the test stopped stays
    stopped, at a point within the tolerance or not, and runs again once resumed."""
    z = torch.zeros(4, 2)
    monitor = Monitor(z, Termination(abstol=1e-3, reltol=0.0))
    monitor.allow_restarts()
    monitor.test(torch.tensor([[1.0], [1.0], [math.nan], [math.nan]]))
    residual = torch.tensor([[1e-5], [1.0], [1e-5], [1.0]])
    with OpCounter() as counter:
        monitor.record(z, residual)
    assert dict(counter.ops) == {"lt": 1, "where": 2, "gt": 1}
    assert monitor.active[:, 0].tolist() == [False, True, False, False]
    assert monitor.codes.tolist() == [Status.CONVERGED, Status.MAX_STEPS, *[Status.NONFINITE] * 2]
    monitor.next_block(1, every=1)
    assert monitor.resume()[:, 0].tolist() == [False, False, True, True]
    monitor.record(z, torch.ones(4, 1))
    assert monitor.active[:, 0].tolist() == [False, True, False, True]


def test_a_predicted_check_costs_ten_operations_and_one_read():
    """next_block's prediction: the rates (log, fall, distance to go, their quotient), the
    fallback where no rate is known, the running samples' largest in one read; the stopped
    samples count as 0 (a tensor, no operation to make it). The slowest sample, 2.2 decades
    to go at 2 per 4 steps, asks for ceil(4.4) steps and one of margin."""
    z = torch.zeros(3, 1, dtype=torch.float64)
    monitor = Monitor(z, Termination(abstol=1e-6, reltol=0.0))
    monitor.record(z, torch.tensor([[1e-2], [10**-1.8], [1.0]], dtype=torch.float64))
    monitor.mark()
    monitor.record(z, torch.tensor([[1e-5], [10**-3.8], [1e-7]], dtype=torch.float64))
    with OpCounter() as counter:
        block = monitor.next_block(4)
    assert block == 6
    assert sum(counter.ops.values()) == 10 and counter.syncs == 1


@pytest.mark.parametrize(("warm_start", "expected"), [(False, [0.8, 0.8]), (True, [1.4, 0.6])])
def test_one_adjoint_step_starts_from_v_with_warm_start_and_from_0_without(
    warm_start, expected, counted_vjp
):
    """f(z) = J z + x with J = diag(0.5, -0.5): the adjoint system is diag(0.5, 1.5) g = v, and
    x's gradient is g. With v = (1, 1) and max_iters=1, one Arnoldi step from 0 gives
    0.8 v = (0.8, 0.8); from v (r0 = (0.5, -0.5), alpha = 0.8) v + 0.8 r0 = (1.4, 0.6); the
    exact (2, 2/3) is met by neither, so each sample's backward is unconverged. backward_nvjp
    counts the VJPs of f the backward took."""
    jac = torch.tensor([0.5, -0.5], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64, requires_grad=True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return counted_vjp.apply(z * jac + x)

    sol = raydeq.solve(
        f,
        torch.zeros(2, 2, dtype=torch.float64),
        solver="broyden",
        adjoint_options={"rtol": 1e-10, "max_iters": 1, "warm_start": warm_start},
        **tight("broyden"),
    )
    torch.testing.assert_close(sol.z, x / (1 - jac), rtol=0, atol=1e-9)
    counted_vjp.calls = 0
    (grad,) = torch.autograd.grad(sol.z.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([expected] * 2, dtype=torch.float64))
    assert sol.stats.backward_converged.tolist() == [False, False]
    assert sol.stats.backward_unconverged_fraction == 1.0
    assert sol.stats.backward_nvjp == counted_vjp.calls


def test_an_infinite_residual_stops_the_sample_as_nonfinite():
    """f is 1 at z = 0 and inf elsewhere: after one fixed-point step the residual is inf - 1
    = inf (not NaN), a non-finite value, not a divergence."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.where(z == 0, 1.0, float("inf"))

    with torch.no_grad():
        sol = raydeq.solve(f, torch.zeros(2, 3), solver="fixed_point", check_every=1)
    assert (sol.stats.status == Status.NONFINITE).all()
    assert torch.equal(sol.z, torch.zeros(2, 3))


def test_a_vcab3_solve_ending_in_its_start_up_still_stops_non_finite_samples():
    """max_steps=1 ends the solve within VCAB3's two BS3 start-up steps, where no check ran:
    the step to a NaN is reported as NONFINITE, not MAX_STEPS."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.where(z == 0, 1.0, float("nan"))

    with torch.no_grad():
        sol = raydeq.solve(f, torch.zeros(2, 3), solver="vcab3", max_steps=1)
    assert sol.stats.steps == 1
    assert (sol.stats.status == Status.NONFINITE).all()


def test_divergence_is_relative_to_a_small_first_residual():
    """z <- 3 z + 1e-3 from 0: the residual 1e-3 sqrt(2) 3^k at the k-th iterate passes 100
    times the first at k = 5 (stats.steps 6: the evaluation at z0 is a fixed-point solve's first
    step), long before it reaches 100 itself (k = 11)."""
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: 3 * z + 1e-3,
            torch.zeros(1, 2, dtype=torch.float64),
            solver="fixed_point",
            abstol=1e-9,
            reltol=0.0,
            divergence=100.0,
            max_steps=8,
            check_every=1,
        )
    assert int(sol.stats.status[0]) == Status.DIVERGED
    assert sol.stats.steps == 6


def test_an_unconverged_sample_returns_its_best_iterate():
    """z <- diag(-0.5, -1.2) z from (1, 1e-3): the decaying mode dominates the residual at first
    and the growing one later, so the residual falls, then rises; the sample returns the
    iterate of least residual among those f was evaluated at. A second sample with
    diag(-0.5, 0.5) converges: half the batch is unconverged."""
    scales = torch.tensor([[-0.5, -1.2], [-0.5, 0.5]], dtype=torch.float64)
    points, images = [], []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z.clone())
        images.append(scales * z)
        return images[-1]

    z0 = torch.tensor([[1.0, 1e-3], [1.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(f, z0, solver="fixed_point", abstol=1e-8, reltol=0.0, max_steps=30)
    residuals = torch.stack([(fz - z)[0].square().mean().sqrt() for z, fz in zip(points, images)])
    best = int(residuals.argmin())
    assert 3 < best < len(points) - 10  # the least residual is well inside the run
    torch.testing.assert_close(sol.z[0], points[best][0], rtol=0, atol=0)
    torch.testing.assert_close(sol.stats.residual[0], residuals[best], rtol=1e-12, atol=0)
    assert sol.stats.status.tolist() == [Status.MAX_STEPS, Status.CONVERGED]
    assert sol.stats.unconverged_fraction == 0.5


@pytest.mark.parametrize(
    ("solver", "options"), [("fixed_point", {"damping": 0.3}), ("anderson", {"beta": 0.3})]
)
def test_a_damped_step_moves_its_weight_of_the_way_to_f(solver, options):
    """With f constant c, the first step from 0 lands on 0.3 c: (1 - damping) z + damping f(z),
    and Anderson's mixing beta f(z) + (1 - beta) z of its one-iterate history."""
    c = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z.clone())
        return c

    with torch.no_grad():
        raydeq.solve(f, torch.zeros_like(c), solver=solver, solver_options=options, max_steps=2)
    torch.testing.assert_close(points[1], 0.3 * c, rtol=1e-15, atol=0)


# (abstol as a power of 2, steps): fixed-point iteration of f(z) = z / 2 from z0 = 1 has the
# residual 2**-k after k steps (its evaluation at z0 counts as the first) and converges on
# step ceil(exponent). The first check, after UNKNOWN_BLOCK = 4 steps (steps = 5), predicts at
# the rate since z0; each check takes ceil(since * to_go / fall) + 1 steps, at most 2 * since
# and MAX_BLOCK = 16: for 2**-8.75, 4 * 3.75 / 4 -> 5 more (10); for 2**-29.75, 8 (the cap
# 2 * 4), then 16 (MAX_BLOCK and 2 * 8), then 16 * 0.75 / 16 -> 2 more: 5 + 8 + 16 + 2 = 31;
# for 2**-44.5, 8, 16, then 16 (ceil(15.5) + 1 capped at MAX_BLOCK): 5 + 8 + 16 + 16 = 45.
@pytest.mark.parametrize(("exponent", "steps"), [(8.75, 10), (29.75, 31), (44.5, 45)])
def test_the_predicted_checks_run_as_many_steps_as_the_residual_s_rate_asks(exponent, steps):
    """Without a read after every step a solve ends at the first check after convergence,
    where the rate since the previous check predicts it."""
    z0 = torch.ones(1, 1, dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: z / 2,
            z0,
            solver="fixed_point",
            abstol=2**-exponent,
            reltol=0.0,
            stop_on_convergence=False,
        )
    assert (sol.stats.steps, sol.stats.nfe) == (steps, steps)
    assert sol.stats.residual.item() == 2.0 ** -math.ceil(exponent)
    assert sol.z.item() == 2.0 ** (1 - math.ceil(exponent)) and bool(sol.stats.converged.all())


@pytest.mark.parametrize("stop_on_convergence", [False, True])
def test_a_residual_that_does_not_fall_is_checked_every_four_steps(stop_on_convergence):
    """Without a rate to predict from, the next check comes UNKNOWN_BLOCK = 4 steps later: the
    residual 2**(k-1) of fixed-point iteration of f(z) = 2 z + 1 from 0 (after k steps) passes
    divergence x its first, 1e4, after 14 steps, and the checks at 5, 9, 13 and 17 stop it
    at 17."""
    z0 = torch.zeros(1, 1, dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: 2 * z + 1,
            z0,
            solver="fixed_point",
            max_steps=100,
            stop_on_convergence=stop_on_convergence,
        )
    assert (sol.stats.steps, sol.stats.nfe) == (17, 17)
    assert sol.stats.status.tolist() == [Status.DIVERGED]
    assert sol.stats.residual.item() == 1.0 and sol.z.item() == 0.0


@pytest.mark.parametrize("check_every", [None, 1])
def test_a_residual_exactly_at_the_tolerance_has_converged(check_every):
    """||f(z) - z|| <= abstol stops the sample: fixed-point iteration of f(z) = z / 2 from 1
    has the residual 2**-10 exactly after 10 steps, and abstol = 2**-10 stops it there."""
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: z / 2,
            torch.ones(1, 1, dtype=torch.float64),
            solver="fixed_point",
            abstol=2.0**-10,
            reltol=0.0,
            check_every=check_every,
        )
    assert sol.stats.steps == 10 and sol.stats.status.tolist() == [Status.CONVERGED]
    assert sol.stats.residual.item() == 2.0**-10 and sol.z.item() == 2.0**-9


@pytest.mark.parametrize("solver", ["vcab3", "euler", "fixed_point", "anderson"])
def test_a_float32_residual_whose_norm_underflows_does_not_read_as_converged(solver):
    """With abstol 0 the test is ||f(z) - z|| <= reltol ||z||, which a contraction towards
    z* = 0 never meets (the residual is about half of ||z||); in float32 both norms underflowed
    to 0 near 1e-23 and the samples ended CONVERGED with residual 0. They now end MAX_STEPS
    with the residual measured in float64."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)
    w = 0.5 * w / torch.linalg.matrix_norm(w, 2)

    def f(z):
        return torch.tanh(z @ w.T)

    z0 = torch.randn(2, 8, generator=g)
    with torch.no_grad():
        sol = raydeq.solve(f, z0, solver=solver, abstol=0.0, reltol=1e-4, max_steps=1000)
    z = sol.z.double()
    expected = torch.linalg.vector_norm(f(sol.z).double() - z, dim=1) / 8**0.5
    assert (expected > 1e-4 * torch.linalg.vector_norm(z, dim=1) / 8**0.5).all()
    assert sol.stats.status.tolist() == [int(Status.MAX_STEPS)] * 2
    assert not sol.stats.converged.any()
    torch.testing.assert_close(sol.stats.residual.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("solver", ["vcab3", "euler", "fixed_point", "anderson"])
def test_a_float32_state_whose_norm_overflows_does_not_read_as_converged(solver):
    """A state of 1e19 in 8 features has a float32 2-norm of inf (its squares overflow), so
    reltol x ||z|| was inf, which the residual of f(z) = z / 2 + 1, 5e18, met: the sample
    ended CONVERGED far from z* = 2. It now ends NONFINITE; one whose residual meets reltol x
    ||z|| measured without overflow (f(z) = z + 1e10) stays CONVERGED, as does the sample
    solved from 0 beside it."""
    z0 = torch.tensor([[1e19] * 8, [1e19] * 8, [0.0] * 8])

    def f(z):
        return torch.cat([z[:1] / 2 + 1, z[1:2] + 1e10, z[2:] / 2 + 1])

    with torch.no_grad():
        sol = raydeq.solve(f, z0, solver=solver, max_steps=50)
    assert sol.stats.status.tolist() == [int(Status.NONFINITE), 0, 0]
    assert sol.stats.converged.tolist() == [False, True, True]
    assert sol.stats.residual[0].item() > 1e18


def test_a_converged_samples_result_meets_its_own_tolerance():
    """With reltol the tolerance grows with ||z||: fixed-point iteration of the map 0 -> 8 ->
    9 -> 10.0625 has the residual 1 at z = 8, above its tolerance 0.12 x 8 = 0.96, and the
    larger residual 1.0625 at z = 9, within 0.12 x 9 = 1.08. The result is the best iterate,
    z = 8, which misses its tolerance, so the sample runs on to z = 10.0625 (residual 0) and
    returns that, rather than reporting z = 8 as converged."""

    def f(z):
        return torch.where(z == 0, 8.0, torch.where(z == 8, 9.0, 10.0625))

    with torch.no_grad():
        sol = raydeq.solve(
            f,
            torch.zeros(1, 1, dtype=torch.float64),
            solver="fixed_point",
            abstol=0.0,
            reltol=0.12,
        )
    assert sol.stats.status.tolist() == [Status.CONVERGED]
    assert sol.z.item() == 10.0625 and sol.stats.residual.item() == 0.0


@pytest.mark.parametrize(("dtype", "steps"), [(torch.float32, 64), (torch.float64, 512)])
def test_a_residual_whose_norm_overflows_stops_the_sample_as_non_finite(dtype, steps):
    """Fixed-point iteration of f(z) = 2 z + 1 from 0 (4 features) with no divergence bound:
    z and the residual z + 1 double on each step; the residual's 2-norm, about 2 x 2**k after
    k iterations, overflows at k = 63 in float32 (4 x 2**126 = 2**128) and k = 511 in
    float64, the 64th and 512th steps, where reltol x ||z|| is inf too. The infinite residual
    is not within it, and the check after that step stops the sample as non-finite; the
    residual never fell below its first, 1, at z0, which stays the result."""
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: 2 * z + 1,
            torch.zeros(1, 4, dtype=dtype),
            solver="fixed_point",
            divergence=float("inf"),
            max_steps=2000,
            check_every=1,
        )
    assert sol.stats.steps == steps and sol.stats.status.tolist() == [Status.NONFINITE]
    assert sol.stats.residual.item() == 1.0 and bool((sol.z == 0).all())


def test_a_residual_exactly_at_the_divergence_bound_has_not_diverged():
    """Only a residual above divergence x the first stops the sample: for f(z) = 2 z + 1 from
    0 the residual after 5 steps, at the first check, is 16 x the first; divergence=16 keeps
    it running to the next check, 4 steps later."""
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: 2 * z + 1,
            torch.zeros(1, 1, dtype=torch.float64),
            solver="fixed_point",
            divergence=16.0,
            max_steps=100,
        )
    assert sol.stats.steps == 9 and sol.stats.status.tolist() == [Status.DIVERGED]


@pytest.mark.parametrize("adjoint", ["gmres", "unrolled"])
def test_only_converged_samples_count_as_converged(adjoint):
    """Per sample f(z) = a z + c from 0: a = 1/2, c = 1 converges (residual 2**-20 after 20
    steps), a = 2 diverges, a = 1 keeps its residual 1 until max_steps, c = NaN is non-finite
    at z0; only the first counts as converged, 3 of 4 do not, and the residuals carry no
    graph."""
    a = torch.tensor([[0.5], [2.0], [1.0], [1.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.0], [1.0], [1.0], [float("nan")]], dtype=torch.float64)
    sol = raydeq.solve(
        lambda z: a * z + c,
        torch.zeros(4, 1, dtype=torch.float64),
        solver="fixed_point",
        adjoint=adjoint,
        abstol=1e-6,
        reltol=0.0,
        max_steps=30,
    )
    expected = [Status.CONVERGED, Status.DIVERGED, Status.MAX_STEPS, Status.NONFINITE]
    assert sol.stats.status.tolist() == expected
    assert sol.stats.converged.tolist() == [True, False, False, False]
    assert sol.stats.unconverged_fraction == 0.75
    assert sol.stats.residual.tolist() == [2.0**-20, 1.0, 1.0, float("inf")]
    assert not sol.stats.residual.requires_grad and sol.stats.residual.grad_fn is None


@pytest.mark.parametrize("solver", ["tsit5", "vcab3", "fixed_point"])
def test_with_check_start_a_batch_partly_converged_at_z0_still_solves_the_rest(solver):
    """f(z) = z / 2 + 1 has z* = 2: the sample that starts there stays there, the one that
    starts at 0 is solved to the tolerance."""
    z0 = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: z / 2 + 1, z0, solver=solver, abstol=1e-8, reltol=0.0, check_start=True
        )
    assert sol.stats.status.tolist() == [Status.CONVERGED, Status.CONVERGED]
    assert sol.stats.steps > 1 and sol.z[0].item() == 2.0
    assert abs(sol.z[1].item() - 2.0) <= 2e-8


@pytest.mark.parametrize(
    ("adjoint", "expected"), [("gmres", [1.4, 0.6]), ("fixed_point", [1.5, 0.5])]
)
def test_an_implicit_adjoint_starts_from_v_when_warm_start_is_not_given(adjoint, expected):
    """f(z) = J z + x with J = diag(0.5, -0.5) and v = (1, 1): one step from v is GMRES's
    v + 0.8 (0.5, -0.5) = (1.4, 0.6) and Neumann's v + J^T v = (1.5, 0.5), where from 0 they
    would give (0.8, 0.8) and v itself; x's gradient is that step."""
    jac = torch.tensor([0.5, -0.5], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    sol = raydeq.solve(
        lambda z: z * jac + x,
        torch.zeros(2, 2, dtype=torch.float64),
        solver="broyden",
        adjoint=adjoint,
        adjoint_options={"rtol": 1e-10, "max_iters": 1},
        **tight("broyden"),
    )
    (grad,) = torch.autograd.grad(sol.z.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([expected] * 2, dtype=torch.float64))


def test_a_recorded_implicit_adjoint_records_gmres_and_leaves_neumann_as_it_is():
    """recorded() (compile="graph") turns on GMRES.graph and keeps its other options; Neumann
    has no Arnoldi steps to record."""
    from raydeq.solvers import GMRES, Neumann
    from raydeq.solvers.adjoint import ImplicitAdjoint

    gmres = ImplicitAdjoint(GMRES(rtol=1e-7, restart=5), warm_start=False).recorded()
    assert gmres.linear_solver == GMRES(rtol=1e-7, restart=5, graph=True)
    assert gmres.warm_start is False
    neumann = ImplicitAdjoint(Neumann(rtol=1e-7))
    assert neumann.recorded() is neumann


def test_the_neumann_resolution_is_the_epsilon_of_the_coarsest_dtype_f_computes_in():
    """f computes in its state's dtype or the caller's autocast's, whichever rounds coarser
    (bfloat16's epsilon 2^-7 over float16's 2^-10); rounding_in raises Neumann's resolution
    to that epsilon exactly, keeps a larger one and leaves GMRES as it is."""
    from raydeq.solvers import GMRES, Neumann
    from raydeq.solvers.adjoint import ImplicitAdjoint
    from raydeq.solvers.solve import computing_dtype

    assert computing_dtype(torch.float64, "cpu") == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert computing_dtype(torch.float32, "cpu") == torch.bfloat16
        assert computing_dtype(torch.float16, "cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert computing_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert computing_dtype(torch.float32, "cpu") == torch.float32
    neumann = ImplicitAdjoint(Neumann(rtol=1e-7), warm_start=False)
    for dtype, eps in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        rounding = neumann.rounding_in(dtype)
        assert rounding.linear_solver == Neumann(rtol=1e-7, resolution=eps)
        assert rounding.warm_start is False
    coarse = ImplicitAdjoint(Neumann(resolution=0.1))
    assert coarse.rounding_in(torch.float16) is coarse
    gmres = ImplicitAdjoint(GMRES())
    assert gmres.rounding_in(torch.float16) is gmres


@pytest.mark.parametrize("given", ["gmres", None, "class"])
def test_an_implicit_adjoint_of_no_linear_solver_instance_is_refused_where_it_is_made(given):
    """ImplicitAdjoint("gmres"), (None) or (GMRES), the class, were taken and failed in the
    backward pass ('str' object is not callable, or GMRES(rtol=<function>) from its operator);
    each is refused where it is made, naming the value and GMRES(); an instance attached by
    hand differentiates z* = a z* + c as the closed form dz*/dc = 1 / (1 - a) does."""
    from raydeq.solvers import GMRES, SolveStats
    from raydeq.solvers.adjoint import ImplicitAdjoint

    value = GMRES if given == "class" else given
    with pytest.raises(TypeError, match=r"linear_solver=.* must be a linear solver such as GMRES"):
        ImplicitAdjoint(value)

    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    z_star = (c / 0.7).detach()
    stats = SolveStats(1, 1, torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.zeros(1))
    z, _ = ImplicitAdjoint(GMRES(rtol=1e-12)).attach(lambda z: 0.3 * z + c, z_star, z_star, stats)
    (grad,) = torch.autograd.grad(z.sum(), c)
    torch.testing.assert_close(grad, torch.full((1, 2), 1 / 0.7, dtype=torch.float64))


def test_anderson_mixes_beta_f_and_one_minus_beta_z_from_a_nonzero_start():
    """With f constant c, the first step from z0 lands on beta c + (1 - beta) z0."""
    c = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    z0 = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z.clone())
        return c

    with torch.no_grad():
        raydeq.solve(f, z0, solver="anderson", solver_options={"beta": 0.3}, max_steps=2)
    torch.testing.assert_close(points[1], 0.3 * c + 0.7 * z0, rtol=1e-15, atol=0)


def test_anderson_regularises_its_mixing_system_by_lam_times_the_mean_residual_square():
    """Anderson's second step mixes f(z0), f(z1) with alpha = w / sum(w), (G + lam mean(diag G)
    I) w = 1, G the Gram matrix of the residuals f(z_i) - z_i: checked against numpy."""
    g = torch.Generator().manual_seed(3)
    a = 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    z0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
    lam = 0.5
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z.clone())
        return z @ a.T + b

    with torch.no_grad():
        raydeq.solve(
            f, z0, solver="anderson", solver_options={"m": 2, "lam": lam}, max_steps=3, abstol=1e-12
        )
    a_np, b_np = a.numpy(), b.numpy()
    for i in range(2):
        zs = [z0[i].numpy(), a_np @ z0[i].numpy() + b_np]
        fs = [a_np @ z + b_np for z in zs]
        gs = np.stack([fz - z for fz, z in zip(fs, zs, strict=True)])
        gram = gs @ gs.T
        w = np.linalg.solve(gram + lam * np.mean(np.diag(gram)) * np.eye(2), np.ones(2))
        alpha = w / w.sum()
        expected = alpha[0] * fs[0] + alpha[1] * fs[1]
        np.testing.assert_allclose(points[2][i].numpy(), expected, rtol=1e-12, atol=1e-14)


def test_broyden_with_a_full_memory_replaces_its_oldest_rank_one_term():
    """Limited-memory good Broyden, H = -I + sum u v^T over the last `memory` terms, each
    step z <- z - H g, u = (dz - H dg) / (dz^T H dg), v = H^T dz: against a dense numpy
    loop that rebuilds H from the terms it keeps."""
    g = torch.Generator().manual_seed(4)
    w = 0.6 * torch.randn(5, 5, generator=g, dtype=torch.float64) / 5**0.5
    b = torch.randn(5, dtype=torch.float64, generator=g)
    z0 = torch.randn(1, 5, generator=g, dtype=torch.float64)
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z.clone())
        return torch.tanh(z @ w.T + b)

    with torch.no_grad():
        raydeq.solve(
            f, z0, solver="broyden", solver_options={"memory": 2}, max_steps=6, abstol=1e-14
        )
    w_np, b_np = w.numpy(), b.numpy()

    def residual(z: np.ndarray) -> np.ndarray:
        return np.tanh(w_np @ z + b_np) - z

    z = z0[0].numpy()
    terms: list[tuple[np.ndarray, np.ndarray]] = []
    expected = [z]
    for _ in range(5):
        h = -np.eye(5) + sum((np.outer(u, v) for u, v in terms), np.zeros((5, 5)))
        dz = -h @ residual(z)
        dg = residual(z + dz) - residual(z)
        v = h.T @ dz
        terms = [*terms, ((dz - h @ dg) / (v @ dg), v)][-2:]
        z = z + dz
        expected.append(z)
    assert len(points) >= 6
    np.testing.assert_allclose(
        torch.cat(points[:6]).numpy(), np.stack(expected), rtol=1e-10, atol=1e-12
    )


def test_broyden_skipping_an_update_keeps_every_rank_one_term():
    """A step whose dg is rounding (f repeats the last residual at the 4th evaluation, with
    both of memory=2's slots held) leaves H unchanged: the slot it would fill keeps its term,
    and later steps fill the slots in turn. Against a dense numpy loop over the two slots;
    the skipped step used to empty its slot, which moved the 5th point by up to 0.055."""
    g = torch.Generator().manual_seed(4)
    w = 0.6 * torch.randn(5, 5, generator=g, dtype=torch.float64) / 5**0.5
    b = torch.randn(5, dtype=torch.float64, generator=g)
    z0 = torch.randn(1, 5, generator=g, dtype=torch.float64)
    points, residuals = [], []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z.clone())
        fz = z + residuals[-1] if len(points) == 4 else torch.tanh(z @ w.T + b)
        residuals.append(fz - z)
        return fz

    with torch.no_grad():
        raydeq.solve(
            f, z0, solver="broyden", solver_options={"memory": 2}, max_steps=7, abstol=1e-14
        )
    w_np, b_np = w.numpy(), b.numpy()
    z, g_z = z0[0].numpy(), np.tanh(w_np @ z0[0].numpy() + b_np) - z0[0].numpy()
    slots = [(np.zeros(5), np.zeros(5))] * 2
    expected = [z]
    for step in range(6):
        h = -np.eye(5) + sum(np.outer(u, v) for u, v in slots)
        dz = -h @ g_z
        g_new = g_z if step == 2 else np.tanh(w_np @ (z + dz) + b_np) - (z + dz)
        if step != 2:
            v = h.T @ dz
            slots[step % 2] = ((dz - h @ (g_new - g_z)) / (v @ (g_new - g_z)), v)
        z, g_z = z + dz, g_new
        expected.append(z)
    assert len(points) >= 7
    np.testing.assert_allclose(
        torch.cat(points[:7]).numpy(), np.stack(expected), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("solver", ["vcab3", "anderson"])
def test_the_evaluations_count_adds_initial_nfe_to_every_call_of_f(solver):
    """stats.nfe is initial_nfe (the caller's evaluations making z0) plus each call of f."""
    calls = []

    def f(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 0.5 * z + 1.0

    with torch.no_grad():
        sol = raydeq.solve(f, torch.zeros(2, 3), solver=solver, initial_nfe=3)
    assert bool(sol.stats.converged.all())
    assert sol.stats.nfe == 3 + len(calls)


@pytest.mark.parametrize(
    ("adjoint", "recorded"), [("gmres", False), ("jfb", False), ("unrolled", True)]
)
def test_only_the_unrolled_adjoint_records_the_forward_steps_for_autograd(adjoint, recorded):
    """An implicit adjoint differentiates one call of f at z* alone: the solver's own calls
    of f run without autograd; the unrolled one backpropagates through them all."""
    f, _ = problem()
    grad_modes = []

    def counted(z: torch.Tensor) -> torch.Tensor:
        grad_modes.append(torch.is_grad_enabled())
        return f(z)

    raydeq.solve(counted, torch.zeros(B, D, dtype=torch.float64), solver="bs3", adjoint=adjoint)
    assert len(grad_modes) > 4
    assert all(mode == recorded for mode in grad_modes[:-1])


def test_states_of_mixed_dtypes_are_refused_naming_each_parts():
    """The refusal named no dtype: a multiscale state's parts are listed with theirs."""
    with pytest.raises(
        TypeError,
        match=r"share one dtype and one device, got torch\.float32 on cpu, torch\.float64 on cpu",
    ):
        raydeq.solve(lambda z: z, [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)])


@pytest.mark.parametrize("solver", ["vcab3", "broyden"])
def test_f_sees_a_state_of_three_or_more_dimensions_in_its_own_shape(solver):
    """A (B, C, L) state reaches f as (B, C, L), not as the solver's flat (B, C L) matrix:
    f mixes its channels, which it could not do on the flat form."""
    g = torch.Generator().manual_seed(5)
    mix = 0.4 * torch.randn(2, 2, generator=g, dtype=torch.float64)
    c = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    shapes = set()

    def f(z: torch.Tensor) -> torch.Tensor:
        shapes.add(tuple(z.shape))
        return torch.einsum("ij,bjl->bil", mix, z) + c

    with torch.no_grad():
        sol = raydeq.solve(f, torch.zeros_like(c), solver=solver, abstol=1e-10, reltol=0.0)
    assert shapes == {(3, 2, 4)}
    eye = torch.eye(2, dtype=torch.float64)
    expected = torch.linalg.solve(eye - mix, c)
    torch.testing.assert_close(sol.z, expected, rtol=0, atol=1e-8)


Pair = collections.namedtuple("Pair", ["fine", "coarse"])


@pytest.mark.parametrize("container", [list, tuple, Pair._make])
@pytest.mark.parametrize("adjoint", ["gmres", "unrolled"])
def test_f_and_the_result_see_a_multiscale_state_in_its_own_container(container, adjoint):
    """A state given as a list, tuple or named tuple reaches f, and comes back, as one: f
    reads it the way its caller built it. The fixed point of fine = coarse / 2 + 1,
    coarse = fine / 2 (per feature) is fine = 4 / 3, coarse = 2 / 3."""
    kinds = set()

    def f(z):
        kinds.add(type(z))
        fine, coarse = z
        return container([coarse.mean(1, keepdim=True).expand_as(fine) / 2 + 1, fine / 2])

    z0 = container([torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)])
    sol = raydeq.solve(f, z0, adjoint=adjoint, abstol=1e-10, reltol=0.0, max_steps=1000)
    assert kinds == {type(z0)} and type(sol.z) is type(z0)
    torch.testing.assert_close(sol.z[0], torch.full((2, 3), 4 / 3, dtype=torch.float64))
    torch.testing.assert_close(sol.z[1], torch.full((2, 3), 2 / 3, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_a_discrete_solver_counts_its_evaluation_at_z0_as_its_first_step(solver):
    """max_steps=3 allows f at z0 and two steps: three calls of f, stats.steps 3."""
    calls = []

    def f(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.tanh(2.0 * z + 1.0)

    with torch.no_grad():
        sol = raydeq.solve(f, torch.zeros(2, 3), solver=solver, max_steps=3, abstol=1e-12)
    assert not bool(sol.stats.converged.any())
    assert (len(calls), sol.stats.steps, sol.stats.nfe) == (3, 3, 3)


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point", "jfb", "unrolled"])
def test_an_f_that_does_not_read_z_differentiates_as_its_own_value(adjoint):
    """f(z) = tanh(x) has J = 0, and one fixed-point step gives z* = tanh(x), so x's gradient
    is 1 - tanh(x)^2 by every adjoint; the implicit ones' VJP of f at z* found no use of z in
    f's graph and raised."""
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x.requires_grad_()
    z0 = torch.zeros(B, D, dtype=torch.float64)
    sol = raydeq.solve(lambda z: torch.tanh(x), z0, solver="fixed_point", adjoint=adjoint)
    (grad,) = torch.autograd.grad(sol.z.sum(), x)
    torch.testing.assert_close(grad, 1 - torch.tanh(x.detach()) ** 2, rtol=1e-14, atol=0)


@pytest.mark.parametrize("solver", ["vcab3", "anderson", "broyden"])
def test_numpy_integers_are_taken_as_the_integers_they_are(solver):
    """A count from numpy (np.int64(3)) is an integer, as the error for a bad one says."""
    w = torch.tensor([[0.5, 0.1], [0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    memory = {"anderson": "m", "broyden": "memory"}.get(solver)

    def solved(count: type) -> raydeq.Solution:
        options = {memory: count(3)} if memory else {}
        return raydeq.solve(
            lambda z: torch.tanh(z @ w + 1),
            z0,
            solver=solver,
            max_steps=count(40),
            solver_options=options,
            adjoint_options={"max_iters": count(10), "restart": count(5)},
        )

    plain, numpy = solved(int), solved(np.int64)
    assert torch.equal(plain.z, numpy.z) and plain.stats.steps == numpy.stats.steps
    (grad,) = torch.autograd.grad(plain.z.sum(), w)
    assert torch.equal(torch.autograd.grad(numpy.z.sum(), w)[0], grad)
    with pytest.raises(TypeError, match=re.escape("max_steps=np.True_ must be an integer >= 1")):
        raydeq.solve(lambda z: z, torch.zeros(1, 2), max_steps=np.True_)


@pytest.mark.parametrize("adjoint", raydeq.solvers.ADJOINTS)
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "vcab3"])
def test_an_f_that_changes_its_input_in_place_is_refused_naming_the_operation(solver, adjoint):
    """An f that changes the state it is given (z += x, z.relu_()) changes the solver's own
    iterate; without grad it went on from a wrong state (z* off by 0.3), with an implicit
    adjoint it failed in autograd's 'leaf Variable ... in-place operation'."""
    w = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 8

    def f(z):
        out = torch.tanh(z @ w + 1)
        z.zero_()
        return out

    with pytest.raises(ValueError, match=r"f changed its input in place .*z = z \+ x"):
        raydeq.solve(f, torch.zeros(3, 5, dtype=torch.float64), solver=solver, adjoint=adjoint)


def test_an_f_that_changes_its_input_in_place_is_refused_under_compile():
    """A traced f reads no version counter: Anderson under compile=True, which compiles f
    alone, returned a z* with residual 2.9 without a word; its eager first evaluation at z0
    now refuses it."""
    w = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 8

    def f(z):
        out = torch.tanh(z @ w + 1)
        z.zero_()
        return out

    z0 = torch.zeros(3, 5, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="f changed its input in place"):
        raydeq.solve(f, z0, solver="anderson", compile={"backend": "eager"})


def test_an_f_that_changes_a_multiscale_input_in_place_is_refused():
    """A part of a multiscale state changed in place is the solver's iterate changed too."""

    def f(z):
        z[1].relu_()
        return [torch.tanh(z[0] + 1), torch.tanh(z[1] - 1)]

    with torch.no_grad(), pytest.raises(ValueError, match="f changed its input in place"):
        raydeq.solve(f, [torch.zeros(2, 3, 4), torch.zeros(2, 2, 2)])


@pytest.mark.parametrize(
    ("dtype", "abstol"), [(torch.float32, 1e300), (torch.float32, 2e38), (torch.float64, 1e308)]
)
@pytest.mark.parametrize("solver", SOLVERS)
def test_an_infinite_residual_meets_no_tolerance_past_the_dtype_s_range(solver, dtype, abstol):
    """abstol times sqrt(features) past the dtype's range compared as inf with the residuals,
    so that a sample whose f is inf everywhere ended CONVERGED with an infinite residual; the
    tolerance acts as the greatest finite number, and the sample ends NONFINITE."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.full_like(z, float("inf"))

    with torch.no_grad():
        sol = raydeq.solve(f, torch.zeros(2, 4, dtype=dtype), solver, abstol=abstol, reltol=0.0)
    assert sol.stats.status.tolist() == [Status.NONFINITE] * 2
    assert sol.stats.converged.tolist() == [False, False]
    assert math.isinf(float(sol.stats.residual.max()))


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_multiscale_residual_is_the_rms_over_all_parts_together(solver):
    """The residual and the test of a state of several parts take the RMS over all of a
    sample's features at once (README), not per part: recomputed at the returned z*."""
    f, _ = problem()

    def split(z):
        fz = f(torch.cat([z[0], z[1].reshape(B, -1)], 1))
        return [fz[:, :2], fz[:, 2:].reshape(B, 2, 2)]

    z0 = [torch.zeros(B, 2, dtype=torch.float64), torch.zeros(B, 2, 2, dtype=torch.float64)]
    with torch.no_grad():
        sol = raydeq.solve(split, z0, solver, abstol=1e-6, reltol=1e-3)
        z = torch.cat([t.reshape(B, -1) for t in sol.z], 1)
        fz = torch.cat([t.reshape(B, -1) for t in split(sol.z)], 1)
    rms = (fz - z).pow(2).mean(1).sqrt()
    torch.testing.assert_close(sol.stats.residual, rms, rtol=1e-12, atol=0)
    assert bool(sol.stats.converged.all())
    assert bool((rms <= 1e-6 + 1e-3 * z.pow(2).mean(1).sqrt()).all())
