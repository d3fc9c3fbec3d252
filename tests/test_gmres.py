"""Batched GMRES and Neumann iteration against dense solves and scipy's GMRES."""

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from raydeq.solvers import GMRES, Neumann


def systems(
    batch: int, n: int, seed: int, spread: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-conditioned nonsymmetric matrices I + spread * G / sqrt(n) and right-hand sides."""
    g = torch.Generator().manual_seed(seed)
    a = (
        torch.eye(n, dtype=torch.float64)
        + spread * torch.randn(batch, n, n, generator=g, dtype=torch.float64) / n**0.5
    )
    return a, torch.randn(batch, n, generator=g, dtype=torch.float64)


def contraction_systems(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """I - K with ||K||_2 = 0.6, solvable by GMRES and Neumann iteration alike."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    k = 0.6 * k / torch.linalg.matrix_norm(k, 2)[:, None, None]
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) - k, b


def matvec(a: torch.Tensor):
    return lambda x: (a @ x[:, :, None])[:, :, 0]


@pytest.mark.parametrize("restart", [5, 40])
def test_gmres_matches_dense_solve(restart):
    a, b = systems(6, 40, seed=0)
    x, info = GMRES(rtol=1e-12, restart=restart, max_iters=400)(matvec(a), b)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert bool(info.converged.all())
    assert (info.residual <= 1e-12 * b.norm(dim=1)).all()
    true_residual = (b - matvec(a)(x)).norm(dim=1)  # the reported one is Arnoldi's estimate
    torch.testing.assert_close(true_residual, info.residual, rtol=0, atol=1e-13 * b.norm())


def test_gmres_uses_the_initial_guess():
    a, b = systems(3, 20, seed=1)
    exact = torch.linalg.solve(a, b)
    x, info = GMRES(rtol=1e-10)(matvec(a), b, exact + 1e-9)
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-9)
    _, cold = GMRES(rtol=1e-10)(matvec(a), b)
    assert (2 * info.iterations <= cold.iterations).all(), (info.iterations, cold.iterations)


@pytest.mark.parametrize("rtol", [1e-4, 1e-8])
def test_gmres_iteration_counts_match_scipy(rtol):
    a, b = systems(5, 60, seed=2, spread=0.8)
    _, info = GMRES(rtol=rtol, restart=60, max_iters=60)(matvec(a), b)
    for i in range(a.shape[0]):
        count = []
        scipy.sparse.linalg.gmres(
            a[i].numpy(),
            b[i].numpy(),
            rtol=rtol,
            atol=0.0,
            restart=60,
            maxiter=1,
            callback=count.append,
            callback_type="pr_norm",
        )
        assert int(info.iterations[i]) == len(count), (int(info.iterations[i]), len(count))


def test_samples_converge_separately():
    """An identity-like system is done in one step, a harder one takes more; both are solved."""
    a, b = systems(2, 30, seed=3, spread=0.9)
    a[0] = torch.eye(30, dtype=torch.float64)
    x, info = GMRES(rtol=1e-10, restart=30)(matvec(a), b)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    assert int(info.iterations[0]) == 1 and int(info.iterations[1]) > 5


def test_gmres_reports_non_convergence():
    a, b = systems(2, 50, seed=4, spread=0.9)
    _, info = GMRES(rtol=1e-12, restart=3, max_iters=6)(matvec(a), b)
    assert not bool(info.converged.any())
    assert (info.iterations == 6).all()


def test_neumann_matches_dense_solve_for_contractions():
    a, b = contraction_systems(4, 25, seed=5)
    x, info = Neumann(rtol=1e-12, max_iters=200)(matvec(a), b)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-11)
    assert bool(info.converged.all())
    _, gm = GMRES(rtol=1e-12)(matvec(a), b)
    assert gm.matvecs < info.matvecs


