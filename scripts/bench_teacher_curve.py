"""Issue 17 part 3: the teacher compressed gradient-free to a share of its parameters, against the
native student, on the same held-out tokens.

For each kept share r of the teacher's parameters (default 0.9, 0.75, 0.6, 0.5, 0.33) the
teacher is compressed with least-squares pruning (``gradfree prune``'s path: MLP neurons chosen by
structured OBS, every linear re-fitted block by block toward the dense teacher). Where pruning
MLP neurons alone cannot reach r while keeping at least ``--min-mlp-share`` of them, the
residual stream is first sliced (one global PCA basis, ``gradfree slice --reconstruct``'s path)
to the narrowest of ``--widths`` that allows it. Every compressed teacher and the native
student are measured on the same held-out tour-guide and news tokens: perplexity, KL to the
dense teacher and top-1 agreement, and the place questions. Rows go to ``--json`` after each
point (a job cut short keeps them)::

    flock /tmp/heavy.lock .venv/bin/python scripts/bench_teacher_curve.py \
        --json docs/results/data/teacher-curve.json --plot docs/results/teacher-curve.png
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from bench_slice import take_tokens  # the same token budgets as the side-by-side rows

from gradfree.adapters import get_adapter
from gradfree.base.plots import pyplot
from gradfree.base.provenance import Stopwatch, machine, versions
from gradfree.baselines import param_count
from gradfree.evaluation.run import evaluate
from gradfree.models import load_model
from gradfree.surgery import basis as B
from gradfree.surgery import fuse_norms_, slice_, untie_
from gradfree.surgery.export import plan_widths
from gradfree.surgery.prune import mlp_keep_for_params
from gradfree.surgery.reconstruct import PrunePlan, reconstruct_
from gradfree.surgery.rotate import rotate_residual_
from gradfree.texts.corpora import load_corpus, load_questions

TEXTS = {"tourguide": "tourguide", "news": "news"}


def measure(
    model: Any, tok: Any, teacher: Any, evals: dict[str, list[Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Perplexity and KL to the teacher per text, and the place questions."""
    out: dict[str, Any] = {}
    for text, docs in evals.items():
        r = evaluate(
            model,
            tok,
            docs,
            teacher=teacher,
            max_length=args.max_length,
            stride=args.max_length,
        )
        t = r["teacher"] or {}
        out[text] = {
            "ppl": float(r["perplexity"]["ppl"]),
            "tokens": int(r["perplexity"]["tokens"]),
            "kl_to_teacher": t.get("kl_mean"),
            "top1_agreement": t.get("top1_agreement"),
        }
    if args.questions:
        from gradfree.evaluation.questions import answer_questions
        from gradfree.texts.corpora import system_prompt

        qa = answer_questions(model, tok, load_questions(), system_prompt())
        out["questions"] = {
            "matched": qa["matched"],
            "n": qa["n"],
            "score": qa["matched"] / qa["n"],
        }
    return out


def plan_for(
    model: Any, target: int, widths: list[float], min_share: float
) -> tuple[float, PrunePlan]:
    """(width fraction to slice first, the MLP plan) for a parameter target (see the module
    docstring); the widths are tried narrow-last."""
    a = get_adapter(model)
    d = a.hidden_size
    for w in widths:
        probe = model
        if w > 0:  # the shapes after slicing, on a meta copy: no weights are touched
            (k,) = plan_widths(model.config, d, w, 1)
            probe = _sliced_shapes(model, k)
        try:
            keep = mlp_keep_for_params(probe, target)
        except Exception:  # cannot reach it at this width
            continue
        if keep >= min_share * a.intermediate_size:
            return w, PrunePlan(mlp_keep=keep)
    raise SystemExit(f"no width in {widths} reaches {target} parameters with enough MLP neurons")


