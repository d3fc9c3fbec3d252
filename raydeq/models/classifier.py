"""Image classifier around an equilibrium layer: stem -> DEQ / Neural ODE -> head."""

from typing import NamedTuple

from torch import Tensor, nn

from raydeq.deq import LayerOutput
from raydeq.models.layers import VariationalDropout2d


class Parts(NamedTuple):
    """The modules of one architecture: stem(images) -> x, cell f(z, x), head(z*), skip g(x)."""

    stem: nn.Module
    cell: nn.Module
    head: nn.Module
    skip: nn.Module


class EquilibriumClassifier(nn.Module):
    """`logits, out = model(images)`, where out holds z*, its statistics and the auxiliary losses
    (weighed by the training objective, `raydeq.training.objective.Objective`)."""

    def __init__(self, stem: nn.Module, layer: nn.Module, head: nn.Module):
        super().__init__()
        self.stem = stem
        self.layer = layer
        self.head = head

    def forward(self, images: Tensor) -> tuple[Tensor, LayerOutput]:
        """Classify a batch; variational dropout draws fresh masks for every call."""
        for module in self.layer.modules():
            if isinstance(module, VariationalDropout2d):
                module.reset()
        out = self.layer(self.stem(images))
        return self.head(out.z), out
