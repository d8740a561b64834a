"""`gradfree rotate` (fuse norms, untie, rotate the residual stream: exact), `gradfree slice`
(SliceGPT-style width reduction from calibration statistics) and `gradfree prune` (MLP neurons
and query heads removed with least-squares compensation). Both write a plain Hugging Face
checkpoint with a rotation ledger and a report; see :mod:`gradfree.surgery.export`.
Thin: parse, validate, call :func:`~gradfree.surgery.export.run_surgery`, print a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gradfree.cli.options import DEVICE, DTYPE, LIMIT, OVERWRITE, SAVE_FORMAT, SPLIT, corpus_option


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _run(options: dict[str, Any], overwrite: bool) -> None:
    from gradfree.base.io import check_new_output
    from gradfree.surgery.config import make_surgery_config
    from gradfree.surgery.export import run_surgery

    cfg = make_surgery_config(**{k: v for k, v in options.items() if v is not None})
    check_new_output(cfg.out, overwrite)
    record = run_surgery(cfg, overwrite=overwrite, log=_log)
    res = record["result"]
    chk = res["check"]["reloaded_vs_original"]
    typer.echo(
        f"max relative logits difference (reloaded vs original): {chk['max_rel']:.3g}", err=True
    )
    if "slice" in res:
        s = res["slice"]
        typer.echo(
            f"width {res['params']['hidden_before']} -> {s['width']}; perplexity "
            f"{res['dense_perplexity']['ppl']:.3f} -> {res['sliced_perplexity']['ppl']:.3f} "
            f"({100 * res['relative_perplexity_change']:+.1f}%)",
            err=True,
        )
    if "prune" in res:
        b, a, p = res["prune"]["before"], res["prune"]["after"], res["params"]
        typer.echo(
            f"heads {b['num_attention_heads']} -> {a['num_attention_heads']}, MLP neurons "
            f"{b['intermediate_size']} -> {a['intermediate_size']}, parameters "
            f"{p['before']:,} -> {p['after']:,}; perplexity "
            f"{res['dense_perplexity']['ppl']:.3f} -> {res['pruned_perplexity']['ppl']:.3f} "
            f"({100 * res['relative_perplexity_change']:+.1f}%)",
            err=True,
        )
    typer.echo(str(Path(cfg.out) / "report.md"))


_MODEL = typer.Option(..., "--model", help="Model: known name or folder.")
_OUT = typer.Option(..., "--out", help="Output checkpoint folder (must not exist).")
_DAMPING = typer.Option(0.01, "--damping", help="Relative damping of the moment (SliceGPT: 0.01).")
_CHECK_CORPUS = typer.Option("tourguide", "--check-corpus", help="Text of the logits check.")
_CHECK_SPLIT = typer.Option("heldout", "--check-split", help="Its split.")
_CHECK_WINDOWS = typer.Option(2, "--check-windows", help="Windows in the logits check.")
_CHECK_TOKENS = typer.Option(128, "--check-tokens", help="Tokens per window.")
_MLP_FRACTION = typer.Option(
    None, "--mlp-fraction", help="Share of each block's MLP neurons to remove (LS-compensated)."
)
_HEADS_KEEP = typer.Option(
    None, "--heads-keep", help="Query heads to keep per KV group (LS-compensated)."
)
_PRUNE_STEPS = typer.Option(64, "--prune-steps", help="OBS removal rounds per selection.")
_LAMBDA = typer.Option(
    None, "--reconstruct-lambda", help="The re-fit's ridge λ relative to tr(C)/k (default 0.01)."
)
_EVAL_CORPUS = typer.Option(
    None, "--eval-corpus", help="Held-out text (default: the calibration corpus)."
)
_EVAL_SPLIT = typer.Option("heldout", "--eval-split", help="Held-out split.")
_EVAL_LIMIT = typer.Option(None, "--eval-limit", help="At most N documents.")
_MAX_LENGTH = typer.Option(512, "--max-length", help="Window length in tokens.")
_BATCH_SIZE = typer.Option(4, "--batch-size", help="Windows per batch.")


def _common(
    check: tuple[str, str | None, int, int], damping: float, device: str, dtype: str
) -> dict[str, object]:
    """The options that both commands share, as the config keys they are recorded under."""
    corpus, split, windows, tokens = check
    return {
        "damping": damping,
        "check_corpus": corpus,
        "check_split": split,
        "check_windows": windows,
        "check_tokens": tokens,
        "device": device,
        "dtype": dtype,
    }


def rotate(
    model: str = _MODEL,
    out: Path = _OUT,
    capture: Path | None = typer.Option(None, "--capture", help="Capture folder: PCA basis."),
    random_seed: int | None = typer.Option(None, "--random-seed", help="Haar-random basis."),
    matrix: Path | None = typer.Option(None, "--matrix", help="d x d orthogonal .safetensors."),
    per_layer: bool = typer.Option(
        False, "--per-layer", help="Also measure per-layer bases with transitions (simulation)."
    ),
    damping: float = _DAMPING,
    check_corpus: str = _CHECK_CORPUS,
    check_split: str | None = _CHECK_SPLIT,
    check_windows: int = _CHECK_WINDOWS,
    check_tokens: int = _CHECK_TOKENS,
    device: str = DEVICE,
    dtype: str = DTYPE,
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
) -> None:
    """Fuse norms, untie and rotate the residual stream; the function is unchanged."""
    _run(
        {
            "command": "rotate",
            "model": model,
            "out": str(out),
            "capture": str(capture) if capture else None,
            "random_seed": random_seed,
            "matrix": str(matrix) if matrix else None,
            "per_layer": per_layer,
            **_common(
                (check_corpus, check_split, check_windows, check_tokens), damping, device, dtype
            ),
            "save_format": save_format,
        },
        overwrite,
    )


def slice_command(
    model: str = _MODEL,
    out: Path = _OUT,
    fraction: float = typer.Option(..., "--fraction", help="Share of the width to remove."),
    corpus: str | None = corpus_option(None, "Calibration texts"),
    split: str | None = SPLIT,
    limit: int | None = LIMIT,
    capture: Path | None = typer.Option(None, "--capture", help="Existing capture instead."),
    recompute: bool = typer.Option(
        False, "--recompute", help="Slice in stages, re-measuring through the sliced model."
    ),
    steps: int = typer.Option(2, "--steps", help="Stages with --recompute."),
    reconstruct: bool = typer.Option(
        False,
        "--reconstruct",
        help="Re-fit every linear by ridge least squares toward the dense model (needs --corpus).",
    ),
    reconstruct_lambda: float | None = _LAMBDA,
    mlp_fraction: float | None = _MLP_FRACTION,
    heads_keep: int | None = _HEADS_KEEP,
    prune_steps: int = _PRUNE_STEPS,
    damping: float = _DAMPING,
    eval_corpus: str | None = _EVAL_CORPUS,
    eval_split: str | None = _EVAL_SPLIT,
    eval_limit: int | None = _EVAL_LIMIT,
    max_length: int = _MAX_LENGTH,
    batch_size: int = _BATCH_SIZE,
    check_corpus: str = _CHECK_CORPUS,
    check_split: str | None = _CHECK_SPLIT,
    check_windows: int = _CHECK_WINDOWS,
    check_tokens: int = _CHECK_TOKENS,
    device: str = DEVICE,
    dtype: str = DTYPE,
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
) -> None:
    """Remove a fraction of the residual width with one global PCA basis (plain checkpoint);
    with --reconstruct, then re-fit the linears to the dense model's outputs."""
    _run(
        {
            "command": "slice",
            "model": model,
            "out": str(out),
            "fraction": fraction,
            "corpus": corpus,
            "split": split,
            "limit": limit,
            "capture": str(capture) if capture else None,
            "recompute": recompute,
            "steps": steps,
            # recorded only when asked for, so a plain slice's config stays as it was
            "reconstruct": True if reconstruct else None,
            "reconstruct_lambda": reconstruct_lambda,
            "mlp_fraction": mlp_fraction,
            "heads_keep": heads_keep,
            "prune_steps": prune_steps if prune_steps != 64 else None,
            "eval_corpus": eval_corpus,
            "eval_split": eval_split,
            "eval_limit": eval_limit,
            "max_length": max_length,
            "batch_size": batch_size,
            **_common(
                (check_corpus, check_split, check_windows, check_tokens), damping, device, dtype
            ),
            "save_format": save_format,
        },
        overwrite,
    )


