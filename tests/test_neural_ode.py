"""The Neural ODE's continuous adjoint against backpropagation through the same solver's steps,
its statistics, and its configuration errors."""

import gc
import math
import re
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from test_deq import LinearCell, linear_ode_solution
from torch import nn

from raydeq.models import build
from raydeq.models.layers import VariationalDropout2d
from raydeq.neural_ode import NeuralODE
from raydeq.solvers.interval import INTERVAL_SOLVERS, integrate
from raydeq.solvers.termination import Termination
from raydeq.training.config import ConfigError, validate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: thread sync dominates


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b): a nonlinear cell with parameters in every term."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.state = nn.Linear(width, width)
        self.input = nn.Linear(width, width, bias=False)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.state(z) + self.input(x))


def gradients(
    solver: str, adjoint: str, tol: float, t1: float, dynamics: str = "f_minus_z"
) -> tuple[torch.Tensor, object]:
    """d/d(x, params) of sum f(z(t1), x)^2 for a fixed float64 cell and input, and the
    statistics."""
    torch.manual_seed(0)
    f = TanhCell(6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    layer = NeuralODE(
        f, t1=t1, dynamics=dynamics, solver=solver, adjoint=adjoint, abstol=tol, reltol=tol
    )
    out = layer(x)
    grads = torch.autograd.grad(out.z.square().sum(), [x, *f.parameters()])
    return torch.cat([g.flatten() for g in grads]), out.stats


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


class DropoutCell(TanhCell):
    """TanhCell with variational dropout on its state term: f(z, x) = tanh(drop(W z) + U x + b)."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.drop = VariationalDropout2d(0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.drop(self.state(z)) + self.input(x))


@pytest.mark.parametrize("between", ["another forward pass", "eval mode"])
def test_the_continuous_adjoint_runs_f_with_the_dropout_of_its_forward_pass(between):
    """A forward pass of another batch (with a fresh mask, as a model's forward draws) or a
    switch to eval mode before the backward leaves the continuous adjoint's gradient that of
    the forward pass, as backprop's is, and f's mask and mode as they were before the backward."""
    grads = {}
    for adjoint in ("continuous", "backprop"):
        torch.manual_seed(0)
        f = DropoutCell(6).double()
        x, other = torch.randn(2, 3, 6, dtype=torch.float64)
        layer = NeuralODE(f, adjoint=adjoint, abstol=1e-9, reltol=1e-9)
        out = layer(x.requires_grad_())
        f.drop.reset()
        if between == "eval mode":
            layer.eval()
        else:
            layer(other)
        mask = f.drop.mask
        grads[adjoint] = torch.cat(
            [g.flatten() for g in torch.autograd.grad(out.z.sum(), [x, *f.parameters()])]
        )
        assert f.drop.mask is mask and f.drop.training == (between != "eval mode")
    assert relative(grads["continuous"], grads["backprop"]) < 1e-6


class FreshDropoutCell(TanhCell):
    """TanhCell whose state term passes through nn.Dropout(0.1), a new mask per call."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.drop = nn.Dropout(0.1)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.drop(self.state(z)) + self.input(x))


def test_a_dropout_drawing_a_mask_per_evaluation_of_f_is_refused_in_training_mode():
    """nn.Dropout in f made each evaluation another function, and the step control followed
    the noise: 827 evaluations to t1 = 1 where the same cell without it takes 14. It is
    refused as a DEQ refuses it, naming the module; in eval mode it is taken."""
    torch.manual_seed(0)
    layer = NeuralODE(FreshDropoutCell(4))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"f\.drop is Dropout.* another function .*Neural ODE"):
        layer(x)
    assert layer.eval()(x).stats.nfe < 30


@pytest.mark.parametrize("dynamics", ["f_minus_z", "f"])
@pytest.mark.parametrize(("solver", "tol"), [("vcab3", 1e-9), ("tsit5", 1e-10), ("bs3", 1e-9)])
def test_the_continuous_adjoint_matches_backprop_through_the_steps(solver, tol, dynamics):
    adjoint, adjoint_stats = gradients(solver, "continuous", tol, 1.0, dynamics)
    backprop, backprop_stats = gradients(solver, "backprop", tol, 1.0, dynamics)
    assert relative(adjoint, backprop) < 1e-6
    assert adjoint_stats.nfe == backprop_stats.nfe > 10
    # One evaluation of the augmented system per VJP; backprop differentiates the accepted steps.
    assert adjoint_stats.backward_nvjp > 10
    assert 0 < backprop_stats.backward_nvjp < backprop_stats.nfe


def test_euler_adjoint_and_backprop_agree_to_first_order():
    """Euler is first order: the two gradients differ by O(h), which falls as sqrt(tol)."""
    loose = relative(*(gradients("euler", a, 1e-5, 0.5)[0] for a in ("continuous", "backprop")))
    tight = relative(*(gradients("euler", a, 1e-7, 0.5)[0] for a in ("continuous", "backprop")))
    assert tight < 1e-3 and 5 < loose / tight < 20


def test_second_derivatives_backprop_matches_finite_differences_and_the_adjoint_refuses(
    central_difference,
):
    """A gradient penalty phi = ||dL/dW||^2 differentiated once more: through the steps its
    directional derivative matches central differences of phi; the continuous adjoint, whose
    backward has no graph, refuses (it gave -0.20 where the answer is 0.39) and names
    'backprop'."""
    torch.manual_seed(0)
    f = TanhCell(4).double()
    weight = f.state.weight
    x = torch.randn(3, 4, dtype=torch.float64)
    direction = torch.randn(4, 4, dtype=torch.float64)

    def penalty(adjoint: str, create_graph: bool) -> torch.Tensor:
        layer = NeuralODE(f, solver="tsit5", adjoint=adjoint, abstol=1e-10, reltol=1e-10)
        (grad,) = torch.autograd.grad(
            layer(x).z.square().sum(), [weight], create_graph=create_graph
        )
        return grad.square().sum()

    (hessian_term,) = torch.autograd.grad(penalty("backprop", True), [weight])
    expected = central_difference(lambda: penalty("backprop", False).item(), weight, direction)
    assert (hessian_term * direction).sum().item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(RuntimeError, match="first derivatives only.*'backprop'"):
        penalty("continuous", True)


def test_forward_mode_through_backprop_matches_central_differences_and_the_adjoint_refuses(
    central_difference,
):
    """Under torch.autograd.forward_ad the backprop adjoint carries the tangent of x through
    the steps (<v, z'> matches central differences); the continuous adjoint failed in torch
    ("You must implement the jvp function"), and a batched backward through it in torch's
    batching rules ("aten::detach"): both now raise naming 'backprop'."""
    torch.manual_seed(0)
    f = TanhCell(4).double()
    x, direction, v = torch.randn(3, 3, 4, dtype=torch.float64)

    def layer(adjoint: str) -> NeuralODE:
        return NeuralODE(f, solver="tsit5", adjoint=adjoint, abstol=1e-10, reltol=1e-10)

    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer("backprop")(fwAD.make_dual(x, direction)).z).tangent
        with pytest.raises(RuntimeError, match="no forward-mode derivative.*'backprop'"):
            layer("continuous")(fwAD.make_dual(x, direction))
    expected = central_difference(lambda: (v * layer("backprop")(x).z).sum().item(), x, direction)
    assert (v * tangent).sum().item() == pytest.approx(expected, rel=1e-7)
    with pytest.raises(
        RuntimeError, match=r"'continuous' cannot take a batched backward.*'backprop'"
    ):
        torch.autograd.functional.jacobian(lambda xb: layer("continuous")(xb).z, x, vectorize=True)


