"""The paper's models: parameter counts, forward/backward of every preset and variant with a
continuous and a discrete solver, batch independence (group norm), dropout masks, config errors,
and the public names' docstrings and types."""

import dataclasses
import functools
import inspect
import io
import math
import pickle
import re
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydeq import DEQ, NeuralODE, models
from raydeq.bench.suites.step_cost import OpCounter
from raydeq.datasets import mnist10k
from raydeq.models import PRESETS, VARIANTS, build, layers, resolve
from raydeq.models.classifier import EquilibriumClassifier
from raydeq.models.dense import DenseCell, DenseConfig
from raydeq.models.layers import VariationalDropout2d, conv, group_norm
from raydeq.models.mdeq import MDEQConfig, MultiscaleCell, mdeq_parts
from raydeq.training.config import trained_settings, validate
from raydeq.training.objective import Objective

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches: thread sync dominates

# Table 1 / Table 2 of the paper: (vanilla and skip_reg, skip).
PAPER_COUNTS = {
    "cifar10_small": (163_546, 200_122),
    "cifar10_large": (10.63e6, 11.19e6),
    "imagenet_small": (17.91e6, 18.47e6),
}
# Batch and spatial size per preset for the CPU forward/backward (ImageNet at 64x64).
SIZES = {
    "mnist_dense": (4, 28),
    "mnist_mdeq": (2, 28),
    "cifar10_small": (2, 32),
    "cifar10_large": (2, 32),
    "imagenet_small": (2, 64),
}
# The two-scale MNIST MDEQ (channels 8 / 16 at 28x28) on which Euler's cycling was found.
CYCLING_MDEQ = dataclasses.replace(
    PRESETS["mnist_mdeq"],
    parts=functools.partial(
        mdeq_parts,
        MDEQConfig(
            channels=(8, 16),
            head_channels=(4, 8),
            final_channels=32,
            in_channels=1,
            expansion=2,
            groups=4,
            dropout=0.1,
        ),
    ),
)
# Bounded work for the large presets: a few solver steps and GMRES iterations suffice to
# exercise every code path; convergence itself is tested on small cells in test_deq.py.
BOUNDED = {"max_steps": 4, "adjoint_options": {"max_iters": 4}}
BOUNDED_ODE = {"abstol": 1.0, "reltol": 1.0}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_dense_parameter_counts_are_exact():
    for variant, expected in [
        ("vanilla", 134_538),
        ("skip_reg", 134_538),
        ("neural_ode", 134_538),
        ("skip", 151_050),
    ]:
        assert n_params(build({"model": "mnist_dense", "variant": variant})) == expected


def test_the_dense_skip_predictor_is_a_relu_of_an_affine_map():
    """g(x) = relu(W x + b), 128 -> 128: like every state relu(W1 z) + relu(W2 x) of the dense
    cell, its prediction is nonnegative, and it is exactly zero where W x + b is negative."""
    torch.manual_seed(0)
    skip = build({"model": "mnist_dense", "variant": "skip"}).layer.skip
    weight, bias = (p.detach() for p in skip.parameters())
    assert weight.shape == (128, 128) and bias.shape == (128,)
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(skip(x), torch.clamp(x @ weight.T + bias, min=0))


def test_the_dense_cell_adds_two_rectified_maps():
    """f(z, x) = relu(W1 z) + relu(W2 x), not relu(W1 z + W2 x): with W1 z < 0 < W2 x, f = W2 x."""
    cell = DenseCell(2)
    with torch.no_grad():
        cell.state.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        cell.inject.weight.copy_(torch.tensor([[0.0, 2.0], [-3.0, 0.0]]))
    z, x = torch.tensor([[-1.0, 2.0]]), torch.tensor([[-1.0, 0.5]])
    # W1 z = (-1, -2): both rectified to 0; W2 x = (1, 3)
    torch.testing.assert_close(cell(z, x), torch.tensor([[1.0, 3.0]]), rtol=0, atol=0)
    torch.testing.assert_close(cell(-z, x), torch.tensor([[2.0, 5.0]]), rtol=0, atol=0)


def test_the_dense_model_embeds_flattened_images_by_a_rectified_affine_map_and_reads_z_star():
    """stem(images) = relu(W vec(image) + b); logits are the head's affine map of the layer's
    equilibrium z* = f(z*, x), not of its initial guess."""
    torch.manual_seed(25)
    model = build({"model": "mnist_dense", "variant": "skip", "abstol": 1e-6, "reltol": 0.0})
    images = torch.randn(3, 1, 28, 28)
    linear = model.stem[1]
    x = torch.clamp(images.reshape(3, 784) @ linear.weight.T + linear.bias, min=0)
    torch.testing.assert_close(model.stem(images), x)
    logits, out = model(images)
    with torch.no_grad():
        residual = (model.layer.f(out.z, x) - out.z).abs().max()
    assert float(residual) < 1e-5
    head = model.head
    torch.testing.assert_close(logits, out.z @ head.weight.T + head.bias)


def conv_params(c_in: int, c_out: int, kernel: int, bias: bool = False) -> int:
    """Weights (and bias) of a kernel x kernel convolution."""
    return c_in * c_out * kernel**2 + (c_out if bias else 0)


def norm_params(channels: int) -> int:
    """An affine group norm's scale and shift."""
    return 2 * channels


def test_cifar10_small_parameter_counts_are_exact_by_layer():
    """MDEQ-small for CIFAR-10 counted by hand from its layer shapes (channels 24 / 24,
    expansion 5, head 8 / 16 widened 4x, 200 final channels, 3x3 upsampling, no weight norm):
    the README's 164,170 / 200,746, which a 5% tolerance around the paper's counts misses."""
    c, inner = 24, 24 * 5
    stem = conv_params(3, c, 3) + conv_params(c, c, 3) + conv_params(c, c, 1) + 3 * norm_params(c)
    block = conv_params(c, inner, 3) + norm_params(inner) + conv_params(inner, c, 3)
    block += 2 * norm_params(c)
    down = up = conv_params(c, c, 3) + norm_params(c)  # 3x3 stride-2 / 3x3 then nearest
    post = conv_params(c, c, 1) + norm_params(c)
    cell = 2 * block + down + up + 2 * post

    def bottleneck(c_in: int, planes: int) -> int:
        out = 4 * planes
        body = conv_params(c_in, planes, 1) + conv_params(planes, planes, 3)
        body += conv_params(planes, out, 1) + 2 * norm_params(planes) + norm_params(out)
        return body + conv_params(c_in, out, 1) + norm_params(out)  # shortcut to 4 * planes

    head = bottleneck(c, 8) + bottleneck(c, 16)
    head += conv_params(32, 64, 3, bias=True) + norm_params(64)
    head += conv_params(64, 200, 1, bias=True) + norm_params(200) + 200 * 10 + 10
    skip_inner = 24 * 3
    skip = conv_params(c, skip_inner, 3) + norm_params(skip_inner) + conv_params(skip_inner, c, 3)
    skip += 2 * norm_params(c) + down
    vanilla = stem + cell + head
    assert (vanilla, vanilla + skip) == (164_170, 200_746)
    for variant, expected in [
        ("vanilla", vanilla),
        ("skip_reg", vanilla),
        ("skip", vanilla + skip),
    ]:
        assert n_params(build({"model": "cifar10_small", "variant": variant})) == expected


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("mnist_mdeq", (278_322, 352_626)),
        ("cifar10_large", (10.63e6, 11.19e6)),
        ("imagenet_small", (17.91e6, 18.47e6)),
    ],
)
def test_multiscale_parameter_counts_match_the_readme_to_its_last_digit(name, counts):
    """The README's table: exact for mnist_mdeq, to the printed 0.01M for the large models."""
    vanilla, skip = counts
    got = [n_params(build({"model": name, "variant": v})) for v in ("vanilla", "skip")]
    if name == "mnist_mdeq":
        assert got == [vanilla, skip]
    else:
        assert [round(n / 1e4) for n in got] == [round(vanilla / 1e4), round(skip / 1e4)]


