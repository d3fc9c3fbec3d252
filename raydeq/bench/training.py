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
