"""Per-layer residual bases with explicit transitions: a measured simulation, not a checkpoint.

SliceGPT (Ashkboos et al. 2024) lets block ``l`` work in its own PCA basis ``Q_l``; the stream
then changes basis between blocks, which needs a ``d x d`` transition ``T_l = Q_{l-1}ᵀ Q_l`` on
the skip connection (row vectors: ``x Q_l = (x Q_{l-1}) T_l``). Vanilla transformers has no such
module, so a model with transitions cannot be a plain checkpoint. Here the transitions are
simulated with forward pre-hooks on a copy of the model, which proves that the construction is
exact when they are kept, and measures their cost (parameters and FLOPs per token) and what the
logits do when they are dropped (:func:`~gradfree.surgery.rotate.per_layer_rotation_error`: an
approximation, never exact unless all bases agree).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.solvers.grassmann import transition_costs
from gradfree.surgery.basis import pca_rotation
from gradfree.surgery.edit import require_unit_norms
from gradfree.surgery.rotate import _rotate_block_, _rotate_ends_, per_layer_rotation_error


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


@torch.no_grad()
def logits_with_transitions(
    model: nn.Module, qs: Sequence[torch.Tensor], input_ids: torch.Tensor
) -> torch.Tensor:
    """Logits of a copy of the (norm-fused) ``model`` whose block ``l`` works in basis ``qs[l]``,
    with the transitions ``qs[l-1]ᵀ qs[l]`` applied to the stream entering each block."""
    require_unit_norms(get_adapter(model), "Per-layer bases")
    sim = copy.deepcopy(model)
    a = get_adapter(sim)
    q64 = [q.detach().to(torch.float64) for q in qs]
    _rotate_ends_(a, q64[0], q64[-1])
    for layer, q in zip(a.layers, q64, strict=True):
        _rotate_block_(layer, q)
    handles = []

    def hook_for(t: torch.Tensor) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                h = args[0]
                return (((h.double() @ t).to(h.dtype), *args[1:]), kwargs)
            h = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": (h.double() @ t).to(h.dtype)}

        return hook

    try:
        for i in range(1, len(q64)):
            t = (q64[i - 1].T @ q64[i]).to(next(sim.parameters()).device)
            module = a.layer_modules[i]
            handles.append(module.register_forward_pre_hook(hook_for(t), with_kwargs=True))
        return sim(input_ids).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def transition_study(
    model: nn.Module, moments: Sequence[torch.Tensor], input_ids: torch.Tensor, damping: float
) -> dict[str, Any]:
    """Per-layer PCA bases from ``moments`` (one d x d per block) on the norm-fused ``model``:
    logits error with transitions kept and dropped, transition costs, extra parameters/FLOPs."""
    a = get_adapter(model)
    d, n = a.hidden_size, a.num_layers
    qs = [pca_rotation(m, damping)[0] for m in moments]
    dev = next(model.parameters()).device
    ids = input_ids.to(dev)
    ref = model(ids).logits
    kept = _rel(logits_with_transitions(model, qs, ids), ref)
    dropped = per_layer_rotation_error(model, qs, ids)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    extra = (n - 1) * d * d
    return {
        "bases": n,
        "with_transitions": {"kind": "exact (simulated with hooks)", "max_rel": kept},
        "without_transitions": {
            "kind": "approximation",
            "max_rel": dropped["relative_logits_error"],
            "fro_rel": dropped["relative_logits_error_fro"],
        },
        "transition_cost": transition_costs(qs),
        "extra_params": extra,
        "extra_params_share": extra / params,
        "extra_flops_per_token": 2 * extra,
        "extra_flops_share": extra / params,  # a forward costs ~2·params FLOPs per token
    }
