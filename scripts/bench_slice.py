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

Side by side with SliceGPT (issue 17): ``--methods global,slicegpt`` runs, for every model and
calibration corpus, the global basis above (method ``gradfree-global``) and the SliceGPT
baseline (:mod:`gradfree.baselines.slicegpt`: per-block bases and shortcut matrices, evaluated
in process) on the same calibration documents and the same held-out tokens; parameters are
counted per stored tensor (shortcuts included, a tied head once). ``--out-side-by-side PATH``
writes the rows (``model``, ``method``, ``fraction``, ``params``, ``text``, ``ppl``, ...; dense
rows have fraction 0), appending to / replacing rows of the same model and calibration::

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_slice.py --models smollm2-135m-instruct \
        --methods global,slicegpt --fractions 0.2,0.25,0.3 --calibrations news \
        --out-side-by-side docs/results/data/slicegpt-side-by-side.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from gradfree.adapters import get_adapter
from gradfree.base.provenance import Stopwatch, machine, versions
from gradfree.baselines import (
    calibration_windows,
    param_count,
    slicegpt_,
    slicegpt_fraction_for_params,
)
from gradfree.evaluation.run import evaluate
from gradfree.models import load_model
from gradfree.surgery import basis as B
from gradfree.surgery import fuse_norms_, slice_, untie_
from gradfree.surgery.export import plan_widths
from gradfree.surgery.prune import mlp_keep_for_params
from gradfree.surgery.reconstruct import PrunePlan, dense_reference, reconstruct_
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


METHOD_NAMES = {
    "global": "gradfree-global",
    "global-ls": "gradfree-global-ls",
    "slicegpt": "slicegpt",
    # at a parameter target (--param-fractions) rather than a width fraction
    "prune-ls": "gradfree-prune-ls",
    "prune-ls-heads": "gradfree-prune-ls-heads",
    "slicegpt-eq": "slicegpt",
    "slice-prune-ls": "gradfree-slice-prune-ls",
}
AT_PARAMS = ("prune-ls", "prune-ls-heads", "slicegpt-eq", "slice-prune-ls")


def _progress(msg: str) -> None:
    """The reconstruction's per-block lines, on stdout: they land in the job's log file."""
    print(msg, flush=True)


def _rows_for(
    base: dict[str, Any], res: dict[str, tuple[float, int]], seconds_eval: float
) -> list[dict[str, Any]]:
    return [
        {**base, "text": t, "ppl": v[0], "tokens": v[1], "seconds_eval": seconds_eval}
        for t, v in res.items()
    ]


