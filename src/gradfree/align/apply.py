"""Fold an :class:`~gradfree.align.fit.AlignmentPlan` into a student, toggle by toggle.

Order and what each step does to the function:

1. ridge LM head (``style``): replaces the head; changes the function.
2. permutations (``permute``): KV groups, query heads within groups, MLP neurons
   (``surgery.permute_*``); function-preserving.
3. norm fusion, then one basis for the whole residual stream (``rotate``,
   ``surgery.rotate_residual_``); function-preserving. With ``per_stage`` the stage bases are
   applied without transitions, with ``refine`` the stage's Householder-refined basis Q·H
   (``surgery.rotate_per_layer_``): both change the function.
"""

from __future__ import annotations

from typing import Any

import torch

from gradfree.adapters import get_adapter
from gradfree.align.fit import AlignmentPlan
from gradfree.base.errors import GradfreeError
from gradfree.surgery import (
    fuse_norms_,
    permute_heads_,
    permute_kv_groups_,
    permute_neurons_,
    rotate_per_layer_,
    rotate_residual_,
    untie_,
)
from gradfree.surgery.edit import assign_


def function_preserving(toggles: dict[str, bool]) -> bool:
    """True when a variant's toggles change nothing the model computes."""
    return not any(toggles.get(t) for t in ("style", "refine", "per_stage", "per_layer"))


@torch.no_grad()
def apply_plan_(
    model: Any,
    plan: AlignmentPlan,
    *,
    permute: bool = False,
    rotate: bool = False,
    refine: bool = False,
    per_stage: bool = False,
    per_layer: bool = False,
    style: bool = False,
) -> list[dict[str, Any]]:
    """Apply the chosen parts of ``plan`` to ``model`` in place; return the surgery ledger."""
    a = get_adapter(model)
    ops: list[dict[str, Any]] = []
    if (refine or per_stage or per_layer) and not rotate:
        raise GradfreeError("Refinement and per-stage or per-layer bases need the rotation toggle.")
    if style:
        if plan.head is None:
            raise GradfreeError("The plan has no ridge head; fit it with ridge_head: true.")
        if a.tied:
            ops.append(untie_(model))
        assign_(a.lm_head, "weight", plan.head)
        ops.append({"op": "ridge_head", **plan.head_info, "changes_function": True})
    if permute:
        for j, (gperm, hperm) in sorted(plan.head_perms.items()):
            ops.append(permute_kv_groups_(model, j, gperm))
            ops.append(permute_heads_(model, j, hperm))
        for j, perm in sorted(plan.neuron_perms.items()):
            entry = permute_neurons_(model, j, perm)
            ops.append({**entry, "perm": f"{len(entry['perm'])} neurons"})
    if rotate:
        ops.append(fuse_norms_(model))
        if refine:
            ops.append({**rotate_per_layer_(model, plan.q_refined), "changes_function": True})
        elif per_stage or per_layer:
            qs = plan.q_stage if per_stage else plan.q_layer
            ops.append({**rotate_per_layer_(model, qs), "changes_function": True})
        else:
            ops.append({**rotate_residual_(model, plan.q), "changes_function": False})
    return ops


def applied_bases(plan: AlignmentPlan, toggles: dict[str, bool]) -> list[torch.Tensor] | None:
    """The per-block bases a variant folds in (None when it does not rotate)."""
    if not toggles.get("rotate"):
        return None
    if toggles.get("refine"):
        return list(plan.q_refined)
    if toggles.get("per_stage"):
        return list(plan.q_stage)
    if toggles.get("per_layer"):
        return list(plan.q_layer)
    return [plan.q] * len(plan.q_layer)
