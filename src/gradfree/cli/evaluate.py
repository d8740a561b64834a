"""`gradfree eval`: perplexity of a model on a corpus, agreement with a teacher, and answers to
the held-out questions; writes eval.json and eval.md. Thin: parse, call
:func:`gradfree.evaluation.corpus.evaluate_corpus` (which loads and records the model, teacher and
corpus), print a summary."""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE, corpus_option


def _layers(text: str | None) -> list[int] | None:
    from gradfree.base.errors import GradfreeError

    if not text:
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise GradfreeError("--compare-layers takes comma-separated layer numbers.") from None


def eval_command(
    model: str = typer.Option(..., "--model", help="Model to evaluate (known name or folder)."),
    corpus: str = corpus_option(..., "Texts to evaluate on"),
    out: Path = typer.Option(..., "--out", help="Output folder (must not exist)."),
    teacher: str | None = typer.Option(
        None, "--teacher", help="A teacher with the same tokenizer: adds KL, agreement, CKA."
    ),
    split: str | None = typer.Option(None, "--split", help="Corpus split, e.g. heldout."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N documents."),
    questions: bool = typer.Option(
        True, "--questions/--no-questions", help="Answer the held-out questions."
    ),
    max_length: int = typer.Option(512, "--max-length", help="Window length in tokens."),
    stride: int = typer.Option(256, "--stride", help="Step between window starts."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    layer_map: str = typer.Option(
        "proportional", "--layer-map", help="'proportional' or teacher layers, e.g. 0,2,4."
    ),
    compare_layers: str | None = typer.Option(
        None, "--compare-layers", help="Model layers for cosine/CKA, e.g. 0,8,16 (default all)."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Evaluate a model: perplexity, agreement with a teacher, and short answers."""
    from gradfree.base.progress import Progress
    from gradfree.evaluation.corpus import evaluate_corpus

    with Progress() as report:  # a bar on a terminal, log lines in a log
        result = evaluate_corpus(
            model,
            corpus,
            out,
            teacher=teacher,
            split=split,
            limit=limit,
            questions=questions,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            layer_map=layer_map,
            compare_layers=_layers(compare_layers),
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            progress=report,
        )
    ppl = result["perplexity"]
    typer.echo(f"perplexity {ppl['ppl']:.3f} over {ppl['tokens']} tokens", err=True)
    if result["teacher"]:
        t = result["teacher"]
        typer.echo(f"KL {t['kl_mean']:.4f}, top-1 agreement {t['top1_agreement']:.3f}", err=True)
    if result["qa"]:
        typer.echo(f"questions {result['qa']['matched']}/{result['qa']['n']} matched", err=True)
    typer.echo(str(out / "eval.md"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("eval")(eval_command)
