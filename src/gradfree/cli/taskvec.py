"""``gradfree taskvec``: task vectors (seed 003) — masks, compression, merges, unmerging, and the
project's own LoRA adapters.

    gradfree taskvec make-adapters --model smollm2-135m-instruct
    gradfree taskvec mask --base B A1 A2 … --k 100000 --out MASK
    gradfree taskvec compress --base B --mask MASK --vector A1 --out a1.safetensors
    gradfree taskvec merge --base B A1 A2 --weights 0.6,0.4 --method ties --out MERGED
    gradfree taskvec unmerge --base B --merged MERGED --dictionary A1 … An --mask MASK --out DIR

A task is a PEFT LoRA folder or a checkpoint (its delta from the base is the task vector).
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE, PROGRESS, dtype_option

app = typer.Typer(
    help="Task vectors: LoRA → ΔW, magnitude masks as indices, compression, merges, unmerging.",
    no_args_is_help=True,
)
BASE = typer.Option(..., "--base", help="Base model (known name or Hugging Face folder).")


def _floats(text: str | None, what: str) -> list[float] | None:
    from gradfree.base.errors import GradfreeError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GradfreeError(f"--{what} takes comma-separated numbers, not {text!r}.") from None


@app.command("mask")
def mask_command(
    tasks: list[str] = typer.Argument(
        ..., help="Task vectors: PEFT adapter folders or checkpoints."
    ),
    base: str = BASE,
    k: int = typer.Option(100_000, "--k", help="Entries kept in all."),
    aggregate: str = typer.Option("max", "--aggregate", help="max, mean (of |τ|) or sum (|Σ τ|)."),
    selection: str = typer.Option(
        "per_module", "--selection", help="per_module (balanced) or global."
    ),
    modules: str = typer.Option(
        "attention", "--modules", help="attention, mlp, linears, or a regular expression."
    ),
    out: Path = typer.Option(..., "--out", help="Mask folder (mask.safetensors + mask.json)."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Build a magnitude mask over task vectors, stored as sorted indices per module."""
    import contextlib

    from gradfree.base.io import check_new_output
    from gradfree.base.progress import reporting
    from gradfree.taskvec.mask import build_mask, describe_bytes
    from gradfree.taskvec.vector import open_base, open_task_vector, unique_labels

    check_new_output(out, overwrite)
    with contextlib.ExitStack() as stack, reporting(progress) as report:
        b = stack.enter_context(open_base(base))
        vectors = [
            open_task_vector(s, b, stack, lab)
            for s, lab in zip(tasks, unique_labels(tasks), strict=True)
        ]
        m = build_mask(
            b,
            vectors,
            k,
            aggregate=aggregate,
            selection=selection,
            modules=modules,
            device=device,
            progress=report,
        )
        m.save(out, overwrite=overwrite)
    typer.echo(describe_bytes(m), err=True)
    typer.echo(str(out))


