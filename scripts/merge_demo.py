"""Merging real copies of one model that compute the same function with different weights.

Qwen2.5-Coder-0.5B (A) is turned into function-preserving variants with the surgery transforms:
``fused`` (RMSNorm weights folded into the linears), ``rotated`` (fused, then the residual stream
rotated by a random orthogonal Q) and ``aligned`` (rotated, then rotated back by a Q̂ estimated
from activations alone: orthogonal Procrustes on teacher×student cross-moments of the residual
stream captured on calibration text). Every variant has A's perplexity; merges of them show what
weight-space averaging does when the inputs are, or are not, in the same coordinates.

    flock /tmp/gradfree-heavy.lock nice -n 5 python scripts/merge_demo.py --out runs/merge_demo

Writes ``results.json`` and ``results.md`` into ``--out``; merged checkpoints are deleted after
they are evaluated unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def _ppl(folder: str, docs: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    from gradfree.evaluation.run import evaluate
    from gradfree.models import load_model

    m = load_model(folder)
    r = evaluate(
        m.model, m.tokenizer, docs, max_length=args.max_length, stride=args.max_length, batch_size=2
    )
    return {"ppl": r["perplexity"]["ppl"], "tokens": r["perplexity"]["tokens"]}


def _variants(args: argparse.Namespace, inputs: Path, log: dict[str, Any]) -> None:
    import torch

    from gradfree.capture import make_config, run_capture
    from gradfree.models import load_model
    from gradfree.solvers import procrustes_from_cross
    from gradfree.surgery import (
        fuse_norms_,
        orthogonality_error,
        random_orthogonal,
        rotate_residual_,
    )
    from gradfree.texts.corpora import load_corpus

    a = load_model(args.model)
    fuse_norms_(a.model)
    a.model.save_pretrained(inputs / "fused")
    a.tokenizer.save_pretrained(inputs / "fused")
    d = a.model.config.hidden_size
    q = random_orthogonal(d, seed=args.seed)
    rotate_residual_(a.model, q)
    a.model.save_pretrained(inputs / "rotated")
    a.tokenizer.save_pretrained(inputs / "rotated")
    del a
    # Alignment from activations only: cross-moments of the residual stream at a few blocks.
    fused, rot = load_model(str(inputs / "fused")), load_model(str(inputs / "rotated"))
    docs = load_corpus("tourguide", split="calibration", limit=args.align_docs)
    n = fused.model.config.num_hidden_layers
    layers = sorted({round(f * (n - 1)) for f in (0.1, 0.35, 0.6, 0.85)})
    cfg = make_config(sites=["resid_pre"], layers=layers, max_length=128, split_first=0)
    t0 = time.perf_counter()
    cap = run_capture(
        {"teacher": fused, "student": rot}, docs, inputs / "align_capture", cfg, progress=False
    )
    c = sum(cap.cross(f"blocks.{i}.resid_pre", f"blocks.{i}.resid_pre").m_ab for i in layers)
    assert isinstance(c, torch.Tensor)
    r = procrustes_from_cross(c)  # fused · R ≈ rotated, so R estimates Q
    log["alignment"] = {
        "tokens": cap.tokens("student"),
        "layers": layers,
        "seconds": round(time.perf_counter() - t0, 1),
        "max_abs_R_minus_Q": float((r - q).abs().max()),
        "orthogonality_error_R": orthogonality_error(r),
    }
    del fused
    rotate_residual_(rot.model, r.T)  # back to (approximately) the fused coordinates
    rot.model.save_pretrained(inputs / "aligned")
    rot.tokenizer.save_pretrained(inputs / "aligned")
    shutil.rmtree(inputs / "align_capture")
    (inputs / "alignment.json").write_text(json.dumps(log["alignment"], indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--out", type=Path, default=Path("runs/merge_demo"))
    p.add_argument("--eval-limit", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--align-docs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    from gradfree.models import resolve_model
    from gradfree.texts.corpora import load_corpus

    out: Path = args.out
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not (inputs / "alignment.json").is_file():
        _variants(args, inputs, log)
    log["alignment"] = json.loads((inputs / "alignment.json").read_text())
    docs = load_corpus("tourguide", split="heldout", limit=args.eval_limit)
    a_dir = resolve_model(args.model).source
    models = {"A": a_dir, **{n: str(inputs / n) for n in ("fused", "rotated", "aligned")}}
    rows: list[dict[str, Any]] = []
    for name, folder in models.items():
        rows.append({"model": name, "recipe": "input", **_ppl(folder, docs, args)})
        print(rows[-1], flush=True)
        _write_results(out, log, rows)
    recipes = {
        "linear(fused, rotated) unaligned": {
            "method": "linear",
            "models": [models["fused"], models["rotated"]],
        },
        "linear(fused, aligned)": {
            "method": "linear",
            "models": [models["fused"], models["aligned"]],
        },
        "linear(A, fused)": {"method": "linear", "models": [a_dir, models["fused"]]},
        "slerp(fused, aligned)": {
            "method": "slerp",
            "models": [models["fused"], models["aligned"]],
        },
        # The methods that measure statistics, at full scale (small calibration sets).
        "fisher(fused, aligned)": {
            "method": "fisher",
            "models": [models["fused"], models["aligned"]],
            "calibration": {"limit": 4, "max_length": 128},
        },
        "regmean(fused, aligned)": {
            "method": "regmean",
            "models": [models["fused"], models["aligned"]],
            "calibration": {"limit": 8, "max_length": 128, "batch_size": 2},
        },
        "regmean(fused, rotated) unaligned": {
            "method": "regmean",
            "models": [models["fused"], models["rotated"]],
            "calibration": {"limit": 8, "max_length": 128, "batch_size": 2},
        },
    }
    for i, (name, recipe) in enumerate(recipes.items()):
        # Each merge runs in its own `gradfree merge` process, so its peak RSS is its own.
        target = out / f"merge_{i}"
        recipe_file = out / f"merge_{i}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        cmd = [
            sys.executable,
            "-c",
            "from gradfree.cli import main; main()",
            "merge",
            str(recipe_file),
            "--out",
            str(target),
            "--overwrite",
        ]
        subprocess.run(cmd, check=True)
        record = json.loads((target / "merge.json").read_text())
        timing = {t["stage"]: t for t in record["timings"]}["merge"]
        row = {"model": name, "recipe": recipe["method"], **_ppl(str(target), docs, args)}
        row["merge_seconds"] = timing["seconds"]
        row["merge_peak_rss_gib"] = round(timing["peak_rss_gib"], 2)
        row["distance"] = record["relative_distance_to_inputs"]
        row["method_summary"] = record["method_summary"]
        rows.append(row)
        print(row, flush=True)
        _write_results(out, log, rows)
        if not args.keep:
            shutil.rmtree(target)
    _write_results(out, log, rows)


def _write_results(out: Path, log: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Written after every row, so an interrupted run keeps what it measured."""
    from gradfree.base.provenance import machine, versions

    log["rows"] = rows
    log["machine"] = machine()
    log["versions"] = versions()
    (out / "results.json").write_text(json.dumps(log, indent=2) + "\n")
    lines = [
        "| model | perplexity | tokens | merge s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ppl']:.3f} | {r['tokens']} | "
            f"{r.get('merge_seconds', '')} | {r.get('merge_peak_rss_gib', '')} |"
        )
    al = log["alignment"]
    lines += [
        "",
        f"Alignment: Procrustes on {al['tokens']} tokens x {len(al['layers'])} blocks "
        f"{al['layers']}; max |R - Q| = {al['max_abs_R_minus_Q']:.2e}, "
        f"max |RᵀR - I| = {al['orthogonality_error_R']:.2e}.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
