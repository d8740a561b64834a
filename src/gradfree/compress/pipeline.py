"""The compression pipeline as functions with clear intermediate results.

    fold_pair_(teacher, student)                         # function-preserving, in place
    layer_map = resolve_layer_map(recipe, teacher, student)
    cap = capture_pair(teacher, student, docs, folder, recipe, layer_map)
    sol = solve(teacher, student, cap, recipe)           # bases, plans, projected, merged
    # ridge_recapture: solve(..., documents=docs, tokenizer=tok) recaptures block by block
    save_checkpoint(sol.model, tokenizer, out); write_report(sol, out)

:func:`compress` runs them all. One capture serves many recipes (``solve`` only reads it), which
is what ``gradfree experiment`` needs; a recipe's ``layer_map`` must then be the capture's.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.provenance import Stopwatch
from gradfree.capture import Capture, Subject, run_capture
from gradfree.compress.attention import (
    AttentionPlan,
    check_geometry,
    plan_attention,
    rope_pairs,
)
from gradfree.compress.bases import BasisSet, residual_bases
from gradfree.compress.distill import ridge_head_, ridge_readers_
from gradfree.compress.interpolate import (
    AlphaPlan,
    alignment_plan,
    interpolate_models,
    optimal_plan,
    restrict_plan,
    uniform_plan,
)
from gradfree.compress.mlp import MlpPlan, fold_spans, plan_mlp
from gradfree.compress.project import project_teacher
from gradfree.compress.recapture import require_calibration, ridge_recaptured_
from gradfree.compress.recipe import PROJECTION_FIELDS, CompressRecipe, make_recipe
from gradfree.solvers.layermap import resolve_map
from gradfree.surgery import fuse_norms_

# k_pre (kv_dim wide, so as cheap as v) serves kv="reuse": its teacher×student cross-moment is what
# the per-pair key rotation is solved from. It is captured for every recipe so that one capture
# serves every variant (scripts/compress_real.py solves many recipes from one capture).
CAPTURE_SITES = [
    "resid_pre",
    "attn_in",
    "mlp_in",
    "attn_heads",
    "mlp_hidden",
    "k_pre",
    "v",
    "final.normed",
]
CROSS_SITES = ["resid_pre", "attn_in", "mlp_in", "attn_heads", "k_pre", "v", "final.normed"]


@dataclass
class Solution:
    """Everything ``solve`` decided, plus the two models it built (student-shaped)."""

    recipe: CompressRecipe
    layer_map: list[int]
    bases: BasisSet
    attention: list[AttentionPlan]
    mlp: list[MlpPlan]
    alphas: AlphaPlan | None  # the α of every block and KV group; None: the projection alone
    projected: nn.Module  # the teacher projected into the student's shape (α = 1)
    model: nn.Module  # the result (the projected teacher itself when merge == "none")
    rope_gap: float
    config_changes: list[str] = field(default_factory=list)
    # KL(teacher ‖ model) of attention, [block][KV group], when measured (see .attention_kl)
    attention_kl: list[list[float]] | None = None
    recaptures: list[dict[str, Any]] = field(default_factory=list)  # ridge_recapture's passes

    def merge_profile(self) -> list[dict[str, Any]]:
        """Seed 000's merge profile: one row per student block."""
        from gradfree.compress.report import sig4

        rows = []
        for j, d in enumerate(self.bases.diagnostics[:-1]):
            a_attn = self.alphas.attn[j] if self.alphas else [1.0]
            a_mlp = self.alphas.mlp[j] if self.alphas else 1.0
            rows.append(
                {
                    "layer": j,
                    "teacher_layer": self.layer_map[j],
                    "alpha_attn": [round(a, 4) for a in a_attn],
                    "alpha_mlp": round(a_mlp, 4),
                    "certainty": round(
                        min([*self.attention[j].group_certainty(), d["alignment_cosine"]]), 4
                    ),
                    "alignment": round(d["alignment_cosine"], 4),
                    "cka": round(d["cka"], 4),
                    "variance_preserved": round(d["variance_preserved"], 4),
                    "transition_cost": round(d["transition_cost"], 4),
                    "kurtosis_gap": round(d["kurtosis_gap"], 3),
                    "head_similarity": round(
                        sum(self.attention[j].similarity) / len(self.attention[j].similarity), 4
                    ),
                    "mlp_correlation": round(self.mlp[j].matched_correlation, 4),
                    "mutual_information": round(d["mutual_information"], 3),
                    "mi_teacher": round(d["mi_teacher"], 3),
                    "mi_per_dim": round(d["mi_per_dim"], 4),
                    "attention_kl": (
                        sig4(sum(self.attention_kl[j]) / len(self.attention_kl[j]))
                        if self.attention_kl
                        else None
                    ),
                }
            )
        return rows


