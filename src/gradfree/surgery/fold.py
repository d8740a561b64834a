"""Untying the LM head and folding RMSNorm weights into the linears that read them.

``RMSNorm(x) = w ⊙ x / rms(x)``, so a linear reading it computes ``W (w ⊙ x̂) + b =
(W diag w) x̂ + b``: the norm weight moves into ``W``'s columns and the norm keeps unit weight.
This is the first step of SliceGPT (Ashkboos et al. 2024) and QuaRot (Ashkboos et al. 2024):
only a norm with unit weight commutes with an orthogonal change of basis of the residual stream.
Unlike those papers we do not mean-centre anything: that is exact for LayerNorm, not RMSNorm.

Traps handled here: folding the final norm into a *tied* head would also rescale the input
embeddings, so the head is untied first (and the config says so, so a saved checkpoint reloads
untied); Qwen3's per-head ``q_norm``/``k_norm`` act after the projections, inside each head, and
are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.surgery.edit import effective_scale, residual_norms, scale_inputs_, set_unit_


def untie_(model: nn.Module) -> dict[str, Any]:
    """Give the LM head its own copy of the embedding matrix; ``{"untied": True}`` if it was tied.

    The config and the model's record of tied keys are made to agree with the now separate head
    (:meth:`~gradfree.adapters.ModelAdapter.mark_untied_`), so a saved checkpoint reloads untied.
    """
    a = get_adapter(model)
    was_tied = a.tied
    if was_tied:
        head = a.lm_head
        head.weight = nn.Parameter(
            a.embed_tokens.weight.detach().clone(), requires_grad=head.weight.requires_grad
        )
    a.mark_untied_()
    return {"op": "untie", "untied": was_tied}


@torch.no_grad()
def fuse_norms_(model: nn.Module) -> dict[str, Any]:
    """Fold every residual RMSNorm weight into its readers and set the norm weights to 1.

    attn_norm → q/k/v columns, mlp_norm → gate/up columns, final norm → LM head columns (the
    head is untied first when needed, recorded in the result). Biases are unchanged: the norm
    scales the linear's input, and the bias is added after the product. Exact in real arithmetic;
    the products are formed in float64 and rounded once to the weight dtype.
    """
    a = get_adapter(model)
    untied = untie_(model)["untied"] if a.tied else False
    folded: list[str] = []
    max_dev = 0.0
    readers: dict[str, list[nn.Module]] = {}
    for layer in a.layers:
        readers[f"layers.{layer.index}.attn_norm"] = list(layer.attn_inputs())
        readers[f"layers.{layer.index}.mlp_norm"] = list(layer.mlp_inputs())
    readers["final_norm"] = [a.lm_head]
    for name, norm in residual_norms(a).items():
        scale = effective_scale(a, norm)
        max_dev = max(max_dev, float((scale - 1).abs().max()))
        for lin in readers[name]:
            scale_inputs_(lin, scale)
        set_unit_(a, norm)
        folded.append(name)
    return {"op": "fuse_norms", "untied": untied, "folded": folded, "max_weight_deviation": max_dev}