@pytest.mark.parametrize("solver", ["vcab3", "tsit5", "bs3", "euler"])
def test_a_fixed_interval_integration_lands_on_the_matrix_exponential(solver):
    a = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    tol = 1e-6 if solver == "euler" else 1e-10
    end = integrate(lambda y: y @ a.T, y0, 2.0, solver, Termination(tol, tol), 100_000)
    exact = y0 @ torch.linalg.matrix_exp(2.0 * a).T
    # Global error: a few hundred local tolerances (euler: first order, about sqrt(tol)).
    torch.testing.assert_close(end.y, exact, rtol=0, atol=3e-3 if solver == "euler" else 1e-7)
    torch.testing.assert_close(end.k, end.y @ a.T, rtol=0, atol=1e-14)


class Counting(nn.Module):
    """Wraps a cell and counts its calls."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell, self.calls = cell, 0

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.cell(z, x)


@pytest.mark.parametrize("dynamics", ["f_minus_z", "f"])
def test_nfe_counts_every_call_of_f_the_output_s_included(dynamics):
    torch.manual_seed(0)
    f = Counting(TanhCell(6).double())
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = NeuralODE(f, dynamics=dynamics, solver="vcab3", abstol=1e-6, reltol=1e-6)
    with torch.no_grad():
        out = layer(x)
    assert out.stats.nfe == f.calls > 10
    f.calls = 0
    out = layer(x.requires_grad_())
    out.z.sum().backward()
    # The continuous adjoint calls f once per augmented evaluation, the output's VJP none.
    assert out.stats.nfe + out.stats.backward_nvjp - 1 == f.calls


@pytest.mark.parametrize("dynamics", ["f_minus_z", "f"])
def test_under_autocast_the_continuous_adjoint_runs_f_as_the_forward_did(dynamics):
    """Under bfloat16 autocast the stem's x is bfloat16; the integration starts from a float32
    z(0) and the backward evaluates f under the forward's autocast (outside it, f would mix
    bfloat16 x with float32 weights), so the gradient matches float32's to bfloat16 precision."""
    torch.manual_seed(0)
    f = TanhCell(8)
    x = torch.randn(4, 8)
    layer = NeuralODE(f, dynamics=dynamics, solver="vcab3", abstol=1e-4, reltol=1e-4)

    def grads(amp: bool) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = layer(x.to(torch.bfloat16) if amp else x)
        return torch.autograd.grad(out.z.float().square().sum(), list(f.parameters()))

    for low, full in zip(grads(amp=True), grads(amp=False), strict=True):
        assert low.dtype == torch.float32
        assert relative(low, full) < 0.03