def side_by_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Dense, gradfree-global and SliceGPT rows on the same calibration and held-out tokens."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {sorted(METHOD_NAMES)}")
    fractions = [float(f) for f in args.fractions.split(",")]
    param_fractions = [float(f) for f in args.param_fractions.split(",") if f.strip()]
    extra = [float(f) for f in args.global_extra_fractions.split(",") if f.strip()]
    calibs = [c.strip() for c in args.calibrations.split(",") if c.strip()]
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        loaded = load_model(name)
        model, tok = loaded.model, loaded.tokenizer
        d = get_adapter(model).hidden_size
        evals = {
            t: take_tokens(tok, load_corpus(c, split="heldout"), args.eval_tokens)
            for t, c in TEXTS.items()
        }
        t0 = time.perf_counter()
        dense = {t: ppl(model, tok, docs, args.max_length) for t, docs in evals.items()}
        base = {"model": name, "method": "dense", "fraction": 0.0, "width": d}
        base |= {"params": param_count(model), "calibration": "-", "calib_tokens": 0}
        base |= {"seconds": 0.0}
        dense_params = base["params"]
        # query heads kept per KV group by prune-ls-heads: one fewer (transformers permitting)
        geo = get_adapter(model).geometry
        heads_keep = max(1, geo.group_size - 1)
        rows += _rows_for(base, dense, time.perf_counter() - t0)
        for t, v in dense.items():
            print(f"{name} dense {t}: ppl {v[0]:.3f} ({v[1]} tokens)", flush=True)
        # SliceGPT and pruning start from the untouched model; the global basis from a fused,
        # untied copy (made only when asked for: two copies of a 1.5B fit in 24 GiB, three not)
        fused = any(m in methods for m in ("global", "global-ls", "slice-prune-ls"))
        dense_copy = copy.deepcopy(model) if fused else model
        if fused:
            fuse_norms_(model)
            untie_(model)
        for calib in calibs:
            cdocs = take_tokens(
                tok, load_corpus(TEXTS[calib], split="calibration"), args.calib_tokens
            )
            windows = calibration_windows(tok, cdocs, max_length=512)
            ntok = sum(int(w.numel()) for w in windows)
            jobs: list[tuple[str, float]] = []
            if "global" in methods:
                jobs += [("global", f) for f in sorted(set(fractions + extra))]
            if "global-ls" in methods:
                jobs += [("global-ls", f) for f in fractions]
            if "slicegpt" in methods:
                jobs += [("slicegpt", f) for f in fractions]
            jobs += [(m, p) for m in AT_PARAMS if m in methods for p in param_fractions]
            q = None
            t_cal = 0.0
            ref = None  # the dense model in the basis q, for global-ls (made once per basis)
            for method, f in jobs:
                t0 = time.perf_counter()
                extra_fields: dict[str, Any] = {}
                watch = Stopwatch()
                with watch.stage(f"{method} {f}"):  # peak RSS of the fit and its evaluation
                    if method in ("global", "global-ls"):
                        if q is None:
                            moments, info = B.calibration_moments(loaded, cdocs, max_length=512)
                            assert info["tokens"] == ntok, (info["tokens"], ntok)
                            q, _ = B.pca_rotation(B.global_moment(moments))
                            t_cal = time.perf_counter() - t0
                            t0 = time.perf_counter()
                        sliced = copy.deepcopy(model)
                        (k,) = plan_widths(sliced.config, d, f, 1)
                        slice_(sliced, k, q)
                        if method == "global-ls":
                            if ref is None:
                                ref = dense_reference(model, q)
                            rec = reconstruct_(
                                sliced,
                                ref,
                                tok,
                                cdocs,
                                rel_lam=args.ls_lambda,
                                max_length=512,
                                progress=_progress,
                            )
                            print(
                                f"{name} global-ls f={f}: reconstructed in {rec['seconds']:.0f}s "
                                f"({len(rec['fits'])} fitted sites, {rec['tokens']} tokens)",
                                flush=True,
                            )
                        secs = time.perf_counter() - t0 + t_cal
                        width = k
                    elif method == "slice-prune-ls":
                        # slice --combo-width of the width (global basis), then prune MLP
                        # neurons to the target inside the reconstruction
                        if q is None:
                            moments, _ = B.calibration_moments(loaded, cdocs, max_length=512)
                            q, _ = B.pca_rotation(B.global_moment(moments))
                        sliced = copy.deepcopy(model)
                        (k,) = plan_widths(sliced.config, d, args.combo_width, 1)
                        if ref is None:
                            ref = dense_reference(model, q)
                        slice_(sliced, k, q)
                        target = int((1.0 - f) * dense_params)
                        plan = PrunePlan(mlp_keep_for_params(sliced, target))
                        rec = reconstruct_(
                            sliced,
                            ref,
                            tok,
                            cdocs,
                            rel_lam=args.ls_lambda,
                            max_length=512,
                            prune=plan,
                            progress=_progress,
                        )
                        secs = time.perf_counter() - t0
                        width = k
                        extra_fields = {
                            "target_param_fraction": f,
                            "width_fraction": args.combo_width,
                            "intermediate_size": plan.mlp_keep,
                        }
                    elif method in ("prune-ls", "prune-ls-heads"):
                        # from the untouched model: no fusion, so a tied head stays tied
                        target = int((1.0 - f) * dense_params)
                        heads = heads_keep if method == "prune-ls-heads" else None
                        plan = PrunePlan(mlp_keep_for_params(dense_copy, target, heads), heads)
                        sliced = copy.deepcopy(dense_copy)
                        rec = reconstruct_(
                            sliced,
                            dense_copy,
                            tok,
                            cdocs,
                            rel_lam=args.ls_lambda,
                            head=not get_adapter(sliced).tied,
                            max_length=512,
                            prune=plan,
                            progress=_progress,
                        )
                        print(
                            f"{name} {method} target -{f:.0%} params: {plan.mlp_keep} neurons, "
                            f"{rec['prune']['num_attention_heads']} heads, "
                            f"{rec['seconds']:.0f}s",
                            flush=True,
                        )
                        secs = time.perf_counter() - t0
                        width = d
                        extra_fields = {
                            "target_param_fraction": f,
                            "intermediate_size": plan.mlp_keep,
                            "num_attention_heads": rec["prune"]["num_attention_heads"],
                        }
                    else:
                        sliced = copy.deepcopy(dense_copy)
                        fs = f
                        if method == "slicegpt-eq":
                            fs = slicegpt_fraction_for_params(
                                dense_copy,
                                int((1.0 - f) * dense_params),
                                slice_head=args.slicegpt_slice_head,
                            )
                            extra_fields = {"target_param_fraction": f}
                        r = slicegpt_(sliced, windows, fs, slice_head=args.slicegpt_slice_head)
                        secs = r.seconds
                        width = r.widths[0][0]
                        f = fs
                    t1 = time.perf_counter()
                    res = {t: ppl(sliced, tok, docs, args.max_length) for t, docs in evals.items()}
                label = METHOD_NAMES[method]
                if label == "slicegpt" and args.slicegpt_slice_head:
                    label = "slicegpt-head-sliced"  # its own curve: a different configuration
                base = {"model": name, "method": label, "fraction": f}
                base |= {"width": width, "params": param_count(sliced), "calibration": calib}
                base |= {"calib_tokens": ntok, "seconds": secs}
                # peak RSS while this row was made (slice/fit + evaluation), sampled
                base |= {"peak_rss_gib": round(watch.rows[-1]["peak_rss_gib"], 3)}
                if method in ("global-ls", "prune-ls", "prune-ls-heads", "slice-prune-ls"):
                    base |= {"ls_lambda": args.ls_lambda}
                base |= extra_fields
                base |= {"param_fraction_removed": 1.0 - base["params"] / dense_params}
                rows += _rows_for(base, res, time.perf_counter() - t1)
                del sliced
                if args.out_side_by_side:  # after every row: a job cut short keeps its rows
                    write_side_by_side(args.out_side_by_side, rows, args)
                print(
                    f"{name} {label} calib={calib} f={f} k={width} "
                    f"params={base['params']} slice {secs:.0f}s "
                    f"peak RSS {base['peak_rss_gib']:.2f} GiB "
                    f"eval {time.perf_counter() - t1:.0f}s "
                    + " ".join(f"{t}={v[0]:.3f}" for t, v in res.items()),
                    flush=True,
                )
            ref = None
        del model, loaded, dense_copy
    return rows


