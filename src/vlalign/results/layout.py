"""Page layout shared by the figures: panel grids, one style per line, one legend per figure.

A figure is a grid of at most :data:`MAX_COLS` panels of :data:`PANEL_IN` inches per row, so the
widest figure fits a page (12.8 in); more panels wrap into rows. Every line keeps one colour
(and line style) in all panels of its figure, and the figure has a single legend below the
panels that names each line once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vlalign.io_utils import atomic_path

FORMATS = ("png", "pdf")
DPI = 150
PANEL_IN = (3.2, 2.4)  # width, height of one panel in inches
MAX_COLS = 4
# Small panels need small type; applied while a figure is built and saved.
RC = {
    "font.size": 7,
    "axes.titlesize": 8,
    "axes.labelsize": 7,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.labelsize": 8,
    "figure.titlesize": 9,
}
LINESTYLES = ("-", "--", "-.", ":")
# black and greys are left out of the palettes: they mark references and shared curves
_GREYS = {"tab10": {7}, "tab20": {14, 15}}

P = ParamSpec("P")
R = TypeVar("R")


def page_style(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a plot function under :data:`RC` (the fonts of a page-sized figure)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with mpl.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def grid(n_panels: int, ncols: int | None = None) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` panels, ``ncols`` (≤ MAX_COLS) per row; spare cells removed."""
    ncols = max(1, min(ncols or MAX_COLS, MAX_COLS, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(PANEL_IN[0] * ncols, PANEL_IN[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer, to measure the legend
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    return fig, axes[:n_panels]


def palette(n: int) -> list[Any]:
    """At least ``n`` distinct colours where the palettes allow: tab10 when it suffices, else
    tab20 with its dark half (tab10's colours) first; greys left out."""
    if n <= 10 - len(_GREYS["tab10"]):
        return [c for i, c in enumerate(mpl.colormaps["tab10"].colors) if i not in _GREYS["tab10"]]
    tab20 = mpl.colormaps["tab20"].colors
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [tab20[i] for i in order if i not in _GREYS["tab20"]]


def line_styles(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """One colour per name (sorted, so the same set of names always gets the same styles);
    past the palette's length the colours repeat with the next line style."""
    names = sorted(set(names))
    colours = palette(len(names))
    return {
        name: {
            "color": colours[i % len(colours)],
            "linestyle": LINESTYLES[(i // len(colours)) % len(LINESTYLES)],
        }
        for i, name in enumerate(names)
    }


def figure_legend(
    fig: Figure, entries: Mapping[str, Mapping[str, Any]], title: str | None = None
) -> None:
    """One legend below the panels, ``label → line style``, in as few rows as fit the width;
    the figure grows by the legend's height so the panels keep their size."""
    if not entries:
        return
    handles = [Line2D([], [], linewidth=1.5, **style) for style in entries.values()]
    labels = list(entries)
    width_px = fig.get_figwidth() * fig.dpi
    renderer = fig.canvas.get_renderer()
    ncol = len(labels)
    while True:
        legend = fig.legend(
            handles, labels, loc="outside lower center", ncol=ncol, title=title, frameon=False
        )
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * width_px or ncol == 1:
            break
        legend.remove()
        ncol -= 1
    # as many columns as needed for that number of rows: rows of even length
    balanced = math.ceil(len(labels) / math.ceil(len(labels) / ncol))
    if balanced != ncol:
        legend.remove()
        legend = fig.legend(
            handles, labels, loc="outside lower center", ncol=balanced, title=title,
            frameon=False,
        )
        box = legend.get_window_extent(renderer)
    fig.set_figheight(fig.get_figheight() + box.height / fig.dpi + 0.1)


def save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """``<out_dir>/<name>.png`` and ``.pdf``, each written atomically."""
    paths = []
    for ext in FORMATS:
        path = Path(out_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight")
        paths.append(path)
    return paths

