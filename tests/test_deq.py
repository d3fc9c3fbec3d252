"""DEQ and NeuralODE layers against independent references: fixed points, implicit-function
gradients, skip and Jacobian losses, pretraining, and the closed-form solution of a linear ODE."""

import copy
import dataclasses
import gc
import math
import re
import types
import typing
import weakref
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils import parametrize

import raydeq
from raydeq.deq import DEQ, LayerOutput, hutchinson_jacobian_loss, skip_loss
from raydeq.models.dense import DenseCell, dense_skip
from raydeq.models.layers import VariationalDropout2d
from raydeq.models.mdeq import MDEQConfig, mdeq_parts
from raydeq.neural_ode import NeuralODE
from raydeq.solvers import Status

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync dominates

B, D = 3, 16
TIGHT = {"abstol": 1e-8, "reltol": 0.0, "max_steps": 2000}
GMRES_TIGHT = {"rtol": 1e-12, "max_iters": 200}


def dense_cell(seed: int = 0, contraction: float = 0.6) -> tuple[DenseCell, torch.Tensor]:
    """A float64 dense cell whose state map has spectral norm `contraction`, and an input x."""
    torch.manual_seed(seed)
    f = DenseCell(D).double()
    with torch.no_grad():
        w = f.state.weight
        w.mul_(contraction / torch.linalg.matrix_norm(w, 2))
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    return f, x


def iterate(f: nn.Module, x: torch.Tensor, z: torch.Tensor, n: int = 300) -> torch.Tensor:
    """Plain fixed-point iteration, the reference for a contractive f (0.6^300 ~ 1e-67)."""
    with torch.no_grad():
        for _ in range(n):
            z = f(z, x)
    return z