@pytest.mark.parametrize("warm", [False, True])
def test_neumann_stops_a_diverging_sample_at_its_iterate_of_smallest_residual(warm):
    """Sample 1's K = 3 I (the adjoint of a layer that does not contract at z*): its residual
    triples with each iteration, and after max_iters=100 it returned its last iterate, of norm
    3^100 ||b|| (5e47), and took the batch to 100 products. It stops once its residual passes
    1e4 times its smallest, 3^9 after 9 iterations, and returns its iterate of smallest
    residual: 0 from zeros (residual ||b||), b itself from the warm start b (residual 3 ||b||).
    The contractions beside it are solved as they are alone."""
    a, b = contraction_systems(3, 12, seed=6)
    a[1] = -2 * torch.eye(12, dtype=torch.float64)
    x, info = Neumann(rtol=1e-12, max_iters=100)(matvec(a), b, b if warm else None)
    alone, alone_info = Neumann(rtol=1e-12, max_iters=100)(
        matvec(a[[0, 2]]), b[[0, 2]], b[[0, 2]] if warm else None
    )
    torch.testing.assert_close(x[[0, 2]], alone, rtol=0, atol=0)
    torch.testing.assert_close(x[[0, 2]], torch.linalg.solve(a[[0, 2]], b[[0, 2]]))
    torch.testing.assert_close(x[1], b[1] if warm else torch.zeros_like(b[1]), rtol=0, atol=0)
    assert info.converged.tolist() == [True, False, True]
    assert int(info.iterations[1]) == 9
    assert float(info.residual[1]) == pytest.approx((3.0 if warm else 1.0) * float(b[1].norm()))
    assert info.matvecs == alone_info.matvecs


@pytest.mark.parametrize("solver", [GMRES, Neumann])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("scale", [1e-30, 1e-21, 1e25])
def test_a_float32_solve_does_not_depend_on_the_scale_of_b(solver, warm, scale):
    """A saturated softmax sends back gradients of 1e-22, whose float32 2-norms lose their
    precision in subnormal numbers (and are 0 below 1e-23, inf above 1e19): solved at b's
    scale, GMRES's residual never met its rtol there. Scaled by each sample's largest |b|,
    the solve is the one at scale 1: the same products, x scaled, the tolerance met. atol is
    in b's units."""
    a, b = contraction_systems(4, 24, seed=7)
    a32, b32 = a.float(), b.float()
    for options in ({"rtol": 1e-4}, {"rtol": 0.0, "atol": 1e-4}):
        unit = solver(**options)
        scaled = solver(**{**options, "atol": options.get("atol", 0.0) * scale})
        x1, info1 = unit(matvec(a32), b32, b32 if warm else None)
        bs = b32 * scale
        xs, info = scaled(matvec(a32), bs, bs if warm else None)
        assert bool(info.converged.all()) and info.matvecs == info1.matvecs
        torch.testing.assert_close(xs / scale, x1, rtol=1e-5, atol=1e-6)
        # Residuals of 1e-4 ||b||, measured to float32's rounding of b.
        noise = 1e-6 * float(b.norm(dim=1).max())
        torch.testing.assert_close(info.residual / scale, info1.residual, rtol=0, atol=noise)
        exact = torch.linalg.solve(a, b).float()
        torch.testing.assert_close(xs / scale, exact, rtol=0, atol=1e-3)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="restart=0"):
        GMRES(restart=0)
    with pytest.raises(ValueError, match="rtol=-1"):
        Neumann(rtol=-1)
    with pytest.raises(ValueError, match="resolution=-1 must be a number >= 0"):
        Neumann(resolution=-1)
    with pytest.raises(TypeError, match="graph='yes' must be True or False"):
        GMRES(graph="yes")


def HALF(u: torch.Tensor) -> torch.Tensor:
    """A = I / 2."""
    return 0.5 * u


@pytest.mark.parametrize("solver", [GMRES(), Neumann()])
@pytest.mark.parametrize(
    ("A", "b", "x0", "error", "message"),
    [
        (HALF, torch.ones(4), None, ValueError, r"b must be a matrix \(B, N\).*got shape \(4,\)"),
        (HALF, torch.ones(2, 3, 4), None, ValueError, r"b must be.*got shape \(2, 3, 4\)"),
        (HALF, torch.ones(2, 0), None, ValueError, r"b must be.*N >= 1.*got shape \(2, 0\)"),
        (HALF, [[1.0, 2.0]], None, TypeError, "b must be a floating tensor.*got list"),
        (HALF, torch.ones(2, 4, dtype=torch.long), None, TypeError, "b must be.*torch.int64"),
        (HALF, torch.ones(2, 4), torch.ones(2, 3), ValueError, r"x0 must be None or.*\(2, 3\)"),
        (HALF, torch.ones(2, 4), torch.ones(2, 4).double(), TypeError, "x0 .*torch.float64"),
        (HALF, torch.ones(2, 4), [[0.0] * 4] * 2, TypeError, "x0 must be None or.*got list"),
        (3, torch.ones(2, 4), None, TypeError, "A=3 must be callable"),
        (lambda u: u[:, :2], torch.ones(2, 4), None, ValueError, r"A must map.*got \(2, 2\)"),
    ],
)
def test_a_bad_system_is_named_at_the_call(solver, A, b, x0, error, message):
    """b, x0 or A of the wrong kind or shape failed deep in torch (an IndexError, 'too many
    values to unpack', a batched product's sizes) or, for x0 in float64, returned float64
    residuals; each is now named with what is allowed."""
    with pytest.raises(error, match=message):
        solver(A, b, x0)


