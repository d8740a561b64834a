"""The report of ``gradfree spectrum``: what was computed, and how it is written.

``write_report`` puts into one output folder, atomically: ``spectrum.json`` (every summary number),
``spectrum.md`` (the seed-002 comparison first, then one table per site and one for the weights),
the PNG plots of :mod:`gradfree.spectrum.plots` and the raw spectra in ``eigenvalues.safetensors``
(keys ``act/{role}/{site key}/{variant}`` and ``weight/{matrix}``) for later analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.spectrum.compute import (
    BASE_VARIANTS,
    STANDARDISED_VARIANTS,
    SiteSpectrum,
    WeightSpectrum,
)

if TYPE_CHECKING:
    import torch


@dataclass
class SpectrumReport:
    """Everything ``gradfree spectrum`` computed, ready to write."""

    capture_path: str
    activations: list[SiteSpectrum]
    weights: list[WeightSpectrum] | None = None
    model: str | None = None
    trunk_width: int | None = None
    standardised: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "capture": self.capture_path,
            "trunk_width": self.trunk_width,
            "standardised": self.standardised,
            "variants": sorted({v for s in self.activations for v in s.summaries}),
            "activations": [s.to_json() for s in self.activations],
            "weights": None
            if self.weights is None
            else {"model": self.model, "matrices": [w.to_json() for w in self.weights]},
            **self.meta,
        }


def write_report(report: SpectrumReport, out: str | Path, overwrite: bool = False) -> Path:
    """Write spectrum.json/.md, eigenvalues.safetensors and the PNGs into ``out``, atomically."""
    from safetensors.torch import save_file

    from gradfree.base.io import atomic_dir, write_json_atomic, write_text_atomic
    from gradfree.spectrum import plots

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        for s in report.activations:
            for v, e in s.eigenvalues.items():
                tensors[f"act/{s.role}/{s.key}/{v}"] = e.contiguous()
        for w in report.weights or []:
            tensors[f"weight/{w.name}"] = w.sq_singular_values.contiguous()
        if tensors:
            save_file(tensors, str(tmp / "eigenvalues.safetensors"))
        pngs = plots.spectrum_plots(report, tmp)
        doc = report.to_json()
        doc["plots"] = [p.name for p in pngs]
        write_json_atomic(tmp / "spectrum.json", doc)
        write_text_atomic(tmp / "spectrum.md", render_markdown(report, pngs))
    return out


_KIND_LETTER = {"uncentered": "u", "centered": "c", "correlation": "r"}
_KEY_VARIANTS = ("uncentered/all", "centered/body")  # the seed's measurement and the corrected one
_VARIANT_ORDER = [*BASE_VARIANTS, *STANDARDISED_VARIANTS]


def _short(variant: str) -> str:
    kind, part = variant.split("/")
    return f"{_KIND_LETTER[kind]}/{part}"


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _median(xs: list[float]) -> float | None:
    import statistics

    return statistics.median(xs) if xs else None


def seed002_rows(report: SpectrumReport) -> list[str]:
    """Median over layers, per (role, site), of the artifact-prone and the corrected Df."""
    rows = []
    groups: dict[tuple[str, str], list[SiteSpectrum]] = {}
    for s in report.activations:
        groups.setdefault((s.role, s.site), []).append(s)
    for (role, site), entries in groups.items():

        def med(variant: str, field: str, entries: list[SiteSpectrum] = entries) -> float | None:
            return _median([e.summaries[variant][field] for e in entries if variant in e.summaries])

        shares = [e.mean_share["all"] for e in entries if "all" in e.mean_share]
        rows.append(
            f"| {role} | {site} | {len(entries)} | {_fmt(med('uncentered/all', 'df'))} | "
            f"{_fmt(med('centered/all', 'df'))} | {_fmt(med('centered/body', 'df'))} | "
            f"{_fmt(med('uncentered/all', 'k95'), 0)} | {_fmt(med('centered/body', 'k95'), 0)} | "
            f"{_fmt(_median(shares), 3)} |"
        )
    return rows


def _site_table(entries: list[SiteSpectrum], trunk_width: int | None) -> list[str]:
    """One row per layer of a (role, site): Df of every variant, k95 and shares."""
    variants = sorted({v for e in entries for v in e.summaries}, key=_VARIANT_ORDER.index)
    keyed = [v for v in variants if v in _KEY_VARIANTS]
    head = ["layer", "dim", "tokens", *[f"Df {_short(v)}" for v in variants]]
    head += [f"k95 {_short(v)}" for v in keyed]
    head += ["top1 u/all", "mean share all", "mean share body"]
    if trunk_width is not None:
        head.append(f"top-{trunk_width} share c/body")
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for e in entries:
        sm = e.summaries
        row = ["final" if e.layer is None else str(e.layer), str(e.dim), str(e.count)]
        row += [_fmt(sm.get(v, {}).get("df")) for v in variants]
        row += [_fmt(sm.get(v, {}).get("k95")) for v in keyed]
        row.append(_fmt(sm.get("uncentered/all", {}).get("top1_share"), 3))
        row += [_fmt(e.mean_share.get("all"), 3), _fmt(e.mean_share.get("body"), 3)]
        if trunk_width is not None:
            row.append(_fmt(sm.get("centered/body", {}).get("trunk_share"), 3))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_markdown(report: SpectrumReport, plots: Sequence[Path] = ()) -> str:
    """The human-readable report: the seed-002 comparison first, then one table per site."""
    lines = [
        f"# Spectra of `{report.capture_path}`",
        "",
        "Df = (Σλ)²/Σλ² (participation ratio); kNN = components for NN% of Σλ; top1 = share of "
        "the largest eigenvalue. Variants: u = un-centered E[xxᵀ], c = centered covariance, "
        "r = correlation (per-dimension standardised); /all = every token, /body = without each "
        "sequence's first token. 'mean share' = ‖μ‖²/E‖x‖², the part of the un-centered energy "
        "that is the mean vector.",
        "",
        "## Seed 002 check: un-centered vs centered Df (medians over layers)",
        "",
        "| role | site | layers | Df u/all | Df c/all | Df c/body | k95 u/all | k95 c/body | "
        "mean share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *seed002_rows(report),
    ]
    groups: dict[tuple[str, str], list[SiteSpectrum]] = {}
    for s in report.activations:
        groups.setdefault((s.role, s.site), []).append(s)
    for (role, site), entries in groups.items():
        lines += ["", f"## {role}: {site}", "", *_site_table(entries, report.trunk_width)]
        notes: dict[str, list[str]] = {}
        for e in entries:
            for n in e.notes:
                notes.setdefault(n, []).append("final" if e.layer is None else str(e.layer))
        lines += [""] * bool(notes) + [f"- {n} (layers {', '.join(ls)})" for n, ls in notes.items()]
    if report.weights is not None:
        head = ["matrix", "shape", "Df(σ²)", "Df / min dim", "k90", "k95", "k99", "top1"]
        if report.trunk_width is not None:
            head.append(f"top-{report.trunk_width} share")
        lines += ["", f"## Weights of `{report.model}` (σ² = squared singular values)", ""]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for w in report.weights:
            sm = w.summary
            row = [w.name, f"{w.shape[0]}×{w.shape[1]}", _fmt(sm["df"]), _fmt(sm["df_over_dim"], 3)]
            row += [str(sm["k90"]), str(sm["k95"]), str(sm["k99"]), _fmt(sm["top1_share"], 3)]
            if report.trunk_width is not None:
                row.append(_fmt(sm["trunk_share"], 3))
            lines.append("| " + " | ".join(row) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def build_report(
    capture_dir: str | Path,
    *,
    roles: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    model_spec: str | None = None,
    trunk_width: int | None = None,
    standardised: bool = False,
    embeddings: bool = True,
    device: str = "cpu",
    loaded: Any = None,
) -> SpectrumReport:
    """Open a capture, compute its activation spectra and (given a model) the weight spectra.

    ``loaded`` (a ``LoadedModel`` already in memory) is used instead of loading ``model_spec``."""
    from gradfree.base.provenance import versions
    from gradfree.spectrum import compute as spectrum

    capture = spectrum.open_capture(capture_dir)
    acts = spectrum.activation_spectra(
        capture,
        roles=roles,
        sites=sites,
        trunk_width=trunk_width,
        standardised=standardised,
        device=device,
    )
    meta: dict[str, Any] = {"capture_manifest": getattr(capture, "manifest", None)}
    weights, model_name = None, None
    if model_spec is not None or loaded is not None:
        if loaded is None:
            from gradfree.models import load_model

            loaded = load_model(str(model_spec), device="cpu", dtype="float32")
        weights = spectrum.weight_spectra(
            loaded.model, embeddings=embeddings, trunk_width=trunk_width, device=device
        )
        model_name = loaded.name
        meta["model_fingerprint"] = loaded.fingerprint
    meta["versions"] = versions()
    return SpectrumReport(
        str(capture_dir), acts, weights, model_name, trunk_width, standardised, meta
    )