def _sliced_shapes(model: Any, k: int) -> Any:
    """An empty model (meta tensors) with the parameter shapes of ``model`` sliced to ``k``."""
    from transformers import AutoModelForCausalLM

    from gradfree.adapters import config_for_width, untie_config_

    cfg = untie_config_(config_for_width(model.config, k))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for ax, text in zip(axes, TEXTS, strict=True):
            pts = sorted(
                (r["params"] / 1e6, r[text]["ppl"]) for r in rows if r["kind"] == "teacher"
            )
            ax.plot([p for p, _ in pts], [y for _, y in pts], "o-", label="teacher, compressed")
            for r in rows:
                if r["kind"] == "student":
                    ax.plot([r["params"] / 1e6], [r[text]["ppl"]], "r*", ms=12, label="student")
            ax.set_yscale("log")
            ax.set(title=f"held-out {text}", xlabel="parameters (M)", ylabel="perplexity")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--student", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--shares", default="0.9,0.75,0.6,0.5,0.33")
    ap.add_argument("--widths", default="0,0.2,0.4167", help="Width fractions tried, in order.")
    ap.add_argument("--min-mlp-share", type=float, default=0.3)
    ap.add_argument("--calibration", default="tourguide")
    ap.add_argument("--calib-tokens", type=int, default=10000)
    ap.add_argument("--eval-tokens", type=int, default=2500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ls-lambda", type=float, default=1e-2)
    ap.add_argument("--prune-steps", type=int, default=32)
    ap.add_argument("--no-questions", dest="questions", action="store_false")
    ap.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="Skip the student's and the dense teacher's rows (a run that adds points).",
    )
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    stamp = {"machine": machine(), "versions": versions(), "command_args": vars(args)}

    def save() -> None:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, **stamp}, indent=1))
        tmp.replace(p)
        if args.plot:
            plot(rows, Path(args.plot))

    teacher_l = load_model(args.teacher)
    teacher, tok = teacher_l.model, teacher_l.tokenizer
    dense_params = param_count(teacher)
    evals = {
        t: take_tokens(tok, load_corpus(c, split="heldout"), args.eval_tokens)
        for t, c in TEXTS.items()
    }
    cdocs = take_tokens(tok, load_corpus(args.calibration, split="calibration"), args.calib_tokens)
    widths = [float(w) for w in args.widths.split(",")]

    if args.references:
        student_l = load_model(args.student)
        t0 = time.perf_counter()
        row = {"kind": "student", "model": args.student, "params": param_count(student_l.model)}
        row |= measure(student_l.model, student_l.tokenizer, teacher, evals, args)
        row |= {"share": row["params"] / dense_params, "seconds_eval": time.perf_counter() - t0}
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)
        del student_l
        gc.collect()
        t0 = time.perf_counter()
        row = {"kind": "dense", "model": args.teacher, "params": dense_params, "share": 1.0}
        row |= measure(teacher, tok, None, evals, args)
        row |= {"seconds_eval": time.perf_counter() - t0}
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)

    shares = [float(s) for s in args.shares.split(",")]
    jobs = [
        (s, *plan_for(teacher, int(s * dense_params), widths, args.min_mlp_share)) for s in shares
    ]
    # the unsliced points first: the sliced ones fuse the teacher in place (same function)
    jobs.sort(key=lambda j: (j[1] > 0, -j[0]))
    q = None
    rotated = None  # the dense teacher in the slicing basis (the sliced points' reference)
    for share, width, plan in jobs:
        plan = PrunePlan(mlp_keep=plan.mlp_keep, steps=args.prune_steps)
        watch = Stopwatch()
        t0 = time.perf_counter()
        with watch.stage(f"compress to {share}"):
            if width == 0:
                ref = teacher
                model = copy.deepcopy(teacher)
            else:
                if rotated is None:
                    # fused and rotated: the teacher's function, so it is also the KL reference;
                    # the original is then freed (two 1.5B copies fit in 24 GiB, three do not)
                    fuse_norms_(teacher)
                    untie_(teacher)
                    moments, _ = B.calibration_moments(teacher_l, cdocs, max_length=512)
                    q, _ = B.pca_rotation(B.global_moment(moments))
                    del moments
                    # rotated in place: the original is not needed again, and a copy beside
                    # it (two 1.5B copies, then a third loaded below) ran out of 24 GiB
                    rotate_residual_(teacher, q)
                    rotated = teacher
                    teacher_l.model = None
                    del teacher
                    gc.collect()
                assert q is not None
                ref = rotated
                model = load_model(args.teacher).model  # a fresh copy, fused and sliced
                fuse_norms_(model)
                untie_(model)
                (k,) = plan_widths(model.config, get_adapter(model).hidden_size, width, 1)
                slice_(model, k, q)
            rec = reconstruct_(
                model,
                ref,
                tok,
                cdocs,
                rel_lam=args.ls_lambda,
                head=not get_adapter(model).tied,
                max_length=512,
                prune=plan,
                progress=lambda m: print(m, flush=True),
            )
        secs = time.perf_counter() - t0
        t1 = time.perf_counter()
        row = {"kind": "teacher", "model": args.teacher, "share_target": share}
        row |= {"width_fraction": width, "hidden_size": get_adapter(model).hidden_size}
        row |= {"intermediate_size": plan.mlp_keep, "params": param_count(model)}
        row |= {"share": param_count(model) / dense_params, "seconds": secs}
        row |= {"peak_rss_gib": round(watch.rows[-1]["peak_rss_gib"], 3)}
        row |= {"calibration": args.calibration, "calib_tokens": rec["tokens"]}
        row |= measure(model, tok, ref, evals, args)
        row |= {"seconds_eval": time.perf_counter() - t1}
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)
        del model, ref
        gc.collect()


if __name__ == "__main__":
    main()