class VJPCountingCell(nn.Module):
    """A cell whose every output counts the vector-Jacobian products taken through it."""

    def __init__(self, cell: nn.Module, counter: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.cell, self.counter = cell, counter

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.counter.apply(self.cell(z, x))


@pytest.mark.parametrize("adjoint", ["backprop", "continuous"])
@pytest.mark.parametrize("solver", ["vcab3", "bs3", "euler"])
def test_backward_nvjp_counts_the_vjps_of_f_the_backward_takes(solver, adjoint, counted_vjp):
    """backward_nvjp is what the backward takes: through the steps, one VJP per evaluation on
    the accepted path but the field at t1 (no step uses it), plus the output's; the continuous
    adjoint, one per evaluation of the augmented system, plus the output's."""
    torch.manual_seed(0)
    f = VJPCountingCell(TanhCell(5).double(), counted_vjp)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    layer = NeuralODE(f, solver=solver, adjoint=adjoint, abstol=1e-6, reltol=1e-6)
    out = layer(x)
    counted_vjp.calls = 0
    out.z.square().sum().backward()
    assert out.stats.backward_nvjp == counted_vjp.calls > 5


@pytest.mark.parametrize("solver", ["vcab3", "tsit5", "bs3", "euler"])
def test_a_step_over_a_sharp_switch_is_rejected_and_retaken(solver, counted_vjp):
    """y = (t, s) with s' = 10 sigmoid((t - 1) / 0.02): the steps grow while s' is flat and
    overshoot the switch at t = 1, where the error estimate rejects them (taking them lost s
    by units). s(2) = 10 exactly, since sigmoid(u) + sigmoid(-u) = 1 over [0, 2]. path_nfe
    counts the evaluations on accepted steps: every one but the field at t1 (which no later
    step uses) is differentiated by a backward pass through the steps."""

    def field(y: torch.Tensor) -> torch.Tensor:
        t = y[:, :1]
        return counted_vjp.apply(
            torch.cat([torch.ones_like(t), 10 * torch.sigmoid((t - 1) / 0.02)], 1)
        )

    y0 = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    tol = 1e-6 if solver == "euler" else 1e-9
    end = integrate(field, y0, 2.0, solver, Termination(tol, tol), 100_000)
    # euler is first order: its global error is about sqrt(tol)
    exact = torch.tensor([[2.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(end.y, exact, rtol=0, atol=1e-2 if solver == "euler" else 1e-5)
    assert end.nfe - end.path_nfe > 1  # the first step's choice spends one evaluation
    counted_vjp.calls = 0
    end.y.sum().backward()
    assert end.path_nfe == counted_vjp.calls + 1


def test_max_steps_is_an_error_naming_the_time_reached():
    a = -torch.eye(2, dtype=torch.float64)
    y0 = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"reached t=.* of t1=5 in max_steps=3 steps"):
        integrate(lambda y: y @ a.T, y0, 5.0, "tsit5", Termination(1e-12, 1e-12), 3)


def test_an_integration_back_from_t1_past_max_steps_names_the_time_t_it_reached():
    """The continuous adjoint integrates from t1 back to 0 in s = t1 - t; past max_steps it
    named s as t ("reached t=5.44 of t1=30", where it had come back to t = 24.56), as if the
    forward pass had stopped near its start."""
    a = -torch.eye(2, dtype=torch.float64)
    y0 = torch.ones(1, 2, dtype=torch.float64)
    term = Termination(1e-12, 1e-12)
    with pytest.raises(RuntimeError, match=r"reached t=(\S+) of t1=5 in") as forward:
        integrate(lambda y: y @ a.T, y0, 5.0, "tsit5", term, 3)
    back = r"reached t=(\S+) on its way back from t1=5 to 0 in max_steps=3 steps"
    with pytest.raises(RuntimeError, match=back) as backward:
        integrate(lambda y: y @ a.T, y0, 5.0, "tsit5", term, 3, backward=True)
    s = float(re.search(r"t=(\S+) of", str(forward.value)).group(1))
    t = float(re.search(r"t=(\S+) on", str(backward.value)).group(1))
    assert 0 < s < 5 and t == pytest.approx(5 - s, abs=1e-5)

    # f(z, x) = diag(0.5, -0.5) z + x: its flow f - z contracts forward, so that the continuous
    # adjoint's z, integrated back from t1, grows and needs more steps than it did.
    saddle = LinearCell(torch.diag(torch.tensor([0.5, -0.5], dtype=torch.float64)))
    node = NeuralODE(saddle, t1=30.0, solver="bs3", abstol=1e-6, reltol=1e-6, max_steps=200)
    out = node(torch.ones(1, 2, dtype=torch.float64))
    assert out.stats.steps < 200
    way_back = r"^the bs3 integration reached t=(\S+) on its way back from t1=30 to 0 in max_steps"
    with pytest.raises(RuntimeError, match=way_back) as refused:
        out.z.sum().backward()
    assert 0 < float(re.match(way_back, str(refused.value)).group(1)) < 30


@pytest.mark.parametrize("solver", ["tsit5", "euler"])
def test_an_integration_of_exactly_max_steps_steps_lands_and_one_fewer_raises(solver):
    """max_steps bounds the steps taken, rejected ones included: the steps an integration
    needs are enough, one fewer is an error."""
    a = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    term = Termination(1e-6, 1e-6)
    end = integrate(lambda y: y @ a.T, y0, 2.0, solver, term, 100_000)
    assert end.steps > 3
    again = integrate(lambda y: y @ a.T, y0, 2.0, solver, term, end.steps)
    assert torch.equal(again.y, end.y) and again.steps == end.steps
    with pytest.raises(RuntimeError, match=f"in max_steps={end.steps - 1} steps"):
        integrate(lambda y: y @ a.T, y0, 2.0, solver, term, end.steps - 1)


def test_the_presets_train_the_neural_ode_by_the_continuous_adjoint():
    model = build({"model": "mnist_dense", "variant": "neural_ode", "solver": "tsit5"})
    assert (model.layer.adjoint, model.layer.solver) == ("continuous", "tsit5")
    cfg = validate({"model": {"variant": "neural_ode"}})
    assert (cfg.model.adjoint, cfg.model.solver, cfg.model.t1) == ("continuous", "vcab3", 1.0)
    assert cfg.model.dynamics == "f_minus_z" and validate({}).model.dynamics is None
    paper = build({"model": "mnist_dense", "variant": "neural_ode", "dynamics": "f"})
    assert paper.layer.dynamics == "f"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"variant": "neural_ode", "adjoint": "gmres"},
            "model.adjoint='gmres' is not one of 'continuous', 'backprop' for variant 'neural_ode'",
        ),
        (
            {"variant": "neural_ode", "solver": "anderson"},
            "model.solver='anderson' is not one of 'vcab3', 'tsit5', 'bs3', 'euler' for variant "
            "'neural_ode'",
        ),
        (
            {"variant": "neural_ode", "dynamics": "f - z"},
            "model.dynamics: 'f - z' is not allowed; choose one of f_minus_z, f",
        ),
        ({"dynamics": "f"}, "model.dynamics: not an option of variant 'skip_reg'"),
        ({"adjoint": "backprop"}, "model.adjoint='backprop' is not one of 'gmres', 'fixed_point'"),
        ({"adjoint": "adjoint"}, "model.adjoint: 'adjoint' is not allowed; choose one of"),
    ],
)
def test_bad_neural_ode_options_are_one_line_naming_the_key_and_the_choices(model, message):
    with pytest.raises(ConfigError) as err:
        validate({"model": model})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("adjoint", ["continuous", "backprop"])
