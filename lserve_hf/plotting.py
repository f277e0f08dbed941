"""Figures for files, without pyplot: a ``matplotlib.figure.Figure`` draws and saves on its own, so
writing a PNG neither needs a display nor switches the backend of a notebook that called us."""

from __future__ import annotations


def new_figure(purpose: str, **kwargs):
    """A constrained-layout ``Figure`` (titles, labels and colorbars laid out without overlap);
    ``ImportError`` saying what to install, and what for, when matplotlib is absent (it is an
    optional dependency: the ``plot`` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"install matplotlib (pip install matplotlib) for {purpose}") from None
    return Figure(layout="constrained", **kwargs)