@pytest.mark.parametrize(
    ("name", "scales"),
    [
        ("mnist_mdeq", [(32, 7), (64, 4)]),
        ("cifar10_small", [(24, 32), (24, 16)]),
        ("cifar10_large", [(32, 32), (64, 16), (128, 8), (256, 4)]),
        ("imagenet_small", [(32, 56), (64, 28), (128, 14), (256, 7)]),
    ],
)
def test_the_initial_state_has_each_scale_at_half_the_previous_resolution(name, scales):
    """The stem strides 2x twice for MNIST's 28 and ImageNet's 224, not at all for CIFAR's 32;
    every further scale is ceil(side / 2), with the channels of the preset (channels, side)."""
    preset = PRESETS[name]
    model = build({"model": name, "variant": "vanilla"})
    with torch.no_grad():
        x = model.stem(torch.zeros(2, *preset.input_shape))
        state = model.layer.f.initial_state(x)
    assert [tuple(t.shape) for t in state] == [(2, ch, side, side) for ch, side in scales]
    assert all(not t.any() for t in state)
    skip = build({"model": name, "variant": "skip"}).layer.skip
    with torch.no_grad():
        assert [t.shape for t in skip(x)] == [t.shape for t in state]


def uses_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_mdeq_parameter_counts_match_the_paper_without_batch_norm(name):
    """skip_reg and neural_ode share the vanilla modules (checked on the dense model)."""
    vanilla, skip = PAPER_COUNTS[name]
    vanilla_model = build({"model": name, "variant": "vanilla"})
    skip_model = build({"model": name, "variant": "skip"})
    assert abs(n_params(vanilla_model) / vanilla - 1) < 0.05, n_params(vanilla_model)
    assert abs(n_params(skip_model) / skip - 1) < 0.05, n_params(skip_model)
    assert not uses_batch_statistics(skip_model)


def test_mnist_presets_use_no_batch_statistics():
    for name in ("mnist_dense", "mnist_mdeq"):
        assert not uses_batch_statistics(build({"model": name, "variant": "skip"}))


def cases() -> list[tuple[str, str, str]]:
    """Every preset x variant x {continuous, discrete}; the Neural ODE is continuous only."""
    return [
        (name, variant, solver)
        for name in PRESETS
        for variant in VARIANTS
        for solver in (["vcab3"] if variant == "neural_ode" else ["vcab3", "broyden"])
    ]


@pytest.mark.parametrize(("name", "variant", "solver"), cases())
def test_forward_backward_is_finite(name, variant, solver):
    torch.manual_seed(0)
    batch, size = SIZES[name]
    preset = PRESETS[name]
    cfg = {"model": name, "variant": variant, "solver": solver}
    if variant == "neural_ode":
        cfg |= BOUNDED_ODE if name != "mnist_dense" else {}
    else:
        cfg |= {"pretrain_steps": 0} | (BOUNDED if name != "mnist_dense" else {})
    model = build(cfg)
    images = torch.randn(batch, preset.input_shape[0], size, size)
    labels = torch.randint(0, 10, (batch,))
    logits, out = model(images)
    assert logits.shape == (batch, 1000 if name == "imagenet_small" else 10)
    assert bool(torch.isfinite(logits).all())
    Objective(preset.lambda_skip)(logits, labels, out).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert bool(torch.isfinite(p.grad).all()), pname
    assert out.stats.nfe > 0 and out.stats.residual.shape == (batch,)
    if variant == "neural_ode":
        assert float(out.skip_loss) == 0.0
    else:
        assert out.stats.backward_nvjp > 0
        assert (out.skip_loss.item() > 0) == (variant != "vanilla")


@pytest.mark.parametrize("variant", ["vanilla", "skip", "skip_reg"])
def test_the_gradient_of_the_training_loss_in_every_parameter_matches_a_dense_reference(variant):
    """The objective cross-entropy + 0.7 skip_loss + 0.3 jac_loss of the dense model (float64):
    the gradient of the stem, f, the predictor and the head is the reference's, z* by
    fixed-point iteration differentiated through a dense (I - J)^-1, the skip loss through z*
    and z0, the Jacobian term at a constant z* with the layer's probe."""
    torch.manual_seed(0)
    tight = {"abstol": 1e-12, "reltol": 1e-12, "adjoint_options": {"rtol": 1e-12, "max_iters": 60}}
    cfg = {"model": "mnist_dense", "variant": variant, "solver": "broyden", "jac_reg": True}
    model = build(cfg | tight).double()
    images, labels = torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 4, 7])
    params = list(model.parameters())
    torch.manual_seed(5)
    logits, out = model(images)
    got = torch.autograd.grad(Objective(0.7, 0.3)(logits, labels, out), params)
    f, x = model.layer.f, model.stem(images)
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(200):
            z = f(z, x)
    J = torch.autograd.functional.jacobian(lambda v: f(v, x), z, create_graph=True)
    J = torch.stack([J[b, :, b] for b in range(len(z))])
    # Valued z*, with the implicit function theorem's derivative in everything f reads.
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    z_star = z + torch.linalg.solve(eye - J.detach(), (f(z, x) - z)[..., None])[..., 0]
    loss = F.cross_entropy(model.head(z_star), labels)
    if variant != "vanilla":
        z0 = model.layer.skip(x) if variant == "skip" else f(torch.zeros_like(x), x)
        loss = loss + 0.7 * (f(z_star, x) - z0).abs().mean()
    torch.manual_seed(5)
    probe = torch.randn_like(z)
    loss = loss + 0.3 * torch.einsum("bi,bij->bj", probe, J).pow(2).sum() / z.numel()
    want = torch.autograd.grad(loss, params)
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        assert (a - b).norm() <= 1e-9 * b.norm(), (name, float((a - b).norm() / b.norm()))


def test_multiscale_state_has_one_tensor_per_scale():
    model = build({"model": "cifar10_large", "variant": "vanilla", **BOUNDED}).eval()
    with torch.no_grad():
        _, out = model(torch.randn(1, 3, 32, 32))
    assert [tuple(t.shape) for t in out.z] == [
        (1, 32, 32, 32),
        (1, 64, 16, 16),
        (1, 128, 8, 8),
        (1, 256, 4, 4),
    ]


def test_jacobian_regularisation_on_a_multiscale_model():
    torch.manual_seed(1)
    model = build({"model": "mnist_mdeq", "variant": "skip_reg", "jac_reg": True})
    logits, out = model(torch.randn(2, 1, 28, 28))
    assert out.jac_loss.item() > 0
    (logits.sum() + out.jac_loss).backward()
    cell_grads = [p.grad for p in model.layer.f.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in cell_grads)


@pytest.mark.parametrize("solver", ["vcab3", "broyden"])
def test_a_sample_has_the_same_equilibrium_alone_and_in_a_batch(solver):
    """Group norm only: z* of sample 0 does not depend on the samples it is batched with."""
    torch.manual_seed(2)
    model = build({"model": "mnist_mdeq", "variant": "skip_reg", "solver": solver})
    model = model.double().eval()
    images = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        _, alone = model(images[:1])
        _, batched = model(images)
    for a, b in zip(alone.z, batched.z, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-10)