def jacobians(f: nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample dense Jacobians d f(z_b, x_b) / d z_b, shape (B, D, D)."""
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, b=b: f(v[None], x[b : b + 1])[0], z[b])
            for b in range(z.shape[0])
        ]
    )


def ift_vjp(f, z, x, v, params) -> tuple[torch.Tensor, ...]:
    """v^T dz*/dtheta = (df/dtheta)^T (I - J)^-T v at the fixed point z, from dense Jacobians."""
    J = jacobians(f, z, x.detach())
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    g = torch.linalg.solve((eye - J).transpose(1, 2), v.unsqueeze(-1)).squeeze(-1)
    return torch.autograd.grad(f(z, x), params, g, allow_unused=True, materialize_grads=True)


def test_output_has_the_public_fields():
    assert [f.name for f in dataclasses.fields(LayerOutput)] == [
        "z",
        "z0",
        "stats",
        "skip_loss",
        "jac_loss",
    ]


@pytest.mark.parametrize(
    ("layer", "name"),
    [(DEQ, "f"), (DEQ, "skip"), (NeuralODE, "f")],
    ids=["deq-f", "skip", "node-f"],
)
def test_the_annotations_of_f_and_skip_admit_the_plain_functions_the_layers_take(layer, name):
    """A layer takes a plain function as f (and as skip), so their annotations admit one as
    they admit a module; annotated nn.Module, a type checker refused DEQ(lambda z, x: ...)."""
    hint = typing.get_type_hints(layer.__init__)[name]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for value in (lambda z, x: z, nn.Linear(2, 2)):
        assert any(isinstance(value, typing.get_origin(k) or k) for k in kinds), (hint, value)


@pytest.mark.parametrize("solver", ["vcab3", "tsit5", "bs3", "euler", "broyden", "anderson"])
def test_equilibrium_matches_plain_iteration(solver):
    f, x = dense_cell()
    out = DEQ(f, solver=solver, **TIGHT)(x)
    reference = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    torch.testing.assert_close(out.z, reference, rtol=0, atol=1e-7)
    assert bool(out.stats.converged.all())
    assert out.stats.residual.shape == (B,)
    assert float(out.skip_loss) == 0.0 and float(out.jac_loss) == 0.0


def test_the_losses_a_layer_does_not_compute_are_zeros_of_the_input_s_dtype():
    """A vanilla layer without Jacobian regularisation: skip_loss and jac_loss are 0-dim zeros
    of x's dtype and device, as the computed ones would be."""
    f, x = dense_cell()
    out = DEQ(f)(x)
    for loss in (out.skip_loss, out.jac_loss):
        assert (loss.shape, loss.dtype, loss.device, float(loss)) == ((), x.dtype, x.device, 0.0)


@pytest.mark.parametrize("solver", ["vcab3", "broyden"])
def test_gradients_match_the_implicit_function_theorem(solver):
    """dL/dtheta = (I - J)^-T v pushed through df/dtheta, from dense per-sample Jacobians."""
    f, x = dense_cell(1)
    v = torch.randn(B, D, dtype=torch.float64)
    params = [f.state.weight, f.inject.weight, x]
    out = DEQ(f, solver=solver, adjoint_options=GMRES_TIGHT, **TIGHT)(x)
    got = torch.autograd.grad((out.z * v).sum(), params)

    z = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    expected = ift_vjp(f, z, x, v, params)
    for a, b in zip(got, expected, strict=True):
        # the forward residual is 1e-8: the gradient carries a relative error of that order
        assert (a - b).norm() / b.norm() < 1e-6
    assert out.stats.backward_nvjp > 1


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point"])
def test_a_saturated_sample_s_tiny_gradient_costs_no_product_and_no_nan(adjoint):
    """A saturated softmax sends back v of 1e-30 or exactly 0 for some samples; in float32
    their 2-norms underflow. Their input gradients are v's scale times the dense reference,
    finite, and the backward takes the products it takes at v's own scale."""
    f, x = dense_cell(2)
    f, x = f.float(), x.detach().float().requires_grad_()
    v = torch.randn(B, D)
    scale = torch.tensor([1.0, 1e-30, 0.0])[:, None]
    options = {"rtol": 1e-5, "max_iters": 50}
    layer = DEQ(f, solver="vcab3", adjoint=adjoint, adjoint_options=options, **TIGHT)
    counts = []
    for weights in (v, v * scale):
        out = layer(x)
        (got,) = torch.autograd.grad((out.z * weights).sum(), [x])
        counts.append(out.stats.backward_nvjp)
    x64 = x.detach().double().requires_grad_()
    z = iterate(f.double(), x64, torch.zeros(B, D, dtype=torch.float64))
    (expected,) = ift_vjp(f, z, x64, v.double(), [x64])
    assert counts[0] == counts[1]
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    for b in range(2):
        error = (got[b].double() / scale[b] - expected[b]).norm() / expected[b].norm()
        assert error < 1e-4, (b, float(error))


def tiny_mdeq(
    dropout: float, gain: float = 1.0
) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """A float64 two-scale MDEQ small enough to converge to 1e-11 and to unroll: its stem,
    cell, head and skip predictor; `gain` scales the cell's post-fuse norms (0.05: f nearly
    contracts, and every solver converges on the inputs drawn after seed 0)."""
    cfg = MDEQConfig(
        channels=(4, 8),
        head_channels=(2, 4),
        final_channels=8,
        in_channels=1,
        expansion=2,
        groups=2,
        dropout=dropout,
    )
    parts = mdeq_parts(cfg)
    with torch.no_grad():
        for post in parts.cell.post_fuse:
            post[-1].weight.mul_(gain)
    return parts.stem.double(), parts.cell.double(), parts.head.double(), parts.skip.double()


def test_multiscale_gradient_matches_unrolled_in_float64():
    """Implicit (GMRES) gradients of every parameter equal backprop through the solver's steps.

    Damped fixed-point iteration converges on this cell (plain iteration does not), so the
    unrolled derivative converges too; variational dropout keeps one mask for the whole solve.
    """
    torch.manual_seed(0)
    stem, cell, head, _ = tiny_mdeq(dropout=0.1)
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    params = [*stem.parameters(), *cell.parameters(), *head.parameters()]
    grads = {}
    for adjoint in ("gmres", "unrolled"):
        for m in cell.modules():
            if isinstance(m, VariationalDropout2d):
                m.reset()
        torch.manual_seed(1)
        layer = DEQ(
            cell,
            solver="fixed_point",
            solver_options={"damping": 0.5},
            adjoint=adjoint,
            adjoint_options={"rtol": 1e-12, "restart": 60, "max_iters": 600}
            if adjoint == "gmres"
            else None,
            abstol=1e-11,
            reltol=0.0,
            max_steps=2000,
        )
        out = layer(stem(images))
        assert bool(out.stats.converged.all())
        loss = head(out.z).square().sum()
        grads[adjoint] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    err = (grads["gmres"] - grads["unrolled"]).norm() / grads["unrolled"].norm()
    assert err < 1e-6, err


class PerAccess(nn.Module):
    """A weight norm computed at every access of its weight, as torch computes any
    parametrization, the one a layer does not hold fixed for its forward pass."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The weight norm's weight of g and v."""
        return self.norm(g, v)


def computed_per_access(layer: DEQ) -> DEQ:
    """A copy of layer whose weight norms are computed at every access."""
    copied = copy.deepcopy(layer)
    for m in copied.modules():
        if parametrize.is_parametrized(m):
            m.parametrizations.weight[0] = PerAccess(m.parametrizations.weight[0])
    return copied


@pytest.mark.parametrize("init", ["zeros", "skip_reg"])
def test_weight_norms_are_computed_once_per_forward_pass_with_their_gradients(init):
    """f's six weight norms are computed once per forward pass (they were at each of its
    evaluations), in the caller's grad mode: in training mode with dropout, z* and every
    gradient equal those of weight norms computed at every access (exactly for a vanilla DEQ;
    Skip Reg.'s two uses of a weight, in f(0, x) and f(z*, x), add their gradients in another
    order), also after an optimizer step, after a state dict is loaded and under no_grad."""
    torch.manual_seed(0)
    _, cell, *_ = tiny_mdeq(dropout=0.2)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    calls = []
    for m in cell.modules():
        if parametrize.is_parametrized(m):
            m.parametrizations.weight[0].register_forward_hook(lambda *args: calls.append(1))
    layer = DEQ(cell, init=init, max_steps=10, adjoint_options={"max_iters": 10})
    initial = copy.deepcopy(layer.state_dict())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    exact = {"rtol": 0, "atol": 0} if init == "zeros" else {"rtol": 1e-12, "atol": 1e-15}
    for step in range(4):
        outs = []
        for model in (layer, computed_per_access(layer)):
            calls.clear()
            torch.manual_seed(step)
            with torch.set_grad_enabled(step < 3):
                out = model(x)
            if step < 3:
                (out.z[0].sum() + out.z[1].square().sum() + out.skip_loss).backward()
            outs.append((out, len(calls), dict(model.named_parameters())))
        (out, once, params), (reference, every, reference_params) = outs
        assert once == 6 and every >= 6 * reference.stats.nfe > 6 * 6, (once, every)
        for a, b in zip(out.z, reference.z, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name, p in params.items():
            torch.testing.assert_close(p.grad, reference_params[name].grad, **exact, msg=name)
        if step == 0:
            optimizer.step()
        else:
            layer.load_state_dict(initial)
        optimizer.zero_grad()


@pytest.mark.parametrize("parametrization", ["spectral_norm", "orthogonal"])
def test_within_the_caller_s_parametrize_cached_a_parametrized_weight_gets_its_gradient(
    parametrization,
):
    """The caller's parametrize.cached() keeps each weight as first computed: a spectral
    norm's or an orthogonal map's, first computed within the solve's no_grad, was kept without
    its graph, and its parameters got no gradient. The layer computes it on entry, and every
    gradient is the implicit function theorem's."""
    f, x = dense_cell(1)
    getattr(nn.utils.parametrizations, parametrization)(f.inject)
    f.eval()
    v = torch.randn(B, D, dtype=torch.float64)
    params = [x, *f.parameters()]
    with parametrize.cached():
        out = DEQ(f, adjoint_options=GMRES_TIGHT, **TIGHT)(x)
        got = torch.autograd.grad((out.z * v).sum(), params)
    z = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    expected = ift_vjp(f, z, x, v, params)
    for a, b in zip(got, expected, strict=True):
        assert (a - b).norm() / b.norm() < 1e-6


@pytest.mark.parametrize("init", ["zeros", "skip", "skip_reg"])
@pytest.mark.parametrize("solver", ["fixed_point", "euler"])
def test_an_unrolled_multiscale_layer_differentiates_its_steps_written_out(init, solver):
    """12 steps of fixed-point iteration damped by 0.5, or Euler's at a fixed h = 0.5 (the same
    map, one evaluation more), on the two-scale MDEQ in training mode (dropout 0.3): the
    unrolled layer's z* (each sample's iterate of least residual) and the gradient of the
    head's loss plus skip_loss in every parameter and in the images are those of the steps
    written out from z0 cut from the graph, with the masks of the forward pass; backward_nvjp
    counts the evaluations the backward passes through."""
    torch.manual_seed(0)
    stem, cell, head, predictor = tiny_mdeq(dropout=0.3)
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    steps = 12
    options = {"damping": 0.5} if solver == "fixed_point" else {"kind": "fixed", "h0": 0.5}
    skip = predictor if init == "skip" else None
    layer = DEQ(
        cell,
        init=init,
        skip=skip,
        solver=solver,
        adjoint="unrolled",
        abstol=1e-30,
        reltol=0.0,
        max_steps=steps,
        solver_options=options,
    )
    params = [*stem.parameters(), *cell.parameters(), *head.parameters(), *predictor.parameters()]
    out = layer(stem(images))
    got = torch.autograd.grad(
        head(out.z).square().sum() + out.skip_loss,
        [*params, images],
        allow_unused=True,
        materialize_grads=True,
    )

    x = stem(images)
    zeros = cell.initial_state(x)
    z0 = {"zeros": zeros, "skip": predictor(x), "skip_reg": cell(zeros, x)}[init]
    z, points, residuals = [t.detach() for t in z0], [], []
    for _ in range(steps + (solver == "euler")):
        fz = cell(z, x)
        points.append(z)
        residuals.append(torch.cat([(a - b).flatten(1) for a, b in zip(fz, z)], 1).norm(dim=1))
        z = [a + 0.5 * (b - a) for a, b in zip(z, fz)]
    best = torch.stack(residuals).argmin(dim=0)
    z_star = [torch.stack([points[k][i][b] for b, k in enumerate(best.tolist())]) for i in range(2)]
    loss = head(z_star).square().sum()
    if init != "zeros":
        loss = loss + skip_loss(cell(z_star, x), z0)
    want = torch.autograd.grad(loss, [*params, images], allow_unused=True, materialize_grads=True)
    for a, b in zip(out.z, z_star, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert out.stats.backward_nvjp == int(best.max()) + (init != "zeros")


@pytest.mark.parametrize("solver", raydeq.solvers.SOLVERS)
def test_a_multiscale_sample_is_solved_alone_as_in_its_batch(solver):
    """Each sample of a batch of two multiscale states stops on its own: its z*, residual and
    status are those it has solved alone, and its residual is the RMS of f(z*) - z* over the
    elements of both parts."""
    torch.manual_seed(0)
    stem, cell, _, _ = tiny_mdeq(dropout=0.0, gain=0.05)
    x = stem(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    layer = DEQ(cell, solver=solver, abstol=1e-6, reltol=0.0, max_steps=500)
    with torch.no_grad():
        batch = layer(x)
        gap = torch.cat([(a - b).flatten(1) for a, b in zip(cell(batch.z, x), batch.z)], 1)
        for b in range(2):
            alone = layer(x[b : b + 1])
            for whole, part in zip(batch.z, alone.z, strict=True):
                torch.testing.assert_close(whole[b : b + 1], part, rtol=0, atol=1e-12)
            torch.testing.assert_close(batch.stats.residual[b], alone.stats.residual[0])
            assert int(batch.stats.status[b]) == int(alone.stats.status[0]) == int(Status.CONVERGED)
    rms = gap.norm(dim=1) / gap.shape[1] ** 0.5
    torch.testing.assert_close(batch.stats.residual, rms, rtol=1e-12, atol=0)
    assert bool((rms <= 1e-6).all())


def test_skip_reg_guess_and_loss_train_f():
    """skip_loss = mean |z* - f(0, x)|; its gradient in W1, W2 is the IFT term minus f(0, x)'s."""
    f, x = dense_cell(2)
    out = DEQ(f, init="skip_reg", solver="broyden", adjoint_options=GMRES_TIGHT, **TIGHT)(x)
    zeros = torch.zeros(B, D, dtype=torch.float64)
    torch.testing.assert_close(out.z0, f(zeros, x), rtol=0, atol=0)
    reference = iterate(f, x.detach(), zeros)
    z0 = f(zeros, x)
    torch.testing.assert_close(out.skip_loss, (reference - z0).abs().mean(), rtol=1e-6, atol=0)
    params = [f.state.weight, f.inject.weight]
    got = torch.autograd.grad(out.skip_loss, params)
    v = (reference - z0.detach()).sign() / reference.numel()
    through_z = ift_vjp(f, reference, x, v, params)
    through_z0 = torch.autograd.grad(z0, params, v, allow_unused=True, materialize_grads=True)
    for a, b, c in zip(got, through_z, through_z0, strict=True):
        assert (a - (b - c)).norm() / (b - c).norm() < 1e-6
    assert float(through_z0[0].abs().sum()) == 0.0  # relu(W1 0) does not depend on W1


def test_the_skip_loss_of_a_multiscale_state_is_the_mean_over_every_element():
    """Two scales of 2 x 3 and 2 x 12 elements: sum |z - z0| over both / 30, not / 6."""
    g = torch.Generator().manual_seed(16)
    z = [torch.randn(2, 3, generator=g), torch.randn(2, 12, generator=g)]
    z0 = [torch.randn(2, 3, generator=g), torch.randn(2, 12, generator=g)]
    expected = sum(float((a - b).abs().sum()) for a, b in zip(z, z0)) / 30
    assert float(skip_loss(z, z0)) == pytest.approx(expected, rel=1e-6)


def test_the_losses_of_a_float16_state_are_summed_without_overflow():
    """A float16 state of 2 x 50,000 elements: sum |z - z0| = 100,000 and ||eps^T J||^2 of
    about 400,000 exceed float16's largest value (65504); both losses are summed in float32."""
    z = torch.ones(2, 50_000, dtype=torch.float16)
    assert float(skip_loss(z, torch.zeros_like(z))) == 1.0
    torch.manual_seed(3)
    got = hutchinson_jacobian_loss(lambda v: 2 * v, z)
    torch.manual_seed(3)
    eps = torch.randn_like(z)  # the probe the estimate draws; eps^T J = 2 eps
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, 4 * eps.float().square().sum() / z.numel(), rtol=1e-6, atol=0)


def test_a_float16_skip_reg_layer_has_finite_losses():
    """f(z, x) = z / 2 + x in float16 with x = 1 on 100,000 elements: z0 = f(0, x) = 1,
    z* = 2, so skip_loss = 1 and jac_loss = ||eps / 2||^2 / dim, about 1/4 (exactly that of
    the probe eps the layer draws)."""
    x = torch.ones(2, 50_000, dtype=torch.float16)
    layer = DEQ(lambda z, x: z / 2 + x, init="skip_reg", solver="fixed_point", jac_reg=True)
    torch.manual_seed(26)
    with torch.no_grad():
        out = layer(x)
    torch.manual_seed(26)
    eps = torch.randn_like(x)
    assert out.z.dtype == torch.float16
    assert float(out.skip_loss) == pytest.approx(1.0, abs=5e-3)
    assert float(out.jac_loss) == pytest.approx(0.25, abs=5e-3)
    expected = (eps.float() / 2).square().sum() / x.numel()
    torch.testing.assert_close(out.jac_loss, expected, rtol=1e-6, atol=0)


class Float32Cell(nn.Module):
    """f(z, x) = tanh(W z + x) computed in float32 whatever the dtype of z and x."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)
        with torch.no_grad():
            self.linear.weight.mul_(0.3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z.float()) + x.float())


def test_the_solve_keeps_the_zero_states_dtype_whatever_dtype_z0_comes_in():
    """A float32 predictor of a float64 cell's state made f fail on a float32 state ("mat1 and
    mat2 must have the same dtype"), and a float32 f(0, x) made Skip Reg. solve a float64 x in
    float32 (z* float32, where init="zeros" gives float64): the solve keeps the zero state's
    dtype, and the predicted start reaches the float64 fixed point."""
    f, x = dense_cell()
    predictor = nn.Linear(D, D)
    with torch.no_grad():
        predictor.weight.copy_(torch.eye(D))
        predictor.bias.zero_()
    layer = DEQ(f, init="skip", skip=lambda x: predictor(x.float()), abstol=1e-12, reltol=0.0)
    out = layer(x)
    assert out.z0.dtype == torch.float32 and out.z.dtype == torch.float64
    torch.testing.assert_close(out.z, iterate(f, x, torch.zeros_like(x)), rtol=0, atol=1e-11)
    cell, x32 = Float32Cell(), x.detach()
    dtypes = {init: DEQ(cell, init=init)(x32).z.dtype for init in ("zeros", "skip_reg")}
    assert dtypes == {"zeros": torch.float64, "skip_reg": torch.float64}


class MixedZeroState(nn.Module):
    """A two-part cell whose own zero state is float32 beside float64."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D, dtype=torch.float64)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(x), D), torch.zeros(len(x), D, dtype=torch.float64)

    def forward(self, z: tuple[torch.Tensor, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.tanh(0.3 * z[0] + x.float()), torch.tanh(0.3 * self.linear(z[1]) + x)


@pytest.mark.parametrize("init", ["zeros", "skip_reg"])
def test_a_zero_state_of_parts_in_two_dtypes_is_refused_naming_each(init):
    """A cell's own zero state of a float32 and a float64 part has no one dtype to solve in:
    the start was cast to the first part's, so that this cell failed within its float64
    product ("mat1 and mat2 must have the same dtype") and one casting its inputs was solved
    in float32 throughout; it is refused naming each part's dtype, as solve refuses such a z0."""
    x = torch.randn(B, D, dtype=torch.float64)
    layer = DEQ(MixedZeroState(), init=init)
    with pytest.raises(TypeError, match=r"got torch\.float32 on cpu, torch\.float64 on cpu"):
        layer(x)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32-f", "autocast"])
def test_the_warm_up_gives_z_in_the_dtype_the_solve_after_it_gives(autocast):
    """A float32 f on a float64 x gave a float32 z for the warm-up's calls and a float64 one
    after them, and under autocast bfloat16 and float32: the head that reads z saw its dtype
    change within a run. The warm-up keeps the solve's dtype, and its z is the float64 f^3(0)."""
    cell, x = Float32Cell(), torch.randn(B, D, dtype=torch.float64)
    if autocast:
        cell, x = dense_cell()[0].float(), x.float()
    layer = DEQ(cell, pretrain_steps=1, pretrain_depth=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        warm, solved = layer(x).z, layer(x).z
    assert warm.dtype == solved.dtype == (torch.float32 if autocast else torch.float64)
    if not autocast:
        want = torch.zeros_like(x)
        for _ in range(3):
            want = cell(want, x).double()
        torch.testing.assert_close(warm, want, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["zeros", "skip_reg"])
def test_under_autocast_the_solve_and_its_backward_stay_float32(init):
    """Under bfloat16 autocast x and f(0, x) are bfloat16; the solver still starts from a float32
    z0, so GMRES runs in float32 (bfloat16 has no triangular solve) and the gradient matches the
    float32 one to bfloat16's precision."""
    f, x = dense_cell(3)
    f, x = f.float(), x.detach().float()

    def solve(amp: bool) -> tuple[LayerOutput, tuple[torch.Tensor, ...]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = DEQ(f, init=init, abstol=1e-4, reltol=0.0)(x)
        return out, torch.autograd.grad(out.z.square().sum(), list(f.parameters()))

    out, grads = solve(amp=True)
    assert out.z0.dtype == (torch.bfloat16 if init == "skip_reg" else torch.float32)
    assert out.z.dtype == torch.float32 and bool(out.stats.backward_converged.all())
    for low, full in zip(grads, solve(amp=False)[1], strict=True):
        assert low.dtype == torch.float32
        assert (low - full).norm() <= 0.02 * full.norm()


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point"])
def test_a_backward_inside_autocast_gives_the_gradient_of_one_outside_it(adjoint):
    """backward() called inside the autocast block of its forward (as a training loop may) runs
    the adjoint's hook under autocast: its linear solve still runs in float32 (GMRES failed on
    a bfloat16 product written into its float32 workspace) and gives the same gradient."""
    f, x = dense_cell(3)
    f, x = f.float(), x.detach().float()
    layer = DEQ(f, adjoint=adjoint, abstol=1e-4, reltol=0.0)

    def grads(inside: bool) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).z.square().sum()
            if inside:
                return list(torch.autograd.grad(loss, list(f.parameters())))
        return list(torch.autograd.grad(loss, list(f.parameters())))

    for inside, outside in zip(grads(inside=True), grads(inside=False), strict=True):
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_skip_reg_counts_the_evaluation_that_gives_z0():
    f, x = dense_cell(3)
    out = DEQ(f, init="skip_reg", solver="anderson", **TIGHT)(x)
    z0 = f(torch.zeros_like(x), x).detach()
    sol = raydeq.solve(lambda z: f(z, x), z0, solver="anderson", check_start=True, **TIGHT)
    assert out.stats.nfe == sol.stats.nfe + 1


def test_skip_loss_trains_the_predictor_and_f():
    """skip_loss = mean |z* - g(x)|: g gets the direct term, f the IFT term through z*."""
    f, x = dense_cell(4)
    g = dense_skip(D).double()
    out = DEQ(f, init="skip", skip=g, solver="vcab3", adjoint_options=GMRES_TIGHT, **TIGHT)(x)
    torch.testing.assert_close(out.z0, g(x), rtol=0, atol=0)
    reference = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    expected = (reference - g(x)).abs().mean()
    torch.testing.assert_close(out.skip_loss, expected, rtol=1e-6, atol=0)
    f_params, g_params = list(f.parameters()), list(g.parameters())
    got = torch.autograd.grad(out.skip_loss, f_params + g_params)
    v = (reference - g(x).detach()).sign() / reference.numel()
    want = ift_vjp(f, reference, x, v, f_params)
    want += torch.autograd.grad(expected, g_params)
    for a, b in zip(got, want, strict=True):
        assert (a - b).norm() / b.norm() < 1e-6


@pytest.mark.parametrize("adjoint", raydeq.solvers.ADJOINTS)
def test_a_frozen_layer_on_an_input_without_gradient_gives_z_star_without_a_graph(adjoint):
    """With f's parameters frozen and x needing no gradient, an implicit adjoint's z* needed
    one all the same (a torch module's output does not), so that a backward ran GMRES to no
    parameter; z* now comes without a graph, of the same value and evaluations."""
    f, x = dense_cell(5)
    x = x.detach()
    trained = DEQ(copy.deepcopy(f), adjoint=adjoint, **TIGHT)(x)
    f.requires_grad_(False)
    assert not f.state(x).requires_grad
    out = DEQ(f, adjoint=adjoint, **TIGHT)(x)
    assert not out.z.requires_grad and torch.equal(out.z, trained.z)
    assert out.stats.nfe == trained.stats.nfe
    reference = iterate(f, x, torch.zeros(B, D, dtype=torch.float64))
    # A residual of 1e-8 (RMS) at contraction 0.6 leaves z* within 2.5e-8 (RMS) of it.
    torch.testing.assert_close(out.z, reference, rtol=0, atol=1e-7)


def test_a_frozen_layer_s_jacobian_loss_needs_a_gradient_only_through_x():
    """jac_loss of a frozen f needed a gradient through the state's own detached copy where x
    needed none (its backward a double backward to no parameter); it now has none there, of
    the same value, and keeps x's: d/dx by hand for f(z) = tanh(W z + U x), whose probed VJP
    is W^T (eps * (1 - f^2))."""
    f = TanhCell(12).requires_grad_(False)
    x = torch.randn(B, D, dtype=torch.float64)
    layer = DEQ(f, jac_reg=True, **TIGHT).train()
    values = []
    for needs in (False, True):
        xi = x.clone().requires_grad_(needs)
        torch.manual_seed(3)
        out = layer(xi)
        assert out.jac_loss.requires_grad == needs
        values.append((out.jac_loss, xi))
    assert torch.equal(values[0][0], values[1][0].detach())
    z = out.z.detach()
    torch.manual_seed(3)
    xi = x.clone().requires_grad_()
    eps = torch.randn_like(z)
    hand = ((eps * (1 - torch.tanh(z @ f.w.T + xi @ f.u.T).square())) @ f.w).square().sum()
    (want,) = torch.autograd.grad(hand / z.numel(), xi)
    (got,) = torch.autograd.grad(*values[1])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_a_frozen_layer_differentiates_its_input_and_leaves_the_predictor_to_skip_loss():
    """f frozen: the gradient in x is the implicit one (dense Jacobians), and a trained
    predictor g gets skip_loss's direct term alone, with no adjoint solve (its backward took 11
    VJPs before, with nothing to reach)."""
    f, x = dense_cell(6)
    f.requires_grad_(False)
    g = dense_skip(D).double()
    out = DEQ(f, init="skip", skip=g, adjoint_options=GMRES_TIGHT, **TIGHT)(x.detach())
    assert not out.z.requires_grad and out.skip_loss.requires_grad
    reference = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    g_params = list(g.parameters())
    out.skip_loss.backward()
    want = torch.autograd.grad((reference - g(x.detach())).abs().mean(), g_params)
    for p, b in zip(g_params, want, strict=True):
        assert (p.grad - b).norm() / b.norm() < 1e-6
    assert out.stats.backward_nvjp == 0
    out = DEQ(f, adjoint_options=GMRES_TIGHT, **TIGHT)(x)
    v = torch.randn(B, D, dtype=torch.float64)
    (got,) = torch.autograd.grad(out.z, x, v)
    (want,) = ift_vjp(f, reference, x, v, [x])
    assert (got - want).norm() / want.norm() < 1e-6 and out.stats.backward_nvjp > 1


class TwoPartCell(nn.Module):
    """A state of two parts, (B, 3) and (B, 5): f(a, b) = (tanh(a W1 + x), tanh(b W2 + a W3))."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(21)
        self.w1 = nn.Parameter(0.3 * torch.randn(3, 3, generator=g))
        self.w2 = nn.Parameter(0.3 * torch.randn(5, 5, generator=g))
        self.w3 = nn.Parameter(0.3 * torch.randn(3, 5, generator=g))

    def initial_state(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_zeros(x.shape[0], 3), x.new_zeros(x.shape[0], 5)]

    def forward(self, z: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        a, b = z
        return [torch.tanh(a @ self.w1 + x), torch.tanh(b @ self.w2 + a @ self.w3)]


class TwoPartPredictor(nn.Module):
    """g(x) = (x P1, x P2), a prediction of TwoPartCell's state."""

    def __init__(self) -> None:
        super().__init__()
        self.p1, self.p2 = nn.Parameter(torch.eye(3)), nn.Parameter(torch.ones(3, 5))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x @ self.p1, x @ self.p2]


class Pair(NamedTuple):
    """A state of two named parts."""

    a: torch.Tensor
    b: torch.Tensor


class PairCell(nn.Module):
    """TwoPartCell on a named-tuple state, which it reads by name."""

    def __init__(self) -> None:
        super().__init__()
        self.f = TwoPartCell()

    def initial_state(self, x: torch.Tensor) -> Pair:
        return Pair(*self.f.initial_state(x))

    def forward(self, z: Pair, x: torch.Tensor) -> Pair:
        return Pair(*self.f([z.a, z.b], x))


@pytest.mark.parametrize(
    "options",
    [{}, {"init": "skip_reg"}, {"jac_reg": True}, {"pretrain_steps": 1}, {"autocast": True}],
    ids=["solve", "skip_reg", "jac_reg", "warm-up", "autocast"],
)
def test_a_named_tuple_state_reaches_f_and_comes_back_as_that_named_tuple(options):
    """f is called on the state in the container its initial_state gives (a named tuple read
    by name), as the solver and the Neural ODE call it; z* is TwoPartCell's fixed point."""
    options = dict(options)
    autocast = options.pop("autocast", False)
    f = PairCell()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(23))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = DEQ(f, solver="fixed_point", abstol=1e-6, reltol=0.0, **options)(x)
    assert type(out.z) is Pair and type(out.z0) is Pair
    if not autocast and "pretrain_steps" not in options:
        want = iterate(f.f, x, f.f.initial_state(x))
        for got, ref in zip(out.z, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pretrain_steps", [0, 1], ids=["solve", "warm-up"])
def test_a_predictor_s_list_is_solved_in_the_cell_s_named_tuple_state(pretrain_steps):
    """A predictor giving the parts of a named-tuple state as a list (TwoPartPredictor) was
    the state f was given, which failed in f reading z.a ("'list' object has no attribute
    'a'"), and z* came back as a list where init="zeros" gives a Pair; the solve now starts
    from its tensors in the zero state's container, and z0 stays the predictor's."""
    f = PairCell()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(23))
    g = TwoPartPredictor()
    deq = DEQ(f, init="skip", skip=g, solver="fixed_point", abstol=1e-6, reltol=0.0)
    deq.pretrain_steps, deq.pretrain_depth = pretrain_steps, 2
    out = deq(x)
    assert type(out.z) is Pair and type(out.z0) is list
    start = [t.detach() for t in g(x)]
    want = iterate(f.f, x, start, n=2 if pretrain_steps else 300)
    for got, ref in zip(out.z, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 if pretrain_steps else 1e-5)


@pytest.mark.parametrize("mode", ["unrolled", "unrolled under autocast", "warm-up"])
def test_the_main_loss_does_not_reach_the_predictor(mode):
    """The solve (or the warm-up's unrolling) starts from z0 cut from the graph, a state of
    several parts included: backpropagating through every step, z* still has no gradient in
    the predictor's parameters; skip_loss has."""
    f, g = TwoPartCell(), TwoPartPredictor()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(22))
    options = {"pretrain_steps": 1, "pretrain_depth": 3} if mode == "warm-up" else {}
    layer = DEQ(f, init="skip", skip=g, solver="fixed_point", adjoint="unrolled", **options)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.endswith("autocast")):
        out = layer(x)
    main = sum(t.float().sum() for t in out.z)
    assert torch.autograd.grad(main, list(g.parameters()), allow_unused=True) == (None, None)
    assert all(t.abs().sum() > 0 for t in torch.autograd.grad(out.skip_loss, list(g.parameters())))


def test_hutchinson_estimate_is_unbiased_for_the_frobenius_norm():
    """Mean of K one-probe estimates vs the dense ||J||_F^2 / dim, within 5 standard errors.

    For a Gaussian probe, eps^T A eps with A = J J^T has variance 2 ||A||_F^2; the batch
    estimate sums B independent such terms over B * D.
    """
    torch.manual_seed(5)
    f, x = dense_cell(5, contraction=0.9)
    z = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    J = jacobians(f, z, x.detach())
    exact = J.square().sum() / (B * D)
    A = J @ J.transpose(1, 2)
    std = (2 * A.square().sum()).sqrt() / (B * D)
    K = 4000
    with torch.no_grad():
        mean = sum(hutchinson_jacobian_loss(lambda v: f(v, x), z) for _ in range(K)) / K
    assert abs(float(mean - exact)) < 5 * float(std) / K**0.5, (float(mean), float(exact))


def test_hutchinson_gradient_is_unbiased():
    """For f = relu(W1 z) + relu(W2 x): ||J_b||_F^2 = sum_i [W1 z_b > 0]_i ||W1_i||^2, whose
    gradient in W1 (z fixed) is 2 [W1 z_b > 0]_i W1_i; the mean estimator gradient matches it
    within 5 standard errors per element."""
    torch.manual_seed(6)
    f, x = dense_cell(6, contraction=0.9)
    z = iterate(f, x.detach(), torch.zeros(B, D, dtype=torch.float64))
    w = f.state.weight
    active = (z @ w.detach().T > 0).double()  # (B, D)
    exact = 2 * active.sum(0)[:, None] * w.detach() / (B * D)
    K = 2000
    samples = torch.stack(
        [
            torch.autograd.grad(hutchinson_jacobian_loss(lambda v: f(v, x), z), w)[0]
            for _ in range(K)
        ]
    )
    err = (samples.mean(0) - exact).abs()
    bound = 5 * samples.std(0) / K**0.5 + 1e-12
    assert bool((err <= bound).all()), float((err / bound).max())


def test_hutchinson_estimate_of_a_multiscale_state_is_over_every_element():
    """A state of two tensors, (B, 3) and (B, 12), and a linear f with a cross-scale term:
    f(a, b) = (a M1 + b M2, b M3). ||J||_F^2 = B (||M1||^2 + ||M2||^2 + ||M3||^2), over the 15 B
    elements of both; the mean of K one-probe estimates is within 5 standard errors of it."""
    g = torch.Generator().manual_seed(11)
    m1, m2, m3 = (
        torch.randn(n, k, generator=g, dtype=torch.float64) for n, k in ((3, 3), (12, 3), (12, 12))
    )
    z = [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 12, dtype=torch.float64)]

    def f(state: list[torch.Tensor]) -> list[torch.Tensor]:
        a, b = state
        return [a @ m1 + b @ m2, b @ m3]

    exact = sum(m.square().sum() for m in (m1, m2, m3)) / 15
    torch.manual_seed(12)
    K = 400
    with torch.no_grad():
        samples = torch.stack([hutchinson_jacobian_loss(f, z) for _ in range(K)])
    bound = 5 * samples.std() / K**0.5
    assert abs(float(samples.mean() - exact)) < float(bound), (float(samples.mean()), float(exact))


def test_a_state_part_that_f_ignores_adds_nothing_to_the_jacobian_penalty():
    """f(a, b) = (a M1 + x, a M2) does not read b: eps^T J = (eps1 M1^T + eps2 M2^T, 0), over
    the 2 x (3 + 5) elements of both parts, with the probes eps1, eps2 the estimate draws."""
    g = torch.Generator().manual_seed(19)
    m1, m2 = torch.randn(3, 3, generator=g), torch.randn(3, 5, generator=g)
    x = torch.randn(2, 3, generator=g)
    z = [torch.zeros(2, 3), torch.zeros(2, 5)]
    torch.manual_seed(20)
    got = hutchinson_jacobian_loss(lambda s: [s[0] @ m1 + x, s[0] @ m2], z)
    torch.manual_seed(20)
    eps1, eps2 = torch.randn(2, 3), torch.randn(2, 5)
    expected = (eps1 @ m1.T + eps2 @ m2.T).square().sum() / 16
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_a_state_part_that_f_sets_to_a_constant_adds_nothing_to_the_jacobian_penalty():
    """f(a, b) = (a M1 + x, c) with c a constant (no graph): eps^T J = eps1 M1^T over the
    2 x (3 + 5) elements, where autograd's error read 'element 1 of tensors does not require
    grad'; an f whose every part is constant has the penalty 0."""
    g = torch.Generator().manual_seed(29)
    m1, x, c = torch.randn(3, 3, generator=g), torch.randn(2, 3, generator=g), torch.ones(2, 5)
    z = [torch.zeros(2, 3), torch.zeros(2, 5)]
    torch.manual_seed(30)
    got = hutchinson_jacobian_loss(lambda s: [s[0] @ m1 + x, c], z)
    torch.manual_seed(30)
    eps1 = torch.randn(2, 3)
    torch.testing.assert_close(got, (eps1 @ m1.T).square().sum() / 16, rtol=1e-6, atol=0)
    assert float(hutchinson_jacobian_loss(lambda s: [x, c], z)) == 0.0


def test_layer_jacobian_loss_is_the_estimate_at_the_equilibrium_and_differentiable():
    """jac_loss is the estimate at z*, and its gradient in the state weight is the slope of
    the estimate (same probe) along a direction of that weight, by central differences."""
    f, x = dense_cell(7)
    torch.manual_seed(8)
    out = DEQ(f, solver="broyden", jac_reg=True, **TIGHT)(x)
    torch.manual_seed(8)
    expected = hutchinson_jacobian_loss(lambda v: f(v, x), out.z)
    torch.testing.assert_close(out.jac_loss, expected, rtol=1e-10, atol=0)
    grads = torch.autograd.grad(out.jac_loss, [f.state.weight, x], allow_unused=True)
    assert grads[0] is not None and bool(torch.isfinite(grads[0]).all())
    assert grads[0].abs().sum() > 0
    direction = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def moved(step: float) -> float:
        """jac_loss with the state weight moved by step along direction."""
        g = copy.deepcopy(f)
        with torch.no_grad():
            g.state.weight += step * direction
        torch.manual_seed(8)
        return float(DEQ(g, solver="broyden", jac_reg=True, **TIGHT)(x).jac_loss.detach())

    slope = (moved(1e-6) - moved(-1e-6)) / 2e-6
    assert float((grads[0] * direction).sum()) == pytest.approx(slope, rel=5e-10)


def test_under_inference_mode_the_jacobian_penalty_says_to_use_no_grad():
    """torch.inference_mode() has no vector-Jacobian product: the layer says so and what to do
    instead, where autograd's own error read 'element 0 of tensors does not require grad';
    under torch.no_grad() the estimate is the one at z*."""
    f, x = dense_cell(22)
    layer = DEQ(f, solver="broyden", jac_reg=True, **TIGHT)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="under torch.no_grad"):
        layer(x.detach())
    with torch.no_grad():
        torch.manual_seed(23)
        out = layer(x)
        torch.manual_seed(23)
        expected = hutchinson_jacobian_loss(lambda v: f(v, x), out.z)
    torch.testing.assert_close(out.jac_loss, expected, rtol=0, atol=0)
    assert float(out.jac_loss) > 0


