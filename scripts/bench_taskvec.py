"""Benchmark of task-vector masks, compression and unmerging on the project's real LoRA adapters
(``gradfree taskvec make-adapters``; SmolLM2-135M by default), printed as tables and saved as JSON.

What it measures, all in one run on the same adapters:

1. masks at several budgets (entries kept in all; seed 003 kept 99,904): build time, bytes of the
   indices against a dense mask, and the share of each task vector's norm the mask keeps;
2. merges of 2…8 of the tasks (random subsets and weights, seeded) with task arithmetic, TIES,
   DARE-linear and DARE-TIES through the merge toolkit's methods, the merged delta rounded to the
   checkpoint's dtype as the written checkpoint has it (float32; bfloat16 as a noise row);
3. recovery by every solver at every budget: support precision / recall / F1, coefficient error
   against the merge's effective coefficients, residual; with added Gaussian noise; and with one
   merged task left out of the dictionary (it must show as residual, not as a wrong task);
4. functional check: real merged checkpoints are written, unmerged through ``unmerge`` (the
   command's path), rebuilt from the recovered weights and scored by held-out perplexity on
   every merged task's text, against the real merged model.

    .venv/bin/python scripts/bench_taskvec.py --out docs/results/data/taskvec-bench-2026-12-04.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
LINEAR = ("nnls", "omp", "lasso", "ridge")


def _rss_gib() -> float:
    from gradfree.base.provenance import lifetime_peak_rss_bytes

    return lifetime_peak_rss_bytes() / 2**30


def _positions(small: Any, big: Any) -> np.ndarray:
    """Where each entry of mask ``small`` sits in ``big``'s flat order (small ⊂ big)."""
    offsets = big.offsets()
    out = []
    for name, idx in small.indices.items():
        bi = big.indices[name].numpy()
        si = idx.numpy()
        pos = np.searchsorted(bi, si)
        assert np.array_equal(bi[pos], si), f"mask of {small.entries} is not inside the larger one"
        out.append(offsets[name][0] + pos)
    return np.concatenate(out)


def _configs(labels: list[str], sizes: list[int], trials: int) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        for trial in range(trials):
            rng = np.random.default_rng(1000 * n + trial)
            subset = sorted(rng.choice(len(labels), size=n, replace=False).tolist())
            weights = np.round(rng.uniform(0.2, 1.0, size=n), 3).tolist()
            out.append({"n": n, "trial": trial, "tasks": subset, "weights": weights})
    return out


def _truth(method: str, cfg: dict[str, Any]) -> np.ndarray:
    from gradfree.taskvec.merge import effective_coefficients

    params = {"scaling": 1.0, "normalize": True}
    return np.array(effective_coefficients(method, cfg["weights"], params))


def _score_all(
    D: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    truth: dict[str, float],
    ties: tuple[np.ndarray, np.ndarray] | None,
    density: float | None,
    solvers: tuple[str, ...],
) -> dict[str, Any]:
    from gradfree.taskvec.unmerge import solve_all

    return solve_all(
        D, y, labels, solvers=solvers, truth=truth, threshold=0.05, ties=ties, density=density
    )