def fold_pair_(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Fold every residual RMSNorm of both models into its readers (untying tied heads)."""
    changes = []
    for name, m in (("teacher", teacher), ("student", student)):
        tied = bool(getattr(m.config, "tie_word_embeddings", False))
        fuse_norms_(m)
        if tied:
            changes.append(f"{name}: tie_word_embeddings true -> false (head merged separately)")
    return changes


def resolve_layer_map(
    recipe: CompressRecipe,
    teacher: nn.Module,
    student: nn.Module,
    cka: Callable[[], list[int]] | None = None,
) -> list[int]:
    n_t, n_s = get_adapter(teacher).num_layers, get_adapter(student).num_layers
    if recipe.layer_map == "cka":
        if cka is None:
            raise GradfreeError("The 'cka' layer map needs a calibration pass (use compress()).")
        return cka()
    return resolve_map(recipe.layer_map, n_t, n_s)


def _subject(obj: Any, fallback_tok: Any = None) -> Subject:
    if isinstance(obj, nn.Module):
        return Subject(obj, fallback_tok)
    return Subject(obj.model, obj.tokenizer, getattr(obj, "name", ""), getattr(obj, "source", ""))


def capture_pair(
    teacher: Any,
    student: Any,
    documents: Sequence[Any],
    folder: str | Path,
    recipe: CompressRecipe,
    layer_map: list[int],
    *,
    progress: bool = False,
    corpus: dict[str, Any] | None = None,
) -> Capture:
    """The paired capture every variant is solved from (``teacher``/``student``: loaded models
    with ``.model``/``.tokenizer`` or Subjects)."""
    cfg = {
        "sites": CAPTURE_SITES,
        "cross_sites": CROSS_SITES,
        "dump_sites": ["mlp_hidden"],
        "layer_map": layer_map,
        "max_length": recipe.max_length,
        "batch_size": recipe.batch_size,
        "dump_rate": recipe.dump_rate,
        "dump_max": recipe.dump_max,
        "seed": recipe.seed,
    }
    subjects = {"teacher": _subject(teacher), "student": _subject(student)}
    return run_capture(subjects, documents, folder, cfg, progress=progress, corpus=corpus)


def cka_layer_map(
    teacher: Any, student: Any, documents: Sequence[Any], folder: Path, recipe: CompressRecipe
) -> list[int]:
    """Monotone map maximising Σ_j CKA(student block j input, teacher block m(j) input), from
    token dumps of both models' block inputs (same tokens: dumps are hash-selected)."""
    from gradfree.solvers import linear_cka_from_moments, monotone_layer_map

    cfg = {
        "sites": ["resid_pre"],
        "dump_sites": ["resid_pre"],
        "max_length": recipe.max_length,
        "batch_size": recipe.batch_size,
        "dump_rate": recipe.dump_rate,
        "dump_max": recipe.dump_max,
        "seed": recipe.seed,
        "exclude_first": 1,
    }
    caps = {
        role: run_capture(_subject(m), documents, folder / role, cfg, progress=False)
        for role, m in (("teacher", teacher), ("student", student))
    }

    def centred(role: str, key: str) -> torch.Tensor:
        x = caps[role].dumps("model", key)["x"].to(torch.float64)
        return x - x.mean(0)

    n_t = get_adapter(_subject(teacher).model).num_layers
    n_s = get_adapter(_subject(student).model).num_layers
    xt = [centred("teacher", f"blocks.{i}.resid_pre") for i in range(n_t)]
    xs = [centred("student", f"blocks.{j}.resid_pre") for j in range(n_s)]
    score = torch.zeros(n_s, n_t, dtype=torch.float64)
    for j in range(n_s):
        for i in range(n_t):
            n = xs[j].shape[0]
            score[j, i] = linear_cka_from_moments(
                xs[j].T @ xs[j] / n, xt[i].T @ xt[i] / n, xs[j].T @ xt[i] / n
            )
    return [int(i) for i in monotone_layer_map(score)]


def project(
    teacher: nn.Module,
    student: nn.Module,
    cap: Capture,
    recipe: CompressRecipe | dict[str, Any] | None = None,
    *,
    config_changes: Sequence[str] = (),
    bases: BasisSet | None = None,
) -> Solution:
    """Bases, head/neuron plans and the projected teacher (α = 1), from one capture.

    Both models must already be folded (:func:`fold_pair_`) and be the ones captured. ``bases``
    replaces the recipe's solved bases (e.g. a geodesic blend of two tasks' bases).
    """
    recipe = make_recipe(recipe)
    t, s = get_adapter(teacher), get_adapter(student)
    check_geometry(t, s)
    layer_map = cap.layer_map
    if layer_map is None or len(layer_map) != s.num_layers:
        raise GradfreeError("The capture is not a paired capture of this student.")
    if isinstance(recipe.layer_map, list) and list(recipe.layer_map) != list(layer_map):
        raise GradfreeError("The recipe's layer map differs from the capture's; recapture.")
    bases = bases or residual_bases(
        cap,
        s.num_layers,
        layer_map,
        recipe.basis,
        trunk_fraction=recipe.trunk_fraction,
        align=recipe.align,
        per_layer=recipe.per_layer,
        part=recipe.basis_stats,
    )
    qk_dims, gap = rope_pairs(t, s)
    attn = [
        plan_attention(
            cap,
            t,
            s,
            j,
            layer_map[j],
            bases.write(j),
            qk_dims,
            select=recipe.head_select,
            match=recipe.head_match,
            value_align=recipe.value_align,
            kv=recipe.kv,
            head_rotation=recipe.head_rotation,
        )
        for j in range(s.num_layers)
    ]
    spans = (
        fold_spans(layer_map, t.num_layers)
        if recipe.depth == "fold"
        else [[] for _ in range(s.num_layers)]
    )
    mlp = [
        plan_mlp(
            cap,
            t,
            s,
            j,
            layer_map[j],
            bases.write(j),
            recipe.mlp_match,
            fold=spans[j],
            reduce=recipe.mlp_reduce,
        )
        for j in range(s.num_layers)
    ]
    projected = project_teacher(teacher, student, bases, layer_map, attn, mlp)
    return Solution(
        recipe.model_copy(update={"merge": "none"}),
        list(layer_map),
        bases,
        attn,
        mlp,
        None,
        projected,
        projected,
        gap,
        list(config_changes),
    )


def interpolate(
    projection: Solution,
    teacher: nn.Module,
    student: nn.Module,
    cap: Capture,
    recipe: CompressRecipe | dict[str, Any] | None = None,
    *,
    documents: Sequence[Any] | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Solution:
    """Merge a projection (from :func:`project`) with the student as ``recipe.merge`` says.

    The recipe's projection fields must equal the projection's; only merge fields may differ, so
    one projection serves every merge variant. ``documents`` and ``tokenizer`` (the calibration
    documents of ``cap``) are needed only by ``ridge_recapture``, which recaptures with them.
    """
    recipe = make_recipe(recipe)
    for f in PROJECTION_FIELDS:
        if getattr(recipe, f) != getattr(projection.recipe, f):
            raise GradfreeError(f"The recipe's {f} differs from the projection's; project again.")
    if recipe.ridge_recapture:  # fail before the α plan, not after it
        require_calibration(documents, tokenizer)
    sol = copy.copy(projection)
    sol.recipe = recipe
    sol.attention_kl = None  # measured on a model; the merge makes a new one
    if recipe.merge == "none":
        return sol
    t, s = get_adapter(teacher), get_adapter(student)
    c = math.sqrt(t.hidden_size / s.hidden_size)
    n_groups = s.geometry.num_kv_heads
    attn, projected = projection.attention, projection.projected
    if recipe.merge == "measured":
        raise GradfreeError(
            "The 'measured' merge chooses α on validation texts: run it with `gradfree "
            "experiment`, or give a uniform α."
        )
    if recipe.merge == "uniform":
        plan = uniform_plan(s.num_layers, n_groups, recipe.alpha)
    elif recipe.merge == "alignment":
        plan = alignment_plan(
            s.num_layers,
            attn,
            projection.bases.diagnostics,
            recipe.alpha,
            recipe.alignment_threshold,
        )
    else:  # optimal, and ridge (whose writers, embedding and head use the optimal α)
        plan = optimal_plan(
            cap, student, projected, projection.bases, projection.layer_map, attn, c
        )
        plan.mode = recipe.merge
    if recipe.alpha_embed is not None:
        plan.embed = recipe.alpha_embed
    if recipe.merge_layers is not None:
        plan = restrict_plan(plan, recipe.merge_layers)
    model = interpolate_models(student, projected, plan, attn)
    if recipe.ridge_recapture:  # readers block by block, then the head, all from recaptures
        sol.recaptures = ridge_recaptured_(
            model,
            student,
            projected,
            teacher,
            projection.bases,
            projection.layer_map,
            attn,
            c,
            recipe,
            documents,
            tokenizer,
            progress=progress,
        )
    elif recipe.merge == "ridge":
        ridge_readers_(
            model,
            student,
            projected,
            cap,
            projection.bases,
            projection.layer_map,
            attn,
            c,
            recipe.ridge_lambda,
        )
    if recipe.ridge_head and not recipe.ridge_recapture:
        ridge_head_(model, student, teacher, cap, recipe.ridge_lambda)
    sol.alphas, sol.model = plan, model
    return sol


def solve(
    teacher: nn.Module,
    student: nn.Module,
    cap: Capture,
    recipe: CompressRecipe | dict[str, Any] | None = None,
    *,
    config_changes: Sequence[str] = (),
    documents: Sequence[Any] | None = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> Solution:
    """:func:`project` then :func:`merge` (``documents``/``tokenizer``: see :func:`merge`)."""
    recipe = make_recipe(recipe)
    proj = project(teacher, student, cap, recipe, config_changes=config_changes)
    return interpolate(
        proj,
        teacher,
        student,
        cap,
        recipe,
        documents=documents,
        tokenizer=tokenizer,
        progress=progress,
    )


def measure_attention_kl(
    sol: Solution, teacher: nn.Module, tokenizer: Any, documents: Sequence[Any], cap: Capture
) -> list[list[float]]:
    """The attention KL of ``sol.model`` against the (folded) teacher per block and KV group, on
    the first ``recipe.attention_kl_windows`` windows of the capture's tokenization."""
    from gradfree.capture.plan import token_windows
    from gradfree.compress.attention_kl import attention_kl

    windows = token_windows(
        tokenizer,
        documents,
        int(cap.config.get("max_length", sol.recipe.max_length)),
        sol.recipe.attention_kl_windows,
        bool(cap.config.get("add_special_tokens", True)),
    )
    return attention_kl(teacher, sol.model, sol.attention, sol.layer_map, windows)


def compress(
    teacher: Any,
    student: Any,
    documents: Sequence[Any],
    out: str | Path,
    recipe: CompressRecipe | dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    corpus: dict[str, Any] | None = None,
    keep_capture: bool = False,
    inputs: dict[str, Any] | None = None,
) -> tuple[Solution, Path]:
    """Fold, capture, solve and write ``out`` (checkpoint + tokenizer + recipe + report).

    ``teacher``/``student`` are loaded models (``.model``, ``.tokenizer``); their norms are folded
    in place (function-preserving). The capture lives in ``out/capture`` (kept with
    ``keep_capture``). Returns the solution and the output folder.
    """
    from gradfree.base.io import atomic_dir, check_new_output
    from gradfree.compress.report import save_checkpoint, write_report

    recipe = make_recipe(recipe)
    check_new_output(out, overwrite)
    tm, sm = _subject(teacher).model, _subject(student).model
    clock = Stopwatch()
    with atomic_dir(out, overwrite) as tmp:
        with clock.stage("fold norms"):
            changes = fold_pair_(tm, sm)
        with clock.stage("layer map"):
            layer_map = resolve_layer_map(
                recipe,
                tm,
                sm,
                lambda: cka_layer_map(teacher, student, documents, tmp / "cka", recipe),
            )
        with clock.stage("paired capture"):
            cap = capture_pair(
                teacher,
                student,
                documents,
                tmp / "capture",
                recipe,
                layer_map,
                progress=progress,
                corpus=corpus,
            )
        with clock.stage("solve + project + merge"):
            sol = solve(
                tm,
                sm,
                cap,
                recipe,
                config_changes=changes,
                documents=documents,
                tokenizer=_subject(student).tokenizer,
                progress=progress,
            )
        if recipe.attention_kl_windows:
            with clock.stage("attention KL"):
                sol.attention_kl = measure_attention_kl(
                    sol, tm, _subject(student).tokenizer, documents, cap
                )
        with clock.stage("write checkpoint"):
            save_checkpoint(sol.model, _subject(student).tokenizer, tmp)
        write_report(sol, tmp, clock=clock, inputs=inputs)
        if not keep_capture:
            shutil.rmtree(tmp / "capture", ignore_errors=True)
        shutil.rmtree(tmp / "cka", ignore_errors=True)
    return sol, Path(out)