@pytest.mark.parametrize("solver", [GMRES(rtol=1e-12), Neumann(rtol=1e-12, max_iters=200)])
def test_an_operator_giving_another_dtype_than_x_is_named(solver):
    """An A giving float64 for float32 x failed in the batched products ("expected scalar
    type Double but found Float"); it is a TypeError naming both dtypes, and the same A in
    x's dtype solves to torch.linalg.solve's x."""
    g = torch.Generator().manual_seed(4)
    m = torch.eye(4, dtype=torch.float64) - 0.3 * torch.rand(4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    with pytest.raises(TypeError, match="A must map x of dtype torch.float32 to one of that dtype"):
        solver(lambda u: u.double() @ m.T, b.float())
    x, info = solver(lambda u: u @ m.T, b)
    torch.testing.assert_close(x, torch.linalg.solve(m, b.T).T, rtol=0, atol=1e-10)
    assert info.converged.all()


def test_gmres_names_a_half_precision_b_which_it_cannot_solve():
    """A float16 b failed in torch ('triangular_solve_cpu not implemented for Half')."""
    with pytest.raises(TypeError, match="b must be.*torch.float32 or torch.float64.*float16"):
        GMRES()(HALF, torch.ones(2, 4, dtype=torch.float16))


def test_an_empty_batch_is_solved_by_both_solvers():
    for solver in (GMRES(), Neumann()):
        x, info = solver(HALF, torch.ones(0, 4))
        assert x.shape == (0, 4) and info.converged.shape == (0,)


def test_an_empty_batch_takes_no_product_with_a():
    """GMRES counted 2 products on a batch of no samples (the residual of x0 and one Arnoldi
    step) and Neumann 1 from a start; neither now applies A, which is what the count says."""
    calls = []

    def counted(u: torch.Tensor) -> torch.Tensor:
        calls.append(u.shape)
        return HALF(u)

    b = torch.ones(0, 4)
    for solver in (GMRES(), Neumann()):
        for x0 in (None, b):
            x, info = solver(counted, b, x0)
            assert x.shape == (0, 4) and info.matvecs == 0 and calls == []
            assert info.iterations.shape == info.residual.shape == (0,)


def test_float32():
    a, b = systems(3, 16, seed=6)
    x, info = GMRES(rtol=1e-5)(matvec(a.float()), b.float())
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-3, atol=1e-4)


def test_a_solve_reads_the_host_at_most_once_every_four_arnoldi_steps():
    """Host reads (the sync of a `bool(tensor)`) per product with A, over a 16-step solve read
    as on an accelerator."""
    from raydeq.bench.suites.step_cost import OpCounter

    a, b = systems(4, 40, seed=7, spread=0.9)
    with OpCounter() as counter:
        _, info = GMRES(rtol=1e-8, restart=40, max_iters=400, check_every=4)(matvec(a), b)
    assert bool(info.converged.all()) and info.matvecs >= 12
    assert counter.syncs <= 0.25 * info.matvecs, (counter.syncs, info.matvecs)