def _summ(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows aggregated by ``keys`` and solver: F1, coefficient error, largest absent weight."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*tuple(r[k] for k in keys), r["solver"]), []).append(r)
    out = []
    for key, rs in groups.items():
        out.append(
            {
                **dict(zip((*keys, "solver"), key, strict=True)),
                "cases": len(rs),
                "f1_min": min(r["f1"] for r in rs),
                "f1_mean": float(np.mean([r["f1"] for r in rs])),
                "coef_err_max": max(r["coef_err"] for r in rs),
                "coef_err_median": float(np.median([r["coef_err"] for r in rs])),
                "absent_weight_max": max(r["absent_weight"] for r in rs),
                "residual_mean": float(np.mean([r["residual"] for r in rs])),
                "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
            }
        )
    return out


def _row(base: dict[str, Any], solver: str, r: dict[str, Any]) -> dict[str, Any]:
    return {
        **base,
        "solver": solver,
        "f1": r["f1"],
        "precision": r["precision"],
        "recall": r["recall"],
        "coef_err": r["coef_error"]["max_abs"],
        "absent_weight": r["largest_absent_weight"],
        "residual": r["residual"],
        "seconds": r.get("seconds", 0.0),
    }


def _eval_docs(labels: list[str], tokenizer: Any, tokens: int) -> dict[str, Any]:
    from gradfree.taskvec.adapters import TASKS, _task_docs, eval_sample

    out = {}
    for lab in labels:
        _, held, _ = _task_docs(TASKS[lab], None)
        out[lab] = eval_sample(tokenizer, held, tokens)
    return out


def _ppl(folder: str, docs: dict[str, Any], device: str) -> dict[str, float]:
    from gradfree.evaluation.run import evaluate
    from gradfree.models import load_model

    loaded = load_model(folder, device=device, dtype="float32")
    out = {}
    for lab, ds in docs.items():
        r = evaluate(
            loaded.model,
            loaded.tokenizer,
            ds,
            max_length=512,
            stride=256,
            batch_size=4,
            device=device,
        )
        out[lab] = float(r["perplexity"]["ppl"])
    return out


def functional(
    args: argparse.Namespace,
    base_spec: str,
    specs: list[str],
    labels: list[str],
    mask_dir: Path,
    work: Path,
) -> list[dict[str, Any]]:
    """Real checkpoints: merge → unmerge (the command's path) → rebuild → held-out perplexity."""
    from gradfree.models import load_model
    from gradfree.taskvec.merge import merge_task_vectors
    from gradfree.taskvec.unmerge import unmerge

    tok = load_model(base_spec, device=args.device, dtype="float32").tokenizer
    cfg = _configs(labels, [args.functional_tasks], 1)[0]
    chosen = [labels[i] for i in cfg["tasks"]]
    docs = _eval_docs(chosen, tok, args.eval_tokens)
    ppl_base = _ppl(base_spec, docs, args.device)
    rows = []
    for method in args.functional_methods:
        dens = [args.density] * len(chosen) if method != "task_arithmetic" else None
        real = work / f"merged-{method}"
        t0 = time.time()
        merge_task_vectors(
            base_spec,
            [specs[i] for i in cfg["tasks"]],
            real,
            weights=cfg["weights"],
            method=method,
            densities=dens,
            labels=chosen,
            say=lambda s: None,
        )
        t_merge = time.time() - t0
        t0 = time.time()
        rec = unmerge(
            base_spec,
            str(real),
            specs,
            mask_dir,
            work / f"unmerge-{method}",
            labels=labels,
            say=lambda s: None,
        )
        t_unmerge = time.time() - t0
        solver = "ties" if method in ("ties", "dare_ties") else "nnls"
        r = rec["solvers"][solver]
        present = [lab for lab in labels if r["weights"][lab] > 0.05]
        w = [r["weights"][lab] for lab in present]
        rebuilt = work / f"rebuilt-{method}"
        if method in ("ties", "dare_ties"):
            # weights are λ·w/Σw: TIES averages, so the weights' scale is λ
            merge_task_vectors(
                base_spec,
                [specs[labels.index(p)] for p in present],
                rebuilt,
                weights=w,
                method=method,
                densities=[r["density"] if method == "ties" else args.density] * len(present),
                scaling=float(sum(w)),
                labels=present,
                say=lambda s: None,
            )
        else:
            merge_task_vectors(
                base_spec,
                [specs[labels.index(p)] for p in present],
                rebuilt,
                weights=w,
                method=method,
                densities=None if dens is None else [args.density] * len(present),
                labels=present,
                say=lambda s: None,
            )
        p_real = _ppl(str(real), docs, args.device)
        p_rebuilt = _ppl(str(rebuilt), docs, args.device)
        rows.append(
            {
                "method": method,
                "tasks": chosen,
                "weights": cfg["weights"],
                "solver": solver,
                "recovered": {lab: r["weights"][lab] for lab in labels},
                "f1": r["f1"],
                "coef_err": r["coef_error"]["max_abs"],
                "residual": r["residual"],
                "ppl_base": ppl_base,
                "ppl_merged": p_real,
                "ppl_rebuilt": p_rebuilt,
                "max_rel_ppl_gap": max(abs(p_rebuilt[k] / p_real[k] - 1) for k in p_real),
                "merge_seconds": t_merge,
                "unmerge_seconds": t_unmerge,
            }
        )
        print(
            f"functional {method}: max |ppl rebuilt / ppl merged − 1| = "
            f"{rows[-1]['max_rel_ppl_gap']:.2e}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapters", default=None, help="Folder of adapters (default: the cache).")
    ap.add_argument("--budgets", default="1000,10000,100000,1000000")
    ap.add_argument("--modules", default="attention")
    ap.add_argument("--sizes", default="2,3,4,5,6,7,8")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--density", type=float, default=0.5, help="TIES/DARE density of the merges.")
    ap.add_argument(
        "--noise", default="0.001,0.01,0.1", help="Relative noise levels (at --noise-budget)."
    )
    ap.add_argument("--noise-budget", type=int, default=10000)
    ap.add_argument(
        "--lasso-max-entries", type=int, default=100000, help="Skip LASSO above this budget (time)."
    )
    ap.add_argument(
        "--ties-max-entries",
        type=int,
        default=100000,
        help="Run the sign-aware solve up to this budget (its forward fits scale with n).",
    )
    ap.add_argument("--functional-tasks", type=int, default=4)
    ap.add_argument("--functional-methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON output file.")
    args = ap.parse_args()
    args.functional_methods = [m for m in args.functional_methods.split(",") if m]

    from gradfree.taskvec import solve
    from gradfree.taskvec.adapters import TASKS, adapters_dir
    from gradfree.taskvec.compress import compress
    from gradfree.taskvec.mask import build_mask
    from gradfree.taskvec.merge import configure, merged_delta_at
    from gradfree.taskvec.unmerge import trim_ranks
    from gradfree.taskvec.vector import open_base, open_task_vector

    folder = Path(args.adapters) if args.adapters else adapters_dir(args.model)
    labels = [t for t in TASKS if (folder / t / "adapter_config.json").is_file()]
    if len(labels) < 3:
        raise SystemExit(
            f"only {len(labels)} adapters in {folder}; run `gradfree taskvec make-adapters` first"
        )
    specs = [str(folder / t) for t in labels]
    budgets = sorted(int(b) for b in args.budgets.split(","))
    sizes = [int(s) for s in args.sizes.split(",") if int(s) <= len(labels)]
    methods = [m for m in args.methods.split(",") if m]
    result: dict[str, Any] = {"model": args.model, "adapters": labels, "args": vars(args)}
    t_all = time.time()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(dir="/tmp") as tmpdir:
        work = Path(tmpdir)
        b = stack.enter_context(open_base(args.model))
        vectors = [open_task_vector(s, b, stack, lab) for s, lab in zip(specs, labels, strict=True)]
        masks, dicts, ties_ranks, mask_rows = {}, {}, {}, []
        norms = None
        for k in budgets:
            t0 = time.time()
            m = build_mask(b, vectors, k, modules=args.modules)
            t_mask = time.time() - t0
            t0 = time.time()
            D = np.stack([compress(v, m, dtype="float64").flat(m) for v in vectors], axis=1)
            t_comp = time.time() - t0
            t0 = time.time()
            parts = [trim_ranks(v, m) for v in vectors]
            t_rank = time.time() - t0
            if norms is None:
                norms = []
                for v in vectors:
                    tot = 0.0
                    for n in v.names():
                        tot += float((v.delta(n) ** 2).sum())
                    norms.append(tot**0.5)
            kept = (np.linalg.norm(D, axis=0) / np.array(norms)).tolist()
            masks[k], dicts[k] = m, D
            ties_ranks[k] = (np.stack([p[0] for p in parts], axis=1), parts[0][1])
            man = m.manifest()["bytes"]
            mask_rows.append(
                {
                    "k": k,
                    "entries": m.entries,
                    "modules": len(m.indices),
                    "index_bytes": man["indices"],
                    "dense_mask_bytes": man["dense_bool_mask_of_these_modules"],
                    "seed_dense_mask_bytes": man["seed_003_dense_mask"],
                    "compressed_vector_bytes_fp32": 4 * m.entries,
                    "mask_seconds": t_mask,
                    "compress_8_seconds": t_comp,
                    "trim_rank_seconds": t_rank,
                    "norm_kept": dict(zip(labels, kept, strict=True)),
                    "peak_rss_gib": _rss_gib(),
                }
            )
            print(
                f"mask k={k}: {m.entries} entries, {man['indices'] / 1e3:.1f} KB, {t_mask:.1f} s",
                flush=True,
            )
        result["masks"] = mask_rows
        big = masks[budgets[-1]]
        pos = {k: _positions(masks[k], big) for k in budgets}
        configs = _configs(labels, sizes, args.trials)
        rows: list[dict[str, Any]] = []
        merge_secs = []
        for cfg in configs:
            sub = [vectors[i] for i in cfg["tasks"]]
            sub_labels = [labels[i] for i in cfg["tasks"]]
            for method in methods:
                dens = None if method == "task_arithmetic" else [args.density] * cfg["n"]
                merger = configure(
                    method, args.model, sub_labels, cfg["weights"], dens, 1.0, True, 0
                )
                t0 = time.time()
                y_big = merged_delta_at(merger, b, sub, big, out_dtypes=("float32", "bfloat16"))
                merge_secs.append({"method": method, "n": cfg["n"], "seconds": time.time() - t0})
                truth = dict(zip(sub_labels, _truth(method, cfg).tolist(), strict=True))
                is_ties = method in ("ties", "dare_ties")
                tdens = (
                    args.density if method == "ties" else (1.0 if method == "dare_ties" else None)
                )
                for k in budgets:
                    D = dicts[k]
                    solvers = (
                        LINEAR
                        if k <= args.lasso_max_entries
                        else tuple(s for s in LINEAR if s != "lasso")
                    )
                    ties = ties_ranks[k] if is_ties and k <= args.ties_max_entries else None
                    cases = [("float32", 0.0, y_big["float32"][pos[k]])]
                    if k == args.noise_budget:
                        cases.append(("bfloat16", 0.0, y_big["bfloat16"][pos[k]]))
                        for lvl in (float(x) for x in args.noise.split(",") if x):
                            cases.append(
                                ("float32", lvl, solve.noisy(y_big["float32"][pos[k]], lvl, 7))
                            )
                    for dt, lvl, y in cases:
                        res = _score_all(D, y, labels, truth, ties, tdens, solvers)
                        base_row = {
                            "method": method,
                            "n": cfg["n"],
                            "trial": cfg["trial"],
                            "k": k,
                            "dtype": dt,
                            "noise": lvl,
                            "dictionary": "complete",
                        }
                        rows += [_row(base_row, s, r) for s, r in res.items()]
                    # one merged task left out of the dictionary (n < 8 leaves absent atoms)
                    if cfg["n"] < len(labels):
                        out_i = cfg["tasks"][0]
                        keep = [i for i in range(len(labels)) if i != out_i]
                        lab2 = [labels[i] for i in keep]
                        tr2 = {kk: vv for kk, vv in truth.items() if kk != labels[out_i]}
                        t2 = None if ties is None else (ties[0][:, keep], ties[1])
                        res = _score_all(
                            D[:, keep], y_big["float32"][pos[k]], lab2, tr2, t2, tdens, solvers
                        )
                        base_row = {
                            "method": method,
                            "n": cfg["n"],
                            "trial": cfg["trial"],
                            "k": k,
                            "dtype": "float32",
                            "noise": 0.0,
                            "dictionary": "one merged task missing",
                        }
                        rows += [_row(base_row, s, r) for s, r in res.items()]
            print(
                f"merges of {cfg['n']} tasks (trial {cfg['trial']}) solved; "
                f"{time.time() - t_all:.0f} s",
                flush=True,
            )
        result["rows"] = rows
        result["merge_seconds"] = merge_secs
        result["summary"] = {
            "by_budget": _summ(
                [
                    r
                    for r in rows
                    if r["noise"] == 0 and r["dtype"] == "float32" and r["dictionary"] == "complete"
                ],
                ("method", "k"),
            ),
            "noise": _summ(
                [r for r in rows if r["k"] == args.noise_budget and r["dictionary"] == "complete"],
                ("method", "dtype", "noise"),
            ),
            "missing_task": _summ(
                [r for r in rows if r["dictionary"] != "complete"], ("method", "k")
            ),
            "by_tasks": _summ(
                [
                    r
                    for r in rows
                    if r["k"] == args.noise_budget
                    and r["noise"] == 0
                    and r["dtype"] == "float32"
                    and r["dictionary"] == "complete"
                ],
                ("method", "n"),
            ),
        }
        mask_dir = work / "mask"
        masks[args.noise_budget].save(mask_dir) if args.noise_budget in masks else big.save(
            mask_dir
        )
        result["functional"] = (
            functional(args, args.model, specs, labels, mask_dir, work)
            if args.functional_methods
            else []
        )
    result["seconds"] = time.time() - t_all
    result["peak_rss_gib"] = _rss_gib()
    from gradfree.base.provenance import machine, versions

    result["machine"], result["versions"] = machine(), versions()
    print(render(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")


def _md(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rule(left: int, right: int) -> str:
    return "|" + "---|" * left + "---:|" * right


SUMMARY_COLUMNS = [
    "solver", "cases", "F1 min", "F1 mean", "coef err max", "coef err median",
    "absent weight max", "residual mean", "solve s",
]  # fmt: skip


def render(result: dict[str, Any]) -> str:
    head = ["k", "entries", "index KB", "dense mask of these modules MB", "seed 003 dense MB"]
    head += ["mask s", "compress 8 s", "kept norm (min–max)"]
    lines = ["## Masks", "", _md(head), _rule(0, 7) + "---|"]
    for m in result["masks"]:
        kn = list(m["norm_kept"].values())
        lines.append(
            _md(
                [
                    f"{m['k']:,}",
                    f"{m['entries']:,}",
                    f"{m['index_bytes'] / 1e3:,.1f}",
                    f"{m['dense_mask_bytes'] / 1e6:,.1f}",
                    f"{m['seed_dense_mask_bytes'] / 1e6:,.0f}",
                    f"{m['mask_seconds']:.2f}",
                    f"{m['compress_8_seconds']:.2f}",
                    f"{min(kn):.3f}–{max(kn):.3f}",
                ]
            )
        )

    def table(title: str, rows: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
        lines.extend(["", f"## {title}", "", _md([*keys, *SUMMARY_COLUMNS])])
        lines.append(_rule(len(keys) + 1, 8))
        for r in rows:
            cells = [r[k] for k in keys] + [r["solver"], r["cases"]]
            cells += [f"{r['f1_min']:.3f}", f"{r['f1_mean']:.3f}", f"{r['coef_err_max']:.2e}"]
            cells += [f"{r['coef_err_median']:.2e}", f"{r['absent_weight_max']:.3f}"]
            cells += [f"{r['residual_mean']:.4f}", f"{r['seconds_mean']:.3f}"]
            lines.append(_md(cells))

    s = result["summary"]
    table("Recovery against mask budget (float32 checkpoints)", s["by_budget"], ("method", "k"))
    table("Recovery against noise", s["noise"], ("method", "dtype", "noise"))
    table("One merged task not in the dictionary", s["missing_task"], ("method", "k"))
    table("Recovery against number of merged tasks", s["by_tasks"], ("method", "n"))
    if result.get("functional"):
        lines += ["", "## Functional check: rebuilt from the recovered weights", ""]
        lines.append(_md(["method", "solver", "F1", "coef err", "task", "ppl base", "ppl merged",
                          "ppl rebuilt"]))  # fmt: skip
        lines.append(_rule(2, 2) + "---|" + "---:|" * 3)
        for f in result["functional"]:
            for t in f["ppl_merged"]:
                lines.append(
                    _md(
                        [
                            f["method"],
                            f["solver"],
                            f"{f['f1']:.3f}",
                            f"{f['coef_err']:.2e}",
                            t,
                            f"{f['ppl_base'][t]:.3f}",
                            f"{f['ppl_merged'][t]:.3f}",
                            f"{f['ppl_rebuilt'][t]:.3f}",
                        ]
                    )
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
