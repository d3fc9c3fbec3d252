"""One optimisation step of a classifier, the same for every model-level benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def loss_of(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, object]:
    """Cross-entropy plus the model's weighted skip loss, and the layer output."""
    logits, out = model(images)
    loss = F.cross_entropy(logits, labels) + model.lambda_skip * out.skip_loss
    return loss, out


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor
) -> object:
    """Forward, backward and optimizer step; returns the layer output (its stats)."""
    optimizer.zero_grad(set_to_none=True)
    loss, out = loss_of(model, images, labels)
    loss.backward()
    optimizer.step()
    return out


def fit(
    model: nn.Module, images: Tensor, labels: Tensor, steps: int, batch: int, seed: int
) -> None:
    """Train `model` for `steps` Adam steps (learning rate 1e-3) on shuffled batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(len(labels), generator=g)
        index, order = order[:batch].to(images.device), order[batch:]
        train_step(model, optimizer, images[index], labels[index])