def test_variational_dropout_keeps_one_mask_per_forward_pass():
    cfg = MDEQConfig(channels=(8, 8), head_channels=(4, 4), final_channels=8, dropout=0.5)
    cell = MultiscaleCell(cfg).train()
    x = torch.randn(2, 8, 8, 8)
    z = [torch.randn_like(t) for t in cell.initial_state(x)]
    first = cell(z, x)
    again = cell(z, x)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for m in cell.modules():
        if isinstance(m, VariationalDropout2d):
            m.reset()
    redrawn = cell(z, x)
    assert any(not torch.equal(a, b) for a, b in zip(first, redrawn, strict=True))
    cell.eval()
    inference = cell(z, x)
    cell_no_drop = MultiscaleCell(dataclasses.replace(cfg, dropout=0.0))
    cell_no_drop.load_state_dict(cell.state_dict())
    for a, b in zip(inference, cell_no_drop.eval()(z, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_model_forward_draws_fresh_masks():
    torch.manual_seed(3)
    model = build({"model": "mnist_mdeq", "variant": "vanilla", **BOUNDED})
    images = torch.randn(2, 1, 28, 28)
    drops = [m for m in model.modules() if isinstance(m, VariationalDropout2d)]
    model(images)
    first = [m.mask.clone() for m in drops]
    model(images)
    assert any(not torch.equal(a, m.mask) for a, m in zip(first, drops, strict=True))


@pytest.mark.parametrize(
    ("layer", "options"), [(DEQ, {"max_steps": 4}), (NeuralODE, BOUNDED_ODE)], ids=["deq", "node"]
)
def test_a_layer_called_alone_draws_fresh_masks_as_a_model_does(layer, options):
    """A DEQ or Neural ODE called on its own draws new masks on every forward pass, as a
    model's forward does: masks kept from the last call would drop the same units of every
    batch of a training run."""
    torch.manual_seed(3)
    cfg = MDEQConfig(channels=(8, 8), head_channels=(4, 4), final_channels=8, dropout=0.5)
    deq = layer(MultiscaleCell(cfg), **options).train()
    x = torch.randn(2, 8, 8, 8)
    drops = [m for m in deq.modules() if isinstance(m, VariationalDropout2d)]
    with torch.no_grad():
        deq(x)
        first = [m.mask.clone() for m in drops]
        deq(x)
    assert any(not torch.equal(a, m.mask) for a, m in zip(first, drops, strict=True))


class MaskedCell(nn.Module):
    """f(z, x) = tanh(W z * mask + x), with a fixed mask held as a registered buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4, bias=False)
        nn.init.normal_(self.linear.weight, std=0.2)
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0, 0.0]))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) * self.mask + x)


@pytest.mark.parametrize(
    ("layer", "options"), [(DEQ, {"max_steps": 40}), (NeuralODE, BOUNDED_ODE)], ids=["deq", "node"]
)
def test_a_layer_keeps_a_buffer_named_mask_when_it_draws_new_dropout_masks(layer, options):
    """Only the variational dropouts' masks are discarded before a forward pass: a cell's own
    buffer that is called `mask` is a setting of f, kept through every call."""
    torch.manual_seed(4)
    cell = MaskedCell()
    deq = layer(cell, **options).train()
    with torch.no_grad():
        deq(torch.randn(3, 4))
        deq(torch.randn(3, 4))
    torch.testing.assert_close(cell.mask, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert "mask" in dict(cell.named_buffers())


class PaddedAttentionCell(nn.Module):
    """f(z, x) = LayerNorm(0.3 tanh(attention(z)) + x) over sequences (B, T, D), whose padding
    is a key_padding_mask the user sets as a plain attribute `mask` before each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.mask: torch.Tensor | None = None

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attention(z, z, z, key_padding_mask=self.mask, need_weights=False)
        return self.norm(0.3 * torch.tanh(a) + x)


@pytest.mark.parametrize(
    ("layer", "options"),
    [(DEQ, {"abstol": 1e-12, "reltol": 0.0, "max_steps": 200}), (NeuralODE, {"t1": 30.0})],
    ids=["deq", "node"],
)
def test_a_layer_keeps_a_plain_attribute_named_mask_of_its_cell(layer, options):
    """A cell's own plain tensor attribute `mask` (here a padding mask) is kept through a
    forward pass: taken for a variational dropout's mask, it was set to None, so that padded
    keys were attended to and z* was that of another function (0.13 off the fixed point
    iteration's at the valid positions)."""
    torch.manual_seed(0)
    cell = PaddedAttentionCell().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    cell.mask = padding
    with torch.no_grad():
        z = layer(cell, **options)(x).z
    assert cell.mask is padding
    reference = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(200):
            reference = cell(reference, x)
    if layer is DEQ:
        torch.testing.assert_close(z, reference, rtol=0, atol=1e-10)
    # The padded sample's valid positions do not see its padding.
    cell.mask = None
    with torch.no_grad():
        alone = layer(cell, **options)(x[1:, :3]).z
    tol = 1e-10 if layer is DEQ else 1e-5
    torch.testing.assert_close(z[1, :3], alone[0], rtol=0, atol=tol)


def test_weight_normalised_convolutions_scale_each_output_channel():
    """weight = g * v / ||v|| with one norm per output channel (MDEQ's weight_norm, dim 0)."""
    layer = conv(3, 5, normalize=True)
    v = layer.parametrizations.weight.original1.detach()
    g = layer.parametrizations.weight.original0.detach()
    assert g.numel() == 5
    norms = v.flatten(1).norm(dim=1)
    torch.testing.assert_close(
        layer.weight.detach(), g.reshape(5, 1, 1, 1) * v / norms[:, None, None, None]
    )


def test_a_weight_normalised_model_pickles_and_saves_whole_giving_the_same_logits():
    """torch refuses to pickle a parametrized module, so torch.save(model) and pickle of every
    weight-normalised preset failed; the copy keeps the weight norm's own g and v (the same
    state_dict keys, so checkpoints load) and gives the original's logits to the bit."""
    torch.manual_seed(0)
    model = build({"model": "mnist_mdeq", "variant": "skip", **BOUNDED}).eval()
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        logits, _ = model(images)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert copy.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(copy.state_dict()[key], value), key
        with torch.no_grad():
            assert torch.equal(copy(images)[0], logits)
        layer = copy.layer.f.blocks[0].conv1
        layer.parametrizations.weight.original0.data.mul_(2)  # g scales the weight it computes
        torch.testing.assert_close(
            layer.weight, 2 * model.layer.f.blocks[0].conv1.weight, rtol=0, atol=0
        )


def test_a_convolution_under_any_parametrization_pickles_with_its_originals():
    """Only a lone weight norm on the weight was pickled: an orthogonal 1 x 1 convolution
    pickled but failed to load ("'_Orthogonal' object has no attribute 'dim'"), a parametrized
    bias failed to pickle (KeyError 'weight'), and a spectral norm's copy ran a power iteration
    as it loaded (its u 0.007 off the original's). Each copy now holds the original's
    parametrizations, state and outputs exactly, and a weight-normalised copy still loads
    weight_g and weight_v."""
    torch.manual_seed(0)
    spectral = nn.utils.parametrizations.spectral_norm(conv(4, 4))
    orthogonal = nn.utils.parametrizations.orthogonal(conv(4, 4, kernel=1))
    both = conv(4, 4, bias=True, normalize=True)
    nn.utils.parametrize.register_parametrization(both, "bias", nn.Tanh())
    images = torch.randn(2, 4, 5, 5)
    for layer in (spectral, orthogonal, both):
        copy = pickle.loads(pickle.dumps(layer))
        kinds = {k: [type(m) for m in v] for k, v in layer.parametrizations.items()}
        assert {k: [type(m) for m in v] for k, v in copy.parametrizations.items()} == kinds
        assert copy.state_dict().keys() == layer.state_dict().keys()
        for key, value in layer.state_dict().items():
            assert torch.equal(copy.state_dict()[key], value), key
        layer.eval(), copy.eval()
        with torch.no_grad():
            assert torch.equal(copy(images), layer(images))
    old = {"weight_g": torch.rand(4, 1, 1, 1), "weight_v": torch.randn(4, 4, 3, 3)}
    copy.load_state_dict(old | {"parametrizations.bias.original": torch.zeros(4)})
    assert torch.equal(copy.parametrizations.weight.original0, old["weight_g"])


class EarlierReduction:
    """Pickles as the weight-normalised convolutions were first pickled: the plain state and
    the weight's parametrization, given to layers._weight_normalised."""

    def __init__(self, layer: nn.Module) -> None:
        _, (self.state, parametrizations) = layer.__reduce_ex__(4)
        self.weight = parametrizations["weight"]

    def __reduce__(self) -> tuple:
        return layers._weight_normalised, (self.state, self.weight)


def test_a_weight_normalised_convolution_pickled_by_the_earlier_reduction_still_loads():
    """torch.save(model) files of weight-normalised models name layers._weight_normalised with
    the weight's parametrization alone; they load with the same g, v, state and outputs."""
    torch.manual_seed(0)
    layer = conv(3, 4, normalize=True)
    copy = pickle.loads(pickle.dumps(EarlierReduction(layer)))
    assert copy.state_dict().keys() == layer.state_dict().keys()
    for key, value in layer.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    images = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(copy(images), layer(images))


def test_a_model_saved_whole_before_its_stem_recorded_the_smallest_side_still_runs():
    """A cifar10_small saved by torch.save(model) before its stem recorded the smallest image
    side it takes failed at its first call ("'Stem' object has no attribute 'smallest_side'");
    it loads and gives the logits it gave."""
    torch.manual_seed(0)
    model = build({"model": "cifar10_small", "variant": "vanilla", **BOUNDED}).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, _ = model(images)
    del model.stem.smallest_side  # as the stem was pickled then
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    assert "smallest_side" not in vars(old.stem)
    with torch.no_grad():
        assert torch.equal(old(images)[0], logits)


def test_convolutions_start_from_a_normal_of_standard_deviation_one_hundredth():
    torch.manual_seed(22)
    layer = conv(64, 64, bias=True)
    w = layer.weight.detach()
    assert (
        abs(float(w.std()) / 0.01 - 1) < 0.02 and abs(float(w.mean())) < 3 * 0.01 / w.numel() ** 0.5
    )
    assert abs(float(layer.bias.detach().std()) / 0.01 - 1) < 0.3


def test_group_norm_takes_the_largest_common_divisor_of_channels_and_groups():
    """gcd: 24 channels in 8 groups of 3, 12 in 4 of 3, 14 in 2 of 7; each group of a sample is
    normalised to mean 0 and variance 1 over its channels and pixels."""
    assert [group_norm(c, 8).num_groups for c in (24, 12, 14, 200)] == [8, 4, 2, 8]
    torch.manual_seed(23)
    h = 3 + 2 * torch.randn(2, 12, 5, 5, dtype=torch.float64)
    out = group_norm(12, 8).double()(h).reshape(2, 4, 3 * 25)
    torch.testing.assert_close(
        out.mean(-1), torch.zeros(2, 4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        out.var(-1, unbiased=False), torch.ones(2, 4, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_variational_dropout_drops_a_fraction_p_and_rescales_by_one_over_one_minus_p():
    """Each element of the mask is 0 with probability p, else 1 / (1 - p): E[drop(h)] = h; the
    fraction dropped of 40,000 elements lies within 5 standard deviations of p."""
    torch.manual_seed(24)
    p, n = 0.1, 40_000
    drop = VariationalDropout2d(p).train()
    h = torch.ones(4, 10, 1000, dtype=torch.float64)
    out = drop(h)
    kept = out != 0
    torch.testing.assert_close(
        out[kept], torch.full_like(out[kept], 1 / (1 - p)), rtol=1e-15, atol=0
    )
    fraction = 1 - float(kept.double().mean())
    assert abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / n), fraction
    torch.testing.assert_close(drop(2 * h), 2 * out, rtol=0, atol=0)  # the same mask again


def test_a_dropout_mask_is_drawn_alike_for_channels_last_and_contiguous_states():
    """The same seed drops the same elements of a state whatever its memory layout: a mask
    drawn like a channels_last state (as a warm-up's Skip DEQ z0 = g(x) of channels_last
    images is) took the random numbers in memory order, another mask and another run."""
    h = torch.ones(2, 8, 3, 3)
    masks = []
    for state in (h, h.contiguous(memory_format=torch.channels_last)):
        torch.manual_seed(29)
        masks.append(VariationalDropout2d(0.5).train()(state))
    torch.testing.assert_close(masks[1], masks[0], rtol=0, atol=0)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_a_dropout_probability_outside_zero_to_one_is_refused(p):
    with pytest.raises(ValueError, match=rf"dropout probability must lie in \[0, 1\), got {p}"):
        VariationalDropout2d(p)


def test_a_dropout_mask_is_redrawn_for_an_input_of_another_shape_or_dtype():
    """Within one forward pass the mask is kept; a batch of another size, or another dtype,
    gets a mask of its own shape and dtype (not the last one broadcast or promoted)."""
    torch.manual_seed(28)
    drop = VariationalDropout2d(0.5).train()
    drop(torch.ones(2, 3, 4, 4))
    out = drop(torch.ones(3, 3, 4, 4))
    assert out.shape == (3, 3, 4, 4) and drop.mask.shape == (3, 3, 4, 4)
    drop(torch.ones(1, 3, 4, 4, dtype=torch.float64))
    out = drop(torch.ones(1, 3, 4, 4, dtype=torch.float16))
    assert out.dtype == drop.mask.dtype == torch.float16


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model": "resnet"}, "model='resnet' is not one of 'mnist_dense'"),
        ({"model": "mnist_dense", "variant": "deep"}, "variant='deep' is not one of 'vanilla'"),
        ({"model": "mnist_dense", "solver": "rk4"}, "solver='rk4' is not one of 'vcab3'"),
        (
            {"model": "mnist_dense", "variant": "neural_ode", "solver": "broyden"},
            "solver='broyden' is not one of 'vcab3', 'tsit5', 'bs3'",
        ),
        (
            {"model": "mnist_dense", "tolerance": 1},
            r"\['tolerance'\]; allowed keys: model, variant, solver, abstol",
        ),
        (
            {"model": "mnist_dense", "variant": "neural_ode", "pretrain_steps": 3},
            r"unknown NeuralODE option\(s\) \['pretrain_steps'\]",
        ),
        (
            {"model": "mnist_dense", "variant": "neural_ode", "adjoint": "gmres"},
            "adjoint='gmres' is not one of 'continuous', 'backprop' for variant 'neural_ode'",
        ),
        ({"model": "mnist_dense", "init": "skip"}, r"unknown DEQ option\(s\) \['init'\]"),
        (
            {"model": "mnist_dense", "solver": "anderson", "solver_options": {"mm": 3}},
            "solver='anderson' takes no option 'mm'; its options are m, lam, beta",
        ),
        (
            {"model": "mnist_dense", "adjoint_options": {"restrt": 5}},
            "adjoint='gmres' takes no option 'restrt'; its options are rtol, atol, max_iters, "
            "restart",
        ),
    ],
)
def test_bad_configs_name_the_value_and_the_choices(cfg, message):
    with pytest.raises(ValueError, match=message):
        build(cfg)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"solver": "anderson", "solver_options": {"mm": 3}}, "takes no option 'mm'"),
        ({"adjoint_options": {"restrt": 5}}, "takes no option 'restrt'"),
    ],
)
def test_resolve_checks_the_solver_and_adjoint_options_without_building(options, message):
    with pytest.raises(ValueError, match=message):
        resolve({"model": "mnist_dense", **options})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"compile": "yes"}, ValueError, "compile='yes' must be True, False, 'graph' or a dict"),
        ({"jac_reg": "true"}, TypeError, "jac_reg='true' must be True or False"),
        ({"divergence": 1}, ValueError, "divergence=1 must be a number > 1"),
        ({"pretrain_depth": 0}, ValueError, "pretrain_depth=0 must be an integer >= 1"),
        ({"variant": "neural_ode", "t1": -1}, ValueError, "t1=-1 must be a number > 0"),
        ({"variant": "neural_ode", "dynamics": "F"}, ValueError, "dynamics='F' is not one of"),
        ({"variant": "neural_ode", "max_steps": 0}, ValueError, "max_steps=0 must be an integer"),
    ],
)
def test_resolve_checks_every_layer_option_as_build_does(options, error, message):
    """resolve, the config's check of its model section, returned compile='yes', t1=-1 or
    jac_reg='true' as resolved options, which build then refused; it refuses them as build
    does, by the layer's own checks."""
    cfg = {"model": "mnist_dense", **options}
    for check in (resolve, build):
        with pytest.raises(error, match=re.escape(message)):
            check(cfg)


