"""Fit seed 001's alignment from a calibration corpus: capture once, then solve everything.

:func:`fit_alignment` runs one paired capture (``gradfree.capture``: residual streams, final
normed states and, for neuron matching, paired MLP activation dumps), one short pass for attention
patterns, optionally the teacher's continuations of the style prompts (system prompt + place), and
solves: the global basis Q, per-stage and per-layer bases, Householder refinements per stage, head
and neuron permutations and the ridge LM head. The result is an :class:`AlignmentPlan` that
:mod:`gradfree.align.apply` folds into any copy of the student, toggle by toggle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradfree.adapters import get_adapter
from gradfree.align import rotations as rot
from gradfree.align.config import AlignConfig
from gradfree.align.head import fit_ridge_head
from gradfree.align.permutations import head_permutation, head_similarity, neuron_permutation
from gradfree.base.errors import GradfreeError


@dataclass
class AlignmentPlan:
    """Everything solved from calibration, independent of which toggles are applied."""

    config: AlignConfig
    layer_map: list[int]
    k: int
    q: torch.Tensor  # the global basis (d_s×d_s)
    q_layer: list[torch.Tensor]  # per-layer solutions (one per student block)
    q_stage: list[torch.Tensor]  # per-stage solutions, one per block (tied within stages)
    q_refined: list[torch.Tensor]  # Q H_stage per block
    stage_of: list[int]
    p_t: list[torch.Tensor]  # teacher principal frames per student block, then final (d_t×k)
    mean_t: list[torch.Tensor]  # teacher means per student block, then final
    layers: list[dict[str, Any]] = field(default_factory=list)  # diagnostics per block + final
    refine: list[dict[str, Any]] = field(default_factory=list)  # per stage
    head_perms: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    neuron_perms: dict[int, torch.Tensor] = field(default_factory=dict)
    perm_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    head: torch.Tensor | None = None
    head_info: dict[str, Any] = field(default_factory=dict)
    capture_run_id: str = ""
    style_texts: list[str] = field(default_factory=list)
    singular_values: dict[str, list[float]] = field(default_factory=dict)


def resolve_k(cfg: AlignConfig, d_s: int, d_t: int) -> int:
    base = min(d_s, d_t)
    if cfg.k is not None:
        if cfg.k > base:
            raise GradfreeError(f"k = {cfg.k} exceeds the shared width min(d_s, d_t) = {base}.")
        return cfg.k
    if cfg.k_fraction is not None:
        return max(1, round(cfg.k_fraction * base))
    return base


def _moments(cap: Any, j: int | None, i: int | None) -> rot.LayerMoments:
    if j is None:
        sk = tk = "final.normed"
    else:
        sk, tk = f"blocks.{j}.resid_pre", f"blocks.{i}.resid_pre"
    s = cap.stats("student", sk, "body")
    t = cap.stats("teacher", tk, "body")
    c = cap.cross(tk, sk, "body")
    name = "final" if j is None else f"blocks.{j}"
    return rot.LayerMoments(
        name, j, i, s.covariance(), t.covariance(), c.cross_covariance(), s.count
    )


def generate_style_texts(
    teacher: Any, tokenizer: Any, places: list[str], system: str, n_tokens: int
) -> list[tuple[list[int], int]]:
    """(token ids, continuation start) per place: the chat prompt "Tell me about <place>." with
    the system prompt, continued greedily by the teacher for ``n_tokens`` tokens."""
    from gradfree.evaluation.questions import build_prompt

    out = []
    dev = next(teacher.parameters()).device
    generate: Any = teacher.generate
    for place in places:
        prompt, fmt = build_prompt(tokenizer, f"Tell me about {place}.", system)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=fmt == "plain")["input_ids"]
        with torch.inference_mode():
            gen = generate(
                input_ids=ids.to(dev),
                attention_mask=torch.ones_like(ids).to(dev),
                do_sample=False,
                num_beams=1,
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        out.append((gen[0].cpu().tolist(), int(ids.shape[1])))
    return out


def _capture(
    teacher: Any,
    student: Any,
    docs: list[Any],
    cfg: AlignConfig,
    out: Path,
    sites: list[str],
    dumps: bool,
) -> Any:
    from gradfree.capture import make_config, run_capture

    tok = student.tokenizer
    total = sum(
        min(len(tok(d.text if hasattr(d, "text") else d)["input_ids"]), 10**9) for d in docs
    )
    rate = min(1.0, 1.5 * cfg.dump_max / max(1, total))
    ccfg = make_config(
        sites=sites,
        cross_sites=["resid_pre", "final.normed"] if "resid_pre" in sites else ["final.normed"],
        layer_map=cfg.layer_map,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        dump_sites=["mlp_hidden"] if dumps else [],
        dump_rate=rate,
        dump_max=cfg.dump_max,
    )
    return run_capture({"teacher": teacher, "student": student}, docs, out, ccfg, progress=False)


def fit_alignment(
    teacher: Any,
    student: Any,
    docs: list[Any],
    cfg: AlignConfig,
    work: Path,
    *,
    places: list[str] | None = None,
    system_prompt: str | None = None,
    say: Any = None,
) -> AlignmentPlan:
    """Capture on ``docs`` (objects with .text) into ``work`` and solve the plan.

    ``teacher`` and ``student`` are loaded models (``.model``, ``.tokenizer``). ``places`` (for
    the style prompts) default to none: then the ridge head is fitted on the blurbs alone.
    """
    say = say or (lambda m: None)
    ta, sa = get_adapter(teacher.model), get_adapter(student.model)
    d_s, d_t = sa.hidden_size, ta.hidden_size
    k = resolve_k(cfg, d_s, d_t)
    sites = ["resid_pre", "final.normed"] + (["mlp_hidden"] if cfg.permute_neurons else [])
    say(f"paired capture of {len(docs)} documents")
    cap = _capture(teacher, student, docs, cfg, work / "capture", sites, cfg.permute_neurons)
    layer_map = cap.layer_map or []
    n = sa.num_layers
    moments = [_moments(cap, j, layer_map[j]) for j in range(n)] + [_moments(cap, None, None)]
    targets = [rot.make_target(m, k, cfg.whiten, cfg.ridge) for m in moments]
    say("solving the rotations")
    q, q_layer, singular = _global_and_layer_bases(moments, targets, k, d_s)
    stage_of, q_stage, q_ref, refine_info = _stage_bases(moments, targets, q, k, d_s, cfg)
    plan = AlignmentPlan(
        cfg,
        layer_map,
        k,
        q,
        q_layer,
        q_stage,
        q_ref,
        stage_of,
        [t.p_t for t in targets],
        [cap.stats("teacher", f"blocks.{layer_map[j]}.resid_pre", "body").mean() for j in range(n)]
        + [cap.stats("teacher", "final.normed", "body").mean()],
        _diagnostics(moments, targets, q, q_layer, q_ref, stage_of, k, d_s),
        refine_info,
    )
    plan.capture_run_id = str(cap.manifest.get("run_id", ""))
    plan.singular_values = singular
    if cfg.permute_heads:
        say("attention patterns for head matching")
        _head_permutations(plan, teacher, student, docs, cfg)
    if cfg.permute_neurons:
        say("neuron correlations")
        _neuron_permutations(plan, cap, n, cfg)
    if cfg.ridge_head:
        say("fitting the ridge LM head")
        _ridge_head(plan, cap, teacher, student, cfg, work, places, system_prompt)
    return plan


def _global_and_layer_bases(
    moments: list[Any], targets: list[Any], k: int, d_s: int
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[float]]]:
    """One rotation for every site (trace-normalised pooled covariance) and one per layer."""
    n = len(moments) - 1
    pooled = sum(
        (m.c_s / max(1e-300, float(torch.trace(m.c_s))) for m in moments),
        torch.zeros_like(moments[0].c_s),
    )
    q, sv = rot.solve_basis(targets, pooled if k < d_s else None)
    singular = {"global": sv.tolist()}
    q_layer = []
    for j in range(n):
        qj, svj = rot.solve_basis([targets[j]], moments[j].c_s if k < d_s else None)
        q_layer.append(qj)
        singular[f"layer_{j}"] = svj.tolist()
    return q, q_layer, singular


def _stage_bases(
    moments: list[Any], targets: list[Any], q: torch.Tensor, k: int, d_s: int, cfg: AlignConfig
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor], list[dict[str, Any]]]:
    """Per-stage bases and the Householder refinement of the global rotation, stage by stage."""
    n = len(moments) - 1
    stage_list = rot.stages(n, cfg.stage_size)
    stage_of = [s for s, blocks in enumerate(stage_list) for _ in blocks]
    q_stage: list[torch.Tensor] = [torch.empty(0)] * n
    q_ref: list[torch.Tensor] = [torch.empty(0)] * n
    refine_info = []
    for s, blocks in enumerate(stage_list):
        ts = [targets[j] for j in blocks]
        pool_s = sum((moments[j].c_s for j in blocks), torch.zeros_like(moments[0].c_s))
        qs, _ = rot.solve_basis(ts, pool_s if k < d_s else None)
        qr, gains, hist = rot.refine_stage(
            ts, [moments[j].c_s for j in blocks], q, cfg.max_reflections, cfg.cosine_target
        )
        for j in blocks:
            q_stage[j], q_ref[j] = qs, qr
        refine_info.append(
            {
                "stage": s,
                "layers": blocks,
                "reflections": len(gains),
                "gains": gains,
                "cosine_history": hist,
                "target_met_before": hist[0] >= cfg.cosine_target,
            }
        )
    return stage_of, q_stage, q_ref, refine_info


def _diagnostics(
    moments: list[Any],
    targets: list[Any],
    q: torch.Tensor,
    q_layer: list[torch.Tensor],
    q_ref: list[torch.Tensor],
    stage_of: list[int],
    k: int,
    d_s: int,
) -> list[dict[str, Any]]:
    """Per site: RMS, and cosine and residual of the fit for the identity and each rotation."""
    n = len(moments) - 1
    eye = torch.eye(d_s, dtype=torch.float64)
    diag = []
    for idx, (m, t) in enumerate(zip(moments, targets, strict=True)):
        applied_ref = q_ref[idx] if idx < n else q_ref[-1]
        diag.append(
            {
                "name": m.name,
                "student_layer": m.student_layer,
                "teacher_layer": m.teacher_layer,
                "stage": stage_of[idx] if idx < n else stage_of[-1],
                "tokens": m.tokens,
                "rms_student": (t.tr_s / d_s) ** 0.5,
                "rms_teacher_k": (t.tr_t / k) ** 0.5,
                "cosine_identity": rot.fit_cosine(t, eye, m.c_s),
                "cosine_global": rot.fit_cosine(t, q, m.c_s),
                "cosine_layer": rot.fit_cosine(t, q_layer[idx], m.c_s) if idx < n else None,
                "cosine_refined": rot.fit_cosine(t, applied_ref, m.c_s),
                "residual_identity": rot.residual_ratio(t, eye, m.c_s),
                "residual_global": rot.residual_ratio(t, q, m.c_s),
                "residual_refined": rot.residual_ratio(t, applied_ref, m.c_s),
            }
        )
    return diag


def _head_permutations(
    plan: AlignmentPlan, teacher: Any, student: Any, docs: list[Any], cfg: AlignConfig
) -> None:
    """Head permutations per KV group from the attention patterns of a few documents."""
    ta, sa = get_adapter(teacher.model), get_adapter(student.model)
    from gradfree.texts.windows import iter_windows

    windows = iter_windows(
        student.tokenizer, docs[: cfg.pattern_docs], cfg.pattern_max_length, first_only=True
    )
    ids = [torch.tensor(w, dtype=torch.long) for _, w in windows]
    sims = head_similarity(teacher.model, student.model, ids, plan.layer_map)
    for j, sim in enumerate(sims):
        gperm, hperm, scores = head_permutation(
            sim, ta.geometry.num_kv_heads, sa.geometry.num_kv_heads
        )
        plan.head_perms[j] = (gperm, hperm)
        plan.perm_scores.setdefault(j, {}).update({f"heads_{k_}": v for k_, v in scores.items()})


def _neuron_permutations(plan: AlignmentPlan, cap: Any, n: int, cfg: AlignConfig) -> None:
    """Neuron permutations from the correlations of the dumped MLP hidden activations."""
    layers = cfg.neuron_layers if cfg.neuron_layers is not None else list(range(n))
    for j in layers:
        if not 0 <= j < n:
            raise GradfreeError(f"Neuron layer {j} is out of range (the student has {n}).")
        tx = cap.dumps("teacher", f"blocks.{plan.layer_map[j]}.mlp_hidden")["x"]
        sx = cap.dumps("student", f"blocks.{j}.mlp_hidden")["x"]
        perm, scores = neuron_permutation(tx, sx)
        plan.neuron_perms[j] = perm
        plan.perm_scores.setdefault(j, {}).update({f"neurons_{k_}": v for k_, v in scores.items()})


def _ridge_head(
    plan: AlignmentPlan,
    cap: Any,
    teacher: Any,
    student: Any,
    cfg: AlignConfig,
    work: Path,
    places: list[str] | None,
    system_prompt: str | None,
) -> None:
    """The ridge LM head from the final states, plus the teacher's style texts when asked."""
    ta, sa = get_adapter(teacher.model), get_adapter(student.model)
    s_final = cap.stats("student", "final.normed", "all")
    c_final = cap.cross("final.normed", "final.normed", "all")
    if cfg.style_prompts and places:
        from gradfree.texts.corpora import system_prompt as default_prompt

        gen = generate_style_texts(
            teacher.model,
            teacher.tokenizer,
            places[: cfg.style_places],
            system_prompt or default_prompt(),
            cfg.style_tokens,
        )
        texts = [student.tokenizer.decode(ids) for ids, _ in gen]
        plan.style_texts = texts
        scap = _capture(
            teacher, student, texts, cfg, work / "style_capture", ["final.normed"], False
        )
        s_final = s_final + scap.stats("student", "final.normed", "all")
        c_final = c_final + scap.cross("final.normed", "final.normed", "all")
    head, info = fit_ridge_head(
        s_final,
        c_final,
        ta.lm_head.weight,
        sa.lm_head.weight,
        rel_lambda=cfg.head_lambda,
        blend=cfg.head_blend,
        chunk=cfg.head_chunk,
    )
    plan.head, plan.head_info = head, {**info, "style_texts": len(plan.style_texts)}
