"""`gradfree spectrum`: eigenvalue spectra of a capture (and singular values of a model's weights).

Writes spectrum.json, spectrum.md, PNG plots and eigenvalues.safetensors into --out; see
:mod:`gradfree.spectrum.compute` for what is measured and why (seed 002's Df claim).
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, OVERWRITE


def _split(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def spectrum(
    capture_dir: Path = typer.Argument(..., help="A capture folder written by `gradfree capture`."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist)."),
    role: str | None = typer.Option(
        None, "--role", help="teacher, student or model (default: every role of the capture)."
    ),
    sites: str | None = typer.Option(
        None, "--sites", help="Comma-separated site names or keys, e.g. resid_pre,mlp_hidden."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Also compute the singular-value spectra of this model's weights."
    ),
    trunk_width: int | None = typer.Option(
        None, "--trunk-width", min=1, help="Report the share of the top N components (a trunk)."
    ),
    standardised: bool = typer.Option(
        False, "--standardised", help="Add the spectra of the correlation matrices."
    ),
    embeddings: bool = typer.Option(
        True, "--embeddings/--skip-embeddings", help="Include the embedding and LM head weights."
    ),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Eigenvalue spectra of captured activations in several variants, and weight spectra."""
    from gradfree.base.io import check_new_output
    from gradfree.spectrum.report import build_report, write_report

    check_new_output(out, overwrite)  # fail before any work
    report = build_report(
        capture_dir,
        roles=[role] if role else None,
        sites=_split(sites),
        model_spec=model,
        trunk_width=trunk_width,
        standardised=standardised,
        embeddings=embeddings,
        device=device,
    )
    write_report(report, out, overwrite=overwrite)
    n_noted = sum(1 for s in report.activations if s.notes)
    typer.echo(f"{len(report.activations)} sites analysed ({n_noted} with notes)", err=True)
    if report.weights is not None:
        typer.echo(f"{len(report.weights)} weight matrices of {report.model}", err=True)
    typer.echo(str(out / "spectrum.md"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("spectrum")(spectrum)
