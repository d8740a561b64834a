"""Function-preserving permutations of attention heads, KV groups and MLP neurons.

Attention sums its heads through ``o``; the MLP sums its neurons through ``down``. Reordering
heads (rows of ``q``, with the matching column blocks of ``o``) or neurons (rows of gate/up, with
the matching columns of ``down``) therefore changes nothing, as long as grouped-query attention
keeps every query head with its KV head: query heads move only within their group, or whole
groups (k/v rows together with the group's query heads) move together. Qwen3's ``q_norm`` and
``k_norm`` have one weight of size ``head_dim`` shared by all heads, so they are unaffected.

Every permutation maps *new position → old index* (``new[i] = old[perm[i]]``), like indexing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.surgery.edit import block, select_inputs_, select_outputs_
from gradfree.surgery.maths import Permutation, as_permutation, block_indices


@torch.no_grad()
def permute_heads_(model: nn.Module, layer: int, perm: Permutation) -> dict[str, Any]:
    """Reorder the query heads of ``layer`` (``perm``: new head → old head) within KV groups."""
    a = get_adapter(model)
    g = a.geometry
    p = as_permutation(perm, g.num_heads, "head permutation")
    moved = [(h, int(old)) for h, old in enumerate(p) if g.kv_group(h) != g.kv_group(int(old))]
    if moved:
        h, old = moved[0]
        raise GradfreeError(
            f"Head permutations must stay within KV groups: position {h} (group "
            f"{g.kv_group(h)}) would take head {old} (group {g.kv_group(old)})."
        )
    rows = block_indices(p, g.head_dim)
    blk = block(a, layer)
    select_outputs_(blk.q_proj, rows)
    select_inputs_(blk.o_proj, rows)
    return {"op": "permute_heads", "layer": layer, "perm": p.tolist()}


@torch.no_grad()
def permute_kv_groups_(model: nn.Module, layer: int, group_perm: Permutation) -> dict[str, Any]:
    """Reorder whole KV groups of ``layer`` (new group → old group): k/v rows and the query
    heads of each group (q rows, o columns) move together, so GQA pairing is kept."""
    a = get_adapter(model)
    g = a.geometry
    p = as_permutation(group_perm, g.num_kv_heads, "KV-group permutation")
    kv_rows = block_indices(p, g.head_dim)
    heads = [h for old in p.tolist() for h in g.heads_in_group(old)]
    q_rows = block_indices(heads, g.head_dim)
    blk = block(a, layer)
    select_outputs_(blk.k_proj, kv_rows)
    select_outputs_(blk.v_proj, kv_rows)
    select_outputs_(blk.q_proj, q_rows)
    select_inputs_(blk.o_proj, q_rows)
    return {"op": "permute_kv_groups", "layer": layer, "perm": p.tolist()}


@torch.no_grad()
def permute_neurons_(model: nn.Module, layer: int, perm: Permutation) -> dict[str, Any]:
    """Reorder the MLP neurons of ``layer`` (new → old): gate/up rows, down columns."""
    a = get_adapter(model)
    blk = block(a, layer)
    p = as_permutation(perm, blk.up_proj.weight.shape[0], "neuron permutation")
    select_outputs_(blk.gate_proj, p)
    select_outputs_(blk.up_proj, p)
    select_inputs_(blk.down_proj, p)
    return {"op": "permute_neurons", "layer": layer, "perm": p.tolist()}