def test_options_resolved_or_validated_can_be_changed_without_changing_the_preset():
    """resolve returned the preset's own adjoint_options dict, which a validated config's
    model section held too: tightening it in place (resolved["adjoint_options"]["rtol"] =
    1e-8) set rtol 1e-8 for every later mnist_dense model and config of the process."""
    resolved = resolve({"model": "mnist_dense"})
    resolved["adjoint_options"]["rtol"] = 1e-8
    validate({"model": {"model": "mnist_dense"}}).model.adjoint_options["max_iters"] = 200
    assert build(resolved).layer.adjoint_options == {"rtol": 1e-8, "max_iters": 15}
    assert PRESETS["mnist_dense"].adjoint_options == {"rtol": 5e-3, "max_iters": 15}
    assert build({"model": "mnist_dense"}).layer.adjoint_options == {"rtol": 5e-3, "max_iters": 15}


@pytest.mark.parametrize("variant", ["vanilla", "skip_reg", "neural_ode"])
def test_build_takes_the_model_section_a_checkpoint_records(variant):
    """A checkpoint's manifest records the run's model section with null for each option it
    left unset (t1 of a DEQ, jac_reg and pretrain_steps of a Neural ODE), which build refused
    as unknown layer options; a null layer option is unset, as in a config."""
    cfg = validate({"model": {"model": "mnist_dense", "variant": variant}})
    recorded = trained_settings(cfg)["model"]
    assert None in recorded.values()
    given = {k: v for k, v in recorded.items() if v is not None}
    assert resolve(recorded) == resolve(given) == resolve(cfg.model_options())
    torch.manual_seed(0)
    weights = build(recorded).state_dict()
    torch.manual_seed(0)
    assert all(torch.equal(weights[k], v) for k, v in build(given).state_dict().items())


