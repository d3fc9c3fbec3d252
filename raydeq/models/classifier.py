"""Image classifier around an equilibrium layer: stem -> DEQ / Neural ODE -> head."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from torch import Tensor, nn

from raydeq.deq import LayerOutput, dtype_note


class Parts(NamedTuple):
    """The modules of one architecture: stem(images) -> x, cell f(z, x), head(z*), skip g(x)."""

    stem: nn.Module
    cell: nn.Module
    head: nn.Module
    skip: nn.Module


class EquilibriumClassifier(nn.Module):
    """`logits, out = model(images)`, where out holds z*, its statistics and the auxiliary losses
    (weighed by the training objective, `raydeq.training.objective.Objective`)."""

    def __init__(self, stem: nn.Module, layer: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.layer = layer
        self.head = head

    def forward(self, images: Tensor) -> tuple[Tensor, LayerOutput]:
        """Classify a batch; variational dropout draws fresh masks for every call (the layer
        discards the last call's). A TypeError for images that are no tensor (a list, a numpy
        array), which the stems would fail on reading their shape."""
        if not isinstance(images, Tensor):
            raise TypeError(
                f"images must be a tensor (B, ...), got {type(images).__name__}: convert it "
                "with torch.as_tensor(images, dtype=torch.float32)"
            )
        with self._dtype_hint(images):
            x = self.stem(images)
        out = self.layer(x)
        return self.head(out.z), out

    @contextmanager
    def _dtype_hint(self, images: Tensor) -> Iterator[None]:
        """Add to an error the stem raises a note naming the images' dtype and the model's
        where they differ (outside autocast the stem fails in its first product, with torch's
        message alone), as the layers name x's dtype and f's. It holds the stem alone: the
        layer breaks an enclosing torch.compile graph, which dynamo cannot resume within it."""
        try:
            yield
        except (RuntimeError, ValueError) as err:
            note = dtype_note(self, images, "images", "model")
            if note:
                err.add_note(note)
            raise
