"""Orthogonal changes of basis of the residual stream (SliceGPT's computational invariance).

With every RMSNorm at unit weight (after :func:`~gradfree.surgery.fold.fuse_norms_`), the norm
commutes with any orthogonal ``Q`` because ``‖Qᵀx‖ = ‖x‖``. Writing the residual stream in the
basis ``x' = Qᵀx`` (row vectors: ``x' = x Q``) then changes no output:

* embeddings ``E ← E Q``;
* every linear that reads the normed residual (q, k, v, gate, up, LM head) ``W ← W Q``;
* every linear that writes into it (o, down) ``W ← Qᵀ W`` and ``b ← Qᵀ b``.

A tied head is consistent with this (``E Q`` serves as both embedding and head), so it is
rotated once. The rotation is formed in float64 and cast once to the weight dtype.

Per-layer bases (SliceGPT's option, not a plain checkpoint)
-----------------------------------------------------------
SliceGPT lets block ``l`` use its own basis ``Q_l``. The residual stream then changes basis at
every block boundary, which takes an extra ``d x d`` transition ``Q_{l+1}ᵀ Q_l`` on the skip
connection: a module that vanilla transformers does not have. We do not build such models. We
only measure what *dropping* the transitions would cost: :func:`per_layer_rotation_error` gives
the transition cost ``‖Q_{l+1}ᵀ Q_l − I‖_F / √d`` per boundary and the relative logits error
of a copy whose blocks read and write in their own bases with no transitions (an approximation,
labelled as such; it is exact only when all the ``Q_l`` are equal).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradfree.adapters import LayerAdapter, ModelAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.solvers.grassmann import transition_costs
from gradfree.surgery.edit import require_unit_norms, transform_inputs_, transform_outputs_
from gradfree.surgery.fold import fuse_norms_
from gradfree.surgery.ledger import rotation_entry
from gradfree.surgery.maths import check_orthogonal


def _rotate_block_(layer: LayerAdapter, q: torch.Tensor) -> None:
    """Block ``layer`` reads and writes the residual stream in basis ``q`` (float64)."""
    for lin in (*layer.attn_inputs(), *layer.mlp_inputs()):
        transform_inputs_(lin, q)
    for lin in (layer.attn_output(), layer.mlp_output()):
        transform_outputs_(lin, q.T)


def _rotate_ends_(a: ModelAdapter, q_in: torch.Tensor, q_out: torch.Tensor) -> None:
    """Embeddings in basis ``q_in``; the head reads basis ``q_out`` (once, if tied)."""
    tied = a.tied
    transform_inputs_(a.embed_tokens, q_in)
    if not tied:
        transform_inputs_(a.lm_head, q_out)
    elif not torch.equal(q_in, q_out):
        raise GradfreeError("A tied LM head must share the embeddings' basis; untie it first.")


@torch.no_grad()
def rotate_residual_(model: nn.Module, q: torch.Tensor, *, tol: float = 1e-6) -> dict[str, Any]:
    """Rotate the whole residual stream by orthogonal ``q`` (d x d); logits are unchanged.

    Refuses a model whose RMSNorm weights are not all 1 (run ``fuse_norms_`` first) and a ``q``
    that is not orthogonal within ``tol``. Returns a ledger with the rotation's entry.
    """
    a = get_adapter(model)
    q64 = check_orthogonal(q, a.hidden_size, "residual rotation", tol)
    require_unit_norms(a, "Rotating the residual stream")
    _rotate_ends_(a, q64, q64)
    for layer in a.layers:
        _rotate_block_(layer, q64)
    return {"op": "rotate_residual", "tied": a.tied, "rotations": [rotation_entry(q64, "Q")]}


@torch.no_grad()
def rotate_per_layer_(model: nn.Module, qs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Block ``l`` reads and writes in its own basis ``qs[l]``, with no transitions (in place).

    An *approximation* unless all the ``qs`` are equal: embeddings are written in ``qs[0]`` and
    the head reads ``qs[-1]``. Norm weights must be 1 (run ``fuse_norms_`` first); a tied head
    must be untied. Returns a ledger with the transition costs and every basis' entry.
    """
    a = get_adapter(model)
    if len(qs) != a.num_layers:
        raise GradfreeError(f"Give one basis per layer: {a.num_layers}, not {len(qs)}.")
    q64 = [check_orthogonal(q, a.hidden_size, f"basis of layer {i}") for i, q in enumerate(qs)]
    require_unit_norms(a, "Rotating the residual stream")
    _rotate_ends_(a, q64[0], q64[-1])
    for layer, q in zip(a.layers, q64, strict=True):
        _rotate_block_(layer, q)
    return {
        "op": "rotate_per_layer",
        "kind": "approximation",
        "transition_cost": transition_costs(q64),
        "rotations": [rotation_entry(q, "Q", i) for i, q in enumerate(q64)],
    }


@torch.no_grad()
def per_layer_rotation_error(
    model: nn.Module, qs: Sequence[torch.Tensor], input_ids: torch.Tensor
) -> dict[str, Any]:
    """What per-layer bases cost when the transitions between them are dropped.

    ``qs`` holds one orthogonal basis per block. A copy of ``model`` is norm-fused, its
    embeddings written in ``qs[0]``, block ``l`` reading and writing in ``qs[l]`` and the head
    reading ``qs[-1]``, with no transition matrices. ``model`` itself is not modified.
    Returns the transition costs and the logits error relative to the largest original logit.
    """
    a = get_adapter(model)
    if len(qs) != a.num_layers:
        raise GradfreeError(f"Give one basis per layer: {a.num_layers}, not {len(qs)}.")
    q64 = [check_orthogonal(q, a.hidden_size, f"basis of layer {i}") for i, q in enumerate(qs)]
    ref = model(input_ids).logits
    sim = copy.deepcopy(model)
    fuse_norms_(sim)
    rotate_per_layer_(sim, q64)
    diff = (sim(input_ids).logits - ref).to(torch.float64)
    ref64 = ref.to(torch.float64)
    return {
        "kind": "approximation",
        "transition_cost": transition_costs(q64),
        "relative_logits_error": float(diff.abs().max() / ref64.abs().max()),
        "relative_logits_error_fro": float(torch.linalg.norm(diff) / torch.linalg.norm(ref64)),
    }