@pytest.mark.parametrize(
    ("variant", "solver", "settings"),
    [
        ("skip_reg", "euler", {"abstol": 1e-5, "reltol": 1e-5, "max_steps": 200}),
        ("vanilla", "anderson", {"max_steps": 7}),
        ("neural_ode", "tsit5", {"abstol": 1e-5, "t1": 2.0}),
    ],
)
def test_a_trained_models_solve_set_for_prediction_is_that_of_a_model_built_with_it(
    variant, solver, settings
):
    """A solver, tolerances, max_steps or t1 set on a built model's layer predict as a model
    built with them and given its weights does, to the bit, with the same NFE: the README's
    way of changing a trained model's solve without retraining."""
    torch.manual_seed(0)
    model = build({"model": "mnist_dense", "variant": variant}).eval()
    images = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        before = model(images)[1].stats.nfe
        model.layer.solver = solver
        for name, value in settings.items():
            setattr(model.layer, name, value)
        logits, out = model(images)
    given = build({"model": "mnist_dense", "variant": variant, "solver": solver, **settings})
    given.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected, solved = given.eval()(images)
    assert torch.equal(logits, expected) and out.stats.nfe == solved.stats.nfe != before


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: DenseConfig(width=0), ValueError, "width=0 must be an integer >= 1"),
        (lambda: DenseConfig(width=1.5), TypeError, "width=1.5 must be an integer >= 1"),
        (lambda: DenseConfig(in_features=-1), ValueError, "in_features=-1 must be an integer"),
        (lambda: DenseCell(0), ValueError, "width=0 must be an integer >= 1"),
        (lambda: DenseCell(-1), ValueError, "width=-1 must be an integer >= 1"),
        (lambda: MDEQConfig((), (), 8), ValueError, "channels=() needs one channel count"),
        (lambda: MDEQConfig((8, 0), (4, 4), 8), ValueError, "channels[1]=0 must be an integer"),
        (lambda: MDEQConfig((8,), (4.0,), 8), TypeError, "head_channels[0]=4.0 must be an"),
        (lambda: MDEQConfig((8,), (4,), 8, groups=0), ValueError, "groups=0 must be an integer"),
        (lambda: MDEQConfig((8,), (4,), 0), ValueError, "final_channels=0 must be an integer"),
    ],
)
def test_a_model_config_of_a_size_below_one_is_refused_naming_the_field(make, error, message):
    """DenseConfig(width=0) built a model of width 0, width=1.5 failed in torch.empty, an
    MDEQConfig without channels in an IndexError and groups=0 made every group norm one group
    per channel (gcd(c, 0) = c); each is refused where the config is made, naming the field,
    and so is the width of a DenseCell made on its own (0 built a cell of no state, -1 failed
    in torch: "Trying to create tensor with negative dimension -1")."""
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_a_multiscale_config_whose_weight_norm_is_no_bool_is_refused_naming_it():
    """MDEQConfig(weight_norm="no") normalised every weight, as any true value does."""
    with pytest.raises(TypeError, match=re.escape("weight_norm='no' must be True or False")):
        MDEQConfig((8,), (4,), 8, weight_norm="no")


def test_a_config_that_is_not_a_dict_is_named():
    with pytest.raises(TypeError, match="a model config is a dict .* got str 'mnist_dense'"):
        build("mnist_dense")


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_empty_batch_gives_empty_logits_and_a_gradient(variant):
    model = build({"model": "mnist_dense", "variant": variant})
    logits, out = model(torch.zeros(0, 1, 28, 28))
    assert logits.shape == (0, 10) and out.stats.converged.shape == (0,)
    logits.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("name", ["mnist_dense", "mnist_mdeq"])
@pytest.mark.parametrize("variant", ["vanilla", "skip", "skip_reg", "neural_ode"])
def test_a_model_in_half_precision_solves_and_trains(name, variant):
    """model.half() without autocast: f got the solver's float32 state and failed in its first
    matmul; now f and the head see float16, while the solve (or integration) keeps float32."""
    torch.manual_seed(0)
    model = build({"model": name, "variant": variant}).eval()
    half = build({"model": name, "variant": variant})
    half.load_state_dict(model.state_dict())
    half = half.half().eval()
    x = torch.randn(4, 1, 28, 28)
    logits = model(x)[0].detach()  # with the graph, as the half model: z* is f(z*) then
    got, out = half(x.half())
    assert got.dtype == torch.float16 and out.stats.nfe > 1
    assert float((got.detach().float() - logits).abs().max() / logits.abs().max()) < 1e-2
    got.float().sum().backward()
    grads = [p.grad for p in half.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["mnist_dense", "mnist_mdeq"])
@pytest.mark.parametrize("kind", ["list", "numpy", "None"])
def test_images_that_are_no_tensor_are_named_with_the_conversion(name, kind):
    """A list, a numpy array or None failed in the stem with "'list' object has no attribute
    'dim'"; it is a TypeError naming the images' type and torch.as_tensor, after which the
    same pixels classify as the tensor does."""
    model = build({"model": name}).eval()
    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    given = {"list": images.tolist(), "numpy": images.numpy(), "None": None}[kind]
    with pytest.raises(TypeError, match=r"images must be a tensor \(B, \.\.\.\), got "):
        model(given)
    if given is not None:
        converted = torch.as_tensor(given, dtype=torch.float32)
        torch.testing.assert_close(model(converted)[0], model(images)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mnist_dense", "mnist_mdeq"])
def test_byte_images_are_told_to_become_floats_not_the_model_to_become_bytes(name):
    """uint8 images (raw pixels) got the note "convert model (model.to(torch.uint8))", a model
    of integers; the note now names the images' cast alone."""
    model = build({"model": name}).eval()
    with pytest.raises(RuntimeError) as failure:
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert "".join(failure.value.__notes__) == (
        "images is torch.uint8 but model's parameters are torch.float32: give images in "
        "model's dtype (images.to(torch.float32))"
    )


@pytest.mark.parametrize("name", ["mnist_dense", "mnist_mdeq"])
def test_images_of_another_dtype_than_the_model_name_both_dtypes(name):
    """float16 images into a float32 model failed in the stem with torch's message alone; the
    error now names both dtypes and the casts, as a layer's does for x and f. Under autocast
    the same images run, and an error raised there gets no such note."""
    model = build({"model": name}).eval()
    images = torch.randn(2, 1, 28, 28, dtype=torch.float16)
    with pytest.raises(RuntimeError) as failure:
        model(images)
    notes = "".join(failure.value.__notes__)
    assert "images is torch.float16 but model's parameters are torch.float32" in notes
    assert "images.to(torch.float32)" in notes and "model.to(torch.float16)" in notes

    def fails(*_) -> None:
        raise RuntimeError("the layer's own error")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images)[0].shape == (2, 10)
        model.layer.register_forward_hook(fails)
        with pytest.raises(RuntimeError, match="the layer's own error") as failure:
            model(images)
    assert not getattr(failure.value, "__notes__", [])


def test_a_compiled_model_compiles_its_stem_and_head_around_the_layer_s_one_graph_break():
    """model.compile() broke the graph at the layer within the classifier's dtype hint, a
    context manager dynamo cannot resume in ("Failed to handle graph break gracefully"), so
    it ran the forward eagerly, the stem alone traced as a frame of its own (one graph, no
    break reason); the hint now holds the stem alone, and the stem and the head are compiled
    around the layer's one named graph break, with the eager logits."""
    import torch._dynamo

    model = build({"model": "mnist_dense", "variant": "skip_reg"}).eval()
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    eager, _ = model(images)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(images)
        compiled, _ = torch.compile(model, backend="eager")(images)
    finally:
        torch._dynamo.reset()
    (only,) = explained.break_reasons
    assert "DEQ runs outside the enclosing torch.compile graph" in only.reason
    assert explained.graph_count == 2  # the stem's graph and the head's
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_config_options_reach_the_layer():
    model = build(
        {
            "model": "cifar10_small",
            "variant": "skip",
            "solver": "anderson",
            "adjoint": "jfb",
            "abstol": 0.2,
            "max_steps": 7,
        }
    )
    layer = model.layer
    assert (layer.init, layer.solver, layer.adjoint, layer.max_steps) == (
        "skip",
        "anderson",
        "jfb",
        7,
    )
    assert (
        layer.termination.abstol == 0.2
        and layer.termination.reltol == PRESETS["cifar10_small"].reltol
    )
    assert not hasattr(model, "lambda_skip")  # the training objective's weight, not the model's
    with pytest.raises(ValueError, match=r"unknown DEQ option\(s\) \['lambda_skip'\]"):
        build({"model": "cifar10_small", "lambda_skip": 0.5})
    ode = build({"model": "mnist_dense", "variant": "neural_ode", "solver": "tsit5", "t1": 2.0})
    assert (ode.layer.solver, ode.layer.adjoint, ode.layer.t1) == ("tsit5", "continuous", 2.0)


