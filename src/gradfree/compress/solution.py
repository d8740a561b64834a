"""A compression solved from one paired capture: bases, head/neuron plans, the projected
teacher and its interpolation with the student.

    proj = project(teacher, student, cap, recipe)            # α = 1: the projected teacher
    sol = interpolate(proj, teacher, student, cap, recipe_b)  # any merge of that projection
    sol = solve(teacher, student, cap, recipe)               # both

Both models must already be folded (:func:`gradfree.compress.pipeline.fold_pair_`) and be the ones
captured. ``solve`` only reads the capture, so one capture serves many recipes; a recipe's
``layer_map`` must then be the capture's. :class:`~gradfree.compress.calibration.Calibration`
runs these steps on its cached capture.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import Capture
from gradfree.compress.attention import AttentionPlan, check_geometry, plan_attention, rope_pairs
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
    """:func:`project` then :func:`interpolate` (``documents``/``tokenizer``: see there)."""
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
    from gradfree.compress.attention_kl import attention_kl
    from gradfree.texts.windows import token_windows

    windows = token_windows(
        tokenizer,
        documents,
        int(cap.config.get("max_length", sol.recipe.max_length)),
        sol.recipe.attention_kl_windows,
        bool(cap.config.get("add_special_tokens", True)),
    )
    return attention_kl(teacher, sol.model, sol.attention, sol.layer_map, windows)