def test_a_restart_cycle_runs_on_a_gpu_without_reading_the_host():
    """A whole restart cycle, read at its end only, on a CUDA system simulated without a GPU
    (fake tensors: a host read, or a CPU tensor mixed in, raises)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.eye(8, device="cuda") + 0.1 * torch.randn(4, 8, 8, device="cuda")
        r = torch.randn(4, 8, device="cuda")
        beta, tol = r.norm(dim=1), torch.full((4,), 1e-6, device="cuda")
        active = beta > tol
        solver = GMRES(restart=6)
        correction, steps, j, estimate, _, _ = solver._cycle(matvec(a), r, beta, tol, active, 6, 7)
    assert j == 6 and correction.device.type == "cuda" and estimate.device.type == "cuda"


def test_on_a_cpu_a_solve_ends_at_the_step_its_last_sample_converges():
    """A CPU read stalls nothing, so GMRES reads after every Arnoldi step there: the products
    are the most steps a sample needs, where a read every 4 steps rounds them up to 4, and x
    is the same up to rounding (a sample's steps after its convergence are left out of its
    solve, and only add zero-weighted basis vectors to its sum)."""
    a, b = systems(6, 30, seed=3, spread=0.5)
    cpu_x, cpu = GMRES(rtol=1e-2)(matvec(a), b)
    every_4_x, every_4 = GMRES(rtol=1e-2, check_every=4)(matvec(a), b)
    assert bool(cpu.converged.all())
    assert int(cpu.iterations.max()) % 4 != 0
    assert cpu.matvecs == int(cpu.iterations.max())
    assert every_4.matvecs == 4 * -(-int(cpu.iterations.max()) // 4)
    torch.testing.assert_close(cpu_x, every_4_x, rtol=1e-13, atol=0)
    assert torch.equal(cpu.iterations, every_4.iterations)


def clustered(
    batch: int, n: int, outliers: list[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q T Q^T with T upper triangular: eigenvalues clustered within 1e-3 of 1 and a few large
    outliers, so the Krylov vectors line up fast and one Gram-Schmidt pass loses orthogonality."""
    g = torch.Generator().manual_seed(8)
    eig = 1 + 1e-3 * torch.randn(batch, n, generator=g, dtype=torch.float64)
    eig[:, : len(outliers)] = torch.tensor(outliers, dtype=torch.float64)
    strict = torch.triu(torch.randn(batch, n, n, generator=g, dtype=torch.float64), 1)
    t = torch.diag_embed(eig) + 0.5 * strict / n**0.5
    q = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))[0]
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return (q @ t @ q.transpose(1, 2)).to(dtype), b.to(dtype)


@pytest.mark.parametrize(
    "dtype, rtol, outliers, steps, gap",
    # the gap is about eps * |A| * |x| / |b|, the rounding of A x itself
    [(torch.float64, 1e-12, [1e3, 1e4], 20, 1e-12), (torch.float32, 1e-5, [1e2, 3e2], 12, 2e-5)],
)
def test_gmres_keeps_the_basis_orthogonal(dtype, rtol, outliers, steps, gap):
    """Solved within one cycle in few steps, the reported residual that of the returned x."""
    a, b = clustered(4, 60, outliers, dtype)
    x, info = GMRES(rtol=rtol, restart=60, max_iters=60)(matvec(a), b)
    assert bool(info.converged.all()) and int(info.iterations.max()) <= steps, info.iterations
    a, b, x = a.double(), b.double(), x.double()
    true_residual = (b - matvec(a)(x)).norm(dim=1)
    assert ((true_residual - info.residual.double()).abs() <= gap * b.norm(dim=1)).all()


def counted(a: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """matvec(a) with a counter of its applications."""
    calls = [0]

    def apply(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return matvec(a)(x)

    return apply, calls


@pytest.mark.parametrize(
    "solver",
    [GMRES(rtol=1e-10, restart=3, max_iters=200), Neumann(rtol=1e-10, max_iters=200)],
    ids=["gmres", "neumann"],
)
@pytest.mark.parametrize("warm", [False, True])
def test_matvecs_count_every_application_of_the_operator(solver, warm):
    """info.matvecs (the adjoint's backward_nvjp) is the number of products with A: those of
    the Arnoldi steps or iterations, the initial residual of a guess, and GMRES's residual
    after each restart cycle (restart=3 takes several)."""
    a, b = contraction_systems(3, 20, seed=9)
    operator, calls = counted(a)
    x, info = solver(operator, b, b if warm else None)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=0, atol=1e-8)
    assert bool(info.converged.all())
    assert info.matvecs == calls[0] > 6


@pytest.mark.parametrize(("rtol", "converged"), [(0.25, False), (0.4, True)])
def test_one_gmres_step_reports_its_closed_form_residual_against_rtol(rtol, converged):
    """A = diag(1, 2), b = (1, 1): one Arnoldi step minimises ||b - alpha A b|| at alpha = 0.6,
    residual sqrt(0.2) = ||b|| / sqrt(10) = 0.316 ||b||. At max_iters=1 the sample has
    converged exactly when rtol is at least that: not at 0.25, at 0.4."""
    a = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)).expand(2, 2, 2)
    b = torch.ones(2, 2, dtype=torch.float64)
    x, info = GMRES(rtol=rtol, max_iters=1)(matvec(a), b)
    torch.testing.assert_close(x, torch.full_like(b, 0.6), rtol=1e-14, atol=0)
    torch.testing.assert_close(info.residual, torch.full((2,), 0.2, dtype=torch.float64).sqrt())
    assert info.converged.tolist() == [converged] * 2
    assert info.iterations.tolist() == [1, 1]