def test_the_presets_drop_out_at_their_rates():
    """Variational dropout in the cell: 0.1 (mnist_mdeq), 0.2 (cifar10_small), 0.3
    (cifar10_large), none for imagenet_small."""
    rates = {"mnist_mdeq": 0.1, "cifar10_small": 0.2, "cifar10_large": 0.3, "imagenet_small": 0.0}
    for name, rate in rates.items():
        cell = PRESETS[name].parts().cell
        assert {m.p for m in cell.modules() if isinstance(m, VariationalDropout2d)} == {rate}, name


def test_a_config_takes_the_preset_s_settings_where_it_names_none():
    """The default variant is Skip Reg.; a DEQ takes the preset's tolerances, step limit and
    warm-up, and its GMRES limits for the implicit adjoints only (gmres, fixed_point); a
    Neural ODE takes the preset's tolerances."""
    dense = resolve({"model": "mnist_dense"})
    assert (
        dense["variant"] == "skip_reg" and build({"model": "mnist_dense"}).layer.init == "skip_reg"
    )
    for adjoint in ("gmres", "fixed_point", "jfb", "unrolled"):
        got = resolve({"model": "mnist_mdeq", "adjoint": adjoint})
        settings = [got[k] for k in ("abstol", "reltol", "max_steps", "pretrain_steps")]
        assert settings == [5e-2, 5e-2, 18, 60], adjoint
        implicit = adjoint in ("gmres", "fixed_point")
        expected = {"rtol": 5e-2, "max_iters": 20} if implicit else {}
        assert got["adjoint_options"] == expected, adjoint
    layer = build({"model": "mnist_mdeq", "adjoint": "fixed_point"}).layer
    assert (layer.pretrain_steps, layer.adjoint_options) == (60, {"rtol": 5e-2, "max_iters": 20})
    ode = build({"model": "mnist_dense", "variant": "neural_ode"}).layer
    assert (ode.termination.abstol, ode.termination.reltol) == (5e-3, 5e-3)


def test_presets_carry_the_readme_s_settings():
    """The README's table of settings: step limit / GMRES limit 50 / 15 (dense), 18 / 20
    (CIFAR-10), 27 / 28 (ImageNet), GMRES rtol = the forward tolerance (5e-3 dense, 5e-2
    multiscale), unrolled warm-up 3,000 steps for cifar10_small, none for the large ones,
    lambda_skip 0.01 for the multiscale models (0.2 for mnist_dense); mnist_mdeq
    takes the multiscale settings with a 60-step warm-up (its preset's comment)."""
    expected = {
        "mnist_dense": (5e-3, 50, 15, 0, 0.2),
        "mnist_mdeq": (5e-2, 18, 20, 60, 0.01),
        "cifar10_small": (5e-2, 18, 20, 3000, 0.01),
        "cifar10_large": (5e-2, 18, 20, 0, 0.01),
        "imagenet_small": (5e-2, 27, 28, 0, 0.01),
    }
    for name, (tol, steps, gmres, warm, lam) in expected.items():
        p = PRESETS[name]
        assert (p.abstol, p.reltol, p.max_steps, p.pretrain_steps, p.lambda_skip) == (
            tol,
            tol,
            steps,
            warm,
            lam,
        ), name
        assert p.adjoint_options == {"rtol": tol, "max_iters": gmres}, name


def test_cifar10_small_warms_up_unrolling_f_five_times():
    """experiments/cifar10/main.jl of SciML/DeepEquilibriumNetworks.jl at d18c610 unrolls f to
    a fixed depth of 5 (`fixed_depth`, Val(5)) for tiny.yml's 3,000 warm-up steps; the layer's
    default depth of 10 doubled the cost of each warm-up step and changed the model trained."""
    torch.manual_seed(0)
    assert resolve({"model": "cifar10_small"})["pretrain_depth"] == 5
    model = build({"model": "cifar10_small", "variant": "vanilla"}).train()
    _, out = model(torch.randn(1, 3, 32, 32))
    assert (model.layer.pretrain_steps, out.stats.nfe) == (3000, 5)
    assert resolve({"model": "mnist_mdeq"})["pretrain_depth"] == 10


def test_weight_normalisation_is_off_for_cifar10_small_only():
    for name in ("mnist_mdeq", "cifar10_small", "cifar10_large", "imagenet_small"):
        cell = build({"model": name, "variant": "vanilla"}).layer.f
        normalised = [
            hasattr(m, "parametrizations") for m in cell.modules() if isinstance(m, nn.Conv2d)
        ]
        assert any(normalised) == (name != "cifar10_small"), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_backward_and_timing():
    """cifar10_large forward + backward at batch 128 on the GPU; prints the time per batch."""
    device = torch.device("cuda")
    torch.manual_seed(4)
    model = build({"model": "cifar10_large", "variant": "skip_reg", "pretrain_steps": 0}).to(device)
    images = torch.randn(128, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (128,), device=device)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits, out = model(images)
        loss = Objective(PRESETS["cifar10_large"].lambda_skip)(logits, labels, out)
        model.zero_grad()
        loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert logits.device.type == "cuda" and all(t.device.type == "cuda" for t in out.z)
    assert bool(torch.isfinite(logits).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    print(
        f"\ncifar10_large skip_reg fwd+bwd, batch 128 on {torch.cuda.get_device_name()}: "
        f"{min(times):.3f} s (nfe {out.stats.nfe}, backward nvjp {out.stats.backward_nvjp})"
    )


@pytest.mark.parametrize("adjoint", ["jfb", "unrolled", "fixed_point"])
def test_every_adjoint_builds_and_trains_with_the_preset_defaults(adjoint):
    """The presets' GMRES limits are only given to the implicit adjoints."""
    model = build({"model": "mnist_dense", "adjoint": adjoint})
    logits, out = model(torch.randn(2, 1, 28, 28))
    torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).backward()
    assert out.stats.backward_nvjp >= 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_euler_does_not_cycle_on_a_multiscale_deq_at_initialisation(monkeypatch):
    """A two-scale MNIST MDEQ at initialisation is no contraction (fixed-point iteration
    stalls), and Euler near its stability limit must not cycle: its default PI control reaches
    the preset's tolerance on 64 test digits. The integral controller cycles above it unless
    the step-size factor after a step whose residual did not fall is cut (stalled_factor)."""
    monkeypatch.setitem(PRESETS, "mnist_mdeq", CYCLING_MDEQ)
    digits = mnist10k(train=False)[0][:64]
    x = digits.float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    runs = {
        "fixed point": ("fixed_point", {}),
        "euler": ("euler", {}),
        "euler, integral control": ("euler", {"kind": "i"}),
        "euler, integral control, h kept after a stalled step": (
            "euler",
            {"kind": "i", "stalled_factor": 1.0},
        ),
    }
    converged = {}
    for label, (solver, options) in runs.items():
        torch.manual_seed(0)
        cfg = {"model": "mnist_mdeq", "variant": "vanilla", "solver": solver, "max_steps": 100}
        net = build({**cfg, "solver_options": options}).eval()
        with torch.no_grad():
            converged[label] = bool(net(x)[1].stats.converged.all())
    assert converged == {
        "fixed point": False,
        "euler": True,
        "euler, integral control": True,
        "euler, integral control, h kept after a stalled step": False,
    }


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _norms(module: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm)]


def _conv(h: torch.Tensor, layer: nn.Conv2d, stride: int = 1) -> torch.Tensor:
    """A same-padded convolution with the layer's (weight-normalised) weight."""
    pad = layer.weight.shape[-1] // 2
    return F.conv2d(h, layer.weight, layer.bias, stride=stride, padding=pad)


