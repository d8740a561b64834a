"""`gradfree align`: fit seed 001's alignment of a student to a teacher and save the aligned
student (a plain checkpoint) with its rotation ledger; see :mod:`gradfree.align`.

Thin: parse, validate the YAML/flags into an :class:`~gradfree.align.AlignConfig`, load the two
models, call :func:`~gradfree.align.run_align`, print where the report is.
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE, SAVE_FORMAT, corpus_option


def align_command(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (known name or folder)."),
    student: str = typer.Option(..., "--student", help="Student model (known name or folder)."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist)."),
    config: Path | None = typer.Option(None, "--config", help="YAML recipe of AlignConfig."),
    corpus: str | None = corpus_option(None, "Calibration texts (default tourguide)"),
    limit: int | None = typer.Option(None, "--limit", help="Calibration documents (default 32)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Window length in tokens."),
    permute: bool | None = typer.Option(
        None, "--permute/--no-permute", help="Head and neuron permutations."
    ),
    rotate: bool | None = typer.Option(None, "--rotate/--no-rotate", help="Residual rotation."),
    refine: bool | None = typer.Option(
        None, "--refine/--no-refine", help="Householder refinement."
    ),
    ridge_head: bool | None = typer.Option(
        None, "--ridge-head/--no-ridge-head", help="LM-head ridge fit."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
) -> None:
    """Rotate and permute the student to the teacher's coordinates; optionally refine, refit."""
    from gradfree.align.config import AlignConfig, load_config
    from gradfree.base.io import check_new_output

    check_new_output(out, overwrite)
    kw = {
        "corpus": corpus,
        "limit": limit,
        "max_length": max_length,
        "rotate": rotate,
        "refine": refine,
        "ridge_head": ridge_head,
    }
    if permute is not None:
        kw["permute_heads"] = kw["permute_neurons"] = permute
    cfg = load_config(AlignConfig, config, **kw)
    from gradfree.align import run_align
    from gradfree.models import load_model

    t = load_model(teacher, device=device, dtype=dtype)
    s = load_model(student, device=device, dtype=dtype)
    path = run_align(
        t,
        s,
        cfg,
        out,
        overwrite=overwrite,
        say=lambda m: typer.echo(m, err=True),
        save_format=save_format,
    )
    typer.echo(str(path / "report.md"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("align")(align_command)
