"""ODE solvers: convergence order on a linear flow with a closed form, and torchdiffeq agreement."""

import math
import re

import pytest
import torch
import torchdiffeq
from hypothesis import example, given, settings
from hypothesis import strategies as st

import raydeq
from raydeq.solvers import CONTINUOUS, Status
from raydeq.solvers import tableau as tableaus
from raydeq.solvers.control import Controller, initial_step
from raydeq.solvers.termination import Termination

N = 5


def linear_problem():
    """dz/dt = A z + c - z with A symmetric, ||A|| < 1: z(t) = z* + expm((A - I) t)(z0 - z*)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-0.9, 0.9, N, dtype=torch.float64)) @ q.T
    c = torch.randn(N, dtype=torch.float64, generator=g)
    z0 = torch.randn(2, N, dtype=torch.float64, generator=g)
    z_star = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - a, c)
    eye = torch.eye(N, dtype=torch.float64)

    def exact(t: float) -> torch.Tensor:
        return z_star + (z0 - z_star) @ torch.linalg.matrix_exp((a - eye) * t).T

    return (lambda z: z @ a.T + c), z0, exact


def integrate(f, z0, solver: str, t1: float, steps: int) -> torch.Tensor:
    """Fixed steps of size t1 / steps, never stopping early (the steady-state test is off)."""
    with torch.no_grad():
        return raydeq.solve(
            f,
            z0,
            solver=solver,
            abstol=1e-300,
            reltol=0.0,
            max_steps=steps,
            solver_options={"kind": "fixed", "h0": t1 / steps},
        ).z


@pytest.mark.parametrize(
    ("solver", "order"), [("tsit5", 5), ("bs3", 3), ("vcab3", 3), ("euler", 1)]
)
def test_convergence_order(solver, order):
    f, z0, exact = linear_problem()
    t1 = 2.0
    errors = [
        float((integrate(f, z0, solver, t1, n) - exact(t1)).abs().max()) for n in (32, 64, 128)
    ]
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - order) < 0.4 for s in slopes), (errors, slopes)


def grown(tree: tuple) -> set[tuple]:
    """The rooted trees made by adding one leaf to any node of `tree` (a node is the sorted
    tuple of its subtrees, a leaf the empty tuple)."""
    trees = {tuple(sorted((*tree, ())))}
    for i, child in enumerate(tree):
        trees |= {tuple(sorted((*tree[:i], g, *tree[i + 1 :]))) for g in grown(child)}
    return trees


def rooted_trees(order: int) -> list[list[tuple]]:
    """The rooted trees of 1, 2, ..., order nodes, one list per order."""
    levels = [[()]]
    while len(levels) < order:
        levels.append(sorted(set().union(*(grown(t) for t in levels[-1]))))
    return levels


def order_defects(tableau: tableaus.Tableau, weights: torch.Tensor, order: int) -> list[float]:
    """|weights . Phi(t) - 1 / gamma(t)| over the trees of each order up to `order`, largest
    per order (Butcher): Phi(t) = prod over t's subtrees s of A Phi(s), gamma(t) = |t| prod
    gamma(s), A the tableau's stages with c_i = sum_j a_ij (the steps are autonomous)."""
    stages = len(tableau.a) + 1
    a = torch.zeros(stages, stages, dtype=torch.float64)
    for i, row in enumerate(tableau.a):
        a[i + 1, : len(row)] = torch.tensor(row, dtype=torch.float64)

    def phi_gamma(t: tuple) -> tuple[torch.Tensor, float, int]:
        """Phi(t), gamma(t) and the number of nodes of t."""
        phi, gamma, size = torch.ones(stages, dtype=torch.float64), 1.0, 1
        for s in t:
            phi_s, gamma_s, size_s = phi_gamma(s)
            phi, gamma, size = phi * (a @ phi_s), gamma * gamma_s, size + size_s
        return phi, gamma * size, size

    defects = []
    for level in rooted_trees(order):
        terms = [phi_gamma(t)[:2] for t in level]
        defects.append(max(abs(float(weights @ phi) - 1 / gamma) for phi, gamma in terms))
    return defects


def test_rooted_trees_are_counted_as_in_butcher_s_table():
    """1, 1, 2, 4, 9, 20 trees of 1 to 6 nodes (OEIS A000081)."""
    assert [len(level) for level in rooted_trees(6)] == [1, 1, 2, 4, 9, 20]


