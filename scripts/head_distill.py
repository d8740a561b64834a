"""LM-head distillation on a real pair, then its comparison on text the choice never saw.

The head is chosen as ``gradfree distill-head`` chooses it (:func:`gradfree.compress.head.fit_head`:
ridge fit on the first ``--fit`` tour-guide calibration blurbs, (λ, β) by validation KL on the
next ``--val``); :func:`gradfree.compress.head.compare_heads` then scores the student's own head
and the chosen one on the first ``--heldout`` tour-guide held-out blurbs and the first ``--news``
news held-out articles (KL, perplexity, top-1, bootstrap interval of the KL difference).

    .venv/bin/python scripts/head_distill.py --json runs/head.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    import torch

    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.compress.head import compare_heads, fit_head
    from gradfree.models import load_model
    from gradfree.texts.corpora import load_corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--student", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--fit", type=int, default=32)
    ap.add_argument("--val", type=int, default=12)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--news", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lambdas", default="0.1,1,10")
    ap.add_argument("--blends", default="0.25,0.5,0.75,1")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, student = load_model(args.teacher), load_model(args.student)
    cal = load_corpus("tourguide", split="calibration")
    clock = Stopwatch()
    choice = fit_head(
        teacher,
        student,
        cal[: args.fit],
        cal[args.fit : args.fit + args.val],
        lambdas=[float(x) for x in args.lambdas.split(",")],
        blends=[float(x) for x in args.blends.split(",")],
        max_length=args.max_length,
        clock=clock,
    )
    head = choice.head if choice.head is not None else student.model.lm_head.weight.detach()
    sets = {
        "heldout": load_corpus("tourguide", split="heldout")[: args.heldout],
        "news": load_corpus("news", split="heldout")[: args.news],
    }
    result = {"choice": choice.describe(), "sets": {}}
    for name, docs in sets.items():
        with clock.stage(f"{name}: both heads"):
            result["sets"][name] = compare_heads(
                student.model, teacher.model, student.tokenizer, docs, head, args.max_length, 4000
            )
    result.update(args=vars(args), stages=clock.rows, machine=machine(), versions=versions())
    print(f"chosen: lambda {choice.lam}, blend {choice.blend}")
    print("| text | student KL | distilled KL | 95% CI of ΔKL | student ppl | distilled ppl |")
    print("|---|---:|---:|---|---:|---:|")
    for name, r in result["sets"].items():
        s, d, ci = r["student"], r["distilled"], r["kl_difference_95ci"]
        print(
            f"| {name} ({r['documents']} docs, {s['tokens']} tok) | {s['kl']:.4f} | "
            f"{d['kl']:.4f} | [{ci[0]:+.4f}, {ci[1]:+.4f}] | {s['ppl']:.2f} | {d['ppl']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
