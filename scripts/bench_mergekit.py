"""gradfree against mergekit on the same mergekit YAML recipes and the same tiny checkpoints, in
float32 and bfloat16: per method the largest difference of any tensor entry (relative to that
tensor's largest magnitude), the share of bitwise-equal tensors, and both tools' times.

mergekit is not a dependency: install it beside the venv, e.g.::

    .venv/bin/pip install --no-deps --target /tmp/mkpkgs mergekit==0.1.5 immutables
    PYTHONPATH=/tmp/mkpkgs .venv/bin/python scripts/bench_mergekit.py \
        --out docs/results/data/mergekit-side-by-side.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gradfree.base.provenance import machine, versions
from gradfree.merge import merge
from gradfree.testing.mergekit import side_by_side_recipes
from gradfree.testing.tiny import save_tiny


def _w(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    import mergekit  # noqa: F401  (a clear ImportError when it is not installed)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # (the models' dtype, mergekit's compute dtype): bf16 inputs once in mergekit's bf16
        # arithmetic, once with it computing in float64 as gradfree always does
        for dtype, compute in (
            ("float32", "float32"),
            ("bfloat16", "bfloat16"),
            ("bfloat16", "float64"),
        ):
            for name, seed in (("a", 0), ("b", 1), ("base", 2)):
                save_tiny(
                    root / dtype / name,
                    "qwen2",
                    seed=seed,
                    num_hidden_layers=3,
                    dtype=getattr(torch, dtype),
                )
            a, b, base = (str(root / dtype / n) for n in ("a", "b", "base"))
            for method, recipe in side_by_side_recipes(a, b, base).items():
                recipe = {**recipe, "dtype": compute, "out_dtype": dtype}
                tag = f"{dtype}-{compute}-{method}"
                t0 = time.perf_counter()
                run_merge(
                    MergeConfiguration.model_validate(recipe),
                    str(root / f"mk-{tag}"),
                    options=MergeOptions(copy_tokenizer=True, quiet=True),
                )
                t_mk = time.perf_counter() - t0
                t0 = time.perf_counter()
                merge(recipe, root / f"gf-{tag}", say=lambda _m: None)
                t_gf = time.perf_counter() - t0
                theirs = _w(root / f"mk-{tag}")
                ours = _w(root / f"gf-{tag}")
                worst, equal = 0.0, 0
                for k, t in ours.items():
                    x, y = t.double(), theirs[k].double()
                    scale = float(y.abs().max()) or 1.0
                    worst = max(worst, float((x - y).abs().max()) / scale)
                    equal += int(torch.equal(t, theirs[k]))
                row = {
                    "method": method,
                    "dtype": dtype,
                    "mergekit_compute": compute,
                    "tensors": len(ours),
                    "bitwise_equal": equal,
                    "max_rel_diff": worst,
                    "seconds_gradfree": round(t_gf, 3),
                    "seconds_mergekit": round(t_mk, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| method | dtype | mergekit computes in | tensors bitwise equal | max difference |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['dtype']} | {r['mergekit_compute']} | "
            f"{r['bitwise_equal']}/{r['tensors']} | "
            f"{r['max_rel_diff']:.2e} |"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"rows": rows, "machine": machine(), "versions": versions()}, indent=1)
        )


if __name__ == "__main__":
    main()