def test_a_training_step_frees_its_graph(adjoint):
    """Once the step's output is dropped, its statistics are freed, and with them the graph
    whose backward node and hook hold them: no reference cycle runs through autograd's graph
    (one kept every step's graph for good, 2 MB a step for mnist_dense's batch of 256 with
    backprop)."""
    torch.manual_seed(0)
    f = TanhCell(6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = NeuralODE(f, adjoint=adjoint, abstol=1e-6, reltol=1e-6)(x)
    out.z.square().sum().backward()
    stats = weakref.ref(out.stats)
    assert stats().backward_nvjp > 1
    del out
    gc.collect()
    assert stats() is None


@pytest.mark.parametrize(("dynamics", "shift"), [("f_minus_z", 1.0), ("f", 0.0)])
def test_the_output_is_f_at_the_closed_form_state_of_each_dynamics(dynamics, shift):
    """dz/dt = M z + x from 0 (M = A - I for f_minus_z, A for f) reaches
    z(t1) = M^-1 (exp(M t1) - I) x; the output is f(z(t1), x) and the residual f - z there."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64) / 2
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t1 = 1.5
    tol = {"abstol": 1e-11, "reltol": 1e-11}
    layer = NeuralODE(LinearCell(a.clone()), t1=t1, dynamics=dynamics, solver="tsit5", **tol)
    with torch.no_grad():
        out = layer(x)
    z = linear_ode_solution(a - shift * torch.eye(4, dtype=torch.float64), x, t1)
    torch.testing.assert_close(out.z, z @ a.T + x, rtol=0, atol=1e-8)
    rms = (z @ a.T + x - z).square().mean(1).sqrt()
    torch.testing.assert_close(out.stats.residual, rms, rtol=0, atol=1e-8)


def test_a_module_in_bfloat16_takes_its_state_in_bfloat16_and_integrates_in_float32():
    """Outside autocast a bfloat16 module gets the state in its own dtype; the integration
    keeps float32 and lands near the float32 module's answer."""
    torch.manual_seed(0)
    cell = TanhCell(4)
    x = torch.randn(3, 4)
    with torch.no_grad():
        full = NeuralODE(cell, solver="tsit5", abstol=1e-4, reltol=1e-4)(x).z
        low = NeuralODE(cell.to(torch.bfloat16), solver="tsit5", abstol=1e-4, reltol=1e-4)(
            x.to(torch.bfloat16)
        ).z
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0, atol=3e-2)


