"""`gradfree compress`: project a teacher into the student's shape and merge it with the student.

Thin: load the recipe (YAML, with command-line overrides), call
:func:`gradfree.compress.pipeline.run_compress` (which loads the models and the corpus and records
them), print the merge profile. torch is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.base.errors import GradfreeError
from gradfree.cli.options import (
    DEVICE,
    DTYPE,
    LIMIT,
    OVERWRITE,
    PROGRESS,
    SAVE_FORMAT,
    SPLIT,
    corpus_option,
)


def compress(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (name, folder or file)."),
    student: str = typer.Option(..., "--student", help="Student model; the output has its shape."),
    corpus: str = corpus_option(..., "Calibration texts"),
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoint + report)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML recipe of options."),
    split: str | None = SPLIT,
    limit: int | None = LIMIT,
    basis: str | None = typer.Option(None, "--basis", help="svd, two_tier, joint (recipe wins)."),
    merge: str | None = typer.Option(
        None, "--merge", help="none, uniform, alignment, optimal, ridge (overrides the recipe)."
    ),
    alpha: float | None = typer.Option(None, "--alpha", help="α for uniform/alignment merges."),
    max_length: int | None = typer.Option(None, "--max-length", help="Capture window length."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    keep_capture: bool = typer.Option(False, "--keep-capture", help="Keep out/capture."),
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Compress a teacher into a student-shaped checkpoint (gradient-free) and write a report."""
    from gradfree.compress import load_recipe, make_recipe
    from gradfree.compress.pipeline import run_compress

    overrides = {"basis": basis, "merge": merge, "alpha": alpha, "max_length": max_length}
    rec = load_recipe(recipe, **overrides) if recipe else make_recipe(None, **overrides)
    sol, path = run_compress(
        teacher,
        student,
        corpus,
        out,
        rec,
        split=split,
        limit=limit,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
        keep_capture=keep_capture,
        save_format=save_format,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"merge profile ({rec.merge})")
    cols = ["layer", "teacher_layer", "alpha_attn", "alpha_mlp", "alignment", "variance_preserved"]
    cols += ["mutual_information", "attention_kl"]
    for c in cols:
        table.add_column(c)
    for row in sol.merge_profile():
        table.add_row(*(str(row[c]) for c in cols))
    Console(stderr=True, width=120).print(table)
    typer.echo(str(path))


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GradfreeError(f"--{what} must be a comma-separated list of numbers.") from None
    if not values:
        raise GradfreeError(f"--{what} needs at least one value.")
    return values


def distill_head(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (name, folder or file)."),
    student: str = typer.Option(..., "--student", help="Student model; only its head changes."),
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoint + report)."),
    corpus: str = corpus_option("tourguide", "Texts of the fit and the validation"),
    split: str | None = typer.Option("calibration", "--split", help="Its split."),
    fit: int = typer.Option(32, "--fit", min=1, help="First N documents: the ridge fit."),
    val: int = typer.Option(12, "--val", min=1, help="Next M documents: choose λ and blend."),
    lambdas: str = typer.Option("0.1,1,10", "--lambdas", help="Relative ridge λ candidates."),
    blends: str = typer.Option("0.25,0.5,0.75,1", "--blends", help="Blend β candidates."),
    max_length: int = typer.Option(256, "--max-length", min=2, help="Window length in tokens."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Distil the teacher's logits into the student's LM head (ridge + blend, chosen by KL)."""
    from gradfree.compress.head import run_distill_head

    lam, beta = _floats(lambdas, "lambdas"), _floats(blends, "blends")
    if any(b <= 0 or b > 1 for b in beta) or any(v <= 0 for v in lam):
        raise GradfreeError("Blends must lie in (0, 1] and λ values must be positive.")
    choice = run_distill_head(
        teacher,
        student,
        out,
        corpus=corpus,
        split=split,
        fit=fit,
        val=val,
        device=device,
        dtype=dtype,
        lambdas=lam,
        blends=beta,
        max_length=max_length,
        overwrite=overwrite,
        progress=progress,
        save_format=save_format,
    )
    typer.echo(
        f"validation KL {choice.student['kl']:.4f} -> {choice.chosen['kl']:.4f} "
        f"(lambda {choice.lam}, blend {choice.blend})",
        err=True,
    )
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
    app.command("distill-head")(distill_head)
