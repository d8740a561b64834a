"""`gradfree ledger check DIR`: re-read a rotation ledger, recompute RᵀR and RRᵀ from the stored
matrices, compare their hashes, and (with --out) plot per-layer errors and write check.json."""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import OVERWRITE


def check_command(
    folder: Path = typer.Argument(
        ..., help="rotations/<run_id> folder, or an align/ablate output."
    ),
    out: Path | None = typer.Option(None, "--out", help="Folder for check.json and plots."),
    tol: float = typer.Option(1e-5, "--tol", help="Orthogonality tolerance."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Recompute the orthogonality statistics of a ledger; exit 1 when a check fails."""
    from gradfree.align.ledger import check_ledger, plot_check
    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic

    if out is not None:
        check_new_output(out, overwrite)
    result = check_ledger(folder, tol)
    if out is not None:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_json_atomic(tmp / "check.json", result)
            plot_check(result, tmp)
    worst = max(
        (
            v["max_abs_rtr_minus_i"]
            for r in result["layers"]
            for v in r.values()
            if isinstance(v, dict)
        ),
        default=0.0,
    )
    typer.echo(
        f"{len(result['layers'])} layers, worst max|RᵀR − I| = {worst:.2e}: "
        f"{'ok' if result['ok'] else 'FAILED'}",
        err=True,
    )
    if not result["ok"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `ledger check` to the root app."""
    sub = typer.Typer(
        help="Rotation ledgers: `ledger check DIR` re-verifies one.", no_args_is_help=True
    )
    sub.command("check")(check_command)
    app.add_typer(sub, name="ledger")
