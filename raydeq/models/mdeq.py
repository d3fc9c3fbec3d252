"""Multiscale DEQ (Bai et al., 2020): stem, multiscale cell f(z, x), skip predictor, head.

The state z is a list with one tensor per scale, scale 0 at the input resolution (after the stem)
and every further scale at half the previous resolution. Only group norm is used inside f and g,
so a sample's equilibrium does not depend on the other samples in its batch.
"""

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydeq.models.classifier import Parts
from raydeq.models.layers import VariationalDropout2d, conv, group_norm
from raydeq.solvers.options import flag, integer

# MDEQConfig's counts besides the per-scale channels, each an integer >= 1 (groups=0 made
# every group norm one of a group per channel, gcd(c, 0) = c).
SIZES = (
    "final_channels",
    "in_channels",
    "num_classes",
    "expansion",
    "skip_expansion",
    "groups",
    "upsample_kernel",
)


@dataclass(frozen=True)
class MDEQConfig:
    """Sizes of one multiscale model; the presets in `raydeq.models.presets` fill these in."""

    channels: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    in_channels: int = 3
    num_classes: int = 10
    expansion: int = 5
    skip_expansion: int = 3
    groups: int = 8
    dropout: float = 0.0
    stem_downsample: int = 0
    upsample_kernel: int = 3
    weight_norm: bool = True

    def __post_init__(self) -> None:
        """Reject inconsistent sizes early, naming the offending field."""
        if len(self.channels) == 0:
            raise ValueError(f"channels={self.channels!r} needs one channel count per scale")
        for name in ("channels", "head_channels"):
            for i, count in enumerate(getattr(self, name)):
                integer(f"{name}[{i}]", count)
        for name in SIZES:
            integer(name, getattr(self, name))
        flag("weight_norm", self.weight_norm)
        if len(self.head_channels) != len(self.channels):
            raise ValueError(
                f"head_channels {self.head_channels} needs one entry per scale {self.channels}"
            )
        if self.upsample_kernel % 2 == 0:
            # padding kernel // 2 keeps a map's size for odd kernels only: an even one grows
            # each coarser scale's map by one row and column before its resize.
            raise ValueError(
                f"upsample_kernel={self.upsample_kernel} must be odd (1, 3, 5, ...), the sizes "
                "of a same-padding convolution"
            )
        if self.stem_downsample not in (0, 1, 2):
            raise ValueError(f"stem_downsample must be 0, 1 or 2, got {self.stem_downsample}")

    @property
    def post_fuse_groups(self) -> int:
        """The groups of the cell's post-fuse norms: MDEQ's half of `groups`, at least one
        (group_norm(c, 0) would be one group per channel, gcd(c, 0) = c, the most)."""
        return max(self.groups // 2, 1)


class ResidualBlock(nn.Module):
    """MDEQ's per-scale block: GN(relu(GN(drop(conv(relu(GN(conv(z))))) + inj) + z))."""

    def __init__(
        self, channels: int, expansion: int, groups: int, dropout: float, normalize: bool
    ) -> None:
        super().__init__()
        inner = channels * expansion
        self.conv1 = conv(channels, inner, normalize=normalize)
        self.norm1 = group_norm(inner, groups)
        self.conv2 = conv(inner, channels, normalize=normalize)
        self.drop = VariationalDropout2d(dropout)
        self.norm2 = group_norm(channels, groups)
        self.norm3 = group_norm(channels, groups)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        """Apply the block, adding the input injection (if any) before the second norm."""
        h = self.drop(self.conv2(F.relu(self.norm1(self.conv1(z)))))
        if injection is not None:
            h = h + injection
        return self.norm3(F.relu(self.norm2(h) + z))


def _down_channels(in_channels: int, out_channels: int, levels: int) -> list[int]:
    """Channel count after each stride-2 step: doubling when that lands on `out_channels`."""
    if in_channels * 2**levels == out_channels:
        return [in_channels * 2 ** (k + 1) for k in range(levels)]
    return [in_channels] * (levels - 1) + [out_channels]


class Downsample(nn.Module):
    """`levels` stride-2 3x3 convolutions with group norm, ReLU between them: to a coarser scale."""

    def __init__(self, in_channels: int, out_channels: int, levels: int, groups: int) -> None:
        super().__init__()
        steps: list[nn.Module] = []
        width = in_channels
        for k, nxt in enumerate(_down_channels(in_channels, out_channels, levels)):
            steps += [conv(width, nxt, stride=2), group_norm(nxt, groups)]
            if k < levels - 1:
                steps.append(nn.ReLU())
            width = nxt
        self.net = nn.Sequential(*steps)

    def forward(self, h: Tensor, size: torch.Size | None = None) -> Tensor:
        """Map `h` to the coarser scale (whose `size` the strides imply; taken for uniformity)."""
        return self.net(h)


class Upsample(nn.Module):
    """Convolution with group norm, then nearest-neighbour upsampling to a finer scale.

    MDEQ uses a 1x1 kernel here; the paper's parameter counts (10.63M, 17.91M) correspond to 3x3.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = conv(in_channels, out_channels, kernel=kernel)
        self.norm = group_norm(out_channels, groups)

    def forward(self, h: Tensor, size: torch.Size) -> Tensor:
        """Map `h` to the finer scale of spatial `size`."""
        return F.interpolate(self.norm(self.conv(h)), size=size, mode="nearest")


class Identity(nn.Module):
    """The fusion map from a scale to itself."""

    def forward(self, h: Tensor, size: torch.Size) -> Tensor:
        """Return `h` unchanged."""
        return h


def scale_sizes(height: int, width: int, scales: int) -> list[tuple[int, int]]:
    """Spatial size of every scale: each stride-2 step maps n to ceil(n / 2)."""
    sizes = [(height, width)]
    for _ in range(scales - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class MultiscaleCell(nn.Module):
    """MDEQ's f(z, x): per-scale residual blocks, then every scale fused into every other (sum)."""

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        ch, g = cfg.channels, cfg.groups
        self.channels = ch
        self.blocks = nn.ModuleList(
            ResidualBlock(c, cfg.expansion, g, cfg.dropout, cfg.weight_norm) for c in ch
        )
        self.fuse = nn.ModuleList(
            nn.ModuleList(self._fuse_map(cfg, j, i) for j in range(len(ch))) for i in range(len(ch))
        )
        self.post_fuse = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                conv(c, c, kernel=1, normalize=cfg.weight_norm),
                group_norm(c, cfg.post_fuse_groups),
            )
            for c in ch
        )

    @staticmethod
    def _fuse_map(cfg: MDEQConfig, src: int, dst: int) -> nn.Module:
        """Map from scale `src` to scale `dst`: identity, strided-conv down, or conv + upsample."""
        ch = cfg.channels
        if src == dst:
            return Identity()
        if src < dst:
            return Downsample(ch[src], ch[dst], dst - src, cfg.groups)
        return Upsample(ch[src], ch[dst], cfg.upsample_kernel, cfg.groups)

    def initial_state(self, x: Tensor) -> list[Tensor]:
        """All-zero state for injection `x` (B, C0, H, W): one tensor per scale."""
        sizes = scale_sizes(x.shape[-2], x.shape[-1], len(self.channels))
        return [x.new_zeros(x.shape[0], c, h, w) for c, (h, w) in zip(self.channels, sizes)]

    def forward(self, z: Sequence[Tensor], x: Tensor) -> list[Tensor]:
        """One application of f: x is injected into the highest resolution only."""
        h = [blk(zi, x if i == 0 else None) for i, (blk, zi) in enumerate(zip(self.blocks, z))]
        fused = []
        for i, row in enumerate(self.fuse):
            size = h[i].shape[-2:]
            # Summed from the first map, not from sum()'s 0: a 0 + map copied a whole scale.
            fused.append(reduce(operator.add, (m(hj, size) for m, hj in zip(row, h))))
        return [post(y) for post, y in zip(self.post_fuse, fused)]


