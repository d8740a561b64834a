"""`gradfree eval`: perplexity of a model on a corpus, agreement with a teacher, and answers to
the held-out questions; writes eval.json and eval.md (see :mod:`gradfree.evaluation.run`)."""

from __future__ import annotations

from pathlib import Path

import typer


def _progress(stage: str, done: int, total: int) -> None:
    end = "\n" if done == total else ""
    typer.echo(f"\r{stage}: {done}/{total}", err=True, nl=False)
    if end:
        typer.echo("", err=True)


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
    corpus: str = typer.Option(..., "--corpus", help="Corpus name or path."),
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
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Evaluate a model: perplexity, agreement with a teacher, and short answers."""
    from gradfree.base.errors import GradfreeError
    from gradfree.base.io import check_new_output
    from gradfree.base.provenance import versions
    from gradfree.evaluation.run import check_window_settings, evaluate, write_eval
    from gradfree.models import load_model
    from gradfree.texts.corpora import corpus_manifest, load_corpus, load_questions, system_prompt

    check_new_output(out, overwrite)  # cheap checks first, before loading anything big
    check_window_settings(max_length, stride)
    docs = load_corpus(corpus, split=split, limit=limit)
    if not docs:
        where = f" in split '{split}'" if split else ""
        raise GradfreeError(f"The corpus {corpus} has no documents{where}.")
    qs, prompt = (load_questions(), system_prompt()) if questions else (None, None)
    loaded = load_model(model, device=device, dtype=dtype)
    tloaded = load_model(teacher, device=device, dtype=dtype) if teacher else None
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        docs,
        teacher=tloaded.model if tloaded else None,
        teacher_tokenizer=tloaded.tokenizer if tloaded else None,
        questions=qs,
        system_prompt=prompt,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        device=device,
        layer_map=layer_map,
        compare_layers=_layers(compare_layers),
        progress=_progress,
    )
    for key, spec, info in (("model", model, loaded), ("teacher_model", teacher, tloaded)):
        if info is not None:
            result[key] = {
                "spec": spec,
                "name": info.name,
                "source": info.source,
                "fingerprint": info.fingerprint,
            }
    result["corpus"] = corpus_manifest(docs, corpus)
    result["versions"] = versions()
    write_eval(result, out, overwrite=overwrite)
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