def _gn(h: torch.Tensor, norm: nn.GroupNorm, groups: int) -> torch.Tensor:
    """Group norm by hand in gcd(channels, groups) groups: each group of channels of a sample to
    mean 0, variance 1 (biased), then the affine scale and shift."""
    b, c = h.shape[:2]
    g = h.reshape(b, math.gcd(c, groups), -1)
    g = (g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    return g.reshape(h.shape) * norm.weight[:, None, None] + norm.bias[:, None, None]


def _nearest(h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize: output pixel i reads input pixel floor(i * n_in / n_out)."""
    rows = torch.arange(size[0]) * h.shape[-2] // size[0]
    cols = torch.arange(size[1]) * h.shape[-1] // size[1]
    return h[..., rows, :][..., cols]


# Three scales of (4, 8, 16) channels with 4 groups (2 after fusion) at 7x7, 4x4, 2x2: a
# two-level down map (4 -> 8 -> 16 channels), up maps by 2 and 4 onto odd sizes.
THREE_SCALES = MDEQConfig(
    channels=(4, 8, 16),
    head_channels=(2, 4, 8),
    final_channels=12,
    in_channels=2,
    num_classes=5,
    expansion=2,
    groups=4,
)


def reference_block(block: nn.Module, z: torch.Tensor, injection, g: int) -> torch.Tensor:
    """GN3(relu(GN2(conv2(relu(GN1(conv1(z)))) + injection) + z)), without dropout."""
    c1, c2 = _convs(block)
    n1, n2, n3 = _norms(block)
    u = _conv(F.relu(_gn(_conv(z, c1), n1, g)), c2)
    if injection is not None:
        u = u + injection
    return _gn(F.relu(_gn(u, n2, g) + z), n3, g)


def reference_down(down: nn.Module, h: torch.Tensor, g: int) -> torch.Tensor:
    """Stride-2 3x3 convolutions, each with group norm, and a ReLU between two of them."""
    convs, norms = _convs(down), _norms(down)
    for k, (c, n) in enumerate(zip(convs, norms, strict=True)):
        h = _gn(_conv(h, c, stride=2), n, g)
        h = F.relu(h) if k < len(convs) - 1 else h
    return h


def reference_cell(
    cell: nn.Module,
    z: list[torch.Tensor],
    x: torch.Tensor,
    groups: int = THREE_SCALES.groups,
    post_groups: int = THREE_SCALES.groups // 2,
) -> list[torch.Tensor]:
    """MDEQ's f(z, x) from its equations: per scale GN3(relu(GN2(conv2(relu(GN1(conv1(z))))
    + x [scale 0]) + z)); then scale i sums identity, down maps (stride-2 3x3 conv + GN, ReLU
    between levels only) and up maps (3x3 conv + GN, nearest resize); then GN_{g/2}(conv1x1(
    relu(.)))."""
    g = groups
    h = [
        reference_block(block, zi, x if i == 0 else None, g)
        for i, (block, zi) in enumerate(zip(cell.blocks, z))
    ]
    out = []
    for i, row in enumerate(cell.fuse):
        y = h[i].clone()
        for j, fuse in enumerate(row):
            if j < i:
                assert len(_convs(fuse)) == i - j
                y = y + reference_down(fuse, h[j], g)
            elif j > i:
                (c,), (n,) = _convs(fuse), _norms(fuse)
                y = y + _nearest(_gn(_conv(h[j], c), n, g), h[i].shape[-2:])
        (c,), (n,) = _convs(cell.post_fuse[i]), _norms(cell.post_fuse[i])
        out.append(_gn(_conv(F.relu(y), c), n, post_groups))
    return out


def test_the_multiscale_cell_is_mdeqs_residual_blocks_and_fusion():
    torch.manual_seed(20)
    cell = mdeq_parts(THREE_SCALES).cell.double()
    for p in cell.parameters():  # away from the near-zero start, so every term counts
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    z = [
        torch.randn(2, c, s, s, dtype=torch.float64)
        for c, s in zip(THREE_SCALES.channels, (7, 4, 2))
    ]
    got = cell(z, x)
    for a, b in zip(got, reference_cell(cell, z, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_each_fused_scale_adds_its_maps_without_copying_a_scale():
    """A three-scale f adds with 10 additions per evaluation (the injection, three residuals,
    two per fused scale): the fusion's sum() from 0 spent 13, each 0 + map a copy of a scale."""
    torch.manual_seed(21)
    cell = mdeq_parts(THREE_SCALES).cell.double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    z = [
        torch.randn(2, c, s, s, dtype=torch.float64)
        for c, s in zip(THREE_SCALES.channels, (7, 4, 2))
    ]
    with torch.no_grad(), OpCounter() as counted:
        got = cell(z, x)
    assert counted.ops["add"] == 10
    for a, b in zip(got, reference_cell(cell, z, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_one_group_normalises_each_post_fuse_map_over_all_its_channels():
    """groups=1 halved to 0 post-fuse groups, which group_norm took as one group per channel
    (6 and 12 groups here); each post-fuse norm is one group, as every other norm of the cell."""
    cfg = dataclasses.replace(THREE_SCALES, channels=(6, 12, 12), groups=1)
    cell = mdeq_parts(cfg).cell.double()
    assert [_norms(post)[0].num_groups for post in cell.post_fuse] == [1, 1, 1]
    torch.manual_seed(21)
    for p in cell.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 6, 5, 3, dtype=torch.float64)
    z = [
        torch.randn(2, c, *s, dtype=torch.float64)
        for c, s in zip((6, 12, 12), ((5, 3), (3, 2), (2, 1)))
    ]
    for a, b in zip(cell(z, x), reference_cell(cell, z, x, groups=1, post_groups=1), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def reference_bottleneck(block: nn.Module, h: torch.Tensor, g: int) -> torch.Tensor:
    """relu(GN(conv1x1(relu(GN(conv3x3(relu(GN(conv1x1(h)))))))) + GN(conv1x1(h)))."""
    c1, c2, c3, cs = _convs(block)
    n1, n2, n3, ns = _norms(block)
    u = F.relu(_gn(_conv(h, c1), n1, g))
    u = F.relu(_gn(_conv(u, c2), n2, g))
    u = _gn(_conv(u, c3), n3, g)
    return F.relu(u + _gn(_conv(h, cs), ns, g))


def test_the_stem_and_the_head_are_mdeqs():
    """Stem: three relu(GN(conv)), the last 1x1. Head: each scale widened by a bottleneck (4x
    planes), folded from the finest into the coarsest by relu(GN(stride-2 conv + bias)),
    relu(GN(1x1 conv + bias)), the spatial mean, then a linear map."""
    torch.manual_seed(21)
    parts = mdeq_parts(THREE_SCALES)
    stem, head = parts.stem.double(), parts.head.double()
    for p in [*stem.parameters(), *head.parameters()]:
        nn.init.normal_(p, std=0.5)
    g = THREE_SCALES.groups
    images = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    h = images
    for c, n in zip(_convs(stem), _norms(stem), strict=True):
        h = F.relu(_gn(_conv(h, c), n, g))
    torch.testing.assert_close(stem(images), h, rtol=1e-10, atol=1e-10)

    z = [
        torch.randn(2, c, s, s, dtype=torch.float64)
        for c, s in zip(THREE_SCALES.channels, (7, 4, 2))
    ]
    y = reference_bottleneck(head.widen[0], z[0], g)
    for i in (1, 2):
        (c,), (n,) = _convs(head.down[i - 1]), _norms(head.down[i - 1])
        y = reference_bottleneck(head.widen[i], z[i], g) + F.relu(_gn(_conv(y, c, 2), n, g))
    (c,), (n,) = _convs(head.final), _norms(head.final)
    pooled = F.relu(_gn(_conv(y, c), n, g)).mean(dim=(-2, -1))
    logits = pooled @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head(z), logits, rtol=1e-10, atol=1e-10)


def test_the_skip_predictor_is_a_residual_block_and_its_down_maps():
    """g(x) = [b, down_1(b), down_2(b)] with b the residual block of x (no injection), each
    down map from scale 0 (one, then two stride-2 steps)."""
    torch.manual_seed(26)
    skip = mdeq_parts(THREE_SCALES).skip.double()
    for p in skip.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    g = THREE_SCALES.groups
    b = reference_block(skip.block, x, None, g)
    expected = [b] + [reference_down(d, b, g) for d in skip.down]
    got = skip(x)
    assert [t.shape[1:] for t in got] == [(4, 7, 7), (8, 4, 4), (16, 2, 2)]
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_the_skip_predictor_has_no_dropout_in_training():
    """The cell drops out at the configured rate; the predictor does not: in training mode its
    prediction is the evaluation-mode one, mask after mask."""
    torch.manual_seed(27)
    cfg = dataclasses.replace(THREE_SCALES, dropout=0.5)
    skip = mdeq_parts(cfg).skip
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = skip.eval()(x)
        skip.train()
        for _ in range(2):
            for m in skip.modules():
                if isinstance(m, VariationalDropout2d):
                    m.reset()
            for a, e in zip(skip(x), expected, strict=True):
                torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize(("downsample", "side"), [(0, 28), (1, 14), (2, 7)])
def test_the_stem_strides_as_often_as_stem_downsample_says(downsample, side):
    cfg = dataclasses.replace(THREE_SCALES, stem_downsample=downsample)
    with torch.no_grad():
        x = mdeq_parts(cfg).stem(torch.zeros(1, 2, 28, 28))
    assert x.shape == (1, 4, side, side)


def test_a_non_square_input_has_non_square_scales():
    """From 7 x 10: 4 x 5 and 2 x 3 (each side ceil(n / 2)), the sizes the stride-2 fusion maps
    produce, so that the cell maps the initial state to a state of the same shapes."""
    cell = mdeq_parts(THREE_SCALES).cell
    x = torch.randn(1, 4, 7, 10)
    state = cell.initial_state(x)
    assert [tuple(t.shape[-2:]) for t in state] == [(7, 10), (4, 5), (2, 3)]
    with torch.no_grad():
        assert [t.shape for t in cell(state, x)] == [t.shape for t in state]


def test_down_maps_double_the_channels_only_where_that_reaches_the_target():
    """8 -> 64 in three steps: 16, 32, 64; 8 -> 12 in three: 8, 8, then 12 (MDEQ's own)."""
    from raydeq.models.mdeq import Downsample

    def widths(down: nn.Module) -> list[tuple[int, int]]:
        return [(c.in_channels, c.out_channels) for c in _convs(down)]

    assert widths(Downsample(8, 64, 3, 4)) == [(8, 16), (16, 32), (32, 64)]
    assert widths(Downsample(8, 12, 3, 4)) == [(8, 8), (8, 8), (8, 12)]
    with torch.no_grad():
        assert Downsample(8, 12, 3, 4)(torch.zeros(1, 8, 9, 9)).shape == (1, 12, 2, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_channels": (2, 4)}, r"head_channels \(2, 4\) needs one entry per scale"),
        ({"head_channels": (2, 4, 8, 16)}, "needs one entry per scale"),
        ({"stem_downsample": 3}, "stem_downsample must be 0, 1 or 2, got 3"),
        ({"upsample_kernel": 2}, r"upsample_kernel=2 must be odd \(1, 3, 5, ...\)"),
    ],
)
def test_an_inconsistent_multiscale_config_is_named(change, message):
    """An even upsample_kernel, padded by kernel // 2, made each up map's convolution one row
    and column larger than its input (a 4 x 4 scale's 5 x 5) before the nearest resize."""
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(THREE_SCALES, **change)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        (
            "mnist_dense",
            (2, 1, 32, 32),
            r"784 values per image .* got images of shape \(2, 1, 32, 32\)",
        ),
        (
            "mnist_dense",
            (2, 3, 28, 28),
            r"784 values per image .* got images of shape \(2, 3, 28, 28\)",
        ),
        ("mnist_mdeq", (2, 3, 28, 28), r"\(batch, 1, height, width\), got \(2, 3, 28, 28\)"),
        ("cifar10_small", (3, 32, 32), r"\(batch, 3, height, width\), got \(3, 32, 32\)"),
        ("cifar10_small", (2, 1, 32, 32), r"\(batch, 3, height, width\), got \(2, 1, 32, 32\)"),
    ],
)
def test_images_of_the_wrong_shape_are_named_with_the_shape_the_stem_takes(name, shape, message):
    """A wrong image size (the dense model's) or channel count, or an image without its batch
    dimension, is refused naming both shapes, not deep inside a matrix product or a group norm."""
    model = build({"model": name, "variant": "skip", "pretrain_steps": 0})
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


