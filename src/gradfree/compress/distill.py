"""Closed-form layer-wise distillation of the student's reader linears toward the teacher.

For each reader (q/k/v rows of matched heads, gate, up) the ridge solution

    W = argmin ‖X̃_S Wᵀ − Y_T‖² + λ‖W − W_S‖²  =  (Y_TᵀX̃_S + λ W_S)(X̃_SᵀX̃_S + λI)⁻¹

with X̃_S the student's captured inputs (a constant feature appended: the bias is fitted too) and
Y_T = W'_T u the projected teacher's outputs on the teacher's own inputs (u as in
:mod:`.merge`), from the same statistics as the optimal α: E[x̃ x̃ᵀ] and E[x̃ ũᵀ] W'_Tᵀ.
:func:`gradfree.solvers.ridge_from_stats` does the solve; λ is relative to the mean of
diag(E[x̃ x̃ᵀ]). This is "activation-informed merging" at the granularity of output rows. Inputs
are the *student's* captured inputs, not recaptured through already-updated layers (one pass).
With ``kv="reuse"`` only the q rows are fitted: k/v are the student's on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.capture import Capture
from gradfree.compress.attention import AttentionPlan
from gradfree.compress.bases import BasisSet
from gradfree.numerics import f64
from gradfree.solvers import ridge_from_stats
from gradfree.surgery.edit import assign_, maybe_param, param


def _fit_rows_(
    dst: nn.Module,
    student: nn.Module,
    proj: nn.Module,
    a: torch.Tensor,
    m: torch.Tensor,
    lam: float,
    rows: torch.Tensor | None = None,
) -> None:
    from gradfree.compress.merge import _aug

    ws, wp = _aug(student, rows), _aug(proj, rows)
    w = ridge_from_stats(a, m @ wp.T, prior=ws, rel_lam=lam)  # out × (in + 1)
    full_w = f64(param(dst)).clone()
    idx = rows if rows is not None else torch.arange(full_w.shape[0])
    full_w[idx] = w[:, :-1]
    assign_(dst, "weight", full_w)
    b = maybe_param(dst, "bias")
    if b is not None:
        full_b = f64(b).clone()
        full_b[idx] = w[:, -1]
        assign_(dst, "bias", full_b)


@torch.no_grad()
def ridge_readers_(
    model: nn.Module,
    student: nn.Module,
    projected: nn.Module,
    cap: Capture,
    bases: BasisSet,
    layer_map: Sequence[int],
    attn: Sequence[AttentionPlan],
    c: float,
    lam: float,
) -> None:
    """Replace ``model``'s readers by their ridge fits (writers, embedding, head unchanged)."""
    from gradfree.compress.merge import attn_group_rows, reader_moments

    mm, s, p = get_adapter(model), get_adapter(student), get_adapter(projected)
    for j in range(mm.num_layers):
        lm, ls, lp = mm.layer(j), s.layer(j), p.layer(j)
        tl, v_in = layer_map[j], bases.read(j)
        a, m = reader_moments(cap, f"blocks.{tl}.attn_in", f"blocks.{j}.attn_in", v_in, c)
        for g in range(mm.geometry.num_kv_heads):
            qr, kr = attn_group_rows(mm, attn[j], g)
            if len(qr):
                _fit_rows_(lm.q_proj, ls.q_proj, lp.q_proj, a, m, lam, qr)
            if attn[j].kv != "reuse":  # reuse: k/v are the student's, nothing to fit
                _fit_rows_(lm.k_proj, ls.k_proj, lp.k_proj, a, m, lam, kr)
                _fit_rows_(lm.v_proj, ls.v_proj, lp.v_proj, a, m, lam, kr)
        a, m = reader_moments(cap, f"blocks.{tl}.mlp_in", f"blocks.{j}.mlp_in", v_in, c)
        _fit_rows_(lm.gate_proj, ls.gate_proj, lp.gate_proj, a, m, lam)
        _fit_rows_(lm.up_proj, ls.up_proj, lp.up_proj, a, m, lam)


@torch.no_grad()
def ridge_head_(
    model: nn.Module, student: nn.Module, teacher: nn.Module, cap: Capture, lam: float
) -> None:
    """LM head H = argmin ‖X_S Hᵀ − X_T H_Tᵀ‖² + λ‖H − H_S‖²: the student's final normed states
    X_S regressed onto the teacher's exact logits (no basis involved), from E[x_S x_Sᵀ] and the
    cross-moment E[x_S x_Tᵀ]; solved in row chunks (151,936 rows) by
    :func:`gradfree.solvers.ridge_from_stats_chunked`."""
    from gradfree.compress.head import ridge_head

    target = get_adapter(model).lm_head
    assign_(target, "weight", ridge_head(student, teacher, cap, lam, dtype=param(target).dtype))
