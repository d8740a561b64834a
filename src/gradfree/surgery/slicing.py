"""Slicing the residual stream to its leading ``k`` dimensions (SliceGPT, Ashkboos et al. 2024).

After norm fusion and a rotation whose leading columns span the stream (e.g. PCA of the
residual activations), the model is cut to hidden size ``k``: embedding columns, the input
columns of every reader (q, k, v, gate, up, head), the output rows of every writer (o, down) and
the norm weights. The result is a plain, smaller checkpoint of the same family.

RMSNorm averages over the hidden width, so the width enters the function. If the dropped
coordinates are zero, with ``S = Σ_{i<k} x_i²``::

    x_k / sqrt(S/d + eps) = sqrt(d/k) · x_k / sqrt(S/k + eps·d/k)

so the sliced model is *exact* with ``rms_norm_eps ← eps·d/k`` and every reader scaled by
``c = sqrt(d/k)`` (folded into the readers, so the norms stay at unit weight and the model can
be rotated again). The epsilon is one config field, shared in Qwen3 with the per-head
``q_norm``/``k_norm`` whose width (head_dim) does not change; those norms are scale-invariant
apart from epsilon (``n(c q; c² eps) = n(q; eps)``), so scaling the q and k projections (and
biases) by a further ``c`` makes them exact too. Where dropped coordinates are not zero the
slice is an approximation, and its error is the energy the rotation left outside ``k``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradfree.adapters import config_for_width, get_adapter, validate_config
from gradfree.base.errors import GradfreeError
from gradfree.surgery.edit import (
    all_norms,
    assign_,
    f64,
    norm_eps,
    param,
    require_unit_norms,
    residual_norms,
    scale_outputs_,
    select_inputs_,
    select_outputs_,
    set_norm_eps_,
)
from gradfree.surgery.fold import untie_
from gradfree.surgery.rotate import rotate_residual_


def _check_config(trial: Any) -> None:
    """Refuse, before touching any weight, a width (``trial``: the config as it would be after
    slicing) that transformers would not save or load.

    (transformers 5.23's LlamaConfig, for one, insists that hidden_size is a multiple of the
    number of attention heads even when head_dim is explicit.)
    """
    validate_config(trial, f"hidden_size {trial.hidden_size}")


def allowed_width(config: Any, k: int) -> bool:
    """Whether transformers accepts hidden size ``k`` for a model of ``config`` (see above)."""
    try:
        _check_config(config_for_width(config, k))
    except GradfreeError:
        return False
    return True


def nearest_allowed_width(config: Any, k: int) -> int:
    """The width closest to ``k`` (in 1..hidden_size) that the config allows; ties keep more."""
    d = int(config.hidden_size)
    k = min(max(int(k), 1), d)
    for off in range(d):
        for cand in (k + off, k - off):
            if 1 <= cand <= d and allowed_width(config, cand):
                return cand
    raise GradfreeError(f"transformers allows no hidden size between 1 and {d} for this model.")


@torch.no_grad()
def slice_(model: nn.Module, k: int, q: torch.Tensor | None = None) -> dict[str, Any]:
    """Shrink the residual stream of ``model`` to its first ``k`` coordinates, in place.

    ``q`` (optional, d x d orthogonal) is applied first with :func:`rotate_residual_`; its
    leading ``k`` columns are the kept basis. Norm weights must be 1 (run ``fuse_norms_``).
    A tied head is untied (the head is rescaled, the embeddings are not). The config
    records the new width and epsilon (:meth:`~gradfree.adapters.ModelAdapter.set_width_`;
    head_dim is written explicitly, as Llama/Qwen2 would otherwise derive it from the width).
    """
    a = get_adapter(model)
    d = a.hidden_size
    if not 0 < k <= d:
        raise GradfreeError(f"The sliced width must be between 1 and {d}, not {k}.")
    geometry = a.geometry  # read before hidden_size changes
    eps = a.norm_eps
    new_eps = eps * d / k
    _check_config(config_for_width(a.config, k, new_eps))
    if any(not math.isclose(norm_eps(n), eps, rel_tol=1e-6) for n in all_norms(a).values()):
        raise GradfreeError("Slicing needs every RMSNorm to use the config's rms_norm_eps.")
    ledger: dict[str, Any] = {"op": "slice", "from": d, "to": k}
    if q is not None:
        ledger["rotation"] = rotate_residual_(model, q)
    require_unit_norms(a, "Slicing the residual stream")
    ledger["untied"] = untie_(model)["untied"]
    c = math.sqrt(d / k)
    keep = torch.arange(k)

    select_inputs_(a.embed_tokens, keep)  # rows are tokens, columns the residual
    for layer in a.layers:
        for lin in (*layer.attn_inputs(), *layer.mlp_inputs()):
            select_inputs_(lin, keep, scale=c)
        # per-head norms see eps·d/k too: pre-scale what they normalise by c (see above)
        if layer.q_norm is not None:
            scale_outputs_(layer.q_proj, c)
        if layer.k_norm is not None:
            scale_outputs_(layer.k_proj, c)
        for lin in (layer.attn_output(), layer.mlp_output()):
            select_outputs_(lin, keep)
    select_inputs_(a.lm_head, keep, scale=c)
    for norm in residual_norms(a).values():
        assign_(norm, "weight", f64(param(norm))[:k])
    for norm in all_norms(a).values():
        set_norm_eps_(norm, new_eps)
    a.set_width_(k, new_eps)
    ledger.update({"reader_scale": c, "rms_norm_eps": new_eps, "head_dim": geometry.head_dim})
    return ledger
