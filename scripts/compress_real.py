"""Real run of `gradfree compress` variants: Qwen2.5-Coder-1.5B (teacher) → 0.5B (student).

One paired capture on the tour-guide calibration split, one projection per basis, several merge
variants; each variant (and the native student) is evaluated on a subset of the held-out
tour-guide split against the teacher (KL, perplexity, top-1 agreement) and on held-out news
(perplexity, out of task). Writes results.json / results.md under --out.

    flock /tmp/gradfree-heavy.lock nice -n 5 python scripts/compress_real.py --out /tmp/cr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from gradfree.base.provenance import Stopwatch
from gradfree.capture import load_capture
from gradfree.compress import (
    capture_pair,
    fold_pair_,
    make_recipe,
    measure_attention_kl,
    merge,
    project,
)
from gradfree.evaluation.run import evaluate
from gradfree.models import load_model
from gradfree.texts.corpora import load_corpus


def parse_variant(base: Any, spec: str) -> Any:
    """``mode[@alpha][^every][+head][~lambda]``, e.g. ``uniform@0+head~0.1`` or ``ridge^1~0.1``:
    merge mode, its α, ridge recaptured every that many blocks, a ridge LM head, the ridge λ."""
    spec, _, lam = spec.partition("~")
    spec, _, head = spec.partition("+")
    spec, _, every = spec.partition("^")
    mode, _, alpha = spec.partition("@")
    kw: dict[str, Any] = {"merge": mode, "ridge_head": head == "head"}
    if every:
        kw.update(ridge_recapture=True, recapture_every=int(every))
    if alpha:
        kw["alpha"] = float(alpha)
    if lam:
        kw["ridge_lambda"] = float(lam)
    return make_recipe(base, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--news", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--bases", default="joint,two_tier,svd,joint:per_layer")
    ap.add_argument(
        "--merges",
        default="none,optimal,uniform@0+head~0.1,ridge+head~0.1,optimal+head~0.1,"
        "uniform,alignment,ridge~0.1,ridge+head~1",
    )
    ap.add_argument("--merges-other", default="none,optimal,ridge+head~0.1", help="for later bases")
    ap.add_argument("--save", default="", help="variant name whose checkpoint is saved")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    results: dict[str, dict] = {}
    res_path = args.out / "results.json"
    if res_path.exists():
        results = json.loads(res_path.read_text())

    with clock.stage("load models"):
        t = load_model("qwen2.5-coder-1.5b-instruct")
        s = load_model("qwen2.5-coder-0.5b-instruct")
    calib = load_corpus("tourguide", split="calibration", limit=args.calib)
    held = load_corpus("tourguide", split="heldout", limit=args.heldout)
    news = load_corpus("news", split="heldout", limit=args.news)

    def run_eval(name: str, model: torch.nn.Module) -> None:
        if name in results:
            return
        with clock.stage(f"eval {name}"):
            r = evaluate(
                model,
                s.tokenizer,
                held,
                teacher=t.model,
                compare_layers=[],
                max_length=256,
                stride=256,
            )
            n = evaluate(model, s.tokenizer, news, max_length=256, stride=256)
        results[name] = {
            "tour_ppl": r["perplexity"]["ppl"],
            "tour_kl": r["teacher"]["kl_mean"],
            "tour_top1": r["teacher"]["top1_agreement"],
            "teacher_tour_ppl": r["teacher"]["teacher_ppl"],
            "news_ppl": n["perplexity"]["ppl"],
            "tokens": r["perplexity"]["tokens"],
        }
        print(name, results[name], flush=True)
        res_path.write_text(json.dumps(results, indent=2))

    run_eval("student", s.model)
    with clock.stage("fold norms"):
        fold_pair_(t.model, s.model)
    cap_dir = args.out / "capture"
    base = make_recipe(max_length=args.max_length)
    from gradfree.solvers.layermap import proportional_map

    lmap = proportional_map(len(t.model.model.layers), len(s.model.model.layers))
    with clock.stage("paired capture"):
        if (cap_dir / "manifest.json").exists():
            cap = load_capture(cap_dir)
        else:
            cap = capture_pair(t, s, calib, cap_dir, base, lmap, progress=False)
    for bi, b in enumerate(args.bases.split(",")):
        kind, _, opt = b.partition(":")
        rb = make_recipe(base, basis=kind, per_layer=opt == "per_layer")
        with clock.stage(f"project {b}"):
            proj = project(t.model, s.model, cap, rb)
        for m in (args.merges if bi == 0 else args.merges_other).split(","):
            name = f"{b}/{m}"
            if name in results:
                continue
            with clock.stage(f"merge {name}"):
                rm = parse_variant(rb, m)
                sol = merge(proj, t.model, s.model, cap, rm, documents=calib, tokenizer=s.tokenizer)
                if sol.recaptures:
                    print(f"{name}: {len(sol.recaptures)} recapture passes", flush=True)
            if rm.attention_kl_windows:
                with clock.stage(f"attention KL {name}"):
                    sol.attention_kl = measure_attention_kl(sol, t.model, s.tokenizer, calib, cap)
            run_eval(name, sol.model)
            results[name]["merge"] = sol.alphas.describe() if sol.merge else None
            results[name]["profile"] = sol.merge_profile()
            res_path.write_text(json.dumps(results, indent=2))
            if name == args.save:
                from gradfree.compress import save_checkpoint, write_report

                folder = args.out / name.replace("/", "_")
                save_checkpoint(sol.model, s.tokenizer, folder)
                write_report(sol, folder, clock=clock)
            del sol
        del proj
    (args.out / "timings.md").write_text(clock.table() + "\n")
    print(clock.table())


if __name__ == "__main__":
    main()
