"""Models and image batches for the model-level benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydeq.bench.context import Checkpoint

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def models_available() -> str | None:
    """None when raydeq.models imports, else the reason it does not."""
    try:
        import raydeq.models  # noqa: F401
    except ImportError as error:
        return f"raydeq.models is not importable: {error}"
    return None


def build(name: str, variant: str, device: torch.device, seed: int, **options: Any) -> nn.Module:
    """The preset `name` as `variant`, with parameters drawn from `seed` (same seed, same f).

    DEQ variants solve from the first step (no unrolled pretraining), so that they measure
    the solver.
    """
    from raydeq.models import build as build_model

    cfg: dict[str, Any] = {"model": name, "variant": variant, **options}
    if variant != "neural_ode":
        cfg.setdefault("pretrain_steps", 0)
    torch.manual_seed(seed)
    return build_model(cfg).to(device)


def load_checkpoint(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Load the model weights of a `raydeq.train` checkpoint into `model`.

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


def input_shape(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of the preset's images."""
    from raydeq.models import PRESETS

    return PRESETS[name].input_shape


def mnist(data_dir: Path | None, train: bool) -> tuple[Tensor, Tensor] | None:
    """Normalised MNIST images (N, 1, 28, 28) and labels: the embedded 10k digits when data_dir
    is None, else MNIST/raw in data_dir (None if absent)."""
    from torchvision import datasets

    from raydeq.data import mnist10k

    if data_dir is None:
        pixels, labels = mnist10k(train)
    elif (data_dir / "MNIST" / "raw").exists():
        dataset = datasets.MNIST(str(data_dir), train=train, download=False)
        pixels, labels = dataset.data, dataset.targets
    else:
        return None
    return pixels.float().div(255).sub(MNIST_MEAN).div(MNIST_STD).unsqueeze(1), labels


def image_batch(
    name: str, batch: int, device: torch.device, data_dir: Path | None, seed: int
) -> tuple[Tensor, str]:
    """A batch of inputs for the preset and where it came from (test digits or Gaussian noise)."""
    shape = input_shape(name)
    data = mnist(data_dir, train=False) if shape == (1, 28, 28) else None
    if data is not None:
        return data[0][:batch].to(device), "MNIST test digits"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g).to(device), "Gaussian images"