def test_neumann_stops_each_sample_at_its_own_iteration():
    """A = (1 - k) I per sample: after n iterations from 0 the residual is k^n ||b|| and
    x = (1 - k^n) / (1 - k) b. At rtol 1e-3, k = 0.5 needs 10 iterations (0.5^10 = 9.8e-4)
    and k = 0.2 only 5 (3.2e-4): the faster sample stops there and keeps its x."""
    k = torch.tensor([0.5, 0.2], dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], dtype=torch.float64)
    a = (1 - k)[:, None, None] * torch.eye(3, dtype=torch.float64)
    x, info = Neumann(rtol=1e-3, max_iters=100)(matvec(a), b)
    n = torch.tensor([10, 5])
    power = (k**n)[:, None]
    assert info.iterations.tolist() == n.tolist() and info.matvecs == 10
    torch.testing.assert_close(x, (1 - power) / (1 - k[:, None]) * b, rtol=1e-14, atol=0)
    torch.testing.assert_close(info.residual, power[:, 0] * b.norm(dim=1), rtol=1e-12, atol=0)
    assert bool(info.converged.all())


@pytest.mark.parametrize(
    "solver", [GMRES(rtol=1e-10), Neumann(rtol=1e-10, max_iters=200)], ids=["gmres", "neumann"]
)
@pytest.mark.parametrize("warm", [False, True])
def test_a_zero_right_hand_side_is_solved_by_zero_and_counts_as_converged(solver, warm):
    """A sample whose b is 0 (a saturated softmax's gradient) gets x = 0 exactly, a residual of
    0 and no iterations, and counts as converged (its tolerance is 0 and 0 <= 0); the other
    samples are solved as on their own."""
    a, b = contraction_systems(3, 12, seed=10)
    b[1] = 0.0
    x, info = solver(matvec(a), b, b if warm else None)
    assert torch.equal(x[1], torch.zeros(12, dtype=torch.float64))
    assert info.converged.tolist() == [True, True, True]
    assert float(info.residual[1]) == 0.0 and int(info.iterations[1]) == 0
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=0, atol=1e-9)


def test_neumann_stops_a_sample_stalled_at_the_rounding_of_its_products():
    """Products K x rounded to float16 (an f in half precision) hold sample 2's residual at 4e-5
    ||b||, above rtol 1e-5: it ran the batch to max_iters=100. At resolution float16's epsilon
    it stops STALL iterations after its smallest residual, unconverged, with the same iterate."""
    a, b = contraction_systems(3, 12, seed=12)
    k = (torch.eye(12, dtype=torch.float64) - a).float()

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return x - (k @ x[:, :, None])[:, :, 0].half().float()

    x, info = Neumann()(rounded, b.float())
    eps = torch.finfo(torch.float16).eps
    stalled, stalled_info = Neumann(resolution=eps)(rounded, b.float())
    assert info.matvecs == 100 and stalled_info.matvecs == 14
    assert stalled_info.converged.tolist() == info.converged.tolist() == [True, True, False]
    assert stalled_info.iterations.tolist() == [10, 12, 14]
    assert torch.equal(stalled, x) and torch.equal(stalled_info.residual, info.residual)
    assert 1e-5 < float(stalled_info.residual[2] / b[2].norm()) < eps

    # Warm-started at that iterate, sample 2 starts within eps ||b|| (its residual 4e-5 ||b||,
    # not the 4e-8 ||b|| of eps times its starting residual): it stops STALL iterations later
    # with the same iterate, where it ran to max_iters.
    again, again_info = Neumann(resolution=eps)(rounded, b.float(), stalled)
    assert again_info.matvecs == 6 and again_info.iterations.tolist() == [0, 0, 5]
    assert torch.equal(again, stalled) and again_info.converged.tolist() == [True, True, False]


