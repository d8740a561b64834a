"""Structured pruning of MLP neurons and of query heads within KV groups (issue 17, part 2).

A neuron is one row of gate and up and one column of down; a query head is ``head_dim`` rows of
q (and of its bias) and the same columns of o. Removing them leaves a plain checkpoint of the
same family with a smaller ``intermediate_size`` / ``num_attention_heads`` (head_dim written
explicitly), provided every block keeps the same numbers and every KV group the same number of
query heads. The KV heads themselves are kept: a KV head removed would take its whole group.

Removal alone loses what the removed units wrote. Which units go, and how the writer (down, o)
compensates, is decided from activation moments by :func:`gradfree.solvers.obs.obs_select`
(least-squares error of the refit, SlimGPT's structured OBS) and the refit itself is
:func:`gradfree.surgery.reconstruct.ls_fit`; :func:`gradfree.surgery.reconstruct.reconstruct_`
does both block by block on recaptured inputs (``mlp_keep=``, ``heads_keep=``). The edits here
are the plain index selections, exact when the removed units write nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradfree.adapters import LayerAdapter, config_for_shape, get_adapter, validate_config
from gradfree.base.errors import GradfreeError
from gradfree.solvers.obs import group_columns
from gradfree.surgery.edit import select_inputs_, select_outputs_


def check_shape(model: nn.Module, mlp_keep: int | None, heads_keep: int | None) -> None:
    """Refuse, before any weight changes, pruning targets the model or transformers would not
    take (``heads_keep``: query heads kept per KV group)."""
    a = get_adapter(model)
    g = a.geometry
    inter = a.intermediate_size
    if mlp_keep is not None and not 0 < mlp_keep <= inter:
        raise GradfreeError(f"The MLP must keep between 1 and {inter} neurons, not {mlp_keep}.")
    if heads_keep is not None and not 0 < heads_keep <= g.group_size:
        raise GradfreeError(
            f"Each KV group must keep between 1 and {g.group_size} query heads, not {heads_keep}."
        )
    heads = g.num_heads if heads_keep is None else heads_keep * g.num_kv_heads
    trial = config_for_shape(a.config, heads, inter if mlp_keep is None else mlp_keep)
    validate_config(trial, f"{heads} query heads / {trial.intermediate_size} MLP neurons")


def kv_pools(num_heads: int, num_kv_heads: int) -> list[list[int]]:
    """The query heads of each KV group (transformers' layout: group g holds heads g·s..)."""
    s = num_heads // num_kv_heads
    return [list(range(grp * s, (grp + 1) * s)) for grp in range(num_kv_heads)]


@torch.no_grad()
def prune_neurons_(layer: LayerAdapter, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep MLP neurons ``keep`` (sorted) of ``layer``: gate/up rows and down columns."""
    idx = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep)
    for lin in layer.mlp_inputs():
        select_outputs_(lin, idx)
    select_inputs_(layer.mlp_output(), idx)


@torch.no_grad()
def prune_heads_(layer: LayerAdapter, keep: Sequence[int], head_dim: int, num_kv: int) -> None:
    """Keep query heads ``keep`` (sorted, the same number in each of the ``num_kv`` KV groups)
    of ``layer``: their q rows (and bias) and o columns. Per-head q norms are shared by all
    heads: kept."""
    if len(keep) % num_kv:
        raise GradfreeError(f"{len(keep)} query heads do not split over {num_kv} KV groups.")
    cols = group_columns(keep, head_dim)
    select_outputs_(layer.q_proj, cols)
    select_inputs_(layer.attn_output(), cols)
    layer.set_group_size_(len(keep) // num_kv)


def finish_shape_(model: nn.Module) -> dict[str, Any]:
    """Record the pruned widths in the config once every block is pruned alike; returns them."""
    a = get_adapter(model)
    hd = a.geometry.head_dim
    heads = {int(layer.q_proj.weight.shape[0]) // hd for layer in a.layers}
    inter = {int(layer.up_proj.weight.shape[0]) for layer in a.layers}
    if len(heads) != 1 or len(inter) != 1:
        raise GradfreeError(
            "The blocks were pruned to different widths; a checkpoint needs one "
            "num_attention_heads and one intermediate_size."
        )
    (n_heads,), (n_inter,) = heads, inter
    a.set_shape_(n_heads, n_inter)
    return {"num_attention_heads": n_heads, "intermediate_size": n_inter}


def pruned_param_count(model: nn.Module, mlp_keep: int | None, heads_keep: int | None) -> int:
    """Parameters of ``model`` (unpruned) once pruned to ``mlp_keep`` neurons per block and
    ``heads_keep`` query heads per KV group: each neuron a gate and an up row and a down column
    (with their biases), each head its q rows (and bias) and o columns; a tied head once."""
    a = get_adapter(model)
    g = a.geometry
    total = sum(p.numel() for p in model.parameters())
    layer = a.layer(0)
    if mlp_keep is not None:
        per_neuron = sum(int(lin.weight.shape[1]) for lin in layer.mlp_inputs())
        per_neuron += sum(1 for lin in layer.mlp_inputs() if lin.bias is not None)
        per_neuron += int(layer.mlp_output().weight.shape[0])
        total -= a.num_layers * (a.intermediate_size - mlp_keep) * per_neuron
    if heads_keep is not None:
        per_head = g.head_dim * int(layer.q_proj.weight.shape[1])
        per_head += g.head_dim if layer.q_proj.bias is not None else 0
        per_head += g.head_dim * int(layer.attn_output().weight.shape[0])
        total -= a.num_layers * (g.group_size - heads_keep) * g.num_kv_heads * per_head
    return total


def mlp_keep_for_params(model: nn.Module, target: int, heads_keep: int | None = None) -> int:
    """The most MLP neurons per block that bring ``model`` (with ``heads_keep``) to at most
    ``target`` parameters."""
    a = get_adapter(model)
    for keep in range(a.intermediate_size, 0, -1):
        if pruned_param_count(model, keep, heads_keep) <= target:
            return keep
    raise GradfreeError(f"Pruning MLP neurons cannot reach {target} parameters on this model.")
