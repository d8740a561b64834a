"""The predictor table of issue 16 on real directions (``gradfree directions extract`` output).

For each pooling asked for, fits every method of ``gradfree.directions.predict.predictor_table``
(closed-form ridge, the seed's torch baselines, the inverse map) on one split by concept, prints
a table next to seed 004's numbers and saves everything as JSON:

    flock /tmp/heavy.lock .venv/bin/python scripts/directions_predictors.py \\
        --directions runs/directions/qwen0.5b-20k --layer 12 \\
        --out docs/results/data/directions-predictors-2026-12-04.json

The model's input embedding table is read from the model the directions name (``--model``
overrides), after ``check_model`` has confirmed it is the same model.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ["method", "params", "inference size", "train cos", "val cos", "test cos"]
    cols += ["seed test cos", "fit s"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        seed = "" if r["seed_test_cos"] is None else f"{r['seed_test_cos']:.4f}"
        out.append(
            f"| {r['method']} | {r['params']:,} | {r['bytes_inference'] / 1e6:.1f} MB "
            f"| {r['train_cos']:.4f} | {r['val_cos']:.4f} | {r['test_cos']:.4f} | {seed} "
            f"| {r['fit_s']:.1f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--directions", required=True)
    ap.add_argument("--layer", type=int, default=None, help="default: the middle stored layer")
    ap.add_argument("--pooling", nargs="+", default=["mean"])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--model", default=None, help="default: the spec recorded in the directions")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from gradfree.adapters import get_adapter
    from gradfree.base.io import check_new_output, write_json_atomic
    from gradfree.directions import predict as P
    from gradfree.directions.store import check_model, load_directions
    from gradfree.models import load_model

    out = check_new_output(args.out, overwrite=args.overwrite)
    d = load_directions(args.directions)
    layers = sorted(d.layers)
    layer = layers[len(layers) // 2] if args.layer is None else args.layer
    spec = args.model or d.model.get("spec")
    t0 = time.perf_counter()
    loaded = load_model(spec, device="cpu", dtype="float32")
    check_model(d, loaded)
    table = get_adapter(loaded.model).embed_tokens.weight.detach().cpu().numpy().copy()
    tokenizer = loaded.tokenizer
    del loaded
    load_s = time.perf_counter() - t0
    methods = tuple(args.methods) if args.methods else P.DEFAULT_METHODS
    split = P.split_by_concept(d.concepts, P.DEFAULT_FRACTIONS, args.seed)
    results: dict[str, Any] = {}
    for pooling in args.pooling:
        print(f"== layer {layer}, pooling {pooling}", flush=True)
        rows = P.predictor_table(
            d,
            table,
            tokenizer,
            layer,
            pooling,
            methods=methods,
            epochs=args.epochs,
            seed=args.seed,
            device="cpu",
            dtype="float32",
            progress=lambda s: print(s, flush=True),
        )
        results[pooling] = rows
        print(_table(rows), flush=True)
    report = {
        "what": "issue 16 predictor table: concept direction from the frozen input embeddings",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "directions": str(Path(args.directions).resolve()),
        "model": d.model,
        "source": d.source,
        "templates": d.templates,
        "layer": layer,
        "layers_stored": layers,
        "n_concepts": len(d.concepts),
        "split": {k: len(v) for k, v in split.items()},
        "split_fractions": list(P.DEFAULT_FRACTIONS),
        "input_form": "mean input embedding of the tokens of ' ' + concept (as in the templates)",
        "embed_table_shape": list(table.shape),
        "bytes_per_param": P.BYTES_PER_PARAM,
        "epochs": args.epochs,
        "seed": args.seed,
        "seed_numbers": P.SEED_NUMBERS,
        "seed_setup": "Qwen3-0.6B layer 14 of 28, 1024-wide, 50k concepts split 35k/7.5k/7.5k",
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "model_load_s": load_s,
        "rows": results,
    }
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