def test_neumann_counts_a_stall_from_its_smallest_residual_not_from_its_start():
    """K = [[0.9, 0.53], [0, 0.9]], b = (0, 1): the residual K^n b first grows, 25 iterations
    that set no smallest residual before it is back below ||b||, then falls on every
    iteration, so that no sample stalls even at resolution 0.5: it converges to x = (53, 10)
    in 222 iterations, as at resolution 0, where counting every iteration that set none
    stopped it at 36, unconverged."""
    k = torch.tensor([[0.9, 0.53], [0.0, 0.9]], dtype=torch.float64)
    a = (torch.eye(2, dtype=torch.float64) - k).expand(1, 2, 2)
    b = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    x, info = Neumann(rtol=1e-8, max_iters=400, resolution=0.5)(matvec(a), b)
    assert info.iterations.tolist() == [222] and info.converged.tolist() == [True]
    torch.testing.assert_close(x, torch.tensor([[53.0, 10.0]], dtype=torch.float64))


def test_neumann_stalls_on_its_smallest_residual_within_the_resolution_as_its_residual_grows():
    """K = diag(0.1, 4), b = (1, 1e-6): the residual (0.1^n, 4^n 1e-6) is smallest at n = 4,
    2.8e-4, within resolution 1e-3 ||b||, and then grows past that. The sample stops 5
    iterations later, at 9, with x of n = 4, (1.111, 85e-6); judged on its current residual,
    above the resolution, it ran on to the divergence stop at 11."""
    k = torch.diag(torch.tensor([0.1, 4.0], dtype=torch.float64))
    a = (torch.eye(2, dtype=torch.float64) - k).expand(1, 2, 2)
    b = torch.tensor([[1.0, 1e-6]], dtype=torch.float64)
    x, info = Neumann(resolution=1e-3)(matvec(a), b)
    assert info.iterations.tolist() == [9] and info.matvecs == 9
    assert info.converged.tolist() == [False]
    torch.testing.assert_close(x, torch.tensor([[1.111, 85e-6]], dtype=torch.float64))


