"""The page of the main job (``runs/demo/report.md``): the one results table and its plot
first, then how the student was made, seed 002's spectra verdicts, the capture, the models and
the time and memory of every stage. Pure formatting of what :mod:`gradfree.experiment.demo`
measured; nothing here runs a model.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def render_report(
    cfg: Any,
    record: dict[str, Any],
    texts: dict[str, list[Any]],
    spectra: dict[str, Any],
    choice: Any,
    plot: Path,
    watch: Any,
) -> str:
    """The whole page (module docstring)."""
    lines = [
        f"# gradfree demo: `{cfg.teacher}` → `{cfg.student}`, without gradients",
        "",
        *_results_table(cfg, record["scores"], texts),
        "",
        f"![results](plots/{plot.name})",
        "",
        *_how_made(cfg, record, texts, choice),
        *_spectra_section(cfg, spectra),
        *_head_section(choice),
        *_capture_section(cfg, record),
        "",
        "## Time and memory per stage",
        "",
        watch.table(),
        "",
        f"Machine: {record['machine']['cpus']} CPUs, {record['machine']['memory_gib']} GiB; "
        f"versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.",
        "",
    ]
    return "\n".join(lines)


def _results_table(cfg: Any, scores: dict[str, Any], texts: dict[str, list[Any]]) -> list[str]:
    nat, dis, tea = scores["native"], scores["distilled"], scores["teacher"]
    lo, hi = scores["kl_difference_95ci"]
    public = "public" in nat
    pub_head = f" | {cfg.public_corpus} ppl" if public else ""
    lines = [
        f"| model | held-out KL(teacher ‖ model) | ΔKL vs native student, 95% CI | held-out "
        f"ppl | top-1 agreement{pub_head} |",
        "|---|---:|---|---:|---:|" + "---:|" * public,
        f"| teacher `{cfg.teacher}` | 0 | – | {tea['heldout']['ppl']:.2f} | 1.000"
        + (f" | {tea['public']['ppl']:.2f} |" if public else " |"),
    ]
    for label, row, ci in (
        (f"native student `{cfg.student}`", nat, "–"),
        ("distilled student `student/`", dis, f"[{lo:+.4f}, {hi:+.4f}]"),
    ):
        h = row["heldout"]
        lines.append(
            f"| {label} | {h['kl']:.4f} | {ci} | {h['ppl']:.2f} | {h['top1']:.3f}"
            + (f" | {row['public']['ppl']:.2f} |" if public else " |")
        )
    return lines


def _how_made(
    cfg: Any, record: dict[str, Any], texts: dict[str, list[Any]], choice: Any
) -> list[str]:
    s = record["scores"]
    h_tokens = s["native"]["heldout"]["tokens"]
    hi = s["kl_difference_95ci"][1]
    verdict = (
        "the distilled student is closer to the teacher than the native one (the interval lies "
        "below 0)"
        if hi < 0
        else "the interval includes or lies above 0: no measured gain on held-out text"
    )
    public = (
        f"; out of task: `{cfg.public_corpus}` {cfg.public_split}[0:{len(texts['public'])}] "
        f"({s['native']['public']['tokens']} tokens, perplexity only tells whether the head "
        "costs anything outside the task)"
        if "public" in texts
        else ""
    )
    head = (
        "the student's own head won on validation, so the checkpoint is the native student"
        if choice.head is None
        else f"λ = {choice.lam:g} (relative), blend β = {choice.blend:g}"
    )
    reload = record["reload"]
    return [
        f"Held-out text: `{cfg.corpus}` heldout[0:{len(texts['heldout'])}] ({h_tokens} scored "
        f"next-token positions, windows of {cfg.max_length}){public}. KL is per token, "
        "KL(teacher ‖ model); the interval is the 95% bootstrap interval over documents "
        f"({cfg.bootstrap_samples} resamples) of the distilled student's KL minus the native "
        f"student's: {verdict}. The teacher ran once per text (a float16 reference of its "
        "log-probabilities); every model was scored against that same reference.",
        "",
        f"**How the student was made** (no gradient step): a paired capture of both models on "
        f"`{cfg.corpus}` calibration[0:{len(texts['fit'])}] gave E[x_S x_Sᵀ] and E[x_S x_Tᵀ] of "
        "the final normed states; ridge heads H(λ) = argmin ‖X_S Hᵀ − X_T H_Tᵀ‖² + λ‖H − H_S‖² "
        "were solved in float64 over the 151,936-row vocabulary in chunks, blended with the "
        f"student's own head and scored on calibration[{len(texts['fit'])}:"
        f"{len(texts['fit']) + len(texts['validation'])}] (documents the fit never saw) by "
        f"measured KL; chosen: {head}. Models in `{cfg.dtype}` on `{cfg.device}`: on this "
        "AVX2 CPU (no bf16 instructions) a bf16 matmul measured 3× slower than float32, so the "
        "teacher stays float32 and its numbers need no bf16 caveat; statistics are float64.",
        "",
        f"**The checkpoint**: `student/` is a plain Hugging Face checkpoint (config, safetensors, "
        "tokenizer). Reloaded with `AutoModelForCausalLM.from_pretrained`, its logits on the "
        f"first held-out window ({reload['tokens']} tokens) differ from the model in memory by "
        f"at most {reload['max_abs_logit_difference']:.2e}.",
    ]


def _spectra_section(cfg: Any, spectra: dict[str, Any]) -> list[str]:
    """Seed 002's claims as measured verdicts, then the medians they rest on."""
    from gradfree.spectrum.report import seed002_rows

    lines = [
        "",
        "## Spectra: seed 002's claims, measured",
        "",
        *_verdicts(spectra),
        "",
        "Medians over layers; u = un-centered, c = centered, /body = without each sequence's "
        "first token. Full tables and plots: `spectrum/student/spectrum.md`, "
        "`spectrum/teacher/spectrum.md`.",
        "",
        "| role | site | layers | Df u/all | Df c/all | Df c/body | k95 u/all | k95 c/body | "
        "mean share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role in ("student", "teacher"):
        lines += seed002_rows(spectra[role])
    plots = [
        f"spectrum/{role}/{p}"
        for role in ("student", "teacher")
        for p in ("df_" + role + "_resid_pre.png", "activations_vs_weights.png")
    ]
    lines += ["", *(f"![{Path(p).stem}]({p})" for p in plots)]
    return lines


def _resid_medians(rep: Any) -> dict[str, float | None]:
    acts = [s for s in rep.activations if s.site == "resid_pre"]

    def med(variant: str, key: str) -> float | None:
        xs = [s.summaries[variant][key] for s in acts if variant in s.summaries]
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    w = [x.summary["df_over_dim"] for x in rep.weights or []]
    return {
        "df_u_all": med("uncentered/all", "df"),
        "df_c_body": med("centered/body", "df"),
        "k95_c_body": med("centered/body", "k95"),
        "act_df_dim": med("centered/body", "df_over_dim"),
        "trunk": med("centered/body", "trunk_share"),
        "weight_df_dim": statistics.median(w) if w else None,
        "dim": acts[0].dim if acts else None,
    }


def _verdicts(spectra: dict[str, Any]) -> list[str]:
    """One line per claim and model: the claim, the measured numbers, the verdict."""
    lines = []
    for role, rep in spectra.items():
        m = _resid_medians(rep)
        if m["df_u_all"] is None or m["df_c_body"] is None:
            continue
        art = m["df_c_body"] > 2 * m["df_u_all"]
        lines.append(
            f'- {role}, "the residual stream has Df ≈ 1.8": un-centered Df {m["df_u_all"]:.2f} '
            f"but {m['df_c_body']:.1f} centered without the first token: "
            + ("**an artifact** of the first token's massive activation." if art else "holds.")
        )
        if (k95 := m["k95_c_body"]) is not None:
            lines.append(
                f'- {role}, "95% of the variance in ≈ 9 components": k95 (c/body) '
                f"{k95:.0f} of {m['dim']}: " + ("**false**." if k95 > 20 else "holds.")
            )
        if m["weight_df_dim"] is not None and m["act_df_dim"] is not None:
            holds = m["act_df_dim"] < m["weight_df_dim"]
            lines.append(
                f'- {role}, "activations compress, weights don\'t": median Df/dim '
                f"{m['act_df_dim']:.3f} (activations) vs {m['weight_df_dim']:.3f} (weights): "
                + ("**holds** (qualitatively)." if holds else "**does not hold**.")
            )
        if m["trunk"] is not None:
            lines.append(
                f"- {role}, seed 000's trunk (top half of the student's width) holds "
                f"{m['trunk']:.1%} of the centered first-token-free residual variance "
                + ("(≥ 85%: **holds**)." if m["trunk"] >= 0.85 else "(< 85%: **falls short**).")
            )
    return lines


def _head_section(choice: Any) -> list[str]:
    s, c = choice.student, choice.chosen
    lines = [
        "",
        "## The head's choice on validation KL",
        "",
        f"Validation ({int(s['tokens'])} tokens): KL {s['kl']:.4f} (student's own head) → "
        f"{c['kl']:.4f} (chosen). These documents chose the head; the held-out table above is "
        "the unbiased test.",
        "",
        "| λ (relative) | blend β | validation KL | validation ppl |",
        "|---:|---:|---:|---:|",
        *(
            f"| {r['lambda']:g} | {r['blend']:g} | {r['kl']:.4f} | {r['ppl']:.2f} |"
            for r in choice.candidates
        ),
    ]
    return lines


def _capture_section(cfg: Any, record: dict[str, Any]) -> list[str]:
    m = record["models"]
    lines = [
        "",
        "## Models and capture",
        "",
        "| role | type | layers | hidden | MLP | Q heads | KV heads | head_dim | tied |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for role in ("teacher", "student"):
        d = m[role]
        lines.append(
            f"| {role} | {d['model_type']} | {d['num_layers']} | {d['hidden_size']} | "
            f"{d['intermediate_size']} | {d['num_heads']} | {d['num_kv_heads']} | "
            f"{d['head_dim']} | {d['tied_embeddings']} |"
        )
    cap = record["capture"]
    lines += [
        "",
        f"Capture `{cap['run_id']}`: sites {', '.join(cfg.sites)}, windows of {cfg.max_length} "
        f"tokens; tokens {cap['tokens']}; layer map (student → teacher) {cap['layer_map']}; "
        f"{cap['shards']} shards, each with its sha256 in `capture/manifest.json`. "
        "Inputs (model fingerprints, text hashes) are in `run.json`.",
    ]
    return lines
