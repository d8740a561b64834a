"""``gradfree kv``: low-rank KV caches (``kv fit``: bases from a capture, measured)."""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, LIMIT, OVERWRITE, PROGRESS, SPLIT, corpus_option


def fit(
    model: str = typer.Option(..., "--model", help="Model (name, folder or file)."),
    corpus: str = corpus_option(..., "Text the bases are fitted on"),
    split: str | None = SPLIT,
    limit: int | None = LIMIT,
    budget: float = typer.Option(..., "--budget", help="Kept share of the KV-cache bytes, (0, 1]."),
    key_mode: str = typer.Option(
        "pre_rope",
        "--key-mode",
        help="Keys: pre_rope (latent before RoPE), pairs, complex (across KV heads), post_rope.",
    ),
    metric: str = typer.Option(
        "attention",
        "--metric",
        help="attention (key errors weighted by the queries, value errors by o_proj) or none.",
    ),
    allocation: str = typer.Option(
        "waterfill", "--allocation", help="Ranks: waterfill (by the spectra) or uniform."
    ),
    latent_bits: int | None = typer.Option(
        None,
        "--latent-bits",
        help="8 or 4: store the latents as int8 / packed int4 with per-token scales.",
    ),
    eval_split: str | None = typer.Option(
        "heldout", "--eval-split", help="Split scored after the fit (default heldout)."
    ),
    eval_limit: int = typer.Option(12, "--eval-limit", min=1, help="Held-out documents scored."),
    max_length: int = typer.Option(256, "--max-length", min=2, help="Window length in tokens."),
    chunk: int = typer.Option(
        32, "--chunk", min=1, help="Tokens fed per step when scoring (the rest is in the cache)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (bases, kv.json, report.md)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Fit low-rank key/value bases under a byte budget and measure the cache on held-out text."""
    from gradfree.kv.fit import run_kv_fit

    r = run_kv_fit(
        model,
        corpus,
        out,
        budget=budget,
        split=split,
        limit=limit,
        eval_split=eval_split,
        eval_limit=eval_limit,
        key_mode=key_mode,
        metric=metric,
        allocation=allocation,
        latent_bits=latent_bits,
        max_length=max_length,
        chunk=chunk,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
    )
    typer.echo(
        f"cache bytes {r['cache_bytes']:,} of {r['dense_cache_bytes']:,} "
        f"({r['bytes_ratio']:.3f}); perplexity {r['ppl_dense']:.3f} -> {r['ppl_kv']:.3f}",
        err=True,
    )
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Low-rank KV caches: fit bases under a byte budget, measured.")
    sub.command("fit")(fit)
    app.add_typer(sub, name="kv")
