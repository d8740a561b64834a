"""``gradfree directions``: concept directions (seed 004) — extraction and steering.

gradfree directions extract --model M --concepts 20000 --layers 12 --out DIR
gradfree directions steer --model M --directions DIR --concept ocean --strength 4 --prompt "..."
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE, PROGRESS

app = typer.Typer(help="Concept directions: extraction and steering.", no_args_is_help=True)


@app.command("extract")
def extract_command(
    model: str = typer.Option(..., "--model", help="Model (name, folder or file)."),
    concepts: int = typer.Option(20000, "--concepts", help="How many concepts of the word list."),
    layers: str = typer.Option(..., "--layers", help="Comma-separated block indices."),
    source: str = typer.Option(
        "wordfreq", "--source", help="Word list: wordfreq or english-words."
    ),
    poolings: str = typer.Option("mean,last", "--poolings", help="mean and/or last (token)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Prompts per forward pass."),
    out: Path = typer.Option(..., "--out", help="Output folder (directions.safetensors + .json)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
    progress: bool = PROGRESS,
) -> None:
    """Extract one direction per concept (concept mean − mean over concepts) at the given layers,
    running only the blocks up to the deepest one."""
    from gradfree.base.errors import GradfreeError
    from gradfree.base.io import check_new_output
    from gradfree.base.progress import reporting
    from gradfree.directions.concepts import word_list
    from gradfree.directions.extract import extract_directions
    from gradfree.models import load_model

    try:
        layer_list = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        raise GradfreeError(
            f"--layers takes comma-separated block indices, not {layers!r}."
        ) from None
    check_new_output(out, overwrite)
    words, record = word_list(concepts, source=source)
    loaded = load_model(model, device=device, dtype=dtype)
    with reporting(progress) as report:
        d = extract_directions(
            loaded.model,
            loaded.tokenizer,
            words,
            layers=layer_list,
            poolings=[p.strip() for p in poolings.split(",") if p.strip()],
            batch_size=batch_size,
            device=device,
            progress=report,
            fingerprint=loaded.fingerprint,
            spec=model,
            concept_source=record,
        )
    d.save(out, overwrite=overwrite)
    t = d.source.get("timings", {})
    rate = t.get("concepts_per_s")
    typer.echo(
        f"{len(d.concepts)} concepts at layers {d.layers}"
        + (f", {rate:.1f} concepts/s" if isinstance(rate, int | float) else ""),
        err=True,
    )
    typer.echo(str(out))


@app.command("steer")
def steer_command(
    model: str = typer.Option(..., "--model", help="Model (name, folder or file)."),
    directions: Path = typer.Option(..., "--directions", help="Folder from `directions extract`."),
    concept: str = typer.Option(..., "--concept", help="A concept of the directions folder."),
    strength: float = typer.Option(..., "--strength", help="Multiple of the direction added."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    layer: int | None = typer.Option(None, "--layer", help="Block (default: the folder's first)."),
    pooling: str = typer.Option("mean", "--pooling", help="mean or last."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", min=1, help="Tokens generated."),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Generate greedily from PROMPT with strength × the concept's direction added to the
    residual stream after block LAYER, next to the same generation without it."""
    import torch

    from gradfree.base.errors import GradfreeError
    from gradfree.directions.steer import steering
    from gradfree.directions.store import check_model, load_directions
    from gradfree.models import load_model

    d = load_directions(directions)
    if concept not in d.concepts:
        raise GradfreeError(
            f"The concept {concept!r} is not in the directions folder {directions}."
        )
    at = d.layers[0] if layer is None else layer
    if at not in d.layers:
        raise GradfreeError(f"The directions folder has layers {d.layers}, not {at}.")
    loaded = load_model(model, device=device, dtype=dtype)
    check_model(d, loaded)
    vector = d.get(at, pooling)[d.concepts.index(concept)]
    tok = loaded.tokenizer
    ids = tok(prompt, return_tensors="pt").to(device)

    def generate() -> str:
        with torch.no_grad():
            out = loaded.model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
            )
        return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))

    plain = generate()
    with steering(loaded.model, at, vector, strength):
        steered = generate()
    typer.echo(f"without: {plain}")
    typer.echo(f"with {concept} × {strength:g} at block {at}: {steered}")


def register(root: typer.Typer) -> None:
    """Add `directions` to the root app."""
    root.add_typer(app, name="directions")