def test_in_eval_mode_the_jacobian_penalty_costs_nothing():
    """In eval mode a jac_reg layer gives jac_loss 0 with f called only by the solve (nfe
    times) and no random probe drawn: the penalty trains, and would otherwise cost every
    prediction an f and a VJP."""
    f, x = dense_cell(24)
    calls = []
    layer = DEQ(lambda z, x: calls.append(1) or f(z, x), solver="broyden", jac_reg=True, **TIGHT)
    layer.eval()
    before = torch.get_rng_state()
    with torch.no_grad():
        out = layer(x)
    assert float(out.jac_loss) == 0.0
    assert len(calls) == out.stats.nfe
    assert torch.equal(torch.get_rng_state(), before)


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x): its Jacobian diag(1 - f^2) W depends on z and x (a ReLU
    cell's is piecewise constant, so no derivative reaches z* through it)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.w = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, 2))
        self.u = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.w.T + x @ self.u.T)


def test_the_jacobian_penalty_holds_the_equilibrium_constant():
    """jac_loss = ||eps^T J_f(z*)||^2 / (B D) with J_f = diag(1 - f^2) W, and its gradient in
    W, U and x is that closed form's at z* held fixed: no term flows back through z*(theta)."""
    f = TanhCell(12)
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    x.requires_grad_()
    torch.manual_seed(14)
    out = DEQ(f, solver="broyden", jac_reg=True, **TIGHT)(x)
    torch.manual_seed(14)
    eps = torch.randn(B, D, dtype=torch.float64)  # the one probe the layer drew
    z = out.z.detach()
    s = 1 - torch.tanh(z @ f.w.T + x @ f.u.T).square()
    expected = ((eps * s) @ f.w).square().sum() / (B * D)
    torch.testing.assert_close(out.jac_loss, expected, rtol=1e-10, atol=0)
    params = [f.w, f.u, x]
    got = torch.autograd.grad(out.jac_loss, params)
    want = torch.autograd.grad(expected, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_state_no_solve_reached_misses_the_tolerance_as_unsolved_not_at_max_steps():
    """A warm-up's unrolled steps and a Neural ODE's interval end where they end, whatever
    max_steps is: a sample they leave above the tolerance is Status.UNSOLVED, where it was
    reported at MAX_STEPS, a limit neither ran to."""
    f, x = dense_cell(9)
    warm_up = DEQ(f, pretrain_steps=1, pretrain_depth=2, max_steps=50)(x)
    node = NeuralODE(f, t1=0.1, max_steps=50, abstol=1e-9, reltol=1e-9)(x)
    for out in (warm_up, node):
        assert out.stats.status.tolist() == [int(Status.UNSOLVED)] * B
        assert not bool(out.stats.converged.any())
    loose = NeuralODE(f, t1=0.1, abstol=1e3, reltol=1e3)(x)
    assert loose.stats.status.tolist() == [int(Status.CONVERGED)] * B


def test_pretraining_unrolls_f_then_solves():
    f, x = dense_cell(9)
    layer = DEQ(f, solver="broyden", pretrain_steps=2, pretrain_depth=3, **TIGHT)
    zeros = torch.zeros(B, D, dtype=torch.float64)
    before = f(f(zeros, x), x)
    unrolled = f(before, x)
    # The statistics are those of the last state f was unrolled from: its residual is the
    # last step's length.
    residual = (unrolled - before).detach().square().mean(1).sqrt()
    for call in range(2):
        out = layer(x)
        torch.testing.assert_close(out.z, unrolled, rtol=0, atol=0)
        assert out.stats.nfe == 3 and out.stats.steps == 3
        torch.testing.assert_close(out.stats.residual, residual, rtol=1e-12, atol=0)
        assert not bool(out.stats.converged.any())
        assert int(layer.step) == call + 1
        got = torch.autograd.grad(out.z.sum(), [f.state.weight])[0]
        want = torch.autograd.grad(unrolled.sum(), [f.state.weight], retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        layer.eval()
        layer(x)  # evaluation calls neither pretrain nor count
        layer.train()
    out = layer(x)
    assert int(layer.step) == 3 and out.stats.nfe != 3
    reference = iterate(f, x.detach(), zeros)
    torch.testing.assert_close(out.z, reference, rtol=0, atol=1e-7)


def test_skip_reg_warm_up_unrolls_from_f_of_zero_cut_from_the_graph():
    """During the warm-up a Skip Reg. DEQ unrolls f from z0 = f(0, x) detached, as its solve
    starts: z = f(f(f(z0))), whose gradient has no term through z0; the statistics count the
    evaluation that gave z0 (4 evaluations, 3 steps); skip_loss is mean |z - z0| with both
    sides in the graph."""
    torch.manual_seed(15)
    f = DenseCell(D).double()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    out = DEQ(f, init="skip_reg", pretrain_steps=1, pretrain_depth=3)(x)
    z0 = f(torch.zeros(B, D, dtype=torch.float64), x)
    z = z0.detach()
    for _ in range(3):
        z = f(z, x)
    torch.testing.assert_close(out.z, z, rtol=0, atol=0)
    assert (out.stats.nfe, out.stats.steps) == (4, 3)
    params = [f.state.weight, f.inject.weight, x]
    got = torch.autograd.grad(out.z.sum(), params, retain_graph=True)
    want = torch.autograd.grad(z.sum(), params, retain_graph=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    expected = (z - z0).abs().mean()
    torch.testing.assert_close(out.skip_loss, expected, rtol=1e-12, atol=0)
    got = torch.autograd.grad(out.skip_loss, params)
    want = torch.autograd.grad(expected, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


class VJPCounting(nn.Module):
    """A cell that counts the vector-Jacobian products of its calls that a backward takes
    (a hook on the first tensor of each output)."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f, self.vjps = f, 0

    def initial_state(self, x: torch.Tensor) -> object:
        make = getattr(self.f, "initial_state", None)
        return make(x) if make else torch.zeros_like(x)

    def forward(self, z: object, x: torch.Tensor) -> object:
        out = self.f(z, x)
        first = out if isinstance(out, torch.Tensor) else out[0]
        if first.requires_grad:
            first.register_hook(self.count)
        return out

    def count(self, grad: torch.Tensor) -> None:
        self.vjps += 1


@pytest.mark.parametrize(("cell", "init"), [("dense", "zeros"), ("two-part", "skip_reg")])
def test_a_warm_up_s_backward_counts_the_vjps_through_its_unrolled_evaluations(cell, init):
    """Backpropagating the main loss through a warm-up of depth 3 takes one VJP of f per
    unrolled evaluation (z0 is cut from the graph), as counted on f's outputs: 3, for a state
    of one tensor and of two parts."""
    f, x = dense_cell(24) if cell == "dense" else (TwoPartCell(), torch.randn(B, 3))
    counting = VJPCounting(f)
    out = DEQ(counting, init=init, pretrain_steps=1, pretrain_depth=3)(x)
    assert out.stats.backward_nvjp == 0
    main = sum(t.sum() for t in ([out.z] if isinstance(out.z, torch.Tensor) else out.z))
    main.backward()
    assert counting.vjps == 3
    assert out.stats.backward_nvjp == 3


@pytest.mark.parametrize(("reltol", "converged"), [(0.7, False), (1.2, True)])
def test_warm_up_statistics_judge_the_state_f_was_unrolled_from(reltol, converged):
    """f(z, x) = z + x unrolled twice from 0: z_prev = x, z = 2 x, residual |x|. The relative
    tolerance is that of z_prev (reltol |x|), not of the output (2 reltol |x|)."""
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    layer = DEQ(lambda z, x: z + x, abstol=0.0, reltol=reltol, pretrain_steps=1, pretrain_depth=2)
    out = layer(x)
    torch.testing.assert_close(out.z, 2 * x, rtol=0, atol=0)
    torch.testing.assert_close(out.stats.residual, x.square().mean(1).sqrt(), rtol=1e-12, atol=0)
    assert out.stats.converged.tolist() == [converged] * B


def test_a_bfloat16_warm_up_is_judged_in_float32_not_at_bfloat16s_rounding():
    """A bfloat16 cell unrolled once from 0 to x = 0.010009765625 (a bfloat16 number) in both
    features: the residual is 0.010009765625, above abstol 1e-2. In bfloat16 its 2-norm and
    the tolerance's both rounded to 0.01416 and the step counted as converged; the statistics
    are float32, as a solve's, and unconverged."""
    x = torch.full((1, 2), 0.010009765625, dtype=torch.bfloat16)
    layer = DEQ(lambda z, x: x, abstol=1e-2, reltol=0.0, pretrain_steps=1, pretrain_depth=1)
    out = layer(x)
    assert out.stats.residual.dtype == torch.float32
    assert out.stats.residual.tolist() == [0.010009765625]
    assert out.stats.status.tolist() == [int(Status.UNSOLVED)]


def test_a_warm_up_that_overflows_is_marked_non_finite():
    """f(z, x) = z + x / 0 is infinite after one step and NaN (inf - inf) in the residual of
    the next: the warm-up's statistics say non-finite, not merely unconverged."""
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    layer = DEQ(lambda z, x: z + x / 0, pretrain_steps=1, pretrain_depth=2)
    with torch.no_grad():
        out = layer(x)
    assert out.stats.status.tolist() == [int(Status.NONFINITE)] * B


def test_a_solve_stops_at_the_layer_s_divergence_bound():
    """f(z, x) = 3 z + x from 0 by fixed-point iteration: the residual is 3^k |x| after k
    steps. A bound of 10 x the first residual stops every sample as diverged within 6 steps;
    the default 1e4 is not reached in 6 (3^6 = 729), so the step limit ends that solve."""
    x = torch.randn(B, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    statuses = {}
    for divergence in (10.0, 1e4):
        layer = DEQ(
            lambda z, x: 3 * z + x, solver="fixed_point", divergence=divergence, max_steps=6
        )
        with torch.no_grad():
            out = layer(x)
        statuses[divergence] = out.stats.status.tolist()
        torch.testing.assert_close(out.z, torch.zeros_like(x), rtol=0, atol=0)  # the best iterate
    assert statuses == {10.0: [int(Status.DIVERGED)] * B, 1e4: [int(Status.MAX_STEPS)] * B}


def recording_backend() -> tuple[list, Callable]:
    """A torch.compile backend that records the graphs it is handed and runs them as traced."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def test_the_layer_s_compile_options_reach_the_solve():
    """compile= a dict of torch.compile options: f runs through the given backend (here one
    that records the graphs it is handed and runs them as traced), with the eager solution."""
    import torch._dynamo

    graphs, backend = recording_backend()
    f, x = dense_cell()
    x = x.detach()
    eager = DEQ(f, solver="broyden", **TIGHT)(x)
    torch._dynamo.reset()
    try:
        out = DEQ(f, solver="broyden", compile={"backend": backend}, **TIGHT)(x)
    finally:
        torch._dynamo.reset()
    assert graphs
    torch.testing.assert_close(out.z, eager.z, rtol=0, atol=1e-12)


def test_compile_set_on_the_layer_later_reaches_the_solve_and_keeps_the_method():
    """layer.compile = {...} set after construction was a plain attribute: it hid
    nn.Module.compile ("'dict' object is not callable") and no solve read it (compile_mode
    stayed False, nothing was traced); it now sets compile_mode, checked as the constructor
    checks it, f runs through the given backend, and layer.compile() stays torch's."""
    import torch._dynamo

    graphs, backend = recording_backend()
    f, x = dense_cell()
    x = x.detach()
    layer = DEQ(f, solver="broyden", **TIGHT)
    eager = layer(x)
    with pytest.raises(ValueError, match="compile='yes' must be True, False, 'graph' or a dict"):
        layer.compile = "yes"
    torch._dynamo.reset()
    try:
        layer.compile = {"backend": backend}
        out = layer(x)
    finally:
        torch._dynamo.reset()
    assert layer.compile_mode == {"backend": backend} and "compile={'backend'" in repr(layer)
    assert graphs and "compile" not in vars(layer)
    torch.testing.assert_close(out.z, eager.z, rtol=0, atol=1e-12)
    assert layer.compile.__func__ is nn.Module.compile and layer.compile.__self__ is layer


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")
def test_the_layer_keeps_nn_modules_compile_method():
    """layer.compile(...) is torch's in-place compile of the module, whatever compile= the layer
    was built with (which took its name, so that calling it raised "'bool' object is not
    callable"); the compiled layer gives the eager solution, without the warning torch gives
    on tracing a functools.cache function (the solve's option checks kept one)."""
    import torch._dynamo

    f, x = dense_cell()
    x = x.detach()
    layer = DEQ(f, solver="broyden", **TIGHT)
    eager = layer(x)
    torch._dynamo.reset()
    try:
        layer.compile(backend="eager")
        out = layer(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out.z, eager.z, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init": "ones"}, "init='ones' is not one of 'zeros', 'skip', 'skip_reg'"),
        ({"init": "skip"}, "init='skip' needs a predictor module"),
        ({"skip": nn.Identity()}, "skip= is only used with init='skip'"),
        ({"solver": "rk4"}, "solver='rk4' is not one of 'vcab3'"),
        ({"adjoint": "magic"}, "adjoint='magic' is not one of 'gmres'"),
        ({"max_steps": 0}, "max_steps=0 must be an integer >= 1"),
        ({"pretrain_steps": -1}, "pretrain_steps=-1 must be an integer >= 0"),
        ({"abstol": -1.0}, "abstol=-1.0 must be a number >= 0"),
        ({"solver": "euler", "solver_options": {"m": 5}}, "solver='euler' takes no option 'm'"),
        ({"adjoint_options": {"rtol": -1.0}}, "rtol=-1.0 must be a number >= 0"),
        ({"compile": "yes"}, "compile='yes' must be True, False, 'graph' or a dict"),
        ({"compile": {"mode": "fast"}}, "compile={'mode': 'fast'}: Unrecognized mode=fast"),
    ],
)
def test_invalid_arguments_name_the_value_and_the_choices(kwargs, message):
    f, _ = dense_cell()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DEQ(**({"f": f} | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pretrain_depth": 1.5}, "pretrain_depth=1.5 must be an integer >= 1"),
        ({"jac_reg": "yes"}, "jac_reg='yes' must be True or False"),
        ({"init": "skip", "skip": 5}, "skip=5 must be callable: g(x) -> z0, e.g. an nn.Module"),
        ({"f": None}, "f=None must be callable: f(z, x) -> z, e.g. an nn.Module"),
        ({"solver_options": 5}, "solver_options=5 must be a dict of options or None"),
        ({"compile": 1}, "compile=1 must be True, False, 'graph' or a dict"),
    ],
)
def test_arguments_of_the_wrong_type_are_a_type_error_naming_the_value(kwargs, message):
    """f=None, jac_reg="yes" or a count of 1.5 was a ValueError, where x of the wrong type was
    a TypeError; a wrong type is a TypeError everywhere, a bad value a ValueError."""
    f, _ = dense_cell()
    with pytest.raises(TypeError, match=re.escape(message)):
        DEQ(**({"f": f} | kwargs))


@pytest.mark.parametrize("init", ["zeros", "skip_reg"])
def test_a_one_dimensional_x_is_refused_not_solved_as_a_batch_of_scalars(init):
    """x of shape (D,) made a state of shape (D,), which the solver read as D samples of one
    value while f's linear maps coupled them: the gradients were not those of the one sample
    x[None], and the statistics had D entries."""
    f, x = dense_cell()
    with pytest.raises(
        ValueError, match=r"x of shape \(16,\) gives a state of shapes \[\(16,\)\].*x\[None\]"
    ):
        DEQ(f, init=init)(x[0])


class ScalarPartCell(nn.Module):
    """A state of a set (B, 3, 2) and a per-sample scalar (B,) read from the set's sum:
    f(h, c) = (tanh(h W + x + c u), 0.5 tanh(sum_n h_n . v))."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = nn.Parameter(0.4 * torch.randn(2, 2, generator=g, dtype=torch.float64))
        self.u = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(0.3 * torch.randn(2, generator=g, dtype=torch.float64))

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), x.new_zeros(x.shape[0])

    def forward(
        self, z: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = z
        return torch.tanh(h @ self.w + x + c[:, None, None] * self.u), 0.5 * torch.tanh(
            h.sum(1) @ self.v
        )


def test_a_state_with_a_per_sample_scalar_part_is_solved_and_differentiated():
    """A multiscale state with a (B,) part beside (B, N, D) is one flat (B, N D + 1) state per
    sample, as solve reads it; the layer refused it, saying it would be solved as B samples of
    one value. z* matches fixed-point iteration and dL/dx the dense implicit gradient
    (I - J)^-T w through f's Jacobian in x."""
    f = ScalarPartCell()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    out = DEQ(f, abstol=1e-12, reltol=0.0, adjoint_options={"rtol": 1e-12})(x)
    reference = f.initial_state(x)
    with torch.no_grad():
        for _ in range(200):
            reference = f(reference, x)
    for got, want in zip(out.z, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    w = (torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(out.z, w, strict=True)), x)

    def flat_f(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h, c = f((flat[:, :6].reshape(4, 3, 2), flat[:, 6]), x)
        return torch.cat([h.reshape(4, 6), c[:, None]], dim=1)

    z_star = torch.cat([reference[0].reshape(4, 6), reference[1][:, None]], dim=1)
    v = torch.cat([w[0].reshape(4, 6), w[1][:, None]], dim=1)
    jz, jx = torch.autograd.functional.jacobian(flat_f, (z_star, x.detach()))
    want = torch.stack(
        [
            torch.linalg.solve(
                torch.eye(7, dtype=torch.float64) - jz[b, :, b], jx[b, :, b].reshape(7, 6)
            ).T
            @ v[b]
            for b in range(4)
        ]
    ).reshape(4, 3, 2)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


class ScalarsCell(nn.Module):
    """A state of two (B,) parts, which hold no feature dimension."""

    def initial_state(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])]

    def forward(self, z: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tanh(z[1] + x.sum(1)), torch.tanh(z[0])]


def test_a_state_whose_parts_all_have_one_dimension_is_refused():
    """Without a feature dimension in any part, the batch of a 1-D x cannot be told from its
    features: a state of (B,) parts alone is refused as a 1-D x is."""
    with pytest.raises(ValueError, match=r"gives a state of shapes \[\(4,\), \(4,\)\]"):
        DEQ(ScalarsCell())(torch.zeros(4, 3))


@pytest.mark.parametrize("layer", [DEQ, NeuralODE])
def test_an_x_that_is_no_tensor_is_named(layer):
    """A list for x failed in torch's zeros_like() with a message naming none of the layer's
    arguments; it is a TypeError naming x and its type."""
    f, x = dense_cell()
    with pytest.raises(TypeError, match=r"x must be a tensor \(B, \.\.\.\), got list"):
        layer(f)(x.tolist())


@pytest.mark.parametrize(
    ("transform", "name"),
    [
        (lambda g, x: torch.func.vmap(lambda xb: g(xb[None]))(x), "vmap"),
        (lambda g, x: torch.func.grad(lambda xb: g(xb).sum())(x), r"grad \(vjp, jacrev"),
        (lambda g, x: torch.func.jacrev(g)(x), r"grad \(vjp, jacrev"),
        (lambda g, x: torch.func.jacfwd(g)(x), r"jvp \(jacfwd\)"),
        (lambda g, x: torch.func.functionalize(g)(x), "functionalize"),
    ],
)
def test_a_torch_func_transform_is_refused_naming_it_and_the_jacobian_that_works(transform, name):
    """Under vmap a layer failed deep in its termination test (.item()) and under grad in its
    adjoint (requires_grad_()); solve and both layers now refuse the transform at the call,
    and torch.autograd.functional.jacobian, which the message names, gives the implicit
    Jacobian (I - D1 W)^-1 D2 U of z* = relu(W z*) + relu(U x)."""
    f, x = dense_cell(2)
    x = x.detach()
    deq = DEQ(f, adjoint_options=GMRES_TIGHT, **TIGHT)
    layers = {
        "DEQ": lambda xb: deq(xb).z,
        "NeuralODE": lambda xb: NeuralODE(f)(xb).z,
        r"raydeq\.solve": lambda xb: raydeq.solve(lambda z: f(z, xb), torch.zeros_like(xb)).z,
    }
    for what, g in layers.items():
        with pytest.raises(RuntimeError, match=rf"{what} cannot run under torch\.func\.{name}"):
            transform(g, x)

    jac = torch.autograd.functional.jacobian(lambda xb: deq(xb).z, x)  # (B, D, B, D)
    z = iterate(f, x, torch.zeros(B, D, dtype=torch.float64))
    w, u = f.state.weight, f.inject.weight
    for b in range(B):
        d1 = torch.diag((w @ z[b] > 0).double())
        d2 = torch.diag((u @ x[b] > 0).double())
        expected = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - d1 @ w, d2 @ u)
        assert (jac[b, :, b] - expected).norm() / expected.norm() < 1e-6
        assert jac[b, :, torch.arange(B) != b].abs().max() == 0


@pytest.mark.parametrize(
    "trace",
    [
        lambda m, x: torch.export.export(m, (x,)),
        lambda m, x: torch.export.export(m, (x,), strict=True),
        lambda m, x: torch.jit.trace(m, (x,), check_trace=False),
        lambda m, x: make_fx(m)(x),
        lambda m, x: torch.func.linearize(m, x),
    ],
    ids=["export", "strict-export", "jit.trace", "make_fx", "linearize"],
)
def test_an_export_or_trace_is_refused_naming_why_and_what_runs_instead(trace):
    """torch.export failed on a data-dependent guard deep in the termination test, and
    torch.jit.trace without its check gave a module fixed at the example's step count (wrong
    for other inputs); solve and both layers now refuse both at the call, and still solve
    after it. A strict export, which traces with dynamo, stops at their graph break, whose
    reason says the same (it named only compile=True, which exports nothing). make_fx and
    torch.func.linearize, which traces with it, failed on "a tracing tensor" at the first
    host read."""
    f, x = dense_cell(2)
    x = x.detach()
    deq, node = DEQ(f), NeuralODE(f)
    layers = {
        "DEQ": lambda xb: deq(xb).z,
        "NeuralODE": lambda xb: node(xb).z,
        r"raydeq\.solve": lambda xb: raydeq.solve(lambda z: f(z, xb), torch.zeros_like(xb)).z,
    }
    for what, g in layers.items():
        module = Lambda(g)
        refused = rf"{what} cannot be exported or traced .*load_model"
        with pytest.raises(RuntimeError, match=refused):
            trace(module, x)
        assert torch.isfinite(module(x)).all()


class Lambda(nn.Module):
    """A module calling `fn`, for the tools that take a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize("layer", [DEQ, NeuralODE])
@pytest.mark.parametrize(
    "method",
    ["register_full_backward_hook", "register_full_backward_pre_hook", "register_backward_hook"],
)
def test_a_module_backward_hook_is_refused_naming_the_tensor_hook(layer, method):
    """The layer returns a LayerOutput, of whose tensors torch hooks none: a full backward hook
    or pre-hook was never called (a warning at each call) and register_backward_hook's failed
    the forward pass with "'LayerOutput' object is not subscriptable"; registering is now
    refused, and the hook it names on out.z receives dL/dz* (the weights of a weighted sum)."""
    f, x = dense_cell()
    deq = layer(f)
    named = rf"{layer.__name__}\.{method} .* out\.z\.register_hook"
    with pytest.raises(TypeError, match=named):
        getattr(deq, method)(lambda *args: None)
    assert not deq._backward_hooks and not deq._backward_pre_hooks
    seen = []
    out = deq(x)
    out.z.register_hook(seen.append)
    weights = torch.randn_like(out.z)
    (weights * out.z).sum().backward()
    torch.testing.assert_close(seen, [weights])


@pytest.mark.parametrize("init", ["skip", "skip_reg"])
def test_a_batch_of_no_samples_has_zero_losses_not_nan(init):
    """skip_loss and jac_loss divided a sum over no elements by their count, 0: NaN, which a
    training loss that adds them carried into its value; they are now 0 with zero gradients."""
    f, x = dense_cell()
    layer = DEQ(f, init=init, skip=dense_skip(D).double() if init == "skip" else None)
    out = layer.train()(x[:0])
    jac = DEQ(f, jac_reg=True).train()(x[:0]).jac_loss
    assert (out.skip_loss.item(), jac.item()) == (0.0, 0.0)
    (out.skip_loss + jac).backward()
    assert float(f.state.weight.grad.abs().sum()) == 0.0


class LinearCell(nn.Module):
    """f(z, x) = A z + x, so dz/dt = f - z = (A - I) z + x and dz/dt = f = A z + x have
    closed-form solutions."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T + x


def linear_ode_solution(m: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """z(t) = M^-1 (exp(M t) - I) x: the solution of dz/dt = M z + x, z(0) = 0."""
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return torch.linalg.solve(m, (torch.linalg.matrix_exp(t * m) - eye) @ x.T).T


@pytest.mark.parametrize("dynamics", ["f_minus_z", "f"])
@pytest.mark.parametrize("adjoint", ["backprop", "continuous"])
def test_neural_ode_and_its_gradients_match_the_matrix_exponential(adjoint, dynamics):
    """The output is f(z(t1), x) with z(t1) in closed form for M = A - I ("f_minus_z") or A."""
    torch.manual_seed(10)
    a = (0.5 * torch.randn(D, D, dtype=torch.float64) / D**0.5).requires_grad_()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    cell = LinearCell(a.detach().clone())
    layer = NeuralODE(
        cell, t1=1.5, dynamics=dynamics, solver="tsit5", adjoint=adjoint, abstol=1e-11, reltol=1e-11
    )
    out = layer(x * 1.0)
    m = a - torch.eye(D, dtype=a.dtype) if dynamics == "f_minus_z" else a
    z1 = linear_ode_solution(m, x, 1.5)
    expected = z1 @ a.T + x
    torch.testing.assert_close(out.z, expected, rtol=0, atol=1e-9)
    v = torch.randn(B, D, dtype=torch.float64)
    got = torch.autograd.grad((out.z * v).sum(), [cell.a, x])
    want = torch.autograd.grad((expected * v).sum(), [a, x])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-8)
    residual = (expected - z1).detach().square().mean(1).sqrt()
    torch.testing.assert_close(out.stats.residual, residual, rtol=1e-10, atol=0)
    assert out.stats.nfe > 1
    assert float(out.skip_loss) == 0.0 and float(out.jac_loss) == 0.0


def test_neural_ode_rejects_a_deq_adjoint_a_discrete_solver_and_unknown_dynamics():
    f, _ = dense_cell()
    with pytest.raises(ValueError, match="dynamics='f-z' is not one of 'f_minus_z', 'f'"):
        NeuralODE(f, dynamics="f-z")
    with pytest.raises(ValueError, match="adjoint='gmres' is not one of 'continuous', 'backprop'"):
        NeuralODE(f, adjoint="gmres")
    with pytest.raises(ValueError, match="solver='broyden' is not one of 'vcab3', 'tsit5'"):
        NeuralODE(f, solver="broyden")
    with pytest.raises(TypeError, match="f=None must be callable: f"):
        NeuralODE(None, adjoint="backprop")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("t1", -1.0, "t1=-1.0 must be a number > 0"),
        ("dynamics", "F", "dynamics='F' is not one of 'f_minus_z', 'f'"),
        ("adjoint", "Backprop", "adjoint='Backprop' is not one of 'continuous', 'backprop'"),
        ("max_steps", 0, "max_steps=0 must be an integer >= 1"),
    ],
)
def test_neural_ode_settings_set_after_it_is_made_are_checked(setting, value, message):
    """Set on the layer after it was made, t1 = -1 integrated nothing (0 steps, output
    f(0, x)), dynamics = "F" took dz/dt = f and adjoint = "Backprop" backpropagated, all
    silently; each is refused at the call as at construction, and t1 = 0.7 set later
    integrates to the matrix exponential's z(0.7)."""
    torch.manual_seed(11)
    a = 0.5 * torch.randn(D, D, dtype=torch.float64) / D**0.5
    x = torch.randn(B, D, dtype=torch.float64)
    layer = NeuralODE(LinearCell(a.clone()), solver="tsit5", abstol=1e-11, reltol=1e-11)
    setattr(layer, setting, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(x)
    layer = NeuralODE(LinearCell(a.clone()), solver="tsit5", abstol=1e-11, reltol=1e-11)
    layer.t1 = 0.7
    z1 = linear_ode_solution(a - torch.eye(D, dtype=a.dtype), x, 0.7)
    torch.testing.assert_close(layer(x).z, z1 @ a.T + x, rtol=0, atol=1e-9)


def test_a_neural_ode_of_a_plain_function_trains_by_backprop_and_the_adjoint_says_so():
    """The continuous adjoint differentiates f.parameters(): a closure's tensors would get no
    gradient, so it refuses a function that is not a module; backprop takes one."""
    weight = torch.eye(3, requires_grad=True)

    def cell(z, x):
        return torch.tanh(z @ weight + x)

    with pytest.raises(TypeError, match="needs f as an nn.Module, got function.*'backprop'"):
        NeuralODE(cell)
    NeuralODE(cell, adjoint="backprop")(torch.randn(2, 3)).z.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_a_skip_predictor_of_the_wrong_shape_is_named_before_the_solve():
    f, x = dense_cell()
    width = x.shape[1]
    deq = DEQ(f, init="skip", skip=nn.Linear(width, width - 1).double())
    with pytest.raises(
        ValueError,
        match=rf"skip\(x\) must give the state's shapes \[\({x.shape[0]}, {width}\)\], got",
    ):
        deq(x)


@pytest.mark.parametrize(
    ("predict", "form"),
    [
        (lambda z: [z], "a list or tuple of 1 tensors"),
        (lambda z: (z, z), "a list or tuple of 2 tensors"),
        (lambda z: None, "a NoneType"),
        (lambda z: z.detach().numpy(), "a ndarray"),
    ],
)
def test_a_skip_predictor_giving_the_state_in_another_container_is_named(predict, form):
    """A predictor giving [z] for a cell whose state is one tensor passed the shape check and
    failed in f's first layer ("linear(): argument 'input' must be Tensor, not list"), and one
    giving None in a TypeError of the check itself; both are named before the solve, while
    the same predictor giving the tensor solves to plain iteration's z*."""
    f, x = dense_cell(28)
    x = x.detach()
    g = nn.Linear(D, D).double()
    deq = DEQ(f, init="skip", skip=lambda xb: predict(g(xb)), **TIGHT)
    message = f"skip(x) must give the state as f's zero state holds it, one tensor, got {form}"
    with pytest.raises(ValueError, match=re.escape(message)):
        deq(x)
    out = DEQ(f, init="skip", skip=g, **TIGHT)(x)
    reference = iterate(f, x, torch.zeros(B, D, dtype=torch.float64))
    assert (out.z - reference).abs().max() < 1e-7


def test_an_init_set_on_a_layer_after_it_is_made_is_checked_with_its_predictor():
    """deq.init = "Skip" (a typo) made the layer solve from zeros with skip_loss 0, and
    init = "skip" set without a predictor failed in calling None; both are refused at the
    call as at construction, and init = "skip_reg" set later starts from f(0, x) as a layer
    built with it does (its skip loss mean |f(z*, x) - f(0, x)| by hand)."""
    f, x = dense_cell(29)
    x = x.detach()
    deq = DEQ(f, **TIGHT)
    deq.init = "Skip"
    with pytest.raises(ValueError, match=r"init='Skip' is not one of 'zeros', 'skip', 'skip_reg'"):
        deq(x)
    deq.init = "skip"
    with pytest.raises(ValueError, match=r"init='skip' needs a predictor module: pass skip=g"):
        deq(x)
    deq.init = "skip_reg"
    out = deq(x)
    reference = iterate(f, x, torch.zeros(B, D, dtype=torch.float64))
    z0 = f(torch.zeros(B, D, dtype=torch.float64), x)
    torch.testing.assert_close(out.z0, z0, rtol=0, atol=0)
    expected = (f(reference, x) - z0).abs().mean()
    torch.testing.assert_close(out.skip_loss, expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    ("setting", "value", "error", "message"),
    [
        ("jac_reg", "no", TypeError, "jac_reg='no' must be True or False"),
        ("pretrain_depth", 0, ValueError, "pretrain_depth=0 must be an integer >= 1"),
        ("pretrain_steps", -1, ValueError, "pretrain_steps=-1 must be an integer >= 0"),
    ],
)
def test_training_settings_set_on_a_layer_after_it_is_made_are_checked(
    setting, value, error, message
):
    """deq.jac_reg = "no" estimated the Jacobian penalty (a truthy string), pretrain_depth = 0
    failed in the solver ("z0 must be a tensor ..., got NoneType") and pretrain_steps = -1
    skipped the warm-up; each is refused at the call as at construction, and a depth of 3 set
    later unrolls f three times (z = f(f(f(0, x), x), x))."""
    f, x = dense_cell(30)
    x = x.detach()
    deq = DEQ(f, pretrain_steps=5)
    setattr(deq, setting, value)
    with pytest.raises(error, match=re.escape(message)):
        deq(x)
    deq = DEQ(f, pretrain_steps=5)
    deq.pretrain_depth = 3
    z = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(3):
        z = f(z, x)
    torch.testing.assert_close(deq(x).z, z, rtol=0, atol=0)


class WideCell(nn.Module):
    """A cell whose state (width 3) is not shaped like its input (width 2)."""

    def __init__(self, zero_state: bool) -> None:
        super().__init__()
        self.w, self.u = nn.Linear(3, 3), nn.Linear(2, 3)
        if zero_state:
            self.initial_state = lambda x: x.new_zeros(x.shape[0], 3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.w(z) + self.u(x))


@pytest.mark.parametrize("layer", [DEQ, NeuralODE, lambda f: DEQ(f, init="skip_reg")])
def test_a_state_not_shaped_like_the_input_names_initial_state(layer):
    """Without initial_state the state starts as zeros_like(x), and f's own product fails:
    the error says why and what to define; with it the layer runs."""
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError) as failure:
        layer(WideCell(zero_state=False))(x)
    assert "zeros_like(x), of shape (4, 2)" in "".join(failure.value.__notes__)
    assert "initial_state(x)" in "".join(failure.value.__notes__)
    assert layer(WideCell(zero_state=True))(x).z.shape == (4, 3)


