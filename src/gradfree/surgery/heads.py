"""Orthogonal maps inside attention heads that leave the attention output unchanged.

Values: attention mixes *tokens*, never value dimensions, so if KV head ``g`` emits ``R v``
instead of ``v`` (its block of ``v_proj`` rows and bias multiplied by ``R``), every query head
of the group returns ``R z``, and replacing that head's ``o`` columns ``O_h`` by ``O_h Rᵀ``
undoes it exactly.

Queries and keys: RoPE turns each frequency pair (dims ``i`` and ``i + p`` in the rotate-half
layout) by a position-dependent angle, i.e. multiplies the pair as a complex number. Another
fixed 2-D rotation ``P`` of the same pair commutes with it, so turning the k rows of a group and
the q rows of each of its query heads by the same ``P`` keeps every score
``(R_t P q)·(R_s P k) = (R_t q)·(R_s k)``. A general rotation mixing pairs would not commute
with RoPE (the Qwen3 trap). Where ``q_norm``/``k_norm`` exist their per-dimension weights only
commute with ``P`` when they are equal on both dims of every turned pair; otherwise we refuse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.solvers.rope_pairs import pair_rotation
from gradfree.surgery.edit import block, f64, param, transform_inputs_, transform_outputs_
from gradfree.surgery.ledger import rotation_entry
from gradfree.surgery.maths import block_indices, check_orthogonal


@torch.no_grad()
def rotate_head_values_(
    model: nn.Module, layer: int, kv_group: int, r: torch.Tensor, *, tol: float = 1e-6
) -> dict[str, Any]:
    """Rotate the values of KV head ``kv_group`` of ``layer`` by orthogonal ``r`` (head_dim²)
    and counter-rotate the ``o`` columns of every query head that reads it."""
    a = get_adapter(model)
    g = a.geometry
    if not 0 <= kv_group < g.num_kv_heads:
        raise GradfreeError(f"KV group {kv_group} does not exist (there are {g.num_kv_heads}).")
    r64 = check_orthogonal(r, g.head_dim, "value rotation", tol)
    blk = block(a, layer)
    transform_outputs_(blk.v_proj, r64, rows=block_indices([kv_group], g.head_dim))
    heads = block_indices(list(g.heads_in_group(kv_group)), g.head_dim)
    transform_inputs_(blk.o_proj, torch.block_diag(*[r64.T] * g.group_size), cols=heads)
    return {
        "op": "rotate_head_values",
        "layer": layer,
        "kv_group": kv_group,
        "rotations": [rotation_entry(r64, f"V[{kv_group}]", layer)],
    }


def _check_qk_norms(model: nn.Module, layer: int, angles: torch.Tensor) -> None:
    """Refuse pair rotations that q_norm/k_norm weights would not commute with."""
    blk = block(get_adapter(model), layer)
    p = angles.shape[1]
    turned = (angles != 0).any(dim=0)  # a pair turned in any group: the norm weight is shared
    for name in ("q_norm", "k_norm"):
        norm = getattr(blk, name)
        if norm is None:
            continue
        w = f64(param(norm))
        unequal = (w[:p] != w[p : 2 * p]) & turned.to(w.device)
        if bool(unequal.any()):
            i = int(unequal.nonzero()[0, 0])
            raise GradfreeError(
                f"Per-frequency q/k rotations are not exact with Qwen3-style {name}: its weight "
                f"differs on the two dims of pair {i} (dims {i} and {i + p}) in layer {layer}."
            )


@torch.no_grad()
def rotate_qk_pairs_(model: nn.Module, layer: int, angles: torch.Tensor) -> dict[str, Any]:
    """Turn each RoPE frequency pair of each KV group's keys and queries by ``angles``.

    ``angles`` has shape ``(num_kv_heads, rotary_dim // 2)``: ``angles[g, i]`` turns pair ``i``
    of KV head ``g`` and of every query head in group ``g`` (weights and biases).
    """
    a = get_adapter(model)
    g = a.geometry
    rd = a.rope.rotary_dim
    ang = torch.as_tensor(angles, dtype=torch.float64)
    if tuple(ang.shape) != (g.num_kv_heads, rd // 2):
        raise GradfreeError(
            f"Pair angles must have shape ({g.num_kv_heads}, {rd // 2}), not {tuple(ang.shape)}."
        )
    _check_qk_norms(model, layer, ang)
    blk = block(a, layer)
    entries = []
    for grp in range(g.num_kv_heads):
        rot = pair_rotation(ang[grp], g.head_dim)
        transform_outputs_(blk.k_proj, rot, rows=block_indices([grp], g.head_dim))
        heads = block_indices(list(g.heads_in_group(grp)), g.head_dim)
        transform_outputs_(blk.q_proj, torch.block_diag(*[rot] * g.group_size), rows=heads)
        entries.append(rotation_entry(rot, f"QK[{grp}]", layer))
    return {"op": "rotate_qk_pairs", "layer": layer, "rotations": entries}
