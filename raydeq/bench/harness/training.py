"""Optimisation steps of a classifier under the training objective, the same for every suite."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from raydeq.bench.harness.timing import Case
from raydeq.deq import LayerOutput
from raydeq.training.config import OptimSection
from raydeq.training.console import Progress
from raydeq.training.objective import Objective
from raydeq.training.state import make_optimizer


def loss_of(
    model: nn.Module,
    objective: Objective,
    images: Tensor,
    labels: Tensor,
    amp: torch.dtype | None = None,
) -> tuple[Tensor, LayerOutput]:
    """The objective on one batch, and the layer output; with `amp` the model runs under
    autocast to that dtype and the loss outside it, as the training loop does for train.amp."""
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        logits, out = model(images)
    return objective(logits, labels, out), out


def train_step(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    amp: torch.dtype | None = None,
) -> LayerOutput:
    """Forward, backward and optimizer step (forward under autocast to `amp` if given);
    returns the layer output (its stats)."""
    optimizer.zero_grad(set_to_none=True)
    loss, out = loss_of(model, objective, images, labels, amp)
    loss.backward()
    optimizer.step()
    return out


def step_case(
    model: nn.Module,
    objective: Objective,
    images: Tensor,
    labels: Tensor,
    amp: torch.dtype | None = None,
) -> Case:
    """Time one training step of `model` on a batch (`train_step`, Adam at learning rate 0, so
    that every timed repeat sees the same parameters); the value is the layer output."""
    optimizer = adam(model, 0.0)

    def prepare() -> Callable[[], LayerOutput]:
        model.train()
        return lambda: train_step(model, objective, optimizer, images, labels, amp)

    return prepare


def adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The training loop's Adam (fused where the parameters allow) at learning rate `lr`; 0 keeps
    the parameters fixed, so every timed repeat sees the same model."""
    return make_optimizer(OptimSection(optimizer="adam", lr=lr), model.parameters())


def fit(
    model: nn.Module,
    objective: Objective,
    data: tuple[Tensor, Tensor],
    steps: int,
    batch: int,
    seed: int,
    label: str = "",
) -> None:
    """Train `model` for `steps` Adam steps (learning rate 1e-3) on batches reshuffled per epoch;
    with a `label`, a progress line on stderr for a step begun 5 s or more after the line before
    (`console.Progress`)."""
    images, labels = data
    optimizer = adam(model, 1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    shown = Progress(label, steps) if label else None
    for _ in range(steps):
        if shown:
            shown.next()
        if len(order) < batch:
            order = torch.randperm(len(labels), generator=g)
        index, order = order[:batch].to(images.device), order[batch:]
        train_step(model, objective, optimizer, images[index], labels[index])
