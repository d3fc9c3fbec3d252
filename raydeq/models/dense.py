"""The paper's dense MNIST model: f(z, x) = relu(W1 z) + relu(W2 x) in R^128 (Table 1)."""

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from raydeq.models.classifier import Parts
from raydeq.solvers.options import integer


class DenseCell(nn.Module):
    """f(z, x) = relu(W1 z) + relu(W2 x), both maps without bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        integer("width", width)
        self.state = nn.Linear(width, width, bias=False)
        self.inject = nn.Linear(width, width, bias=False)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """One application of f."""
        return F.relu(self.state(z)) + F.relu(self.inject(x))


class DenseStem(nn.Sequential):
    """Flatten the image and embed it: Linear(in_features, width) + ReLU."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.in_features = in_features

    def forward(self, images: Tensor) -> Tensor:
        """Embed images (B, ...) of in_features values each, naming any other shape."""
        if images.dim() < 2 or math.prod(images.shape[1:]) != self.in_features:
            raise ValueError(
                f"the dense model takes {self.in_features} values per image (batch, ...), "
                f"got images of shape {tuple(images.shape)}"
            )
        return super().forward(images)


def dense_skip(width: int) -> nn.Module:
    """Skip DEQ's predictor g(x) = relu(W x + b)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU())


@dataclass(frozen=True)
class DenseConfig:
    """Sizes of the dense model: flattened input, state width, classes."""

    in_features: int = 784
    width: int = 128
    num_classes: int = 10

    def __post_init__(self) -> None:
        """Refuse a size that is no integer >= 1, naming it, before any layer is made of it."""
        for name in ("in_features", "width", "num_classes"):
            integer(name, getattr(self, name))


def dense_parts(cfg: DenseConfig) -> Parts:
    """Stem, cell, head and skip predictor of the dense model."""
    return Parts(
        stem=DenseStem(cfg.in_features, cfg.width),
        cell=DenseCell(cfg.width),
        head=nn.Linear(cfg.width, cfg.num_classes),
        skip=dense_skip(cfg.width),
    )