@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("layer", [DEQ, NeuralODE, lambda f: DEQ(f, init="skip_reg")])
def test_an_input_of_another_width_than_the_cell_s_is_named_as_what_f_may_not_expect(
    layer, zero_state
):
    """x of width 5 into a cell whose input is width 2 fails in f's own product: the note
    names x's shape as what f may not expect (a cell with initial_state got no note at all,
    one without only the advice to define initial_state)."""
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as failure:
        layer(WideCell(zero_state))(x)
    notes = "".join(failure.value.__notes__)
    assert "(4, 5)" in notes and "x may not be the input f expects" in notes
    assert ("initial_state(x) returning the zero state" in notes) is not zero_state


@pytest.mark.parametrize("layer", [DEQ, NeuralODE, lambda f: DEQ(f, init="skip_reg")])
def test_an_input_of_another_dtype_than_the_cell_names_both_dtypes_not_initial_state(layer):
    """A float64 cell given float32 x fails in its own product, on the zero state too: the
    note names the two dtypes and the cast, not a state shaped unlike its input (it is not)."""
    f, x = dense_cell(25)
    with pytest.raises(RuntimeError) as failure:
        layer(f)(x.float())
    notes = "".join(failure.value.__notes__)
    assert "initial_state" not in notes
    assert "x is torch.float32 but f's parameters are torch.float64" in notes
    assert "x.to(torch.float64)" in notes


