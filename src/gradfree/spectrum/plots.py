"""PNG plots of a spectrum report (through :mod:`gradfree.base.plots`).

Spectra (``spectrum_plots``), per captured role and site:
- ``decay_{role}_{site}.png``: normalised eigenvalues λ_k/Σλ against k on log-log axes, one line
  per layer, un-centered/all tokens beside centered/without the first token, so the seed-002
  artifact (one dominant direction) and what remains once it is removed are seen side by side;
- ``df_{role}_{site}.png``: the participation ratio Df per layer, one line per variant;
- ``activations_vs_weights.png`` (when weights were analysed): Df divided by the dimension per
  layer, for the residual stream of each role and for each kind of weight matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.plots import line_plot, pyplot, slug

if TYPE_CHECKING:
    from gradfree.spectrum.report import SpectrumReport

# The two variants shown side by side in decay plots: the seed's measurement and the corrected one.
DECAY_VARIANTS = ("uncentered/all", "centered/body")


def decay_plot(panels: dict[str, dict[int, Sequence[float]]], path: Path, *, title: str) -> Path:
    """Panels of normalised spectra (λ_k/Σλ vs k, log-log), one line per layer coloured by depth."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    try:
        for ax, (name, by_layer) in zip(axes[0], panels.items(), strict=True):
            n = max(len(by_layer) - 1, 1)
            cmap = plt.get_cmap("viridis")
            for i, (layer, eigs) in enumerate(sorted(by_layer.items())):
                total = sum(eigs) or 1.0
                # Below 1e-12 of the total an eigenvalue is float64 rounding of a rank-deficient
                # matrix (e.g. fewer distinct tokens than dimensions), not signal.
                y = [e / total for e in eigs if e > 1e-12 * total]
                ax.plot(range(1, len(y) + 1), y, color=cmap(i / n), lw=1, label=f"layer {layer}")
            ax.set(xscale="log", yscale="log", title=name, xlabel="component k", ylabel="λ_k / Σλ")
            ax.grid(alpha=0.3)
            if len(by_layer) <= 12:
                ax.legend(fontsize=6)
        layers = sorted({k for p in panels.values() for k in p})
        fig.suptitle(f"{title} (colour: layer {layers[0]} dark → {layers[-1]} light)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def spectrum_plots(report: SpectrumReport, folder: Path) -> list[Path]:
    """Every plot of a spectrum report (see the module docstring); returns the files written."""
    written: list[Path] = []
    groups: dict[tuple[str, str], list[Any]] = {}
    for s in report.activations:
        if s.layer is not None:  # sites outside the blocks (final.normed) are in the tables only
            groups.setdefault((s.role, s.site), []).append(s)
    for (role, site), entries in groups.items():
        entries.sort(key=lambda e: e.layer)
        panels = {
            v: {e.layer: e.eigenvalues[v].tolist() for e in entries if v in e.eigenvalues}
            for v in DECAY_VARIANTS
        }
        panels = {v: p for v, p in panels.items() if p}
        name = f"{slug(role)}_{slug(site)}"
        if panels:
            path = folder / f"decay_{name}.png"
            written.append(decay_plot(panels, path, title=f"{role}: {site} eigenvalue decay"))
        variants = sorted({v for e in entries for v in e.summaries})
        df_series: dict[str, tuple[Sequence[float], Sequence[float]]] = {
            v: (
                [e.layer for e in entries if v in e.summaries],
                [e.summaries[v]["df"] for e in entries if v in e.summaries],
            )
            for v in variants
        }
        if df_series:
            written.append(
                line_plot(
                    df_series,
                    folder / f"df_{name}.png",
                    title=f"{role}: {site} participation ratio per layer",
                    xlabel="layer",
                    ylabel="Df = (Σλ)²/Σλ²",
                    logy=True,
                )
            )
    if report.weights:
        written.append(_activations_vs_weights(report, groups, folder))
    return written


def _activations_vs_weights(
    report: SpectrumReport, groups: dict[tuple[str, str], list[Any]], folder: Path
) -> Path:
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
    styles: dict[str, str] = {}
    for (role, site), entries in groups.items():
        if site != "resid_pre":
            continue
        for v in DECAY_VARIANTS:
            pts = [(e.layer, e.summaries[v]["df_over_dim"]) for e in entries if v in e.summaries]
            if pts:
                label = f"act {role} resid_pre {v}"
                series[label] = ([p[0] for p in pts], [p[1] for p in pts])
                styles[label] = "--s"
    kinds: dict[str, list[tuple[int, float]]] = {}
    for w in report.weights or []:
        if w.layer is not None:
            kinds.setdefault(w.kind, []).append((w.layer, w.summary["df_over_dim"]))
    for kind, pts in kinds.items():
        series[f"weight {kind}"] = ([p[0] for p in pts], [p[1] for p in pts])
    return line_plot(
        series,
        folder / "activations_vs_weights.png",
        title="Df / dimension: activations (dashed) vs weights (σ²)",
        xlabel="layer",
        ylabel="Df / dim",
        logy=True,
        styles=styles,
    )
