"""The configured optimizers: fused on a CPU, and their steps equal to torch's per-tensor
implementation with the same settings."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from raydeq.training.config import OptimSection
from raydeq.training.state import fusable, make_optimizer

SETTINGS = {
    "sgd": ({"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, torch.optim.SGD),
    "adam": ({"weight_decay": 1e-2}, torch.optim.Adam),
    "adamw": ({"weight_decay": 1e-2}, torch.optim.AdamW),
}


def trajectory(make: Callable, steps: int = 4) -> list[torch.Tensor]:
    """Parameters of a small net after `steps` updates on a fixed regression batch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    optimizer = make(list(net.parameters()))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", SETTINGS)
def test_fused_step_matches_per_tensor_reference(name: str):
    extra, kind = SETTINGS[name]
    cfg = OptimSection(optimizer=name, lr=0.05, **extra)
    got = trajectory(lambda params: make_optimizer(cfg, params))
    assert make_optimizer(cfg, [nn.Parameter(torch.zeros(3))]).param_groups[0]["fused"] is True
    want = trajectory(lambda params: kind(params, lr=0.05, foreach=False, **extra))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert not torch.equal(want[0], trajectory(lambda params: kind(params, lr=0.0))[0])


def test_each_optimizer_takes_the_configured_rate_and_sgd_its_momentum():
    for name in SETTINGS:
        cfg = OptimSection(optimizer=name, lr=0.02)
        optimizer = make_optimizer(cfg, [nn.Parameter(torch.zeros(3))])
        assert optimizer.param_groups[0]["lr"] == 0.02, name
    cfg = OptimSection(optimizer="sgd", lr=0.02, momentum=0.5)
    got = trajectory(lambda params: make_optimizer(cfg, params))
    want = trajectory(lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.5, foreach=False))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_fusable_only_for_floating_parameters_on_one_supported_device():
    floating = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    integer = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    meta = nn.Parameter(torch.zeros(2, device="meta"))
    assert fusable(floating) is True
    assert fusable([*floating, integer]) is None
    assert fusable([*floating, meta]) is None
    assert fusable([]) is None
