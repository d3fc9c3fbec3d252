"""Building blocks of the multiscale models: convolutions, group norm, variational dropout."""

from collections import OrderedDict
from math import gcd
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm (no batch statistics) in gcd(channels, groups) groups, the most that divide
    both (14 channels with groups=8 take 2, not 7)."""
    return nn.GroupNorm(gcd(channels, groups), channels, affine=True)


# The name of the hook weight_norm registers to load its older state dicts (weight_g, weight_v).
WEIGHT_NORM_HOOK = "_weight_norm_compat_hook"


class Conv2d(nn.Conv2d):
    """nn.Conv2d that pickles parametrized, as torch.save(model) needs: torch refuses to pickle
    a parametrized module, whose class it makes at run time, so this one pickles as its plain
    state and its parametrizations (weight norm's g and v, or any other's originals), and
    unpickles parametrized again with them."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        """The default reduction, or for a parametrized layer `_parametrized` of its state
        without the parametrizations and of the parametrizations."""
        if not parametrize.is_parametrized(self):
            return super().__reduce_ex__(protocol)
        state = dict(vars(self))
        modules = dict(state["_modules"])
        parametrizations = modules.pop("parametrizations")
        # weight_norm's hook that loads its older state dicts is a local function, which pickle
        # cannot name; weight_norm adds it again on unpickling.
        hooks = state["_load_state_dict_pre_hooks"]
        kept = {
            k: h for k, h in hooks.items() if getattr(h.hook, "__name__", None) != WEIGHT_NORM_HOOK
        }
        state.update(_modules=modules, _load_state_dict_pre_hooks=OrderedDict(kept))
        return _parametrized, (state, parametrizations)


def _parametrized(state: dict[str, Any], parametrizations: nn.ModuleDict) -> Conv2d:
    """A Conv2d of the plain `state` under the pickled `parametrizations`, each with its own
    originals (a weight norm's g and v): a weight norm is registered by weight_norm, with its
    loader of older state dicts, and any other (spectral_norm, orthogonal, the bias's) in
    place of a stand-in, so that none is evaluated (a spectral norm's power iteration)."""
    layer = Conv2d.__new__(Conv2d)
    layer.__setstate__(state)
    for name, parametrization in parametrizations.items():
        if len(parametrization) == 1 and isinstance(parametrization[0], _WeightNorm):
            setattr(layer, name, nn.Parameter(parametrization().detach()))
            weight_norm(layer, name, dim=parametrization[0].dim)
        else:
            setattr(layer, name, nn.Parameter(torch.empty(0)))
            parametrize.register_parametrization(layer, name, nn.Identity(), unsafe=True)
        layer.parametrizations[name] = parametrization
    return layer


def _weight_normalised(state: dict[str, Any], weight: nn.Module) -> Conv2d:
    """A Conv2d that an earlier reduction pickled, naming this function with the plain state
    and the weight norm's parametrization alone (torch.save(model) files of that time)."""
    return _parametrized(state, nn.ModuleDict({"weight": weight}))


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
    layer = Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=bias)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.01)
    return weight_norm(layer, dim=0) if normalize else layer


class VariationalDropout2d(nn.Module):
    """Dropout whose mask is drawn once per forward pass and reused by every evaluation of f.

    A fresh mask per call would change f between solver iterations and destroy the fixed point;
    `reset()` discards the mask so that the next call draws a new one; draws_mask_per_pass
    tells a DEQ or Neural ODE to discard it before each forward pass.
    """

    draws_mask_per_pass = True

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
