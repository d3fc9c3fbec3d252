"""Matplotlib without a display (the Agg backend), figures as PNG bytes and the pieces that
every chart an experiment writes (results, Pareto front, the paper's figures) shares.

Matplotlib is imported on the first chart, not with this module: `python -m raydeq.tune`
imports this for its reports, and a --dry-run, a --help or a trial's worker draws nothing. The
figures are matplotlib Figures of their own, never pyplot's, whose backend is the process's.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend

__all__ = [
    "LOG_SPAN",
    "legend_beside",
    "log_y",
    "nothing_drawn",
    "png",
    "spans_decades",
    "step_curves",
    "step_panel",
    "subplots",
]

# An axis whose values span this factor or more is logarithmic: on a linear one, times from
# 1e-3 to 1e-1 s put the small ones, often the ones that matter, in a sliver at the bottom.
LOG_SPAN = 20.0


def subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> Any:
    """A figure of its own and its axes (Figure.subplots' arguments), drawn by Agg without
    pyplot: pyplot's backend is the process's, and choosing Agg for it switched off the inline
    figures of a notebook that ran an experiment."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*args, **kwargs)


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


def step_curves(
    curves: Mapping[str, Sequence[pd.DataFrame]], metric: str
) -> Iterator[tuple[str, pd.DataFrame]]:
    """Per variant that reported `metric`, its line against step: the mean and std over its
    seeds' report histories at each step (a std of 0 where one seed reported)."""
    for group, frames in curves.items():
        usable = [f[["step", metric]].dropna() for f in frames if metric in f]
        if any(len(f) for f in usable):
            stats = pd.concat(usable).groupby("step")[metric].agg(["mean", "std"])
            yield group, stats.fillna(0.0)


def step_panel(axes: Any, unreported: str, linear: bool) -> None:
    """Finish axes of lines against step: a grid, a log y axis where the lines span decades
    (unless `linear`: an accuracy's fractions read linearly whatever their span), or the words
    `unreported` in place of axes with no line."""
    axes.grid(alpha=0.3)
    if not axes.lines:
        nothing_drawn(axes, unreported)
    elif not linear:
        log_y(axes)


def legend_beside(
    axes: Any, handles: Mapping[str, Artist], columns: int = 1, gap: float = 0.03
) -> Legend:
    """One legend of the labelled `handles` right of `axes`, its top left `gap` (of the axes'
    width) past their right edge: inside, it covered what a panel draws."""
    return axes.legend(
        list(handles.values()),
        list(handles),
        fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.0 + gap, 1.0),
        ncols=columns,
    )


def png(figure: Figure, dpi: int = 120, outside: Sequence[Artist] = ()) -> bytes:
    """The figure, laid out, as PNG bytes. The image grows to take in the `outside` artists,
    which the layout leaves out (a legend too large for the figure)."""
    buffer = io.BytesIO()
    for artist in outside:
        artist.set_in_layout(False)
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi, **_grown(figure, outside))
    return buffer.getvalue()


def _grown(figure: Figure, outside: Sequence[Artist]) -> dict[str, object]:
    """savefig's settings for an image that takes in the `outside` artists (none without them):
    the artists a tight box takes in replace the figure's own, a suptitle among them."""
    if not outside:
        return {}
    extra = [*figure.get_default_bbox_extra_artists(), *outside]
    return {"bbox_inches": "tight", "bbox_extra_artists": extra}
