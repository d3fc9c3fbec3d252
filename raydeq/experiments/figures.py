"""Matplotlib without a display (the Agg backend) and figures as PNG bytes, for every chart an
experiment writes (results, Pareto front, the paper's figures).

pyplot is imported on the first chart, not with this module: `python -m raydeq.tune` imports
this for its reports, and a --dry-run, a --help or a trial's worker draws nothing.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

__all__ = ["LOG_SPAN", "log_y", "nothing_drawn", "png", "pyplot", "spans_decades", "subplots"]

# An axis whose values span this factor or more is logarithmic: on a linear one, times from
# 1e-3 to 1e-1 s put the small ones, often the ones that matter, in a sliver at the bottom.
LOG_SPAN = 20.0


@functools.cache
def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend, chosen before pyplot is first imported."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def subplots(*args: Any, **kwargs: Any) -> Any:
    """pyplot.subplots on the Agg backend: a figure and its axes."""
    return pyplot().subplots(*args, **kwargs)


def spans_decades(values: Sequence[float]) -> bool:
    """Whether values, all positive, span LOG_SPAN or more: their axis reads on a log scale."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) >= LOG_SPAN * min(finite)


def log_y(axes: Any) -> None:
    """A logarithmic y axis where the values of the lines drawn span LOG_SPAN or more (a
    variant's times of 1e-3 s beside another's of 1 s flattened to 0 on a linear one)."""
    if spans_decades([float(y) for line in axes.lines for y in line.get_ydata()]):
        axes.set_yscale("log")


def nothing_drawn(axes: Any, text: str) -> None:
    """Write `text` in place of empty axes, whose frame, ticks and grid are hidden (the ticks
    of axes shared with a drawn panel stay there): a panel with nothing to draw says why (every
    trial failed before its first report) instead of showing bare 0-1 axes."""
    axes.set_axis_off()
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)


def png(figure: Figure, dpi: int = 120, outside: Sequence[Artist] = ()) -> bytes:
    """The figure, laid out, as PNG bytes; the figure is closed. The image grows to take in
    the `outside` artists, which the layout leaves out (a legend too large for the figure)."""
    buffer = io.BytesIO()
    for artist in outside:
        artist.set_in_layout(False)
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi, **_grown(figure, outside))
    pyplot().close(figure)
    return buffer.getvalue()


def _grown(figure: Figure, outside: Sequence[Artist]) -> dict[str, object]:
    """savefig's settings for an image that takes in the `outside` artists (none without them):
    the artists a tight box takes in replace the figure's own, a suptitle among them."""
    if not outside:
        return {}
    extra = [*figure.get_default_bbox_extra_artists(), *outside]
    return {"bbox_inches": "tight", "bbox_extra_artists": extra}
