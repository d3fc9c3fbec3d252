"""The presets as the model-level suites use them: built by seed, loaded from a checkpoint, fed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydeq.bench.harness.context import Checkpoint
from raydeq.bench.harness.timing import Case
from raydeq.datasets import mnist10k
from raydeq.deq import LayerOutput
from raydeq.models import PRESETS, EquilibriumClassifier
from raydeq.models import build as build_model
from raydeq.training.objective import Objective

# Mean and standard deviation of the MNIST training pixels (scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
Split = tuple[Tensor, Tensor]
# A suite's note on a model that no checkpoint gave weights and nothing trained.
UNTRAINED = "untrained weights"
# image_batch's source for MNIST test digits: only for these do the suites train mnist_dense.
DIGITS = "MNIST test digits"


def build(
    name: str, variant: str, device: torch.device, seed: int, **options: Any
) -> EquilibriumClassifier:
    """The preset `name` as `variant`, with parameters drawn from `seed` (same seed, same f).

    DEQ variants solve from the first step (no unrolled pretraining), so that they measure
    the solver; every other option goes to the layer's constructor.
    """
    cfg: dict[str, Any] = {"model": name, "variant": variant, **options}
    if variant != "neural_ode":
        cfg.setdefault("pretrain_steps", 0)
    torch.manual_seed(seed)
    return build_model(cfg).to(device)


def preset_objective(name: str) -> Objective:
    """The training objective with the preset's recommended skip-loss weight."""
    return Objective(PRESETS[name].lambda_skip)


def predict_case(model: nn.Module, images: Tensor) -> Case:
    """Time one prediction of a batch (eval mode, no autograd); the value is the layer output."""

    def prepare() -> Callable[[], LayerOutput]:
        model.eval()

        def thunk() -> LayerOutput:
            with torch.no_grad():
                return model(images)[1]

        return thunk

    return prepare


def load_checkpoint(model: EquilibriumClassifier, checkpoint: Checkpoint) -> str:
    """Load the model weights of a training checkpoint into `model`; returns the suites' note
    on them.

    The checkpoint may hold a Skip DEQ: its predictor is ignored, f, stem and head must match.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in checkpoint.weights and k != "layer.step"]
    if missing:
        raise ValueError(
            f"{checkpoint.folder} holds no weights for {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}: it is a checkpoint of another model"
        )
    try:
        model.load_state_dict({k: v for k, v in checkpoint.weights.items() if k in own})
    except RuntimeError as err:
        raise ValueError(f"{checkpoint.folder} holds weights of another size: {err}") from None
    return f"weights of the checkpoint {checkpoint.folder}"


def mnist(data_dir: Path | None, train: bool) -> Split | None:
    """Normalised MNIST images (N, 1, 28, 28) and labels: the embedded 10k digits when data_dir
    is None, else MNIST/raw in data_dir (None if absent)."""
    if data_dir is None:
        pixels, labels = mnist10k(train)
    elif (data_dir / "MNIST" / "raw").exists():
        from torchvision import datasets

        dataset = datasets.MNIST(str(data_dir), train=train, download=False)
        pixels, labels = dataset.data, dataset.targets
    else:
        return None
    return pixels.float().div(255).sub(MNIST_MEAN).div(MNIST_STD).unsqueeze(1), labels


def mnist_splits(data_dir: Path | None) -> tuple[Split, Split] | str:
    """The training and test splits, or why they are missing."""
    train, test = mnist(data_dir, train=True), mnist(data_dir, train=False)
    if train is None or test is None:
        return f"MNIST not found in {data_dir} (MNIST/raw in the IDX layout)"
    return train, test


def image_batch(
    name: str, batch: int, device: torch.device, data_dir: Path | None, seed: int
) -> tuple[Tensor, str]:
    """A batch of inputs for the preset and where it came from (test digits or Gaussian noise)."""
    shape = PRESETS[name].input_shape
    data = mnist(data_dir, train=False) if shape == (1, 28, 28) else None
    if data is not None:
        return data[0][:batch].to(device), DIGITS
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g).to(device), "Gaussian images"