@pytest.mark.parametrize("layer", [DEQ, NeuralODE])
def test_an_integer_input_names_its_dtype_and_the_cast_to_the_cell_s(layer):
    """An int64 x made an int64 zero state, refused by the solver as "each state tensor must be
    floating point" with no word of x; the error now names x's dtype and x.to(f's dtype), and
    not f.to(torch.int64), which would leave f with nothing to train."""
    f, x = dense_cell(26)
    with pytest.raises(TypeError, match="floating point") as failure:
        layer(f)(x.round().long())
    notes = "".join(failure.value.__notes__)
    assert notes == (
        "x is torch.int64 but f's parameters are torch.float64: give x in f's dtype "
        "(x.to(torch.float64))"
    )


def test_an_error_of_a_cell_that_takes_the_zero_state_names_no_initial_state():
    """A cell whose state is its input's shape gets no note about initial_state on an error
    that is not about the state: a Neural ODE past max_steps, or f's own error on a later call.
    One that takes zeros_like(x) to another shape (width 2 to 3) still gets the note."""
    f, x = dense_cell(21)
    with pytest.raises(RuntimeError, match="in max_steps=2 steps") as failure:
        NeuralODE(f, t1=5.0, abstol=1e-10, reltol=1e-10, max_steps=2)(x)
    assert not getattr(failure.value, "__notes__", [])
    calls = []

    def fails_third(z, x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the cell's own error")
        return f(z, x)

    with pytest.raises(RuntimeError, match="the cell's own error") as failure:
        DEQ(fails_third, solver="fixed_point")(x)
    assert not getattr(failure.value, "__notes__", [])
    widens = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="f must return a state of the shapes") as failure:
        DEQ(lambda z, x: widens(z), solver="fixed_point")(torch.randn(4, 2))
    assert "initial_state(x)" in "".join(failure.value.__notes__)


