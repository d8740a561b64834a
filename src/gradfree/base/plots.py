"""PNG plots for reports: line and bar charts (matplotlib, headless Agg backend, chosen inside
each call so that importing gradfree never touches a display or imports matplotlib).

The spectrum's own plots are in :mod:`gradfree.spectrum.plots`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    styles: dict[str, str] | None = None,
) -> Path:
    """One line per named (x, y) series against an integer x (a layer), written as a PNG."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        for label, (x, y) in series.items():
            ax.plot(x, y, (styles or {}).get(label, "-o"), label=label, markersize=3)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # x is a layer index
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def bar_plot(
    values: dict[str, float], path: Path, *, title: str, xlabel: str, logx: bool = False
) -> Path:
    """One horizontal bar per named value, in the given order (top to bottom), as a PNG."""
    plt = pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    try:
        ax.barh(range(len(names)), [values[n] for n in names], color="#4C72B0")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set(title=title, xlabel=xlabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