@pytest.mark.parametrize("name", ["EULER", "BS3", "TSIT5"])
def test_tableaus_meet_the_order_conditions_of_their_solution_and_error_estimate(name: str):
    """The step's weights b (the FSAL last row) meet every order condition up to `order` and
    the embedded solution's, b - b_error, up to `error_order`, to float64 rounding, and each
    fails one of the next order, which the controller's exponents assume. A linear flow (the
    convergence test) checks only the stability polynomial, not the conditions of bushy trees."""
    tableau = getattr(tableaus, name)
    b = torch.zeros(len(tableau.a) + 1, dtype=torch.float64)
    b[: len(tableau.a[-1])] = torch.tensor(tableau.a[-1], dtype=torch.float64)
    embedded = b - torch.tensor(tableau.b_error, dtype=torch.float64)
    for weights, order in ((b, tableau.order), (embedded, tableau.error_order)):
        *met, next_order = order_defects(tableau, weights, order + 1)
        assert max(met) < 1e-13, (name, order, met)
        assert next_order > 1e-5, (name, order, next_order)


@pytest.mark.parametrize("solver", ["tsit5", "bs3", "vcab3"])
def test_agrees_with_torchdiffeq_dopri5(solver):
    g = torch.Generator().manual_seed(1)
    w = 0.8 * torch.randn(N, N, generator=g, dtype=torch.float64) / N**0.5
    x = torch.randn(3, N, generator=g, dtype=torch.float64)
    z0 = torch.randn(3, N, generator=g, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ w.T + x)

    t1 = 1.5
    ref = torchdiffeq.odeint(
        lambda t, z: f(z) - z,
        z0,
        torch.tensor([0.0, t1], dtype=torch.float64),
        method="dopri5",
        rtol=1e-12,
        atol=1e-12,
    )[-1]
    torch.testing.assert_close(integrate(f, z0, solver, t1, 600), ref, rtol=0, atol=1e-7)


def test_adaptive_solve_reaches_the_closed_form_steady_state():
    f, z0, exact = linear_problem()
    for solver in ("tsit5", "bs3", "vcab3", "euler"):
        with torch.no_grad():
            sol = raydeq.solve(f, z0, solver=solver, abstol=1e-9, reltol=0.0, max_steps=5000)
        torch.testing.assert_close(sol.z, exact(200.0), rtol=0, atol=1e-7)


