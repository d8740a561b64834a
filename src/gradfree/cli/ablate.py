"""`gradfree ablate`: seed 001 §16.2's variant matrix (base, +permutations, +rotations, +style,
style only, and the measured extras) evaluated against the teacher; writes ablation.md/json."""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE


def ablate_command(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (known name or folder)."),
    student: str = typer.Option(..., "--student", help="Student model (known name or folder)."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist)."),
    config: Path | None = typer.Option(None, "--config", help="YAML recipe of AblateConfig."),
    variants: str | None = typer.Option(None, "--variants", help="Comma-separated variant names."),
    heldout_limit: int | None = typer.Option(None, "--heldout-limit", help="Held-out documents."),
    questions: int | None = typer.Option(None, "--questions", help="Place questions (0: none)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Evaluate every alignment toggle against the teacher: one results table."""
    from gradfree.align.config import AblateConfig, load_config
    from gradfree.base.io import check_new_output

    check_new_output(out, overwrite)
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    cfg = load_config(
        AblateConfig, config, variants=names, heldout_limit=heldout_limit, questions=questions
    )
    from gradfree.align import run_ablation
    from gradfree.models import load_model

    t = load_model(teacher, device=device, dtype=dtype)
    s = load_model(student, device=device, dtype=dtype)
    run_ablation(t, s, cfg, out, overwrite=overwrite, say=lambda m: typer.echo(m, err=True))
    typer.echo(str(out / "ablation.md"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("ablate")(ablate_command)