def equal_params(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every SliceGPT row: the global basis's perplexity at the same parameter count,
    interpolated linearly in (params, log ppl) between the two nearest global rows (None where
    the global rows do not bracket it)."""
    out = []
    for r in rows:
        if r["method"] != "slicegpt":
            continue
        pts = sorted(
            (g["params"], g["ppl"])
            for g in rows
            if g["method"] == "gradfree-global"
            and (g["model"], g["calibration"], g["text"])
            == (r["model"], r["calibration"], r["text"])
        )
        est = None
        for (p0, y0), (p1, y1) in itertools.pairwise(pts):
            if p0 <= r["params"] <= p1 and p1 > p0:
                w = (r["params"] - p0) / (p1 - p0)
                est = math.exp((1 - w) * math.log(y0) + w * math.log(y1))
        out.append(
            {
                **{k: r[k] for k in ("model", "calibration", "text", "fraction", "params")},
                "ppl_slicegpt": r["ppl"],
                "ppl_global_at_equal_params": est,
            }
        )
    return out


def _row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a row: one model, method, knob (fraction or parameter target), calibration and
    held-out text."""
    knob = r.get("target_param_fraction", r["fraction"])
    equal = "target_param_fraction" in r
    return (r["model"], r["method"], r["calibration"], round(knob, 6), equal, r["text"])


def write_side_by_side(path: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Merge ``rows`` into the JSON list at ``path``: a row of the same model, method, knob,
    calibration and text is replaced, others kept (so runs of different methods add up)."""
    p = Path(path)
    old: list[dict[str, Any]] = json.loads(p.read_text()) if p.exists() else []
    new_keys = {_row_key(r) for r in rows}
    kept = [r for r in old if _row_key(r) not in new_keys]
    stamp = {"machine": machine(), "command_args": vars(args)}
    merged = kept + [{**r, **stamp} for r in rows]
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(p)


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
    ap.add_argument(
        "--methods",
        default=None,
        help="Side by side: comma list of " + ", ".join(METHOD_NAMES) + ".",
    )
    ap.add_argument(
        "--ls-lambda", type=float, default=1e-2, help="global-ls: ridge λ relative to tr(C)/k."
    )
    ap.add_argument("--calibrations", default=",".join(TEXTS), help="With --methods.")
    ap.add_argument(
        "--combo-width",
        type=float,
        default=0.1,
        help="slice-prune-ls: the share of the residual width sliced before pruning.",
    )
    ap.add_argument(
        "--param-fractions",
        default="0.2,0.25,0.3",
        help="prune-ls, prune-ls-heads, slicegpt-eq: fractions of the dense parameters removed.",
    )
    ap.add_argument(
        "--global-extra-fractions",
        default="",
        help="With --methods: more fractions for the global basis (for equal-parameter rows).",
    )
    ap.add_argument("--slicegpt-slice-head", action="store_true", help="Slice the head too.")
    ap.add_argument("--out-side-by-side", default=None, help="With --methods: the rows' JSON.")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.methods is not None:
        rows_sbs = side_by_side(args)
        for e in equal_params(rows_sbs):
            g = e["ppl_global_at_equal_params"]
            print(
                f"equal params {e['model']} calib={e['calibration']} {e['text']} f={e['fraction']} "
                f"params={e['params']}: slicegpt {e['ppl_slicegpt']:.3f}, global "
                + ("n/a" if g is None else f"{g:.3f}"),
                flush=True,
            )
        return
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
