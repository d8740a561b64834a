"""`gradfree capture`: activation statistics of one model or a teacher/student pair, and
`gradfree capture combine`: add captures over disjoint documents.

Thin: parse, build a :class:`~gradfree.capture.CaptureConfig`, call
:func:`~gradfree.capture.corpus.capture_corpus` (which loads the models and the corpus and records
them) / :func:`~gradfree.capture.combine_captures`, print a summary.
The library (and torch) is imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gradfree.base.errors import GradfreeError
from gradfree.cli.options import DEVICE, DTYPE, LIMIT, OVERWRITE, PROGRESS, SPLIT, corpus_option

if TYPE_CHECKING:
    from gradfree.capture import Capture


def _summary(cap: Capture, title: str, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    m = cap.manifest
    table = Table(title=title)
    for col in ("role", "model", "tokens (all / body / head)", "keys", "dumped sites"):
        table.add_column(col)
    for role in cap.roles:
        entry = m["roles"][role]
        t = entry["tokens"]
        table.add_row(
            role,
            entry.get("name") or entry.get("model_type", ""),
            f"{t['all']} / {t['body']} / {t['head']}",
            str(len(cap.keys(role))),
            str(len(cap.dump_keys(role))),
        )
    console = Console(stderr=True, width=120)
    console.print(table)
    size = sum(int(s["bytes"]) for s in m["shards"].values())
    console.print(
        f"sites: {', '.join(m['sites'])}; {len(m['shards'])} shards, {size / 1e6:.1f} MB; "
        f"{m['documents']['count']} documents, {m['windows']} windows; "
        f"{len(cap.cross_pairs())} cross pairs; {seconds:.1f} s"
    )
    typer.echo(str(cap.path))


def capture(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", help="One model to capture."),
    teacher: str | None = typer.Option(None, "--teacher", help="Teacher of a paired capture."),
    student: str | None = typer.Option(None, "--student", help="Student of a paired capture."),
    corpus: str | None = corpus_option(None, "Texts to capture"),
    split: str | None = SPLIT,
    limit: int | None = LIMIT,
    out: Path | None = typer.Option(None, "--out", help="Output capture folder."),
    sites: str | None = typer.Option(
        None, "--sites", help="Comma-separated sites (default resid_pre,final.normed)."
    ),
    layers: str | None = typer.Option(None, "--layers", help="Blocks: all, or e.g. 0,4,8-11."),
    full: str | None = typer.Option(None, "--full", help="Sites forced to full covariance."),
    layer_map: str = typer.Option(
        "proportional", "--layer-map", help="proportional, or teacher index per student block."
    ),
    cross_sites: str | None = typer.Option(
        None, "--cross-sites", help="Paired sites (default resid_pre,final.normed if captured)."
    ),
    max_length: int = typer.Option(512, "--max-length", help="Window length in tokens."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per batch."),
    exclude_first: int = typer.Option(0, "--exclude-first", help="Drop the first N positions."),
    split_first: int = typer.Option(1, "--split-first", help="Keep the first N apart (head)."),
    dump_sites: str | None = typer.Option(None, "--dump-sites", help="Sites to dump tokens of."),
    dump_rate: float = typer.Option(0.05, "--dump-rate", help="Share of tokens dumped."),
    dump_max: int = typer.Option(20000, "--dump-max", help="Most dumped tokens per site."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Batches per checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dump subsample."),
    workers: int = typer.Option(
        1, "--workers", help="Local torch.distributed ranks (under torchrun: one rank each)."
    ),
    sequential: bool = typer.Option(
        False,
        "--sequential",
        help="One block at a time, weights read from the safetensors only when it runs.",
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Capture activation statistics (moments, cross moments, token dumps) over a corpus."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from gradfree.capture import make_config

    paired = teacher is not None or student is not None
    if (model is not None) == paired or (paired and (teacher is None or student is None)):
        raise GradfreeError("Pass --model, or both --teacher and --student.")
    if corpus is None or out is None:
        raise GradfreeError("Pass --corpus and --out.")
    options = {
        "sites": sites,
        "layers": layers,
        "full": full,
        "cross_sites": cross_sites,
        "layer_map": layer_map,
        "max_length": max_length,
        "batch_size": batch_size,
        "exclude_first": exclude_first,
        "split_first": split_first,
        "dump_sites": dump_sites,
        "dump_rate": dump_rate,
        "dump_max": dump_max,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
    }
    config = make_config({k: v for k, v in options.items() if v is not None})
    models = model if model is not None else {"teacher": str(teacher), "student": str(student)}
    run = _runner(workers, sequential)
    t0 = time.perf_counter()
    try:
        cap = run(  # None on the ranks other than 0 of a torchrun job: rank 0 reports
            models,
            corpus,
            out,
            config,
            split=split,
            limit=limit,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            progress=progress,
        )
    except KeyboardInterrupt:
        kept = "the last finished block" if sequential else "the last checkpoint"
        typer.echo(
            f"error: interrupted; work up to {kept} is kept in {out}.partial and "
            "the same command resumes from there.",
            err=True,
        )
        raise typer.Exit(130) from None
    if cap is not None:
        _summary(cap, "capture", time.perf_counter() - t0)


def _runner(workers: int, sequential: bool) -> Any:
    """The library call: one process, N local ranks or a torchrun rank, or block by block."""
    import functools

    from gradfree.capture.corpus import capture_corpus
    from gradfree.capture.distributed import world_from_env
    from gradfree.capture.launch import capture_distributed

    distributed = workers > 1 or world_from_env() is not None  # --workers N, or under torchrun
    if distributed:
        return functools.partial(capture_distributed, workers=workers, sequential=sequential)
    if sequential:
        from gradfree.capture.sequential import capture_corpus_sequential

        return capture_corpus_sequential
    return capture_corpus


def combine(
    captures: list[Path] = typer.Argument(..., help="Capture folders over disjoint documents."),
    out: Path = typer.Option(..., "--out", help="Output capture folder."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Combine captures of the same models and settings over disjoint documents."""
    import time

    from gradfree.capture import combine_captures

    t0 = time.perf_counter()
    cap = combine_captures(captures, out, overwrite=overwrite)
    _summary(cap, "combined capture", time.perf_counter() - t0)


def register(app: typer.Typer) -> None:
    """Add `capture` (and its `combine` subcommand) to the root app."""
    sub = typer.Typer(
        help="Capture activation statistics; `capture combine` adds captures of disjoint texts.",
        invoke_without_command=True,
        no_args_is_help=False,
    )
    sub.callback(invoke_without_command=True)(capture)
    sub.command("combine")(combine)
    # the name of the first releases, kept so that existing scripts still run
    sub.command("merge", hidden=True)(combine)
    app.add_typer(sub, name="capture")
