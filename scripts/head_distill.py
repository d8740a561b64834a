"""LM-head distillation on a real pair, chosen on validation KL (gradfree.compress.head).

The student keeps its body; its LM head becomes β·H(λ) + (1 − β)·H_S, with H(λ) the ridge fit of
the teacher's logits on the student's final states (from a paired capture of the first
``--fit`` tour-guide calibration blurbs) and (λ, β) chosen by KL(teacher ‖ student) on the next
``--val`` calibration blurbs. Reported on data the choice never saw: the first ``--heldout``
tour-guide held-out blurbs (KL, perplexity, top-1 agreement, per-document KL differences with a
bootstrap interval) and the first ``--news`` news held-out articles (out of task).

    .venv/bin/python scripts/head_distill.py --json runs/head.json [--save runs/head-student]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def _per_doc(val: list[Any], head: torch.Tensor) -> list[dict[str, float]]:
    from gradfree.compress.head import head_scores

    out = []
    for v in val:
        sc = head_scores([v], head)
        logp = v.states.float() @ head.float().T
        sc["top1"] = float((logp[:-1].argmax(-1) == v.teacher_logp[:-1].argmax(-1)).float().mean())
        out.append(sc)
    return out


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    n = sum(r["tokens"] for r in rows)
    kl = sum(r["kl"] * r["tokens"] for r in rows) / n
    nll = sum(torch.log(torch.tensor(r["ppl"])).item() * r["tokens"] for r in rows) / n
    top1 = sum(r["top1"] * r["tokens"] for r in rows) / n
    return {"kl": kl, "ppl": float(torch.exp(torch.tensor(nll))), "top1": top1, "tokens": n}


def _bootstrap(a: list[dict[str, float]], b: list[dict[str, float]], seed: int = 0) -> list[float]:
    """95% interval of the token-weighted KL difference (b − a), resampling documents."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([r["tokens"] for r in a])
    d = torch.tensor([rb["kl"] - ra["kl"] for ra, rb in zip(a, b, strict=True)]) * t
    idx = torch.randint(len(a), (4000, len(a)), generator=g)
    stats = d[idx].sum(1) / t[idx].sum(1)
    return [float(stats.quantile(0.025)), float(stats.quantile(0.975))]


def main() -> None:
    from gradfree.base.io import check_new_output
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.compress.head import apply_head_, fit_head, validation_set
    from gradfree.compress.report import save_checkpoint
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
    ap.add_argument("--save", default=None, help="Also write the student with the chosen head.")
    args = ap.parse_args()
    if args.save:
        check_new_output(args.save)  # refuse an existing folder before any work
    torch.manual_seed(0)
    t0 = time.perf_counter()
    teacher, student = load_model(args.teacher), load_model(args.student)
    cal = load_corpus("tourguide", split="calibration")
    fit, val_docs = cal[: args.fit], cal[args.fit : args.fit + args.val]
    held = load_corpus("tourguide", split="heldout")[: args.heldout]
    news = load_corpus("news", split="heldout")[: args.news]
    clock = Stopwatch()
    choice = fit_head(
        teacher,
        student,
        fit,
        val_docs,
        lambdas=[float(x) for x in args.lambdas.split(",")],
        blends=[float(x) for x in args.blends.split(",")],
        max_length=args.max_length,
        clock=clock,
    )
    with clock.stage("held-out and news features"):
        sets = {
            name: validation_set(
                student.model, teacher.model, student.tokenizer, docs, args.max_length
            )
            for name, docs in (("heldout", held), ("news", news))
        }
    h_s = student.model.lm_head.weight.detach()
    head = choice.head if choice.head is not None else h_s
    result: dict[str, Any] = {"choice": choice.describe(), "sets": {}}
    for name in ("heldout", "news"):
        a, b = _per_doc(sets[name], h_s), _per_doc(sets[name], head)
        result["sets"][name] = {
            "student": _summary(a),
            "distilled": _summary(b),
            "kl_difference_95ci": _bootstrap(a, b),
            "documents": len(a),
        }
    result.update(
        args=vars(args),
        seconds={r["stage"]: r["seconds"] for r in clock.rows},
        total_seconds=time.perf_counter() - t0,
        machine=machine(),
        versions=versions(),
    )
    print(
        f"chosen: lambda {choice.lam}, blend {choice.blend} (validation KL "
        f"{choice.student['kl']:.4f} -> {choice.chosen['kl']:.4f})"
    )
    print(
        "| text | student KL | distilled KL | 95% CI of ΔKL | student ppl | distilled ppl | "
        "student top-1 | distilled top-1 |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name, r in result["sets"].items():
        s, d, ci = r["student"], r["distilled"], r["kl_difference_95ci"]
        print(
            f"| {name} ({r['documents']} docs, {int(s['tokens'])} tok) | {s['kl']:.4f} | "
            f"{d['kl']:.4f} | [{ci[0]:+.4f}, {ci[1]:+.4f}] | {s['ppl']:.2f} | {d['ppl']:.2f} | "
            f"{s['top1']:.3f} | {d['top1']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.save and choice.head is not None:
        apply_head_(student.model, choice.head)
        save_checkpoint(student.model, student.tokenizer, Path(args.save))


if __name__ == "__main__":
    main()