@app.command("compress")
def compress_command(
    vector: str = typer.Option(
        ...,
        "--vector",
        help="A PEFT adapter folder, or a checkpoint whose delta from --base is taken.",
    ),
    base: str = BASE,
    mask: Path = typer.Option(..., "--mask", help="Mask folder from `gradfree taskvec mask`."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    values_dtype: str = typer.Option("float32", "--values-dtype", help="float32 or float64."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Keep a task vector (or any model's delta from the base) at a mask's entries."""
    import contextlib

    from gradfree.base.errors import GradfreeError
    from gradfree.taskvec.compress import compress
    from gradfree.taskvec.mask import load_mask
    from gradfree.taskvec.vector import open_base, open_task_vector

    if out.suffix != ".safetensors":
        raise GradfreeError(f"The output {out} must be a .safetensors file.")
    if out.exists() and not overwrite:
        raise GradfreeError(
            f"The file {out} already exists; choose another path or pass --overwrite."
        )
    m = load_mask(mask)
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(open_base(base))
        v = open_task_vector(vector, b, stack)
        c = compress(v, m, dtype=values_dtype, device=device)
        c.save(out, overwrite=overwrite)
    typer.echo(f"{m.entries:,} values, {c.bytes / 1e3:,.1f} KB", err=True)
    typer.echo(str(out))


@app.command("merge")
def merge_command(
    tasks: list[str] = typer.Argument(
        ..., help="Task vectors: PEFT adapter folders or checkpoints."
    ),
    base: str = BASE,
    method: str = typer.Option(
        "task_arithmetic", "--method", help="task_arithmetic, ties, dare_ties or dare_linear."
    ),
    weights: str | None = typer.Option(None, "--weights", help="Comma-separated, one per task."),
    densities: str | None = typer.Option(
        None, "--densities", help="Comma-separated kept fractions (TIES, DARE), one per task."
    ),
    scaling: float = typer.Option(
        1.0, "--scaling", help="λ: how much of the combination is added."
    ),
    normalize: bool = typer.Option(
        True, "--normalize/--no-normalize", help="TIES: average agreeing entries (else sum)."
    ),
    seed: int = typer.Option(0, "--seed", help="DARE's drops."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint folder."),
    dtype: str | None = dtype_option(None, "Output dtype (default: the base's)."),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Merge task vectors into the base with the merge toolkit's methods (a plain checkpoint)."""
    from gradfree.taskvec.merge import merge_task_vectors

    rec = merge_task_vectors(
        base,
        tasks,
        out,
        weights=_floats(weights, "weights"),
        method=method,
        densities=_floats(densities, "densities"),
        scaling=scaling,
        normalize=normalize,
        seed=seed,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        say=lambda s: typer.echo(s, err=True),
    )
    typer.echo(
        f"{method}: {rec['tensors']['changed']} of {rec['tensors']['total']} tensors changed",
        err=True,
    )
    typer.echo(str(out))


@app.command(
    "unmerge", context_settings={"allow_extra_args": True, "ignore_unknown_options": False}
)
def unmerge_command(
    ctx: typer.Context,
    base: str = BASE,
    merged: str = typer.Option(
        ..., "--merged", help="The merged checkpoint (or a compressed delta file)."
    ),
    dictionary: list[str] = typer.Option(
        ..., "--dictionary", help="Candidate task vectors: --dictionary A1 A2 … (or repeated)."
    ),
    mask: Path = typer.Option(..., "--mask", help="Mask folder from `gradfree taskvec mask`."),
    out: Path = typer.Option(..., "--out", help="Output folder (unmerge.json, report.md)."),
    solvers: str = typer.Option("nnls,omp,lasso,ridge", "--solvers", help="Comma-separated."),
    threshold: float = typer.Option(0.05, "--threshold", help="Weights above it count as present."),
    density: float | None = typer.Option(
        None, "--density", help="TIES density for the sign-aware solve (default: record or grid)."
    ),
    sign_aware: bool = typer.Option(
        True, "--sign-aware/--no-sign-aware", help="Also fit the TIES merge model."
    ),
    device: str = DEVICE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Recover which task vectors a merged model was made of, and their weights."""
    from gradfree.base.errors import GradfreeError
    from gradfree.taskvec.unmerge import render, unmerge

    extra = list(ctx.args)
    if any(a.startswith("-") for a in extra):
        raise GradfreeError(f"Unknown option {next(a for a in extra if a.startswith('-'))}.")
    rec = unmerge(
        base,
        merged,
        [*dictionary, *extra],
        mask,
        out,
        solvers=[s.strip() for s in solvers.split(",") if s.strip()],
        threshold=threshold,
        density=density,
        sign_aware=sign_aware,
        device=device,
        overwrite=overwrite,
        say=lambda s: typer.echo(s, err=True),
    )
    typer.echo(render(rec), err=True)
    typer.echo(str(out))


@app.command("make-adapters")
def make_adapters_command(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model to adapt."),
    tasks: str | None = typer.Option(
        None, "--tasks", help="Comma-separated tasks (default: all 8)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Folder (default: the adapter cache)."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank."),
    steps: int = typer.Option(16, "--steps", help="Optimizer steps per adapter."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training block."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Data order and LoRA initialisation."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Train the project's LoRA task adapters with peft (data preparation; cached like models).
    The table of held-out perplexities is written to OUT/adapters.json and adapters.md."""
    from gradfree.taskvec.adapters import make_adapters

    names = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
    r = make_adapters(
        model,
        names,
        out,
        rank=rank,
        steps=steps,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
    )
    for task, a in r["adapters"].items():
        typer.echo(
            f"{task}: held-out perplexity {a['ppl_base']:.3f} → {a['ppl_adapter']:.3f} "
            f"({a['path']})",
            err=True,
        )


def register(root: typer.Typer) -> None:
    """Add `taskvec` to the root app."""
    root.add_typer(app, name="taskvec")
