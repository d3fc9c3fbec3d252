"""Building blocks of the multiscale models: convolutions, group norm, variational dropout."""

from math import gcd

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm (no batch statistics) in gcd(channels, groups) groups, the most that divide
    both (14 channels with groups=8 take 2, not 7)."""
    return nn.GroupNorm(gcd(channels, groups), channels, affine=True)


def conv(
    in_channels: int,
    out_channels: int,
    kernel: int = 3,
    stride: int = 1,
    bias: bool = False,
    normalize: bool = False,
) -> nn.Conv2d:
    """Same-padding convolution, optionally weight-normalised over output channels.

    Weights (and bias) start from N(0, 0.01^2) as in MDEQ, so the initial cell is a mild map.
    """
    layer = nn.Conv2d(
        in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias
    )
    for p in layer.parameters():
        nn.init.normal_(p, std=0.01)
    return weight_norm(layer, dim=0) if normalize else layer


class VariationalDropout2d(nn.Module):
    """Dropout whose mask is drawn once per forward pass and reused by every evaluation of f.

    A fresh mask per call would change f between solver iterations and destroy the fixed point;
    `reset()` discards the mask so that the next call draws a new one.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p
        self.mask: Tensor | None = None

    def reset(self) -> None:
        """Forget the current mask; the next training-mode call draws a new one."""
        self.mask = None

    def forward(self, h: Tensor) -> Tensor:
        """Multiply by the stored mask (drawn on first use), identity in eval mode or when p = 0."""
        if not self.training or self.p == 0.0:
            return h
        mask = self.mask
        if (
            mask is None
            or mask.shape != h.shape
            or mask.dtype != h.dtype
            or mask.device != h.device
        ):
            # Drawn in h's logical order, not its memory layout: the same seed drops the same
            # elements of a channels_last state.
            mask = torch.empty(h.shape, dtype=h.dtype, device=h.device)
            mask = mask.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
            self.mask = mask
        return h * mask

    def extra_repr(self) -> str:
        """Show the drop probability in the module's repr."""
        return f"p={self.p}"