def test_adams_weights_integrate_quadratics_and_milne_estimates_the_predictor_error():
    """On uneven nodes the Newton-form predictor integrates quadratic derivatives exactly; on
    even steps 9/10 (y_AM - y_AB) is the AB3 predictor's true error for a cubic derivative."""
    from raydeq.solvers.ode import adams_weights, divided_differences

    h = torch.tensor([[0.4], [1.3], [0.5]], dtype=torch.float64)
    older = torch.tensor([[0.3], [0.2], [0.5]], dtype=torch.float64)
    last = torch.tensor([[0.7], [0.9], [0.5]], dtype=torch.float64)

    def predict(derivative):
        """The predictor's increment and the second divided differences before and after."""
        f_old, f_mid, f_now = (derivative(t) for t in (-(older + last), -last, 0 * h))
        d1 = (f_mid - f_old) / older
        d1, d2 = divided_differences(f_now, f_mid, d1, last, older)
        h2, w3 = adams_weights(last, h)
        increment = h * f_now + 0.5 * h2 * d1 + w3 / 3 * d2
        return increment, d2, divided_differences(derivative(h), f_now, d1, h, last)[1], w3

    for degree in (0, 1, 2):
        increment, d2, d2_new, _ = predict(lambda t, degree=degree: t**degree)
        torch.testing.assert_close(increment, h ** (degree + 1) / (degree + 1))
        # AM3 is exact there too: Milne's difference vanishes.
        torch.testing.assert_close(d2_new, d2, rtol=0, atol=1e-12)
    y_ab, d2, d2_new, w3 = predict(lambda t: t**3)
    milne = w3 / 3 * (d2_new - d2)
    torch.testing.assert_close(0.9 * milne[2], h[2] ** 4 / 4 - y_ab[2], rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", ["vcab3", "tsit5", "bs3", "euler"])
def test_the_steady_state_is_reached_at_the_stability_limit(solver):
    """A few slow modes and many fast ones: the steps end at the explicit method's stability
    limit, where the step-size controller must not cycle above the tolerance."""
    from raydeq.bench.harness.problems import SpectralProblem, Spectrum

    problem = SpectralProblem(Spectrum(dim=256, batch=32), torch.device("cpu"))
    with torch.no_grad():
        sol = raydeq.solve(
            problem.f, torch.zeros(32, 256), solver=solver, abstol=1e-4, reltol=0.0, max_steps=2000
        )
    assert bool(sol.stats.converged.all()), (sol.stats.nfe, float(sol.stats.residual.max()))
    assert sol.stats.nfe < 200


def test_a_step_relative_tolerance_skips_resolving_the_transient():
    """Euler accepts local errors up to step_rtol of the step length: far from the steady
    state its steps grow as if the tolerance were loose, yet it stops at the same residual, at
    the closed-form steady state, with a fraction of the evaluations."""
    f, z0, exact = linear_problem()
    nfe = {}
    for step_rtol in (0.0, 0.4):
        with torch.no_grad():
            sol = raydeq.solve(
                f,
                z0,
                solver="euler",
                abstol=1e-6,
                reltol=0.0,
                max_steps=10000,
                solver_options={"step_rtol": step_rtol, "contraction": 0.0},
            )
        assert bool(sol.stats.converged.all())
        torch.testing.assert_close(sol.z, exact(200.0), rtol=0, atol=3e-5)
        nfe[step_rtol] = sol.stats.nfe
    assert nfe[0.4] < nfe[0.0] / 10, nfe


def test_steps_that_contract_the_residual_are_accepted():
    """On a strongly contracting layer (eigenvalues of A in [-0.3, 0.3]) a unit Euler step is
    one fixed-point iteration whose local error is about half its length, above step_rtol:
    Euler's default control accepts it because it cuts the residual below 0.7 of its start,
    so it takes fixed-point iteration's evaluations, where error control alone takes about
    twice as many; all stop at the closed-form fixed point."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-0.3, 0.3, N, dtype=torch.float64)) @ q.T
    c = torch.randn(N, dtype=torch.float64, generator=g)
    z_star = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - a, c)
    runs = {
        "fixed point": ("fixed_point", {}),
        "euler": ("euler", {}),
        "euler, error control only": ("euler", {"contraction": 0.0}),
    }
    nfe = {}
    for label, (solver, options) in runs.items():
        with torch.no_grad():
            sol = raydeq.solve(
                lambda z: z @ a.T + c,
                torch.zeros(2, N, dtype=torch.float64),
                solver=solver,
                abstol=1e-8,
                reltol=0.0,
                max_steps=1000,
                solver_options=options,
            )
        assert bool(sol.stats.converged.all()), label
        torch.testing.assert_close(sol.z, z_star.expand(2, N), rtol=0, atol=1e-7)
        nfe[label] = sol.stats.nfe
    assert nfe["euler"] <= nfe["fixed point"] + 1, nfe
    assert nfe["euler"] < nfe["euler, error control only"] / 1.5, nfe


def layer(spectrum: str, radius: float, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W and the inputs x of f(z) = tanh(W z + x), with ||W|| = radius: "orthogonal", W =
    radius Q (eigenvalues on the circle of that radius); "symmetric", eigenvalues spread over
    [-radius, radius]; "negative", W = -radius I; "stable", eigenvalues spread over [-radius,
    0.9] (for radius > 1 no contraction, but its flow is stable); "complex", a Gaussian matrix
    scaled to spectral radius `radius` and shifted to eigenvalues of real part up to 0.9 (not
    normal: ||f(z) - z|| can rise along the flow). All but the first take inputs of scale 0.3,
    so that tanh' is near 1 and J_f(z*) keeps an eigenvalue near -radius, the fast end of the
    flow's spectrum, where an explicit method's step is limited."""
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    x = torch.randn(4, dim, generator=g, dtype=torch.float64)
    if spectrum == "complex":
        w = radius / torch.linalg.eigvals(gaussian).abs().max() * gaussian
        shift = 0.9 - torch.linalg.eigvals(w).real.max()
        return w + shift * torch.eye(dim, dtype=torch.float64), 0.3 * x
    q, _ = torch.linalg.qr(gaussian)
    if spectrum == "orthogonal":
        return radius * q, x
    top = {"symmetric": radius, "negative": -radius, "stable": 0.9}[spectrum]
    eigenvalues = torch.linspace(-radius, top, dim, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T, 0.3 * x


@settings(max_examples=24, deadline=None, derandomize=True)
@given(
    radius=st.floats(0.5, 0.99),
    dim=st.integers(8, 16),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(3, 10),
    spectrum=st.sampled_from(["orthogonal", "symmetric", "negative"]),
)
# With a step cap of 1.4, BS3 cycled above the tolerance to max_steps on the first two, and
# with 1.3 on the fourth; with a contraction rule of 0.7 per step, Tsit5 took 5.8x on the third.
@example(radius=0.9, dim=12, seed=0, exponent=6, spectrum="negative")
@example(radius=0.9, dim=12, seed=0, exponent=3, spectrum="symmetric")
@example(radius=0.5, dim=12, seed=4, exponent=10, spectrum="symmetric")
@example(radius=0.95, dim=8, seed=0, exponent=6, spectrum="negative")
def test_every_continuous_solver_converges_within_5x_fixed_point_evaluations(
    radius, dim, seed, exponent, spectrum
):
    """Steady-state step control: on a contraction f(z) = tanh(W z + x) with W of spectral
    norm `radius` (see `layer` for the spectra), every continuous solver ends CONVERGED
    at any tolerance from 1e-3 to 1e-10 with at most 5x the evaluations of fixed-point
    iteration: its steps are limited by stability near the steady state, not by resolving the
    transient to the tolerance (which cost up to 50x for vcab3 and tsit5 and 500x for bs3)."""
    w, x = layer(spectrum, radius, dim, seed)
    tol = 10.0**-exponent

    def run(solver: str) -> raydeq.SolveStats:
        with torch.no_grad():
            return raydeq.solve(
                lambda z: torch.tanh(z @ w.T + x),
                torch.zeros(4, dim, dtype=torch.float64),
                solver=solver,
                abstol=tol,
                reltol=tol,
                max_steps=10_000,
            ).stats

    reference = run("fixed_point")
    assert bool(reference.converged.all())
    for solver in CONTINUOUS:
        stats = run(solver)
        assert (stats.status == Status.CONVERGED).all(), (solver, stats)
        assert stats.nfe <= 5 * reference.nfe, (solver, stats.nfe, reference.nfe)


@pytest.mark.parametrize(
    ("spectrum", "radius", "dim"),
    [("stable", 1.2, 8), ("stable", 2.5, 8), ("stable", 4.0, 8), ("complex", 1.5, 16)],
)
@pytest.mark.parametrize("solver", CONTINUOUS)
def test_every_continuous_solver_converges_where_the_layer_is_no_contraction(
    solver, spectrum, radius, dim
):
    """f(z) = tanh(W z + x) with the eigenvalues of W below 1, some below -1 (see `layer`):
    fixed-point iteration diverges, the flow dz/dt = f(z) - z is stable. Near z* the error
    estimate alone held h at the edge of the method's stability region, where the fastest mode
    neither decays nor grows: BS3 stalled on all four, Euler on the second and third, Tsit5 on
    the third, each until max_steps with a constant residual.
    On the last, where ||f(z) - z|| rises along the flow, a cap on the step-size factor after
    such a step (instead of a product) shrank Euler's h to 0."""
    w, x = layer(spectrum, radius, dim, seed=0)

    def run(name: str) -> raydeq.SolveStats:
        with torch.no_grad():
            return raydeq.solve(
                lambda z: torch.tanh(z @ w.T + x),
                torch.zeros(4, dim, dtype=torch.float64),
                solver=name,
                abstol=1e-6,
                reltol=1e-6,
                max_steps=3000,
            ).stats

    assert not run("fixed_point").converged.any()
    stats = run(solver)
    assert (stats.status == Status.CONVERGED).all(), (solver, stats)


@pytest.mark.parametrize("features", [1, 16])
@pytest.mark.parametrize("kind", ["pi", "i"])
def test_a_local_error_within_the_rms_tolerance_is_accepted_and_one_above_it_rejected(
    features, kind
):
    """abstol is an RMS tolerance: an error of 0.999 abstol in every feature is accepted
    whatever the number of features, 1.01 abstol is rejected."""
    ctl = Controller(kind=kind)
    term = Termination(abstol=1e-3, reltol=0.0)
    like = torch.zeros(2, features, dtype=torch.float64)
    scales = ctl.scales(like, term, 1.0, 0.0, error_order=2)
    error = torch.full_like(like, 1e-3) * torch.tensor([[0.999], [1.01]], dtype=torch.float64)
    h = torch.ones(2, 1, dtype=torch.float64)
    e = ctl.error_ratio(error, h, lambda: torch.zeros(2, 1), None, like, scales)
    rejected, _, _ = ctl.decide(e, h, h, h, ctl.memory(h), error_order=2)
    assert rejected[:, 0].tolist() == [False, True]


def test_the_pi_memory_keeps_the_last_accepted_error():
    """The proportional term remembers e^b of the last accepted step (b = 0.4 / (order + 1)),
    an error below 1e-4 of the tolerance counted as 1e-4 of it; a rejected step leaves it."""
    ctl = Controller()
    unit = ctl.unit(2)
    b = 0.4 / 3
    e = torch.tensor([[0.5 * unit], [2.0 * unit], [1e-9 * unit]], dtype=torch.float64)
    h = torch.ones(3, 1, dtype=torch.float64)
    memory = torch.full_like(h, 0.75)
    rejected, h_next, kept = ctl.decide(e, h, h, h, memory, error_order=2)
    assert rejected[:, 0].tolist() == [False, True, False]
    expected = [(0.5 * unit) ** b, 0.75, (1e-4 * unit) ** b]
    torch.testing.assert_close(kept[:, 0], torch.tensor(expected, dtype=torch.float64))
    # The next step: h * e^-a * memory, a = 0.7 / 3, between min_factor and max_factor.
    factor = (e[:, 0] ** (-0.7 / 3) * 0.75).clamp(0.2, 10.0)
    torch.testing.assert_close(h_next[:, 0], factor)


def test_a_step_accepted_by_contraction_above_the_tolerance_is_remembered_at_the_tolerance():
    """contraction accepts a step whose residual fell enough whatever its error; the PI memory
    counts that error as the tolerance (unit), not more, and h does not shrink."""
    ctl = Controller(contraction=0.5)
    unit = ctl.unit(2)
    e = torch.tensor([[3.0 * unit], [3.0 * unit]], dtype=torch.float64)
    residual = torch.ones(2, 1, dtype=torch.float64)
    residual_new = torch.tensor([[0.5], [0.6]], dtype=torch.float64)
    h = torch.ones(2, 1, dtype=torch.float64)
    memory = torch.full_like(h, 0.75)
    rejected, h_next, kept = ctl.decide(e, residual, residual_new, h, memory, error_order=2)
    assert rejected[:, 0].tolist() == [False, True]
    torch.testing.assert_close(kept[:, 0], torch.tensor([unit ** (0.4 / 3), 0.75]).double())
    assert h_next[0, 0].item() == 1.0 and h_next[1, 0].item() < 1.0


@pytest.mark.parametrize("batch", [1, 3])
def test_the_error_ratio_s_floor_is_a_contiguous_column_made_in_one_operation(batch):
    """Controller.scales' abstol floor, abstol sqrt(N) / (|error weight| unit), is a column
    of contiguous strides, as the steps' own (also at batch 1, where a column cut from the
    state would keep its row stride), made by one operation per solve."""
    from raydeq.bench.suites.step_cost import OpCounter

    ctl = Controller()
    like = torch.zeros(batch, 9, dtype=torch.float64)
    with OpCounter() as counter:
        floor, _, _ = ctl.scales(like, Termination(abstol=1e-3), 2.0, 3.0, error_order=2)
    assert sum(counter.ops.values()) == 1 and floor.stride() == (1, 1)
    expected = torch.full((batch, 1), 1e-3 * 3 / (2 * ctl.unit(2)), dtype=torch.float64)
    torch.testing.assert_close(floor, expected, rtol=0, atol=0)


@pytest.mark.parametrize("move_scale", [None, 0.5])
def test_the_error_ratio_weighs_the_error_against_abstol_the_step_and_reltol(move_scale):
    """e / unit = 2 ||error|| h / (abstol sqrt(N) + step_rtol 3 s ||move|| + reltol ||y_new||)
    for an error and a move given as 2 and 3 times the vectors passed, the move scaled by s
    (1 where move_scale is None: the move's norm is the step's own)."""
    ctl = Controller(step_rtol=0.4)
    term = Termination(abstol=1e-3, reltol=1e-2)
    g = torch.Generator().manual_seed(0)
    error, move, y_new = torch.randn(3, 2, 9, generator=g, dtype=torch.float64)
    h = torch.tensor([[0.5], [1.0]], dtype=torch.float64)
    scales = ctl.scales(y_new, term, 2.0, 3.0, error_order=2)
    scale = None if move_scale is None else torch.full_like(h, move_scale)
    e = ctl.error_ratio(error, h, lambda: move.norm(dim=1, keepdim=True), scale, y_new, scales)
    s = 1.0 if move_scale is None else move_scale
    tolerance = 1e-3 * 3 + 0.4 * 3 * s * move.norm(dim=1) + 1e-2 * y_new.norm(dim=1)
    expected = ctl.unit(2) * 2 * error.norm(dim=1) * h[:, 0] / tolerance
    torch.testing.assert_close(e[:, 0], expected, rtol=1e-12, atol=0)


def test_a_fixed_step_controller_accepts_every_step_and_keeps_h():
    ctl = Controller(kind="fixed", h0=0.25)
    e = torch.tensor([[0.0], [1e6], [float("nan")]], dtype=torch.float64)
    h = torch.full((3, 1), 0.25, dtype=torch.float64)
    rejected, h_next, _ = ctl.decide(e, h, h, h, ctl.memory(h), error_order=2)
    assert not bool(rejected.any()) and torch.equal(h_next, h)


def test_a_fixed_step_vcab3_takes_its_adams_steps_at_h0_above_its_adaptive_cap():
    """kind="fixed" keeps h0 = 1 past VCAB3's Adams cap of 0.5: on z' = -z / 2 from 1, two BS3
    steps (R(z) = 1 + z + z^2 / 2 + z^3 / 6) and two constant-step AB3 steps, by hand."""
    lam = -0.5
    r = 1 + lam + lam**2 / 2 + lam**3 / 6
    ys = [1.0, r, r * r]
    for _ in range(2):
        f0, f1, f2 = (lam * y for y in ys[-3:])
        ys.append(ys[-1] + (23 * f2 - 16 * f1 + 5 * f0) / 12)
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: (1 + lam) * z,
            torch.ones(1, 1, dtype=torch.float64),
            solver="vcab3",
            abstol=1e-12,
            reltol=0.0,
            max_steps=4,
            solver_options={"kind": "fixed", "h0": 1.0},
        )
    assert sol.stats.steps == 4
    torch.testing.assert_close(sol.z[0, 0].item(), ys[-1], rtol=1e-12, atol=0)


def test_the_first_step_follows_hairer_norsett_wanner():
    """Per sample (one feature, abstol = reltol = 1e-3, order 3): for y' = -y from 1, the
    step 0.01 of the first guess sees d2 = d1 = 500 and h1 = (0.01 / 500)**(1/4); for a
    constant field y' = 1000 the first guess 1e-5 caps the step at 100 x 1e-5; from y = 0 the
    step is h1 of the field alone; y' = -y from -1 scales by |y| as from 1."""
    a = torch.tensor([[-1.0], [0.0], [0.0], [-1.0]], dtype=torch.float64)
    c = torch.tensor([[0.0], [1000.0], [1.0], [0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [1.0], [0.0], [-1.0]], dtype=torch.float64)

    def field(y: torch.Tensor) -> torch.Tensor:
        return a * y + c

    h = initial_step(field, y, field(y), 3, Termination(1e-3, 1e-3))
    # From y = 0: d1 = 1 / 1e-3 = 1000, the guess 1e-6, d2 = 0; h1 = (0.01 / 1000)**(1/4).
    steps = [(0.01 / 500) ** 0.25, 1e-3, 1e-5**0.25, (0.01 / 500) ** 0.25]
    torch.testing.assert_close(h[:, 0], torch.tensor(steps, dtype=torch.float64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("solver", CONTINUOUS)
def test_a_first_step_picked_from_a_zero_state_with_abstol_0_integrates(solver):
    """With abstol = 0, Hairer's scale abstol + reltol |y| is 0 at y = 0 (a Neural ODE's z(0)
    and a vanilla DEQ's z0), where the first-step heuristic has nothing to measure by. y' =
    1 - y from 0 reaches 1 - 1/e at t = 1 (to 1e-3, Euler's global error at reltol 1e-6), and
    f(z) = z / 2 + 1 its steady state 2, instead of a NaN step size."""
    from raydeq.solvers.interval import integrate

    end = integrate(
        lambda y: 1 - y,
        torch.zeros(1, 4, dtype=torch.float64),
        1.0,
        solver,
        Termination(0.0, 1e-6),
        10_000,
    )
    expected = torch.full((1, 4), 1 - math.exp(-1), dtype=torch.float64)
    torch.testing.assert_close(end.y, expected, rtol=0, atol=1e-3)
    with torch.no_grad():
        sol = raydeq.solve(
            lambda z: z / 2 + 1,
            torch.zeros(2, 3, dtype=torch.float64),
            solver=solver,
            abstol=0.0,
            reltol=1e-6,
            solver_options={"h0": None},
            max_steps=1000,
        )
    assert sol.stats.status.tolist() == [Status.CONVERGED] * 2
    torch.testing.assert_close(
        sol.z, torch.full((2, 3), 2.0, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_a_fixed_step_controller_without_h0_is_refused():
    with pytest.raises(ValueError, match="kind='fixed' needs the step size h0"):
        Controller(kind="fixed")


@pytest.mark.parametrize("solver", ["tsit5", "vcab3"])
def test_a_safety_factor_whose_error_unit_overflows_float32_is_refused(solver: str):
    # The error ratio's unit is safety^(1 / (b - a)): 1e50 for Tsit5's PI exponents at
    # safety 1e-3, past float32's range, where a float32 solve stopped with a RuntimeError.
    f = lambda z: torch.tanh(z / 2 + 1)  # noqa: E731
    with pytest.raises(ValueError, match=re.escape("safety=0.001 must be a number in [0.1, 1]")):
        raydeq.solve(f, torch.zeros(3, 4), solver=solver, solver_options={"safety": 1e-3})
    with torch.no_grad():
        sol = raydeq.solve(
            f,
            torch.zeros(3, 4),
            solver=solver,
            abstol=1e-6,
            reltol=0,
            solver_options={"safety": 0.1},
        )
    # PI control at safety 0.1 aims at errors far below the tolerance: small steps, no overflow.
    residual = (f(sol.z) - sol.z).norm(dim=1) / 2
    assert sol.stats.status.tolist() == [Status.MAX_STEPS] * 3
    torch.testing.assert_close(sol.stats.residual, residual)
    assert (residual < (f(torch.zeros(3, 4))).norm(dim=1) / 2).all()


def scalar_decay(lam: float, y0: float, abstol: float):
    """f(z) = (1 + lam) z, the flow y' = lam y, from y0 (one sample, one feature), with a
    monitor that stops nothing before abstol."""
    from raydeq.solvers.termination import Monitor

    y = torch.full((1, 1), y0, dtype=torch.float64)
    return (lambda z: (1.0 + lam) * z), y, Monitor(y, Termination(abstol, 0.0))


def bs3_step(lam: float, y: float, h: float) -> tuple[float, float]:
    """Bogacki-Shampine's step of y' = lam y: the 3rd-order point and its error estimate
    against the embedded 2nd-order solution (weights 7/24, 1/4, 1/3, 1/8)."""
    k1 = lam * y
    k2 = lam * (y + h / 2 * k1)
    k3 = lam * (y + 3 * h / 4 * k2)
    y1 = y + h * (2 / 9 * k1 + 1 / 3 * k2 + 4 / 9 * k3)
    k4 = lam * y1
    y2 = y + h * (7 / 24 * k1 + 1 / 4 * k2 + 1 / 3 * k3 + 1 / 8 * k4)
    return y1, y1 - y2


@pytest.mark.parametrize("method", ["bs3", "vcab3"])
def test_a_bs3_step_sizes_the_next_by_its_second_order_error(method):
    """With the integral controller the step after a BS3 step (vcab3's first start-up step
    is one) is h 0.9 (|err| / abstol)^(-1/3): the error estimate is of order 2."""
    from raydeq.solvers.ode import VCAB3, RungeKutta
    from raydeq.solvers.tableau import BS3

    lam, h, abstol = -0.5, 0.5, 1e-3
    ctl = Controller(kind="i", h0=h)
    solver = RungeKutta(BS3, ctl) if method == "bs3" else VCAB3(ctl)
    f, y, monitor = scalar_decay(lam, 1.0, abstol)
    c, _, _ = solver.init(f, y, monitor)
    c = solver.phases()[0].step(f, c, monitor)
    flow = c if method == "bs3" else c.flow
    y1, err = bs3_step(lam, 1.0, h)
    assert flow.y.item() == pytest.approx(y1, rel=1e-14)
    assert flow.h.item() == pytest.approx(h * 0.9 * (abs(err) / abstol) ** (-1 / 3), rel=1e-12)


def quadratic_integral(times: list[float], values: list[float], a: float, b: float) -> float:
    """The integral over [a, b] of the quadratic through (times, values)."""
    import numpy as np

    antiderivative = np.polyint(np.polyfit(times, values, 2))
    return float(np.polyval(antiderivative, b) - np.polyval(antiderivative, a))


def test_an_adams_step_predicts_by_ab3_and_sizes_the_next_by_milne_s_estimate():
    """After two accepted BS3 start-up steps (uncapped) the step is capped at h_max, and the
    Adams step integrates the quadratic through
    the last three derivatives (AB3), and with the integral controller the next step is
    h 0.9 (|err| / abstol)^(-1/4) for Milne's err = 9/10 (y_AM3 - y_AB3), y_AM3 integrating
    the quadratic through the new derivative and the last two."""
    from raydeq.solvers.ode import VCAB3

    lam, abstol = -0.5, 1e-3
    solver = VCAB3(Controller(kind="i", h0=0.5, h_max=0.4))
    f, y, monitor = scalar_decay(lam, 1.0, abstol)
    c, _, _ = solver.init(f, y, monitor)
    times, ys = [0.0], [1.0]
    for _ in range(2):
        h = c.flow.h.item()
        c = solver.startup_step(f, c, monitor)
        times.append(times[-1] + h)
        ys.append(c.flow.y.item())
    assert c.accepted.item() == 2 and times[-1] - times[-2] > 0.4
    h = c.flow.h.item()
    assert h == 0.4
    c = solver.adams_step(f, c, monitor)
    derivatives = [lam * v for v in ys]
    t, t_new = times[-1], times[-1] + h
    y_ab = ys[-1] + quadratic_integral(times, derivatives, t, t_new)
    assert c.flow.y.item() == pytest.approx(y_ab, rel=1e-12)
    y_am = ys[-1] + quadratic_integral(
        [*times[1:], t_new], [*derivatives[1:], lam * y_ab], t, t_new
    )
    err = 0.9 * abs(y_am - y_ab)
    factor = min(max(0.9 * (err / abstol) ** (-1 / 4), 0.2), 10.0)
    assert c.flow.h.item() == pytest.approx(h * factor, rel=1e-9)
    assert c.last.item() == pytest.approx(h, rel=1e-15)


@pytest.mark.parametrize(("solver", "order"), [("tsit5", 5), ("bs3", 3), ("euler", 1)])
def test_a_first_step_picked_from_the_problem_uses_the_method_s_order(solver, order):
    """With h0=None, for y' = -y from 1 (abstol = reltol = 1e-3) the first step is
    (0.01 / 500)^(1 / (order + 1)) (see test_the_first_step_follows_hairer_norsett_wanner)."""
    from raydeq.solvers.solve import make_solver
    from raydeq.solvers.termination import Monitor

    f, y, _ = scalar_decay(-1.0, 1.0, 1e-3)
    monitor = Monitor(y, Termination(1e-3, 1e-3))
    c, nfe, _ = make_solver(solver, {"h0": None}).init(f, y, monitor)
    assert nfe == 2
    assert c.h.item() == pytest.approx((0.01 / 500) ** (1 / (order + 1)), rel=1e-9)


def test_a_vcab3_sample_solves_alike_alone_and_beside_one_with_a_longer_start_up():
    """A sample whose start-up is over keeps its Adams differences while another in the
    batch still takes start-up steps (f = -3 z + c rejects BS3's first steps there)."""
    a = torch.tensor([[0.5], [-3.0]], dtype=torch.float64)
    c = torch.tensor([[0.3, -0.2], [1.0, -1.0]], dtype=torch.float64)

    def run(rows: slice):
        with torch.no_grad():
            return raydeq.solve(
                lambda z: a[rows] * z + c[rows],
                torch.zeros_like(c[rows]),
                solver="vcab3",
                abstol=1e-9,
                reltol=0.0,
                max_steps=200,
            )

    batched = run(slice(0, 2))
    assert bool(batched.stats.converged.all())
    for i in range(2):
        alone = run(slice(i, i + 1))
        torch.testing.assert_close(batched.z[i : i + 1], alone.z, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    ("solver", "options", "h"),
    [
        ("euler", {"h_max": 0.1}, 0.1),
        ("bs3", {"h0": 1.0, "h_max": 0.1}, 0.1),
        ("tsit5", {"h_max": 0.5}, 0.5),
        ("vcab3", {"h0": 3.0}, 1.4),  # its BS3 start-up's cap
    ],
)
def test_h_max_caps_the_first_step(solver: str, options: dict, h: float):
    """The first step is at most h_max like every other: on y' = 1 - y / 2 from 0 the field is
    1, so the first stage after z0 is at c2 h (Euler's c2 = 1, BS3's 1 / 2, Tsit5's 0.161)."""
    points = []

    def f(z: torch.Tensor) -> torch.Tensor:
        points.append(z[0, 0].item())
        return z / 2 + 1

    with torch.no_grad():
        raydeq.solve(
            f,
            torch.zeros(1, 1, dtype=torch.float64),
            solver=solver,
            solver_options=options,
            max_steps=1,
            check_every=1,
        )
    c2 = {"euler": 1.0, "bs3": 0.5, "vcab3": 0.5, "tsit5": 0.161}[solver]
    assert points[1] == pytest.approx(c2 * h, rel=1e-12)


@pytest.mark.parametrize("key", ["h_max", "safety", "step_rtol", "contraction", "max_factor"])
def test_an_adaptive_option_beside_kind_fixed_is_refused(key: str):
    """kind="fixed" keeps every step at h0 and accepts it: h_max, the error control's and the
    contraction rule's options would change nothing, so they are refused, naming the key, at the
    solve and where a model's config is checked."""
    options = {"kind": "fixed", "h0": 0.5, key: 0.2 if key != "max_factor" else 2.0}
    message = f"solver_options.{key}={options[key]!r} is not used with kind='fixed'"
    with pytest.raises(ValueError, match=re.escape(message)):
        raydeq.solve(lambda z: z / 2 + 1, torch.zeros(1, 2), solver="tsit5", solver_options=options)
    with pytest.raises(ValueError, match=re.escape(message)):
        raydeq.models.resolve({"model": "mnist_dense", "solver": "bs3", "solver_options": options})


@pytest.mark.parametrize("solver", CONTINUOUS)
def test_a_sample_resting_at_a_zero_fixed_point_under_abstol_0_keeps_gradients_finite(solver):
    """abstol=0 with a reltol: a sample whose z0 = 0 is its fixed point (a zero input to a
    bias-free cell) takes zero steps of error 0 over a tolerance of 0, an error ratio of
    0 / 0 that set its h to NaN, and the unrolled backward through the NaN steps made every
    parameter's gradient NaN with every continuous solver; the ratio is now 0, and the
    gradients are the implicit function theorem's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)
    w = (0.5 * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x[1] = 0.0

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + x)

    sol = raydeq.solve(
        f, torch.zeros_like(x), solver=solver, adjoint="unrolled", abstol=0.0, reltol=1e-10
    )
    (grad,) = torch.autograd.grad(sol.z.sum(), w)
    assert bool(sol.stats.converged.all()) and sol.z[1].abs().max() == 0
    z = sol.z.detach()
    want = torch.zeros_like(w)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v, b=b: torch.tanh(v @ w.T + x[b]), z[b])
        u = torch.linalg.solve((torch.eye(4, dtype=w.dtype) - jac).T, torch.ones_like(z[b]))
        want += torch.autograd.grad(torch.tanh(z[b] @ w.T + x[b]), w, u)[0]
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
