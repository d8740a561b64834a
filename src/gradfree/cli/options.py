"""The options that many commands share, defined once: device, dtype, overwrite, progress, the
corpus with its split and limit, and the weight format of a written checkpoint.

The device and dtype are checked while the command line is parsed, before any output folder is
touched: a dtype must be one of :data:`~gradfree.base.configfile.DTYPES`, a device must parse as a
torch device (nothing is probed, so "cuda:0" is accepted on a CPU machine until a model is placed
there). A bad value is one sentence (``GradfreeError``), like every other error of the CLI.
"""

from __future__ import annotations

from typing import Any

import typer

from gradfree.base.configfile import DTYPES, check_device, check_dtype

DEVICE_HELP = "Torch device: cpu, cuda, cuda:1, mps..."
DTYPE_HELP = f"Model dtype: {', '.join(DTYPES[:-1])} or {DTYPES[-1]}."
CORPUS_HELP = "a corpus name (see `gradfree data list`) or a .jsonl/.txt path"


def _device(value: str | None) -> str | None:
    return None if value is None else check_device(value)


def _dtype(value: str | None) -> str | None:
    return None if value is None else check_dtype(value)


def device_option(default: str | None = "cpu", help: str = DEVICE_HELP) -> Any:
    """``--device``, parsed when the command line is read (default cpu; None: the config's)."""
    return typer.Option(default, "--device", help=help, callback=_device)


def dtype_option(default: str | None = "float32", help: str = DTYPE_HELP) -> Any:
    """``--dtype``, one of the dtypes the loaders accept (default float32; None: the config's)."""
    return typer.Option(default, "--dtype", help=help, callback=_dtype)


def _save_format(value: str) -> str:
    from gradfree.models.fp8 import check_weight_format

    return check_weight_format(value)


def save_format_option() -> Any:
    """``--save-format``: safetensors (the model's dtype) or fp8 (Qwen's block-FP8 format)."""
    return typer.Option(
        "safetensors",
        "--save-format",
        help="Checkpoint weights: safetensors (model dtype) or fp8 (e4m3, 128x128 block scales).",
        callback=_save_format,
    )


def corpus_option(default: Any = ..., what: str = "Text") -> Any:
    """``--corpus``: ``what`` the command reads, by name or path (``...``: required)."""
    return typer.Option(default, "--corpus", help=f"{what}: {CORPUS_HELP}.")


SPLIT = typer.Option(None, "--split", help="Corpus split, e.g. calibration or heldout.")
LIMIT = typer.Option(None, "--limit", help="Use at most N documents.")
DEVICE = device_option()
DTYPE = dtype_option()
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --out.")
PROGRESS = typer.Option(
    True, "--progress/--no-progress", help="Report progress (a bar on a terminal, else log lines)."
)
SAVE_FORMAT = save_format_option()
