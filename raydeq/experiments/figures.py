"""Matplotlib without a display (the Agg backend) and figures as PNG bytes, for every chart an
experiment writes (results, Pareto front, the paper's figures)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
from matplotlib.artist import Artist

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (the backend is chosen first)

__all__ = ["plt", "png"]


def png(figure: plt.Figure, dpi: int = 120, outside: Sequence[Artist] = ()) -> bytes:
    """The figure, laid out, as PNG bytes; the figure is closed. The image grows to take in
    the `outside` artists, which the layout leaves out (a legend too large for the figure)."""
    buffer = io.BytesIO()
    for artist in outside:
        artist.set_in_layout(False)
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi, **_grown(figure, outside))
    plt.close(figure)
    return buffer.getvalue()


def _grown(figure: plt.Figure, outside: Sequence[Artist]) -> dict[str, object]:
    """savefig's settings for an image that takes in the `outside` artists (none without them):
    the artists a tight box takes in replace the figure's own, a suptitle among them."""
    if not outside:
        return {}
    extra = [*figure.get_default_bbox_extra_artists(), *outside]
    return {"bbox_inches": "tight", "bbox_extra_artists": extra}
