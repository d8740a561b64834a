"""`gradfree data`: list the known text corpora and fetch the public ones into the cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gradfree.base.errors import GradfreeError
from gradfree.texts.corpora import BUILTIN, CORPORA, fetch_corpus, list_corpora

_CACHE_HELP = "Cache root (default: $GRADFREE_CACHE or ~/.cache/gradfree)."


def _docs(n_docs: int | None, splits: dict[str, int]) -> str:
    if n_docs is None:
        return "-"
    parts = ", ".join(f"{n} {s}" for s, n in sorted(splits.items()))
    return f"{n_docs} ({parts})" if parts else str(n_docs)


def list_cmd(
    cache: Path | None = typer.Option(None, "--cache", help=_CACHE_HELP),
) -> None:
    """Show the known corpora, their licence, and whether each is ready to load."""
    table = Table(title="Known text corpora")
    for col in ("name", "description", "licence", "installed", "docs"):
        table.add_column(col)
    for info in list_corpora(cache):
        table.add_row(
            info.name,
            info.description,
            info.licence,
            "yes" if info.installed else "no",
            _docs(info.n_docs, info.splits),
        )
    Console(width=200).print(table)


def fetch(
    name: str = typer.Argument(..., help="A corpus name (see `gradfree data list`) or 'all'."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if present."),
    cache: Path | None = typer.Option(None, "--cache", help=_CACHE_HELP),
) -> None:
    """Download a public corpus (or all of them) into <cache>/texts/<name>/."""
    if name != "all" and name not in CORPORA:
        known = ", ".join(CORPORA)
        raise GradfreeError(f"Unknown corpus '{name}': use one of {known}, or 'all'.")
    todo = [n for n in CORPORA if n != BUILTIN] if name == "all" else [name]
    for n in todo:
        if n == BUILTIN:
            typer.echo(f"{n}: built in, nothing to fetch ({fetch_corpus(n, cache)})")
            continue
        typer.echo(f"{n}: {fetch_corpus(n, cache=cache, force=force, progress=True)}")


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the root app."""
    sub = typer.Typer(help="List and fetch the text corpora.", no_args_is_help=True)
    sub.command("list")(list_cmd)
    sub.command("fetch")(fetch)
    app.add_typer(sub, name="data")