def prune(
    model: str = _MODEL,
    out: Path = _OUT,
    corpus: str = corpus_option(..., "Calibration texts"),
    split: str | None = SPLIT,
    limit: int | None = LIMIT,
    mlp_fraction: float | None = _MLP_FRACTION,
    params_fraction: float | None = typer.Option(
        None,
        "--params-fraction",
        help="Share of all parameters to remove, by MLP neurons (after --heads-keep).",
    ),
    heads_keep: int | None = _HEADS_KEEP,
    prune_steps: int = _PRUNE_STEPS,
    reconstruct_lambda: float | None = _LAMBDA,
    eval_corpus: str | None = _EVAL_CORPUS,
    eval_split: str | None = _EVAL_SPLIT,
    eval_limit: int | None = _EVAL_LIMIT,
    max_length: int = _MAX_LENGTH,
    batch_size: int = _BATCH_SIZE,
    check_corpus: str = _CHECK_CORPUS,
    check_split: str | None = _CHECK_SPLIT,
    check_windows: int = _CHECK_WINDOWS,
    check_tokens: int = _CHECK_TOKENS,
    device: str = DEVICE,
    dtype: str = DTYPE,
    save_format: str = SAVE_FORMAT,
    overwrite: bool = OVERWRITE,
) -> None:
    """Remove MLP neurons and query heads chosen by least-squares error, re-fitting every linear
    block by block toward the original model (plain checkpoint, smaller config widths)."""
    _run(
        {
            "command": "prune",
            "model": model,
            "out": str(out),
            "corpus": corpus,
            "split": split,
            "limit": limit,
            "mlp_fraction": mlp_fraction,
            "params_fraction": params_fraction,
            "heads_keep": heads_keep,
            "prune_steps": prune_steps,
            "reconstruct_lambda": reconstruct_lambda,
            "eval_corpus": eval_corpus,
            "eval_split": eval_split,
            "eval_limit": eval_limit,
            "max_length": max_length,
            "batch_size": batch_size,
            **_common(
                (check_corpus, check_split, check_windows, check_tokens), 0.01, device, dtype
            ),
            "save_format": save_format,
        },
        overwrite,
    )


def register(app: typer.Typer) -> None:
    """Add `rotate`, `slice` and `prune` to the root app."""
    app.command("rotate")(rotate)
    app.command("slice")(slice_command)
    app.command("prune")(prune)
