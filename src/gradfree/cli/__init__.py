"""The ``gradfree`` command line: a thin layer that parses, validates, calls one library
function and prints a summary. Every command group lives in its own module with a
``register(app)`` function; errors are one sentence (``GradfreeError``), never a traceback."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from gradfree import __version__
from gradfree.base.errors import GradfreeError

# Command modules, in the order `gradfree --help` lists them.
COMMAND_MODULES = [
    "models",
    "data",
    "capture",
    "spectrum",
    "evaluate",
    "rotate",
    "compress",
    "experiment",
    "align",
    "ablate",
    "ledger",
    "merge",
    "kv",
    "taskvec",
    "directions",
    "demo",
]


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="gradfree",
        help="Compress, align and merge transformer LMs without gradient descent.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"gradfree {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", help="Print the version and exit.", is_eager=True, callback=_version
        ),
    ) -> None:
        """Compress, align and merge transformer LMs without gradient descent."""

    for name in COMMAND_MODULES:
        module = importlib.import_module(f"gradfree.cli.{name}")
        module.register(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: GradfreeError becomes one line on stderr, exit 2."""
    app = build_app()
    try:
        app(args=argv, prog_name="gradfree")  # click handles usage errors itself (exit 2)
    except GradfreeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; nothing partial was kept.", err=True)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("GRADFREE_DEBUG"):
            raise
        typer.echo(
            f"error: unexpected {e.__class__.__name__}: {e} (set GRADFREE_DEBUG=1 for a traceback)",
            err=True,
        )
        sys.exit(1)
