"""What every suite is given: the device, the size profile, the models, the data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from raydeq.solvers.options import choice

# A suite's problem sizes: a frozen dataclass per suite, one instance per size name.
Size = TypeVar("Size")
SIZES = ("tiny", "quick", "full")


@dataclass(frozen=True)
class Checkpoint:
    """Model weights read from a training checkpoint folder."""

    folder: Path
    weights: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Context:
    """Settings of one benchmark run.

    size is "tiny" (the smoke test: smallest problems, one repeat), "quick" (a few minutes on
    a 2-core CPU) or "full"; models are the presets the DEQ-vs-Neural-ODE suite times; weights
    maps a preset to a training checkpoint whose model that suite and the training-step suite
    load instead of training or leaving it untrained.
    """

    device: torch.device
    size: str = "quick"
    models: tuple[str, ...] = ("mnist_dense", "cifar10_small")
    data_dir: Path | None = None  # None: the embedded 10k MNIST digits
    seed: int = 0
    weights: Mapping[str, Checkpoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choice("size", self.size, SIZES)

    def pick(self, sizes: Mapping[str, Size]) -> Size:
        """A suite's problem sizes for this run's size profile."""
        return sizes[self.size]