def test_a_bfloat16_modules_residual_is_measured_in_float32_as_a_deqs():
    """A bfloat16 module's residual ||f(z(t1), x) - z(t1)|| is judged in float32, as a DEQ's
    solve judges it, not rounded to bfloat16's three digits."""
    torch.manual_seed(0)
    cell = TanhCell(4).to(torch.bfloat16)
    with torch.no_grad():
        out = NeuralODE(cell, solver="tsit5")(torch.randn(3, 4, dtype=torch.bfloat16))
    assert out.z.dtype == torch.bfloat16 and out.stats.residual.dtype == torch.float32


@pytest.mark.parametrize("solver", INTERVAL_SOLVERS)
def test_a_tolerance_past_float32_s_range_integrates_a_float32_state_as_a_float64_one(solver):
    """abstol=1e300 failed in torch's full_like on a float32 state; its steps are now those of
    a float64 integration, which takes the same tolerance."""
    torch.manual_seed(0)
    cell = TanhCell(4)
    x = torch.randn(3, 4)
    with torch.no_grad():
        wide = NeuralODE(cell.double(), solver=solver, abstol=1e300, reltol=1e300)(x.double())
        narrow = NeuralODE(cell.float(), solver=solver, abstol=1e300, reltol=1e300)(x)
    assert narrow.stats.nfe == wide.stats.nfe
    torch.testing.assert_close(narrow.z.double(), wide.z, rtol=0, atol=1e-4)


