"""Matplotlib without a display (the Agg backend) and figures as PNG bytes, for every chart an
experiment writes (results, Pareto front, the paper's figures)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (the backend is chosen first)

__all__ = ["plt", "png"]


def png(figure: plt.Figure, dpi: int = 120) -> bytes:
    """The figure, laid out, as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()