class MultiscaleSkip(nn.Module):
    """Skip DEQ's explicit predictor g(x): a residual block, then strided down-sampling."""

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.block = ResidualBlock(ch[0], cfg.skip_expansion, cfg.groups, 0.0, cfg.weight_norm)
        self.down = nn.ModuleList(
            Downsample(ch[0], c, i, cfg.groups) for i, c in enumerate(ch) if i > 0
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Predict the multiscale equilibrium from the injection."""
        h = self.block(x)
        return [h] + [d(h) for d in self.down]


def _norms(cfg: MDEQConfig) -> list[tuple[int, int, int]]:
    """(channels, groups, level) of the group norms of the stem, f and the head, where level
    counts the stride-2 steps from the image to the map the norm sees (g's norms repeat f's
    at scale 0 and its down maps, with channel counts whose divisors f's have)."""
    s, g, ch, last = cfg.stem_downsample, cfg.groups, cfg.channels, len(cfg.channels) - 1
    norms = [(ch[0], g, min(s, 1)), (ch[0], g, s), (ch[0], g, s)]
    for i, c in enumerate(ch):
        norms += [(c * cfg.expansion, g, s + i), (c, g, s + i), (c, cfg.post_fuse_groups, s + i)]
        for j in range(i):  # down maps from finer scales
            norms += [(w, g, s + j + k + 1) for k, w in enumerate(_down_channels(ch[j], c, i - j))]
        norms += [(c, g, s + j) for j in range(i + 1, len(ch))]  # up maps from coarser scales
        h = cfg.head_channels[i]
        norms += [(h, g, s + i), (h, g, s + i), (h * Bottleneck.expansion, g, s + i)]
        norms.append((h * Bottleneck.expansion, g, s + i))  # shortcut or next down map
    norms.append((cfg.final_channels, g, s + last))
    return norms


def smallest_side(cfg: MDEQConfig) -> int:
    """Images need a height or width above this: a group norm whose groups hold one channel
    each sees one value per group on a 1 x 1 map (`level` stride-2 steps turn every side up to
    2^level into 1), which torch refuses for a batch of one and sets to its bias, whatever the
    input, for a larger batch; 0 where no norm has one channel per group."""
    levels = [level for c, groups, level in _norms(cfg) if groups % c == 0]
    return 2 ** max(levels) if levels else 0


class Stem(nn.Module):
    """Input injection: two 3x3 convolutions (stride 2 as configured) and a 1x1 convolution."""

    # A Stem pickled whole before it recorded its smallest side (torch.save(model) of
    # cifar10_small) has none of its own; it runs unchecked, as it ran then.
    smallest_side = 0

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        c, g = cfg.channels[0], cfg.groups
        self.net = nn.Sequential(
            conv(cfg.in_channels, c, stride=2 if cfg.stem_downsample >= 1 else 1),
            group_norm(c, g),
            nn.ReLU(),
            conv(c, c, stride=2 if cfg.stem_downsample >= 2 else 1),
            group_norm(c, g),
            nn.ReLU(),
            conv(c, c, kernel=1),
            group_norm(c, g),
            nn.ReLU(),
        )
        self.in_channels = cfg.in_channels
        self.smallest_side = smallest_side(cfg)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) of a height or width above `smallest_side` -> injection x at
        the highest DEQ resolution; a ValueError for others, before the solve."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"the multiscale model takes images (batch, {self.in_channels}, height, width), "
                f"got {tuple(images.shape)}"
            )
        if max(images.shape[-2:]) <= self.smallest_side:
            raise ValueError(
                f"the multiscale model takes images of height or width above "
                f"{self.smallest_side}, got {images.shape[-2]} x {images.shape[-1]}: its "
                f"coarsest maps would be 1 x 1, where a group norm of one channel per group "
                "sees a single value"
            )
        return self.net(images)