def test_neumann_stops_at_max_iters_with_its_partial_sum():
    """A = 0.5 I, b of norm 3: three iterations from 0 give x = (1 - 0.5^3) / 0.5 b = 1.75 b,
    residual 0.5^3 ||b|| = 0.375, far above rtol; the solve stops there, unconverged."""
    a = 0.5 * torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    b = torch.tensor([[1.0, 2.0, -2.0, 0.0], [0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    x, info = Neumann(rtol=1e-12, max_iters=3)(matvec(a), b)
    torch.testing.assert_close(x, 1.75 * b, rtol=1e-15, atol=0)
    torch.testing.assert_close(info.residual, torch.full((2,), 0.375, dtype=torch.float64))
    assert info.iterations.tolist() == [3, 3] and info.matvecs == 3
    assert info.converged.tolist() == [False, False]


@pytest.mark.parametrize(("every", "error"), [(0, ValueError), (-4, ValueError), (2.5, TypeError)])
def test_a_check_every_that_is_not_a_positive_integer_is_named(every, error):
    """check_every=0 would fall back to the default read interval unannounced; None is the
    default itself."""
    with pytest.raises(error, match=rf"check_every={every} must be an integer >= 1"):
        GMRES(check_every=every)
    assert GMRES(check_every=None).check_every is None


@pytest.mark.parametrize("warm", [False, True])
def test_a_right_hand_side_in_the_null_space_stays_unsolved_and_finite(warm):
    """A b = 0 (the adjoint of a sample where J^T v = v, f the identity along v): the Krylov
    space is b alone and no multiple of A b reduces the residual. As scipy's GMRES does, the
    sample keeps its start x0, reports its true residual ||b - A x0|| and is not converged,
    where a zero column of H made its estimate 0 and its x NaN. The third sample, A = 2 I, is
    solved exactly by its first step, which meets even rtol 0."""
    a = torch.zeros(3, 2, 2, dtype=torch.float64)
    a[1, 0, 0] = 1.0
    a[2] = 2 * torch.eye(2, dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    x, info = GMRES(rtol=0.0, max_iters=3)(matvec(a), b, b if warm else None)
    for i in range(2):
        x_ref, code = scipy.sparse.linalg.gmres(
            a[i].numpy(), b[i].numpy(), x0=b[i].numpy() if warm else None, rtol=0.0, maxiter=3
        )
        assert code > 0
        np.testing.assert_array_equal(x[i].numpy(), x_ref)
        assert float(info.residual[i]) == float(np.linalg.norm(b[i].numpy() - a[i].numpy() @ x_ref))
    torch.testing.assert_close(x[2], b[2] / 2, rtol=1e-15, atol=0)
    assert info.converged.tolist() == [False, False, True]
    assert int(info.iterations[2]) == 1 and float(info.residual[2]) == 0.0


def singular_system(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(0, d_2, ..., d_n) P^T (Q, P orthogonal, d_i in [0.5, 1.5]) and a random b,
    whose part along Q's first column is outside A's range: A x = b has no solution."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    p = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    d = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    d[0] = 0.0
    return q @ torch.diag(d) @ p.T, torch.randn(n, generator=g, dtype=torch.float64)


def least_squares_residual(a: torch.Tensor, b: torch.Tensor) -> float:
    """min_x ||b - A x||, by numpy's least-squares solve."""
    x = np.linalg.lstsq(a.numpy(), b.numpy(), rcond=None)[0]
    return float(np.linalg.norm(b.numpy() - a.numpy() @ x))


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n", [2, 3, 12, 20])
def test_a_singular_system_stops_unconverged_at_its_least_squares_residual(dtype, rtol, n):
    """b outside A's range (the adjoint's I - J^T where J^T u = u for some u): n Arnoldi steps
    span the whole space and its last one meets A's null space, where the residual estimate
    fell to rounding (1e-7, 1e-16) and the sample read converged with x of 1e7 to 1e17 and a
    true residual up to 600. It keeps the solve of the steps before, whose residual is the
    least-squares minimum, and stops there unconverged."""
    a, b = singular_system(n, seed=n)
    x, info = GMRES(rtol=rtol, restart=20)(matvec(a[None].to(dtype)), b[None].to(dtype))
    minimum = least_squares_residual(a, b)
    true_residual = float((b - a @ x[0].double()).norm())
    noise = 1e-5 if dtype == torch.float32 else 1e-13
    assert info.converged.tolist() == [False] and bool(torch.isfinite(x).all())
    assert info.iterations.tolist() == [n] and info.matvecs == n
    assert minimum > 0.1 and abs(true_residual - minimum) <= noise * float(b.norm())
    assert abs(float(info.residual[0]) - true_residual) <= noise * float(b.norm())


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("warm", [False, True])
def test_a_singular_sample_leaves_the_rest_of_its_batch_as_it_was(dtype, rtol, warm):
    """A batch with one singular sample (1): it stops unconverged, finite, at no more than its
    start's residual and at least the least-squares minimum; the regular samples' x, steps and
    residuals are bit for bit those of the batch whose sample 1 has b = 0 (read at the cycle's
    end only, so that both take the same steps: a longer cycle moves x by rounding), and solve
    A x = b."""
    a, b = systems(4, 20, seed=11)
    a[1], b[1] = singular_system(20, seed=12)
    a, b = a.to(dtype), b.to(dtype)
    solver = GMRES(rtol=rtol, restart=20, check_every=20)
    x, info = solver(matvec(a), b, b if warm else None)
    zeroed = b.clone()
    zeroed[1] = 0.0
    x_ref, ref = solver(matvec(a), zeroed, zeroed if warm else None)
    regular = [0, 2, 3]
    assert info.converged.tolist() == [True, False, True, True]
    assert torch.equal(x[regular], x_ref[regular])
    assert torch.equal(info.iterations[regular], ref.iterations[regular])
    assert torch.equal(info.residual[regular], ref.residual[regular])
    a, b = a.double(), b.double()
    exact = torch.linalg.solve(a[regular], b[regular])
    torch.testing.assert_close(x[regular].double(), exact, rtol=0, atol=100 * rtol)
    assert bool(torch.isfinite(x).all())
    start = b[1] - a[1] @ b[1] if warm else b[1]
    true_residual = float((b[1] - a[1] @ x[1].double()).norm())
    assert least_squares_residual(a[1], b[1]) * (1 - 1e-6) <= true_residual <= float(start.norm())
    torch.testing.assert_close(float(info.residual[1]), true_residual, rtol=1e-4, atol=0)