@pytest.mark.parametrize("layer", [DEQ, NeuralODE])
def test_a_cell_returning_no_state_gets_the_solver_s_error_without_a_note(layer):
    """A cell that returns None fails on its zero state too, but neither x's shape nor its
    dtype is the cause (both match the cell's): the solver's TypeError comes alone."""

    class NoState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = dense_cell(27)[0]

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> None:
            self.cell(z, x)

    x = dense_cell(27)[1]
    with pytest.raises(TypeError, match="f must return a state like z0 .* got NoneType") as failure:
        layer(NoState())(x)
    assert not getattr(failure.value, "__notes__", [])


def test_a_predictor_s_shape_error_names_initial_state_for_a_cell_without_one():
    """A cell whose state (width 3) is not its input's (width 2) and that defines no
    initial_state: a predictor of the state's true shape fails the zeros_like(x) check, and
    the error says where that shape came from."""
    deq = DEQ(WideCell(zero_state=False), init="skip", skip=nn.Linear(2, 3))
    with pytest.raises(ValueError, match="skip\\(x\\) must give the state's shapes") as failure:
        deq(torch.randn(4, 2))
    assert "initial_state(x)" in "".join(failure.value.__notes__)


def test_skip_reg_statistics_count_the_evaluation_that_makes_z0():
    f, x = dense_cell()
    out = DEQ(f, init="skip_reg", **TIGHT)(x)
    z0 = f(torch.zeros_like(x), x).detach()
    sol = raydeq.solve(lambda z: f(z, x), z0, check_start=True, **TIGHT)
    assert out.stats.nfe == sol.stats.nfe + 1 > 2
    with pytest.raises(ValueError, match="initial_nfe=-1 must be an integer >= 0"):
        raydeq.solve(lambda z: f(z, x), z0, initial_nfe=-1)


