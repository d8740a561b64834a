"""`gradfree merge RECIPE.yaml --out DIR`: merge same-shape models as a YAML recipe says.

Thin: read and validate the recipe, call :func:`gradfree.merge.merge`, print a summary.
``--list-methods`` prints the registered methods with their parameters and papers.
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, OVERWRITE, SAVE_FORMAT, dtype_option


def merge_command(
    recipe: Path | None = typer.Argument(None, help="YAML merge recipe."),
    out: Path | None = typer.Option(None, "--out", help="Output checkpoint folder."),
    device: str = DEVICE,
    dtype: str | None = dtype_option(
        None, "Output dtype (overrides the recipe; default: the first model's)."
    ),
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
    keep_statistics: bool = typer.Option(
        False, "--keep-statistics", help="Keep Fisher/Gram statistics in OUT/statistics."
    ),
    list_methods: bool = typer.Option(
        False, "--list-methods", help="List the merge methods and exit."
    ),
) -> None:
    """Merge same-shape models (linear, soups, SLERP, task arithmetic, TIES, DARE, Fisher,
    RegMean) into a plain Hugging Face checkpoint."""
    from gradfree.base.errors import GradfreeError
    from gradfree.merge import list_methods as methods
    from gradfree.merge import load_recipe, merge

    if list_methods:
        for m in methods():
            params = ", ".join(
                [*m["parameters"], *(f"{p} (per model)" for p in m["tensor_parameters"])]
            )
            typer.echo(f"{m['name']}: {m['description']} [{m['reference_url']}]")
            typer.echo(f"    parameters: {params or 'none'}")
        return
    if recipe is None or out is None:
        raise GradfreeError("Pass a recipe file and --out (or --list-methods).")
    rec = load_recipe(recipe)
    result = merge(
        rec,
        out,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        keep_statistics=keep_statistics,
        say=lambda m: typer.echo(m, err=True),
        save_format=save_format,
    )
    r = result.record
    dist = ", ".join(
        f"{k}: {'n/a' if v is None else f'{v:.3g}'}"
        for k, v in r["relative_distance_to_inputs"].items()
    )
    typer.echo(
        f"{r['method']['name']}: {r['output']['tensors']} tensors in {r['output']['dtype']}; "
        f"relative distance to inputs {dist}",
        err=True,
    )
    if r["evaluation"]:
        ppl = r["evaluation"]["merged"]["ppl"]
        typer.echo(f"merged perplexity {ppl:.3f}", err=True)
    typer.echo(str(result.path))


def register(app: typer.Typer) -> None:
    """Add `merge` to the root app."""
    app.command("merge")(merge_command)