class Bottleneck(nn.Module):
    """Head block widening one scale to 4 * planes channels (1x1, 3x3, 1x1 convolutions)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, groups: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            conv(in_channels, planes, kernel=1),
            group_norm(planes, groups),
            nn.ReLU(),
            conv(planes, planes),
            group_norm(planes, groups),
            nn.ReLU(),
            conv(planes, out, kernel=1),
            group_norm(out, groups),
        )
        self.shortcut = (
            nn.Sequential(conv(in_channels, out, kernel=1), group_norm(out, groups))
            if in_channels != out
            else nn.Identity()
        )

    def forward(self, h: Tensor) -> Tensor:
        """relu(body(h) + shortcut(h))."""
        return F.relu(self.body(h) + self.shortcut(h))


class ClassificationHead(nn.Module):
    """MDEQ's head: widen each scale, fold high resolutions into the lowest, pool, classify."""

    def __init__(self, cfg: MDEQConfig) -> None:
        super().__init__()
        g, e = cfg.groups, Bottleneck.expansion
        widths = [h * e for h in cfg.head_channels]
        self.widen = nn.ModuleList(
            Bottleneck(c, h, g) for c, h in zip(cfg.channels, cfg.head_channels)
        )
        self.down = nn.ModuleList(
            nn.Sequential(conv(a, b, stride=2, bias=True), group_norm(b, g), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.final = nn.Sequential(
            conv(widths[-1], cfg.final_channels, kernel=1, bias=True),
            group_norm(cfg.final_channels, g),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(cfg.final_channels, cfg.num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        """Equilibrium (one tensor per scale) -> logits (B, num_classes)."""
        y = self.widen[0](z[0])
        for down, widen, zi in zip(self.down, self.widen[1:], z[1:]):
            y = widen(zi) + down(y)
        return self.classifier(self.final(y).mean(dim=(-2, -1)))


def mdeq_parts(cfg: MDEQConfig) -> Parts:
    """Stem, multiscale cell, classification head and skip predictor of one MDEQ."""
    return Parts(
        stem=Stem(cfg),
        cell=MultiscaleCell(cfg),
        head=ClassificationHead(cfg),
        skip=MultiscaleSkip(cfg),
    )