@pytest.mark.parametrize("adjoint", ["continuous", "backprop"])
def test_a_batch_of_no_samples_integrates_nothing_and_differentiates(adjoint):
    """An empty batch: an empty output, the output's one evaluation, no step, zero gradients."""
    torch.manual_seed(0)
    f = TanhCell(4).double()
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    out = NeuralODE(f, adjoint=adjoint)(x)
    assert out.z.shape == (0, 4) and (out.stats.nfe, out.stats.steps) == (1, 0)
    out.z.sum().backward()
    assert x.grad.shape == (0, 4) and float(f.state.weight.grad.abs().sum()) == 0.0


def test_a_one_dimensional_x_is_refused_not_integrated_as_a_batch_of_scalars():
    """x of shape (D,) made a state of shape (D,), whose statistics had D entries (one per
    value, as a batch of D samples); it is refused as the DEQ refuses it."""
    with pytest.raises(ValueError, match=r"x of shape \(4,\) gives a state of shapes \[\(4,\)\]"):
        NeuralODE(TanhCell(4))(torch.zeros(4))


def test_a_non_positive_t1_and_a_plain_function_for_the_continuous_adjoint_are_refused():
    """t1 must be > 0; the continuous adjoint differentiates f.parameters(), so a plain
    function is a TypeError naming adjoint='backprop', which takes it."""
    with pytest.raises(ValueError, match=r"t1=0.0 must be a number > 0"):
        NeuralODE(TanhCell(3), t1=0.0)
    with pytest.raises(TypeError, match="needs f as an nn.Module, got function.*'backprop'"):
        NeuralODE(lambda z, x: torch.tanh(z + x))
    out = NeuralODE(lambda z, x: torch.tanh(z + x), adjoint="backprop")(torch.ones(2, 3))
    assert out.z.shape == (2, 3)


class Spin(Exception):
    """An integration that went on past the evaluations it could need."""