@pytest.mark.parametrize(("name", "side"), [("mnist_mdeq", 20), ("imagenet_small", 32)])
def test_the_multiscale_stems_take_any_image_size(name, side):
    """MDEQ's convolutions take any height and width (ImageNet at 32x32 in a quick run)."""
    model = build({"model": name, "variant": "vanilla", **BOUNDED}).eval()
    with torch.no_grad():
        logits, _ = model(torch.randn(1, PRESETS[name].input_shape[0], side, side + 3))
    assert logits.shape == (1, 1000 if name == "imagenet_small" else 10)


SIX = dataclasses.replace(THREE_SCALES, channels=(6, 12, 24), head_channels=(3, 6, 12))


@pytest.mark.parametrize(
    ("cfg", "side"),
    [
        (SIX, 0),  # no norm of one channel per group
        (THREE_SCALES, 4),  # scale 0's 4 channels in 4 groups, up-mapped from scale 2
        (dataclasses.replace(SIX, groups=6), 4),
        (dataclasses.replace(SIX, groups=6, stem_downsample=1), 8),
    ],
)
def test_images_whose_coarsest_maps_leave_a_group_norm_one_value_are_refused(cfg, side):
    """Where a group norm of one channel per group sees a 1 x 1 map, torch refused a batch of
    one (after the solve, where the head's norm is that one) and set the norm to its bias for
    a larger batch; the stem refuses both, naming the size, at each size where torch refuses
    a batch of one."""
    parts = mdeq_parts(cfg)
    assert parts.stem.smallest_side == side
    layer = DEQ(parts.cell, skip=parts.skip, init="skip", max_steps=1)
    model = EquilibriumClassifier(parts.stem, layer, parts.head).eval()
    for n in range(1, 2 * side + 2):
        for h, w in ((n, 1), (1, n), (n, n)):
            refused = max(h, w) <= side
            parts.stem.smallest_side = 0
            with torch.no_grad():
                try:
                    model(torch.zeros(1, 2, h, w))
                except ValueError as err:
                    assert refused and "Expected more than 1 value" in str(err), (h, w, err)
                else:
                    assert not refused, (h, w)
            parts.stem.smallest_side = side
            for batch in (1, 2):
                if refused:
                    message = f"height or width above {side}, got {h} x {w}"
                    with pytest.raises(ValueError, match=message):
                        parts.stem(torch.zeros(batch, 2, h, w))


def test_a_preset_refuses_images_too_small_for_its_norms_before_the_solve():
    """cifar10_small took 1 x 1 images in a batch of two, its head's norm of 8 channels in 8
    groups set to its bias, and refused one alone after the solve."""
    assert PRESETS["mnist_mdeq"].parts().stem.smallest_side == 4
    model = build({"model": "cifar10_small", "variant": "vanilla", "pretrain_steps": 0})
    model.layer.forward = None  # the solve is never reached
    with pytest.raises(ValueError, match="above 1, got 1 x 1"):
        model(torch.randn(2, 3, 1, 1))


def _unannotated(function: Callable) -> list[str]:
    """The parameters (but self, cls, *args and **kwargs) and return of function without a
    type annotation."""
    signature = inspect.signature(function)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.annotation is inspect.Parameter.empty
        and p.name not in ("self", "cls")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return missing + ["return"] * (signature.return_annotation is inspect.Signature.empty)


def test_every_public_name_of_raydeq_models_has_a_docstring_and_a_typed_signature():
    """EquilibriumClassifier(stem, layer, head), which build returns, had no return type; each
    class and function raydeq.models exports, and each of a class's own public methods,
    __init__ and __call__, is typed in every argument and its return, and documented."""
    found = []
    for name in models.__all__:
        exported = getattr(models, name)
        if inspect.isfunction(exported):
            functions = {name: exported}
        elif inspect.isclass(exported):
            functions = {
                f"{name}.{attribute}": value
                for attribute, value in vars(exported).items()
                if inspect.isfunction(value)
                and (not attribute.startswith("_") or attribute in ("__init__", "__call__"))
            }
        else:
            continue
        if not exported.__doc__:
            found.append(f"{name}: no docstring")
        for qualified, function in functions.items():
            found += [f"{qualified}: {part} not annotated" for part in _unannotated(function)]
            if not function.__doc__ and not qualified.endswith("__init__"):
                found.append(f"{qualified}: no docstring")
    assert not found, found
