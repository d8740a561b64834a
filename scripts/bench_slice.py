"""Benchmark of SliceGPT-style slicing with one global PCA basis (``gradfree slice``).

For each model: held-out perplexity on tour-guide and news text of the dense model and of the
model sliced by 10/20/25/30% of its residual width, with the basis calibrated on the tour-guide
calibration split or on the news calibration split; time and peak RSS per row. Slicing uses the
same library calls as ``gradfree slice`` (fuse + untie, reader-moment PCA, ``slice_``); the
sliced model is evaluated in memory (the tests prove a saved-and-reloaded one gives identical
logits).

Usage (on the shared machine, one heavy job at a time):
    flock /tmp/gradfree-heavy.lock nice -n 5 .venv/bin/python scripts/bench_slice.py \
        --calib-tokens 10000 --eval-tokens 2500 --json out/bench_slice.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from gradfree.adapters import get_adapter
from gradfree.base.provenance import Stopwatch, machine, versions
from gradfree.evaluation.run import evaluate
from gradfree.models import load_model
from gradfree.surgery import basis as B
from gradfree.surgery import fuse_norms_, slice_, untie_
from gradfree.surgery.export import plan_widths
from gradfree.texts.corpora import load_corpus

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
FRACTIONS = [0.10, 0.20, 0.25, 0.30]
TEXTS = {"tourguide": "tourguide", "news": "news"}


def take_tokens(tok: Any, docs: list[Any], n: int) -> list[Any]:
    """Documents in corpus order until they hold at least ``n`` tokens."""
    out, total = [], 0
    for d in docs:
        out.append(d)
        total += len(tok(d.text)["input_ids"])
        if total >= n:
            break
    return out


def ppl(model: Any, tok: Any, docs: list[Any], max_length: int) -> tuple[float, int]:
    r = evaluate(model, tok, docs, max_length=max_length, stride=max_length)["perplexity"]
    return float(r["ppl"]), int(r["tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--calib-tokens", type=int, default=10000)
    ap.add_argument("--eval-tokens", type=int, default=2500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--recompute", type=float, default=None, help="Also: this fraction in 2 stages."
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    fractions = [float(f) for f in args.fractions.split(",")]
    print(
        "| model | calibration | fraction | width | ppl tour-guide | ppl news | "
        "Δ tour-guide | Δ news | calib (s) | slice+eval (s) | peak RSS (GiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        watch = Stopwatch()
        with watch.stage("load"):
            loaded = load_model(name)
        model, tok = loaded.model, loaded.tokenizer
        d = get_adapter(model).hidden_size
        evals = {
            t: take_tokens(tok, load_corpus(c, split="heldout"), args.eval_tokens)
            for t, c in TEXTS.items()
        }
        with watch.stage("dense"):
            dense = {t: ppl(model, tok, docs, args.max_length) for t, docs in evals.items()}
        r0 = watch.rows[-1]
        row = {
            "model": name,
            "calibration": "-",
            "fraction": 0.0,
            "width": d,
            "ppl": {t: v[0] for t, v in dense.items()},
            "tokens": {t: v[1] for t, v in dense.items()},
            "seconds": r0["seconds"],
            "peak_rss_gib": r0["peak_rss_gib"],
        }
        rows.append(row)
        print(
            f"| {name} | dense | 0 | {d} | {dense['tourguide'][0]:.3f} | {dense['news'][0]:.3f} "
            f"| - | - | - | {r0['seconds']:.0f} | {r0['peak_rss_gib']:.2f} |",
            flush=True,
        )
        fuse_norms_(model)
        untie_(model)
        for calib in TEXTS:
            cdocs = take_tokens(
                tok, load_corpus(TEXTS[calib], split="calibration"), args.calib_tokens
            )
            with watch.stage(f"calibrate {calib}"):
                moments, info = B.calibration_moments(loaded, cdocs, max_length=512)
                q, _ = B.pca_rotation(B.global_moment(moments))
            cal = watch.rows[-1]
            jobs = [(f, False) for f in fractions]
            if args.recompute is not None:
                jobs.append((args.recompute, True))
            for f, recompute in jobs:
                t0 = time.perf_counter()
                with watch.stage(f"slice {calib} {f}"):
                    sliced = copy.deepcopy(model)
                    widths = plan_widths(sliced.config, d, f, 2 if recompute else 1)
                    qq = q
                    sub = copy.copy(loaded)
                    sub.model = sliced
                    for s, k in enumerate(widths):
                        if s > 0:
                            m2, _ = B.calibration_moments(sub, cdocs, max_length=512)
                            qq, _ = B.pca_rotation(B.global_moment(m2))
                        slice_(sliced, k, qq)
                    res = {t: ppl(sliced, tok, docs, args.max_length) for t, docs in evals.items()}
                    del sliced, sub
                st = watch.rows[-1]
                secs = time.perf_counter() - t0
                rel = {t: res[t][0] / dense[t][0] - 1 for t in res}
                label = calib + (" (recompute, 2 stages)" if recompute else "")
                rows.append(
                    {
                        "model": name,
                        "calibration": label,
                        "fraction": f,
                        "width": widths[-1],
                        "calib_tokens": info["tokens"],
                        "ppl": {t: v[0] for t, v in res.items()},
                        "relative": rel,
                        "seconds_slice_eval": st["seconds"],
                        "seconds_calibration": cal["seconds"],
                        "peak_rss_gib": max(st["peak_rss_gib"], cal["peak_rss_gib"]),
                    }
                )
                print(
                    f"| {name} | {label} ({info['tokens']} tok) | {f:.2f} | {widths[-1]} | "
                    f"{res['tourguide'][0]:.3f} | {res['news'][0]:.3f} | "
                    f"{100 * rel['tourguide']:+.1f}% | {100 * rel['news']:+.1f}% | "
                    f"{cal['seconds']:.0f} | {secs:.0f} | {rows[-1]['peak_rss_gib']:.2f} |",
                    flush=True,
                )
        del model, loaded
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"rows": rows, "args": vars(args), "machine": machine(), "versions": versions()},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