# A root finder counts its evaluation at z0 as its first step.
@pytest.mark.parametrize(("solver", "steps"), [("tsit5", 0), ("vcab3", 0), ("broyden", 1)])
def test_a_predicted_state_that_meets_the_tolerance_takes_no_step(solver, steps):
    # f does not depend on z, so Skip Reg.'s z0 = f(0, x) is the fixed point itself.
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w) + 0 * z

    with torch.no_grad():
        out = DEQ(f, init="skip_reg", solver=solver)(x)
        unread = raydeq.solve(lambda z: f(z, x), f(torch.zeros_like(x), x), solver=solver)
    # f(0, x), then f at z0; the solve reads the test there and stops.
    assert (out.stats.steps, out.stats.nfe, bool(out.stats.converged.all())) == (steps, 2, True)
    assert unread.stats.steps > steps  # without the read, the first block runs
    with pytest.raises(TypeError, match="check_start=1 must be True or False"):
        raydeq.solve(lambda z: f(z, x), x, check_start=1)


# Euler's and fixed-point iteration's first step from z0 is z1 = f(z0); Tsit5's (h = 1.8) is
# exp(-0.9) of the way back to z*, up to its 6th-order term. A root finder counts its
# evaluation at z0 as its first step; Tsit5 spends 6 evaluations a step, the others 1.
@pytest.mark.parametrize(
    ("solver", "steps", "nfe", "unread_steps", "gain", "atol"),
    [
        ("euler", 3, 4, 4, 0.5, 1e-12),
        ("fixed_point", 4, 4, 5, 0.5, 1e-12),
        ("tsit5", 3, 19, 4, math.exp(-0.9), 1e-6),
    ],
)
def test_a_predicted_state_near_the_fixed_point_takes_a_short_first_block(
    solver, steps, nfe, unread_steps, gain, atol
):
    # f(z) = z / 2 + x has z* = 2x; from z0 = z* + d the residual f(z) - z = (z* - z) / 2 is
    # 1.5 abstol (RMS of d: 3 abstol) and one step takes it below abstol (0.75 abstol).
    abstol = 1e-3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g)
    d = torch.randn(3, 8, dtype=torch.float64, generator=g)
    d = 3 * abstol * d / d.square().mean(1, keepdim=True).sqrt()

    def f(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + x

    # The accelerator's schedule (on a CPU a solve also stops at the step it converges).
    options = {"abstol": abstol, "reltol": 0.0, "stop_on_convergence": False}
    with torch.no_grad():
        read = raydeq.solve(f, 2 * x + d, solver=solver, check_start=True, **options)
        unread = raydeq.solve(f, 2 * x + d, solver=solver, **options)
    # Converged after one step, read after the first block: 3 steps where an unread z0 runs 4.
    assert (read.stats.steps, read.stats.nfe, unread.stats.steps) == (steps, nfe, unread_steps)
    assert bool(read.stats.converged.all())
    torch.testing.assert_close(read.z, 2 * x + gain * d, rtol=0, atol=atol)
    residual = torch.full((3,), 1.5 * abstol * gain, dtype=torch.float64)
    torch.testing.assert_close(read.stats.residual, residual, rtol=0, atol=atol)


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point", "jfb", "unrolled"])
def test_a_training_step_frees_its_graph(adjoint):
    """Once the step's output is dropped, its statistics are freed, and with them the graph
    whose backward hook holds them: the adjoints close no reference cycle through autograd's
    graph."""
    f, x = dense_cell()
    out = DEQ(f, adjoint=adjoint, abstol=1e-6, reltol=1e-6)(x)
    out.z.square().sum().backward()
    stats = weakref.ref(out.stats)
    assert stats().backward_nvjp >= 1
    del out
    gc.collect()
    assert stats() is None


def test_only_a_layer_with_a_warm_up_reads_its_call_count_on_the_host():
    """pretraining() reads the training-call count (a synchronisation on a GPU) only when
    there is an unrolled warm-up to end."""
    from raydeq.bench.suites.step_cost import OpCounter

    f, _ = dense_cell()
    plain, warm = DEQ(f).train(), DEQ(f, pretrain_steps=2).train()
    with OpCounter() as counter:
        assert plain.pretraining() is False
    assert counter.syncs == 0
    with OpCounter() as counter:
        assert warm.pretraining() is True
    assert counter.syncs == 1


def test_a_layer_whose_warm_up_is_over_reads_its_call_count_no_more():
    """The call count only grows in training, so once pretraining() has read it at
    pretrain_steps every later call solves without reading it (two reads each training step
    for the rest of a run, the loop's and the layer's); a loaded state dict with a count
    inside the warm-up unrolls again."""
    from raydeq.bench.suites.step_cost import OpCounter

    f, x = dense_cell()
    layer = DEQ(f, pretrain_steps=2, pretrain_depth=2).train()
    start = copy.deepcopy(layer.state_dict())
    for _ in range(2):
        assert layer(x).stats.nfe == 2
    assert layer.pretraining() is False
    with OpCounter() as counter:
        assert layer.pretraining() is False
    assert counter.syncs == 0
    layer.load_state_dict(start)
    assert layer.pretraining() is True and layer(x).stats.nfe == 2


def test_a_warm_up_lengthened_after_it_ended_unrolls_its_added_calls():
    """pretrain_steps raised on the layer after its warm-up ended (2 calls unrolled, the 3rd
    solved, then 5) unrolls calls 4 and 5 (nfe = pretrain_depth = 3, z = f(f(f(0, x), x), x)),
    as a layer built with 5 and that count does, and the 6th solves; all solved from call 3
    on, the ended warm-up kept whatever pretrain_steps said."""
    f, x = dense_cell()
    x = x.detach()
    layer = DEQ(f, pretrain_steps=2, pretrain_depth=3).train()
    assert [layer(x).stats.nfe == 3 for _ in range(3)] == [True, True, False]
    layer.pretrain_steps = 5
    z = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(3):
        z = f(z, x)
    for _ in range(2):
        out = layer(x)
        assert out.stats.nfe == 3
        torch.testing.assert_close(out.z, z, rtol=0, atol=0)
    assert layer(x).stats.nfe != 3 and int(layer.step) == 6


@pytest.mark.parametrize("init", ["skip", "skip_reg"])
def test_an_unrolled_layer_s_skip_loss_is_measured_at_f_of_z_star(init):
    """skip_loss is mean |f(z*, x) - z0| for every adjoint: stopped short of z* (3 steps), an
    unrolled layer's, whose z is z* itself, equals that of f(z*, x) and JFB's (whose z is
    f(z*, x)) on the same z*; the evaluation counts in nfe and its VJP in backward_nvjp."""
    f, x = dense_cell(31, contraction=0.9)
    g = dense_skip(D).double() if init == "skip" else None
    options = {"init": init, "skip": g, "solver": "fixed_point", "max_steps": 3, "abstol": 1e-9}
    unrolled = DEQ(f, adjoint="unrolled", **options)(x)
    jfb = DEQ(f, adjoint="jfb", **options)(x)
    assert not bool(unrolled.stats.converged.any())
    expected = (f(unrolled.z, x) - unrolled.z0).abs().mean()
    torch.testing.assert_close(unrolled.skip_loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(unrolled.skip_loss, jfb.skip_loss, rtol=1e-12, atol=0)
    assert unrolled.stats.nfe == jfb.stats.nfe
    counting = VJPCounting(f)
    out = DEQ(counting, adjoint="unrolled", **options)(x)
    out.skip_loss.backward()
    assert out.stats.backward_nvjp == counting.vjps - (init == "skip_reg")


@pytest.mark.parametrize("init", ["skip", "skip_reg"])
def test_an_unrolled_sample_that_stays_at_z0_has_the_skip_loss_of_f_of_z0(init):
    """A sample whose z0 meets the tolerance stays there, and an unrolled solve returns it as
    f(z0): its skip_loss term is |f(z0) - z0|, as JFB's on the same z*, not |f(f(z0)) - z0|
    (on the tiny two-scale MDEQ whose z0 all meet the tolerance 0.7886 against 0.7849, with
    an evaluation more), beside a sample that steps; every VJP of its backward is counted,
    and dropping the output frees the step."""
    stem, cell, _, predictor = tiny_mdeq(dropout=0.0)
    skip = predictor if init == "skip" else None
    g = torch.Generator().manual_seed(4)
    x = stem(torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=g)).detach()
    with torch.no_grad():
        z0 = skip(x) if init == "skip" else cell(cell.initial_state(x), x)
        gap = torch.cat([(a - b).flatten(1) for a, b in zip(cell(z0, x), z0, strict=True)], 1)
    residual = gap.norm(dim=1) / gap.shape[1] ** 0.5  # the RMS residual the solve tests
    options = {"init": init, "skip": skip, "solver": "anderson", "reltol": 0.0}
    options["abstol"] = float(residual.prod().sqrt())  # between the two samples' residuals
    counting = VJPCounting(cell)
    unrolled = DEQ(counting, adjoint="unrolled", **options)(x)
    jfb = DEQ(cell, adjoint="jfb", **options)(x)
    stays = int(residual.argmin())
    torch.testing.assert_close(unrolled.z[0][stays], jfb.z[0][stays], rtol=0, atol=0)
    assert not torch.equal(unrolled.z[0][1 - stays], jfb.z[0][1 - stays])
    torch.testing.assert_close(unrolled.skip_loss, jfb.skip_loss, rtol=1e-12, atol=0)
    assert unrolled.stats.nfe == jfb.stats.nfe
    (sum(t.sum() for t in unrolled.z) + unrolled.skip_loss).backward()
    assert unrolled.stats.backward_nvjp == counting.vjps - (init == "skip_reg")
    stats = weakref.ref(unrolled.stats)
    del unrolled
    gc.collect()
    assert stats() is None  # no cycle through autograd's graph holds the step


def test_a_layer_s_repr_names_the_settings_it_solves_with():
    """Two layers that solve differently print differently: the repr names each setting given
    to the constructor (not only f), as nn.Linear's names its sizes."""
    deq = DEQ(DenseCell(4), init="skip_reg", solver="anderson", adjoint="jfb", abstol=1e-5)
    assert repr(deq) != repr(DEQ(DenseCell(4)))
    assert repr(deq).startswith(
        "DEQ(\n  init='skip_reg', solver='anderson', adjoint='jfb', abstol=1e-05, reltol=0.001, "
        "max_steps=100, divergence=10000.0, jac_reg=False, pretrain_steps=0, "
        "pretrain_depth=10, solver_options={}, adjoint_options={}, compile=False\n  (f): DenseCell("
    )
    node = NeuralODE(DenseCell(4), t1=2.0, dynamics="f", adjoint="backprop")
    assert repr(node).startswith(
        "NeuralODE(\n  t1=2.0, dynamics='f', solver='vcab3', adjoint='backprop', abstol=0.001, "
        "reltol=0.001, max_steps=10000\n  (f): DenseCell("
    )


def test_tolerances_set_on_a_layer_after_it_is_made_are_checked_and_solved_with():
    """deq.abstol = 1e-11 set an attribute that no solve read: the layer went on solving at
    the 1e-3 it was built with (z* 1.7e-3 from plain iteration's); the tolerances are now its
    Termination's, checked as at construction, and the solve meets them (z* within 1e-9 of
    the reference); a Neural ODE's likewise."""
    f, x = dense_cell(27)
    x = x.detach()
    reference = iterate(f, x, torch.zeros(B, D, dtype=torch.float64))
    deq = DEQ(f, max_steps=2000)
    deq.abstol, deq.reltol = 1e-11, 0.0
    out = deq(x)
    assert (deq.abstol, deq.termination.abstol, deq.termination.reltol) == (1e-11, 1e-11, 0.0)
    assert "abstol=1e-11" in repr(deq)
    assert out.stats.converged.all()
    assert (out.z - reference).abs().max() < 1e-9
    with pytest.raises(ValueError, match=r"abstol=-1 must be a number >= 0"):
        deq.abstol = -1
    with pytest.raises(ValueError, match=r"divergence=0.5 must be a number > 1"):
        deq.divergence = 0.5
    assert deq.abstol == 1e-11

    node = NeuralODE(f)
    node.reltol = 1e-7
    assert node.termination.reltol == 1e-7
    with pytest.raises(ValueError, match=r"reltol=nan must be a number >= 0"):
        node.reltol = float("nan")


@pytest.mark.parametrize(
    "run",
    [
        lambda f, x: raydeq.solve(lambda z: f(z, x), torch.zeros_like(x)),
        lambda f, x: DEQ(f, init="skip_reg", pretrain_steps=2)(x),
        lambda f, x: NeuralODE(f)(x),
    ],
    ids=["solve", "deq", "neural_ode"],
)
def test_a_meta_input_is_refused_naming_its_device(run):
    """A 'meta' tensor holds no values to solve for: each path says so in one ValueError, not
    torch's Tensor.item() error from deep inside the solve (or autocast's unknown device)."""
    f = DenseCell(5).to("meta")
    with pytest.raises(ValueError, match=r"of shape \(3, 5\) is on the 'meta' device"):
        run(f, torch.zeros(3, 5, device="meta"))


class DroppedCell(nn.Module):
    """A dense cell whose state map's output passes through `drop`."""

    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.cell, _ = dense_cell()
        self.drop = drop

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.cell(z, x))