@pytest.mark.parametrize("solver", INTERVAL_SOLVERS)
def test_a_step_too_small_to_move_t_is_an_error_naming_it_not_a_spin_to_max_steps(solver):
    """dy/dt = y^2 from y = 1 blows up at t = 1: the steps shrink until t + h rounds to t. The
    integration stops there naming the step size, where it went on to max_steps on steps that
    left t in place, or to an inf state whose NaN step ended it as if at t1 (a guard on the
    evaluations fails the test instead of waiting for a billion steps)."""
    calls = 0

    def field(y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 5_000:
            raise Spin(f"{calls} evaluations at a blow-up")
        return y * y

    y0 = torch.ones(1, 2, dtype=torch.float64)
    stuck = (
        rf"the {solver} integration's step size fell to \S+ at t=(0\.99|1\.0)\d* of t1=2, too "
        r"small to move t \(its solution may blow up there\); max_steps cannot help"
    )
    with pytest.raises(RuntimeError, match=stuck):
        integrate(field, y0, 2.0, solver, Termination(1e-3, 1e-3), 10**9)


@pytest.mark.parametrize("solver", INTERVAL_SOLVERS)
@pytest.mark.parametrize(("y0", "rate", "at"), [(1e30, -1.0, "0"), (5e18, 1.0, "1")])
def test_a_float32_state_whose_norm_overflows_is_an_error_not_a_nan_endpoint(solver, y0, rate, at):
    """dy/dt = rate y from y0 in float32 (from 1e30 down, or from 5e18 up past 1e19): the state
    is finite all the way, but the squares of its norms overflow, the error ratio is 0 or
    inf / inf and the step size NaN; the integration returned a NaN state or an uncontrolled
    one as its endpoint, it now names the overflow. In float64 it lands on exp(rate) y0; a NaN
    field still gives a NaN endpoint (training's non-finite step), not this error."""
    start = torch.full((1, 4), y0)
    overflow = (
        rf"the {solver} integration's state or field at t={at} of t1=1 is finite but its norms "
        r"overflow \(entries past about 2e\+19 in torch.float32\), which leaves its steps without "
        "error control"
    )
    with pytest.raises(RuntimeError, match=overflow):
        integrate(lambda y: rate * y, start, 1.0, solver, Termination(1e-3, 1e-3), 1000)
    end = integrate(lambda y: rate * y, start.double(), 1.0, solver, Termination(1e-3, 1e-3), 1000)
    torch.testing.assert_close(end.y, start.double() * math.exp(rate), rtol=0.05, atol=0)
    nan = integrate(lambda y: y * math.nan, start, 1.0, solver, Termination(1e-3, 1e-3), 1000)
    assert nan.y.isnan().all()


@pytest.mark.parametrize("solver", ["tsit5", "bs3", "euler"])
def test_norms_that_overflow_midway_stop_the_integration_where_its_step_size_turns_nan(solver):
    """dy/dt = y from 5e18 to t1=10 in float32: once the norms overflow (past t = 1.3) the
    error ratio turns a step size NaN, and the integration stops there, naming a t before t1."""
    start = torch.full((1, 4), 5e18)
    with pytest.raises(RuntimeError, match=r"state or field at t=\S+ of t1=10 ") as info:
        integrate(lambda y: y, start, 10.0, solver, Termination(1e-3, 1e-3), 1000)
    assert 0 < float(re.search(r"at t=(\S+) of", str(info.value)).group(1)) < 10


@pytest.mark.parametrize("adjoint", ["continuous", "backprop"])
def test_functional_call_with_other_tensors_differentiates_those_tensors(adjoint):
    """torch.func.functional_call with a parameter dict (a second copy of the weights, and a
    doubled input map in place of a frozen one) gives the gradients of a module that holds
    those weights, as backprop through the steps does: the continuous adjoint's backward, run
    after the call has put f's own tensors back, integrates f with the call's tensors."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = NeuralODE(TanhCell(6).double(), adjoint=adjoint, abstol=1e-9, reltol=1e-9)
    layer.f.input.requires_grad_(False)
    tensors = {name: p.detach() * 1.5 for name, p in layer.named_parameters()}
    trained = {name: t.requires_grad_() for name, t in tensors.items() if "input" not in name}
    out = torch.func.functional_call(layer, tensors, (x,))
    grads = torch.autograd.grad(out.z.square().sum(), list(trained.values()))
    reference = NeuralODE(TanhCell(6).double(), adjoint="backprop", abstol=1e-9, reltol=1e-9)
    reference.load_state_dict(tensors)
    reference.f.input.requires_grad_(False)
    expected = torch.autograd.grad(
        reference(x).z.square().sum(), [p for p in reference.parameters() if p.requires_grad]
    )
    assert (
        relative(
            torch.cat([g.flatten() for g in grads]), torch.cat([e.flatten() for e in expected])
        )
        < 1e-6
    )


class ConditionedCell(TanhCell):
    """TanhCell scaled by a context f holds as an attribute: f(z, x) = tanh(W z + U x + b) * c."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.context = torch.ones(())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return super().forward(z, x) * self.context


@pytest.mark.parametrize(
    ("context", "named"),
    [("encoder", r"a tensor of shape \(6(, 6)?\)"), ("x", "x itself"), ("frozen", None)],
)
def test_a_context_f_closes_over_is_refused_by_the_continuous_adjoint_naming_it(context, named):
    """A context set on f from another layer's output (or from x) reached the continuous
    adjoint's gradient through the output's evaluation of f alone: the encoder's weights were
    3% off backprop's and x's 1.6%, silently. It is refused, naming what f depends on and
    adjoint='backprop'; a context needing no gradient is taken, its gradients backprop's."""
    torch.manual_seed(0)
    f = ConditionedCell(6).double()
    encoder = nn.Linear(6, 6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    contexts = {
        "encoder": lambda: 1 + 0.5 * torch.tanh(encoder(x)),
        "x": lambda: 1 + 0.5 * x,
        "frozen": lambda: 1 + 0.5 * x.detach(),
    }
    grads = {}
    for adjoint in ("continuous", "backprop"):
        f.context = contexts[context]()
        layer = NeuralODE(f, adjoint=adjoint, solver="tsit5", abstol=1e-10, reltol=1e-10)
        if named and adjoint == "continuous":
            with pytest.raises(ValueError, match=rf"also depends on {named} .*'backprop'"):
                layer(x)
            continue
        out = layer(x)
        grads[adjoint] = torch.autograd.grad(out.z.square().sum(), [x, *f.parameters()])
    if not named:
        for a, b in zip(grads["continuous"], grads["backprop"], strict=True):
            assert relative(a, b) < 1e-8


@pytest.mark.parametrize("backward_within", [True, False])
def test_within_the_caller_s_parametrize_cached_the_continuous_adjoint_differentiates_weights(
    backward_within,
):
    """The caller's parametrize.cached() keeps each weight as first computed: a weight norm
    first computed within the continuous adjoint's integration was kept without its graph, and
    its g and v got gradients 96-100% off. The layer computes it on entry, and the gradients
    are backprop's, with the backward within the cache or after it."""
    torch.manual_seed(0)
    f = TanhCell(6).double()
    nn.utils.parametrizations.weight_norm(f.state)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *f.parameters()]
    options = {"solver": "tsit5", "abstol": 1e-10, "reltol": 1e-10}
    reference = NeuralODE(f, adjoint="backprop", **options)
    expected = torch.autograd.grad(reference(x).z.square().sum(), params)
    with nn.utils.parametrize.cached():
        loss = NeuralODE(f, **options)(x).z.square().sum()
        if backward_within:
            got = torch.autograd.grad(loss, params)
    if not backward_within:
        got = torch.autograd.grad(loss, params)
    for a, b in zip(got, expected, strict=True):
        assert relative(a, b) < 1e-8
