"""The two entry points: :func:`run_align` (fit, fold, save a checkpoint and its ledger) and
:func:`run_ablation` (fit once, build seed 001 §16.2's variants, evaluate each against the
teacher, write one results table). Both take loaded models (``gradfree.models.load_model``) and
write their output folder atomically.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import torch

from gradfree.align.apply import applied_bases, apply_plan_, function_preserving
from gradfree.align.config import VARIANTS, AblateConfig, AlignConfig
from gradfree.align.fit import AlignmentPlan, fit_alignment
from gradfree.align.ledger import manifest, write_ledger
from gradfree.base.errors import GradfreeError


def _calibration(cfg: AlignConfig) -> list[Any]:
    from gradfree.texts.corpora import load_corpus

    return load_corpus(cfg.corpus, split=cfg.split, limit=cfg.limit)


def _places(docs: list[Any]) -> list[str]:
    out = []
    for d in docs:
        place = (getattr(d, "meta", None) or {}).get("place")
        if place and place not in out:
            out.append(str(place))
    return out


def toggles_of(cfg: AlignConfig) -> dict[str, bool]:
    return {
        "permute": cfg.permute_heads or cfg.permute_neurons,
        "rotate": cfg.rotate,
        "refine": cfg.refine,
        "per_stage": cfg.rotate and cfg.rotation == "per_stage" and not cfg.refine,
        "per_layer": cfg.rotate and cfg.rotation == "per_layer" and not cfg.refine,
        "style": cfg.ridge_head,
    }


@torch.no_grad()
def _logit_change(a: Any, b: Any, ids: list[int]) -> float:
    dev = next(a.parameters()).device
    x = torch.tensor([ids], device=dev)
    la, lb = a(input_ids=x).logits.double(), b(input_ids=x).logits.double()
    return float((la - lb).abs().max() / la.abs().max())


def run_align(
    teacher: Any,
    student: Any,
    cfg: AlignConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    say: Any = None,
    save_format: str = "safetensors",
) -> Path:
    """Fit on the calibration corpus, fold the chosen steps into the student, save
    ``model/`` (a plain checkpoint; ``save_format`` "fp8": Qwen's block-FP8 format),
    ``rotations/<run_id>/``, ``manifest.json``, ``config.json``, ``align.json`` and
    ``report.md`` into ``out``."""
    from gradfree.base.io import atomic_dir, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.models.fetch import save_checkpoint
    from gradfree.texts.windows import token_windows

    say = say or (lambda m: None)
    docs = _calibration(cfg)
    run_id = uuid.uuid4().hex[:12]
    watch = Stopwatch()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with watch.stage("fit (capture + solves)"):
            plan = fit_alignment(
                teacher, student, docs, cfg, tmp / "work", places=_places(docs), say=say
            )
        toggles = toggles_of(cfg)
        with watch.stage("fold and save"):
            model = copy.deepcopy(student.model)
            ops = apply_plan_(model, plan, **toggles)
            probe = token_windows(student.tokenizer, docs[:1], 64, 1)[0]
            change = _logit_change(student.model, model, probe)
            save_checkpoint(model, student.tokenizer, tmp / "model", weight_format=save_format)
        ledger = write_ledger(tmp, run_id, plan, applied_bases(plan, toggles))
        preserving = function_preserving(toggles)
        record = {
            "run_id": run_id,
            "toggles": toggles,
            "function_preserving": preserving,
            "save_format": save_format,
            "max_relative_logit_change": change,
            "k": plan.k,
            "layer_map": plan.layer_map,
            "layers": plan.layers,
            "refine": plan.refine,
            "permutation_scores": plan.perm_scores,
            "head": plan.head_info,
            "ops": ops,
            "stages": watch.rows,
            "versions": versions(),
            "machine": machine(),
        }
        prompts = [d.text for d in docs] + plan.style_texts
        write_json_atomic(
            tmp / "manifest.json",
            manifest(run_id, prompts, teacher, student, {"capture_run_id": plan.capture_run_id}),
        )
        write_json_atomic(tmp / "config.json", cfg.model_dump(mode="json"))
        write_json_atomic(tmp / "align.json", record)
        write_text_atomic(
            tmp / "report.md", _align_report(record, cfg, ledger.relative_to(tmp), watch)
        )
        import shutil

        shutil.rmtree(tmp / "work", ignore_errors=True)
    return Path(out)


def _align_report(rec: dict[str, Any], cfg: AlignConfig, ledger: Path, watch: Any) -> str:
    t = rec["toggles"]
    on = ", ".join(k for k, v in t.items() if v) or "nothing"
    if rec["function_preserving"]:
        verdict = (
            "**This alignment changes nothing the model computes**: the permutations and the one "
            "residual basis are exact changes of coordinates (max relative logit change "
            f"{rec['max_relative_logit_change']:.2e}, float rounding). It only re-expresses the "
            "student in the teacher's principal coordinates."
        )
    else:
        verdict = (
            "**This alignment changes the function** (ridge head, refinement or per-stage bases "
            "without transitions): max relative logit change "
            f"{rec['max_relative_logit_change']:.3g}."
        )
    lines = [
        f"# gradfree align `{rec['run_id']}`",
        "",
        f"Steps applied: {on}; k = {rec['k']}.",
        "",
        verdict,
        "",
    ]
    lines += [
        "| layer | stage | cosine identity | cosine global Q | cosine own layer | cosine refined "
        "| residual identity | residual global |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in rec["layers"]:
        lines.append(
            f"| {d['name']} | {d['stage']} | {d['cosine_identity']:.3f} | "
            f"{d['cosine_global']:.3f} | {_f(d['cosine_layer'])} | {d['cosine_refined']:.3f} | "
            f"{d['residual_identity']:.3f} | {d['residual_global']:.3f} |"
        )
    lines += [
        "",
        "Cosines are pooled, centered, on calibration statistics (student coordinates "
        "x Q[:, :k] vs teacher principal coordinates).",
        "",
    ]
    for r in rec["refine"]:
        lines.append(
            f"- stage {r['stage']} (blocks {r['layers'][0]}–{r['layers'][-1]}): {r['reflections']} "
            f"reflection(s), mean cosine {' → '.join(f'{c:.3f}' for c in r['cosine_history'])}"
        )
    for op in rec["ops"]:
        tc = op.get("transition_cost")
        if tc:
            lines += [
                "",
                f"Per-stage/per-layer bases without transitions: transition cost mean "
                f"{sum(tc) / len(tc):.3f}, max {max(tc):.3f} (0 means one shared basis).",
            ]
    lines += ["", f"Rotation ledger: `{ledger}`.", "", watch.table(), ""]
    return "\n".join(lines)


def _f(x: Any, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _spread(items: list[Any], n: int, lang: Any) -> list[Any]:
    """Up to ``n`` items, round-robin over languages (so that every language appears)."""
    by: dict[str, list[Any]] = {}
    for it in items:
        by.setdefault(str(lang(it)), []).append(it)
    out: list[Any] = []
    queues = [list(v) for _, v in sorted(by.items(), key=lambda kv: (kv[0] != "en", kv[0]))]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def run_ablation(
    teacher: Any,
    student: Any,
    cfg: AblateConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    say: Any = None,
) -> dict[str, Any]:
    """Fit once, evaluate every variant of ``cfg.variants``; write ``ablation.md``,
    ``ablation.json``, ``manifest.json``, ``config.json`` and the ledger into ``out``.
    Returns the JSON record. The teacher runs once, before any variant."""
    import gc

    from gradfree.align.evaluate import build_reference
    from gradfree.align.fit import generate_style_texts
    from gradfree.align.report import render_ablation
    from gradfree.base.io import atomic_dir, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch
    from gradfree.texts.corpora import load_corpus, load_questions, system_prompt

    say = say or (lambda m: None)
    acfg = cfg.align.model_copy(
        update={
            "ridge_head": cfg.align.ridge_head
            or any(VARIANTS[v].get("style") for v in cfg.variants)
        }
    )
    docs = _calibration(acfg)
    held = _spread(load_corpus(acfg.corpus, split="heldout"), cfg.heldout_limit, lambda d: d.lang)
    qs = _spread(load_questions(), cfg.questions, lambda q: q.lang) if cfg.questions else []
    prompt = system_prompt()
    run_id = uuid.uuid4().hex[:12]
    watch = Stopwatch()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with watch.stage("fit (capture + solves)"):
            plan = fit_alignment(
                teacher,
                student,
                docs,
                acfg,
                tmp / "work",
                places=_places(docs),
                system_prompt=prompt,
                say=say,
            )
        with watch.stage("teacher reference (held-out, prompts, questions)"):
            say("teacher reference outputs")
            prompts = generate_style_texts(
                teacher.model,
                teacher.tokenizer,
                _places(held)[: cfg.prompt_places],
                prompt,
                cfg.prompt_tokens,
            )
            ref = build_reference(
                teacher.model,
                teacher.tokenizer,
                held,
                plan,
                max_length=cfg.eval_max_length,
                prompts=prompts,
                questions=qs,
                system_prompt=prompt,
                max_new_tokens=cfg.max_new_tokens,
            )
        teacher_desc = {"name": teacher.name, "fingerprint": teacher.fingerprint}
        write_ledger(tmp, run_id, plan, [plan.q] * len(plan.q_layer) if acfg.rotate else None)
        rows, failures = _variants(student, plan, ref, cfg, qs, prompt, watch, say)
        record = _ablation_record(run_id, cfg, plan, ref, held, rows, failures, watch)
        record["checks"] = _checks(rows)
        prompts_all = [d.text for d in docs] + plan.style_texts
        write_json_atomic(
            tmp / "manifest.json",
            manifest(
                run_id,
                prompts_all,
                teacher,
                student,
                {"capture_run_id": plan.capture_run_id, "teacher_desc": teacher_desc},
            ),
        )
        write_json_atomic(tmp / "config.json", cfg.model_dump(mode="json"))
        write_json_atomic(tmp / "ablation.json", record)
        write_text_atomic(tmp / "ablation.md", render_ablation(record))
        import shutil

        shutil.rmtree(tmp / "work", ignore_errors=True)
    del ref
    gc.collect()
    return record


def _ablation_record(
    run_id: str,
    cfg: AblateConfig,
    plan: Any,
    ref: Any,
    held: list[Any],
    rows: dict[str, Any],
    failures: list[str],
    watch: Any,
) -> dict[str, Any]:
    """``ablation.json``: the plan's solves, the teacher's reference facts and every variant."""
    from gradfree.base.provenance import machine, versions

    return {
        "run_id": run_id,
        "config": cfg.model_dump(mode="json"),
        "k": plan.k,
        "layer_map": plan.layer_map,
        "fit_layers": plan.layers,
        "refine": plan.refine,
        "permutation_scores": {str(k): v for k, v in plan.perm_scores.items()},
        "head": plan.head_info,
        "teacher_qa": ref.qa,
        "heldout_docs": [
            {"id": d["id"], "lang": d["lang"], "tokens": len(d["ids"])} for d in ref.docs
        ],
        "prompt_places": _places(held)[: cfg.prompt_places],
        "variants": rows,
        "failures": failures,
        "stages": watch.rows,
        "versions": versions(),
        "machine": machine(),
    }


def _variants(
    student: Any,
    plan: Any,
    ref: Any,
    cfg: AblateConfig,
    qs: list[Any],
    prompt: str,
    watch: Any,
    say: Any,
) -> tuple[dict[str, Any], list[str]]:
    """Apply and evaluate every variant on a copy of the student (one at a time in memory);
    a variant that fails is recorded as a failure and the others still run."""
    import gc

    from gradfree.align.evaluate import evaluate_variant

    rows: dict[str, Any] = {}
    failures: list[str] = []
    for name in cfg.variants:
        toggles = VARIANTS[name]
        say(f"variant {name}")
        with watch.stage(f"variant {name}"):
            model = copy.deepcopy(student.model)
            try:
                ops = apply_plan_(model, plan, **toggles)
                res = evaluate_variant(
                    model,
                    student.tokenizer,
                    ref,
                    plan.k,
                    questions=qs,
                    system_prompt=prompt,
                    max_new_tokens=cfg.max_new_tokens,
                )
            except (GradfreeError, RuntimeError, ValueError) as e:
                failures.append(f"{name}: {e}")
                del model
                continue
            res["toggles"] = toggles
            res["function_preserving"] = function_preserving(toggles)
            res["transition_cost"] = next(
                (o.get("transition_cost") for o in ops if o.get("op") == "rotate_per_layer"),
                None,
            )
            rows[name] = res
            del model
            gc.collect()
    return rows, failures


def _checks(rows: dict[str, Any]) -> dict[str, Any]:
    """Function-preserving variants must match the base student's KL (to float rounding)."""
    base = rows.get("base")
    out: dict[str, Any] = {}
    if base is None:
        return out
    for name, r in rows.items():
        if r["function_preserving"] and name != "base":
            diff = abs(r["kl"] - base["kl"])
            out[name] = {
                "kl_diff_vs_base": diff,
                "identical": diff <= 1e-4 * max(base["kl"], 1e-6) + 1e-6,
            }
    return out


__all__ = ["AlignmentPlan", "run_ablation", "run_align", "toggles_of"]