@pytest.mark.parametrize("drop", [nn.Dropout(0.1), nn.AlphaDropout(0.2), nn.Dropout1d(0.1)])
def test_a_dropout_drawing_a_mask_per_evaluation_of_f_is_refused_naming_it(drop):
    """nn.Dropout in f draws a new mask at every evaluation, so f has no fixed point: a solve
    ran to max_steps with converged samples drawn by chance (5 of 8 at p=0.1, Anderson), and
    each adjoint differentiated another f."""
    deq = DEQ(DroppedCell(drop), solver="anderson")
    x = torch.randn(B, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"f\.drop is .*Dropout.* new mask .*VariationalDropout2d"):
        deq(x)
    assert deq.eval()(x).stats.converged.all()


class AttendingCell(nn.Module):
    """LayerNorm(0.3 tanh(attention(z)) + x) on sequences (B, T, 4), or an LSTM's in place of
    the attention."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.norm = nn.LayerNorm(4)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.inner, nn.MultiheadAttention):
            a, _ = self.inner(z, z, z, need_weights=False)
        else:
            a, _ = self.inner(z)
        return self.norm(0.3 * torch.tanh(a) + x)


@pytest.mark.parametrize(
    ("inner", "refused"),
    [
        (nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True), True),
        (nn.LSTM(4, 4, num_layers=2, dropout=0.1, batch_first=True), True),
        (nn.MultiheadAttention(4, 2, batch_first=True), False),
    ],
    ids=["attention", "lstm", "attention-without-dropout"],
)
def test_a_module_dropping_out_within_its_own_forward_is_refused_naming_it(inner, refused):
    """nn.MultiheadAttention(dropout=0.1) drops attention weights with a new mask at every
    evaluation of f, as an LSTM does between its layers: a solve in training mode ran to
    max_steps (residual 0.02 where the tolerance was 1e-5) with no word of why; it is refused
    as nn.Dropout is, and taken in eval mode or without the dropout."""
    torch.manual_seed(0)
    deq = DEQ(AttendingCell(inner).double(), abstol=1e-8, reltol=0.0, max_steps=200).train()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    if refused:
        with pytest.raises(ValueError, match=r"(?s)f\.inner is .* dropout=0\.1, which draws a new"):
            deq(x)
        deq.eval()
    assert deq(x).stats.converged.all()


def test_the_jacobian_penalty_of_a_self_attending_cell_is_differentiated_twice():
    """jac_loss of a cell with nn.MultiheadAttention failed at its backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"): its
    gradient in an attention weight now matches central differences of the estimate with the
    same probe, and a layer's jac_loss backpropagates."""
    torch.manual_seed(0)
    cell = AttendingCell(nn.MultiheadAttention(4, 2, batch_first=True)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    z = torch.randn(3, 5, 4, dtype=torch.float64)
    weight = cell.inner.in_proj_weight

    def penalty() -> torch.Tensor:
        torch.manual_seed(1)
        return hutchinson_jacobian_loss(lambda s: cell(s, x), z)

    (grad,) = torch.autograd.grad(penalty(), weight)
    h = 1e-6
    with torch.no_grad():
        weight[0, 0] += h
        up = penalty()
        weight[0, 0] -= 2 * h
        down = penalty()
        weight[0, 0] += h
    assert float(grad[0, 0]) == pytest.approx(float(up - down) / (2 * h), rel=1e-6)
    DEQ(cell, jac_reg=True).train()(x).jac_loss.backward()
    assert weight.grad is not None and bool(weight.grad.isfinite().all())


@pytest.mark.parametrize("drop", [nn.Dropout(0.0), VariationalDropout2d(0.1)])
def test_a_dropout_that_keeps_f_fixed_within_a_forward_pass_is_taken(drop):
    """A dropout of p=0 or one mask per forward pass leaves f one map within the solve: z* is
    where plain iteration of f with that pass's mask goes."""
    f = DroppedCell(drop).double()
    x = torch.randn(B, D, dtype=torch.float64)
    out = DEQ(f, solver="anderson", **TIGHT)(x)
    assert out.stats.converged.all()
    reference = iterate(f, x, torch.zeros(B, D, dtype=torch.float64))
    torch.testing.assert_close(out.z, reference, rtol=0, atol=5e-8)


class BatchNormedCell(nn.Module):
    """tanh(0.3 BN(W z) + x): BatchNorm in training mode couples the samples of a batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 5).double()
        self.norm = nn.BatchNorm1d(5, track_running_stats=False).double()

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.3 * self.norm(self.lin(z)) + x)


@pytest.mark.parametrize("adjoint", ["gmres", "fixed_point"])
def test_an_implicit_adjoint_refuses_a_batchnorm_coupling_the_samples(adjoint):
    """The implicit adjoints solve each sample's system alone; through a BatchNorm using the
    batch's statistics, whose Jacobian couples the samples, GMRES's gradient was 15% off the
    dense implicit gradient (Neumann's 11%) with every sample reported converged."""
    deq = DEQ(BatchNormedCell(), solver="anderson", adjoint=adjoint)
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=rf"f\.norm is BatchNorm1d.* couples .* adjoint='{adjoint}' solves .*nn\.GroupNorm",
    ):
        deq(x)
    with torch.no_grad():
        assert deq(x).stats.converged.all()


def test_a_batchnorm_coupling_the_samples_is_differentiated_exactly_when_unrolled():
    """Unrolled through fixed-point iteration, the gradient through a batch-coupled f is the
    implicit gradient from the batch's dense Jacobian."""
    f = BatchNormedCell()
    x, c = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    deq = DEQ(f, solver="fixed_point", adjoint="unrolled", abstol=1e-11, reltol=0.0, max_steps=2000)
    out = deq(x)
    (out.z * c).sum().backward()
    z = out.z.detach()
    jac = torch.autograd.functional.jacobian(lambda v: f(v, x), z).reshape(30, 30)
    g = torch.linalg.solve((torch.eye(30, dtype=torch.float64) - jac).T, c.reshape(-1))
    (reference,) = torch.autograd.grad(f(z, x), f.lin.weight, g.reshape(6, 5))
    torch.testing.assert_close(f.lin.weight.grad, reference, rtol=1e-6, atol=1e-8)


def nested(module: nn.Module) -> nn.Module:
    """`module` two containers deep, as a block of a model holds its norm."""
    return nn.Sequential(nn.Sequential(module))


@pytest.mark.parametrize(
    ("norm", "name", "mode"),
    [
        (nn.BatchNorm2d(D), "f.drop", "train"),
        (nn.BatchNorm3d(D), "f.drop", "train"),
        (nn.SyncBatchNorm(D), "f.drop", "train"),
        (nn.LazyBatchNorm1d(), "f.drop", "train"),
        (nested(nn.BatchNorm1d(D)), r"f\.drop\.0\.0", "train"),
        (nn.BatchNorm1d(D), "f.drop", "train"),
        (nn.BatchNorm1d(D, track_running_stats=False), "f.drop", "eval"),
    ],
)
def test_every_batchnorm_by_the_batchs_statistics_is_refused_under_an_implicit_adjoint(
    norm, name, mode
):
    """Each BatchNorm kind, nested or not, normalises by the batch's statistics in training
    mode (running statistics kept or not) and in eval mode without running statistics."""
    deq = DEQ(DroppedCell(norm), adjoint="gmres").train(mode == "train")
    with pytest.raises(ValueError, match=rf"{name} is .*BatchNorm.* couples the samples"):
        deq(torch.randn(B, D, dtype=torch.float64))


def test_a_batchnorm_in_eval_mode_with_running_statistics_is_differentiated_implicitly():
    """In eval mode a BatchNorm with running statistics is a per-sample affine map: the
    gradients are the implicit function theorem's through it (GMRES at its default rtol)."""
    cell = DroppedCell(nn.BatchNorm1d(D).double())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cell.drop.running_mean.copy_(torch.randn(D, generator=g, dtype=torch.float64))
        cell.drop.running_var.copy_(torch.rand(D, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(B, D, dtype=torch.float64, generator=g, requires_grad=True)
    params = [x, cell.cell.state.weight, cell.drop.weight]
    out = DEQ(cell, adjoint="gmres", **TIGHT).eval()(x)
    got = torch.autograd.grad(out.z.sum(), params)
    assert out.stats.converged.all()
    want = ift_vjp(cell, out.z.detach(), x, torch.ones(B, D, dtype=torch.float64), params)
    for a, b in zip(got, want, strict=True):
        assert (a - b).norm() / b.norm() < 1e-4


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_layer_counts_each_call_once_and_recomputes_its_own_warm_up(reentrant):
    """torch.utils.checkpoint runs the forward pass again in the backward: that recomputation
    counted as a training call, so the warm-up ended early, and at its last step the
    recomputation solved where the call had unrolled (a CheckpointError without reentrancy,
    gradients 5% off with it); the gradients now equal the plain layer's (within the solve's
    tolerance with reentrancy, whose forward runs without a graph and returns z*, not f(z*)) and
    each call counts once."""
    f, x = dense_cell()
    layers = [DEQ(copy.deepcopy(f), pretrain_steps=2, pretrain_depth=3, **TIGHT) for _ in range(2)]
    for call in range(4):
        for layer in layers:
            layer.zero_grad()
        layers[0](x).z.square().sum().backward()
        z = torch.utils.checkpoint.checkpoint(lambda t: layers[1](t).z, x, use_reentrant=reentrant)
        z.square().sum().backward()
        for kept, plain in zip(layers[1].parameters(), layers[0].parameters(), strict=True):
            torch.testing.assert_close(kept.grad, plain.grad, rtol=0, atol=1e-6)
        assert int(layers[1].step) == int(layers[0].step) == call + 1


def test_an_f_whose_graph_hides_its_parameters_keeps_z_star_on_the_graph():
    """torch.utils.checkpoint with use_reentrant=True shows only its inputs to autograd and
    accumulates its parameters' gradients in its own backward: z* must keep its graph (it came
    without one, so a backward gave the parameters no gradient without a word), and the
    implicit adjoint's autograd.grad then fails naming the checkpoint instead."""
    f, x = dense_cell(7)
    x = x.detach()

    def hidden(z: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(lambda a: f(a, x), z, use_reentrant=True)

    z0 = torch.zeros(B, D, dtype=torch.float64)
    out = raydeq.solve(hidden, z0, solver="fixed_point", abstol=1e-10, reltol=0)
    assert out.z.requires_grad
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        out.z.sum().backward()


def test_a_compiled_training_step_runs_the_solves_eagerly_behind_one_named_graph_break():
    """torch.compile of a user's step traced into the solver and broke its graph at each host
    read, under reasons naming torch internals ("C-implemented special method", Tensor.item()),
    and fullgraph=True failed on them; the solves and both layers now run outside the
    enclosing graph, one graph break whose reason says why, with the eager gradients, and a
    layer's own compile= still compiles f within it."""
    import torch._dynamo

    f, x = dense_cell()
    x = x.detach()
    graphs, backend = recording_backend()
    deq = DEQ(f, solver="broyden", compile={"backend": backend}, **TIGHT)
    node = NeuralODE(f)

    def fx(z: torch.Tensor) -> torch.Tensor:
        return f(z, x)

    steps = {
        "raydeq.solve": lambda xb: raydeq.solve(fx, 2.0 * xb).z.square().sum(),
        "DEQ": lambda xb: deq(2.0 * xb).z.square().sum(),
        "NeuralODE": lambda xb: node(2.0 * xb).z.square().sum(),
    }
    for what, step in steps.items():
        eager = torch.autograd.grad(step(x), list(f.parameters()))
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(step)(x)
            torch._dynamo.reset()
            compiled = torch.compile(step, backend="eager")(x)
            torch._dynamo.reset()
            with pytest.raises(torch._dynamo.exc.Unsupported, match=f"{what} runs outside"):
                torch.compile(step, backend="eager", fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
        (only,) = explained.break_reasons
        assert f"{what} runs outside" in only.reason and "residual on the host" in only.reason
        for got, want in zip(torch.autograd.grad(compiled, list(f.parameters())), eager):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert graphs


@pytest.mark.parametrize("solver", ["tsit5", "anderson"])
@pytest.mark.parametrize("adjoint", ["gmres", "unrolled"])
def test_per_sample_gradients_of_a_batch_are_those_of_each_sample_solved_alone(solver, adjoint):
    """The README's per-sample gradients: one torch.autograd.grad(losses[i], params,
    retain_graph=True) per sample of a batch is the gradient of that sample solved alone, to
    rounding (1.7e-14 of its largest entry at most with unrolled Anderson, where the README said
    3e-16), and with unrolled, is_grads_batched=True gives them all at once, to rounding too."""
    f, x = dense_cell(contraction=0.9)
    x = x.detach()
    params = list(f.parameters())
    layer = DEQ(f, solver=solver, adjoint=adjoint)
    losses = layer(x).z.pow(2).sum(dim=1)
    each = [torch.autograd.grad(losses[b], params, retain_graph=True) for b in range(B)]
    for b in range(B):
        alone = torch.autograd.grad(layer(x[b : b + 1]).z.pow(2).sum(), params)
        for got, want in zip(each[b], alone, strict=True):
            assert (got - want).abs().max() <= 1e-13 * want.abs().max()
    if adjoint == "unrolled":
        eye = torch.eye(B, dtype=torch.float64)
        batched = torch.autograd.grad(losses, params, eye, is_grads_batched=True)
        for b in range(B):
            for rows, got in zip(batched, each[b], strict=True):
                assert (rows[b] - got).abs().max() <= 1e-13 * got.abs().max()
