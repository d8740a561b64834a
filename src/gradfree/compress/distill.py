"""Closed-form layer-wise distillation of the student's reader linears toward the teacher.

For each reader (q/k/v rows of matched heads, gate, up) the ridge solution

    W = argmin ‖X̃_S Wᵀ − Y_T‖² + λ‖W − W_S‖²  =  (Y_TᵀX̃_S + λ W_S)(X̃_SᵀX̃_S + λI)⁻¹

with X̃_S the student's captured inputs (a constant feature appended: the bias is fitted too) and
Y_T = W'_T u the projected teacher's outputs on the teacher's own inputs (u as in
:mod:`.interpolate`), from the same statistics as the optimal α: E[x̃ x̃ᵀ] and E[x̃ ũᵀ] W'_Tᵀ.
:func:`gradfree.solvers.ridge_from_stats` does the solve; λ is relative to the mean of
diag(E[x̃ x̃ᵀ]). This is "activation-informed merging" at the granularity of output rows.

:func:`ridge_readers_` takes every block's inputs from one capture of the native student (one
pass); :func:`ridge_block_` fits one block from given moments, so that :mod:`.recapture` can fit
block by block from inputs recaptured through the blocks already fitted (``ridge_recapture``).
With ``kv="reuse"`` only the q rows are fitted: k/v are the student's on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.numerics import f64
from gradfree.capture import Capture
from gradfree.compress.attention import AttentionPlan
from gradfree.compress.bases import BasisSet
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
    from gradfree.compress.interpolate import _aug

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


Moments = tuple[torch.Tensor, torch.Tensor]  # (A, M) of :func:`.interpolate.reader_moments`


@torch.no_grad()
def ridge_block_(
    model: nn.Module,
    student: nn.Module,
    projected: nn.Module,
    j: int,
    attn: AttentionPlan,
    lam: float,
    *,
    attn_moments: Moments | None = None,
    mlp_moments: Moments | None = None,
) -> None:
    """Block j's ridge fits from given moments: q/k/v rows of matched heads from ``attn_moments``
    (attn_in), gate/up from ``mlp_moments`` (mlp_in); a part whose moments are None is left as is.

    Taking moments rather than a capture lets :mod:`.recapture` fit the attention and the MLP of
    one block from two different passes."""
    from gradfree.compress.interpolate import attn_group_rows

    mm, s, p = get_adapter(model), get_adapter(student), get_adapter(projected)
    lm, ls, lp = mm.layer(j), s.layer(j), p.layer(j)
    if attn_moments is not None:
        a, m = attn_moments
        for g in range(mm.geometry.num_kv_heads):
            qr, kr = attn_group_rows(mm, attn, g)
            if len(qr):
                _fit_rows_(lm.q_proj, ls.q_proj, lp.q_proj, a, m, lam, qr)
            if attn.kv != "reuse":  # reuse: k/v are the student's, nothing to fit
                _fit_rows_(lm.k_proj, ls.k_proj, lp.k_proj, a, m, lam, kr)
                _fit_rows_(lm.v_proj, ls.v_proj, lp.v_proj, a, m, lam, kr)
    if mlp_moments is not None:
        a, m = mlp_moments
        _fit_rows_(lm.gate_proj, ls.gate_proj, lp.gate_proj, a, m, lam)
        _fit_rows_(lm.up_proj, ls.up_proj, lp.up_proj, a, m, lam)


def block_moments(
    cap: Capture, site: str, j: int, teacher_layer: int, v_in: torch.Tensor, c: float
) -> Moments:
    """(A, M) of student block j's ``site`` (attn_in or mlp_in) paired with the teacher's block."""
    from gradfree.compress.interpolate import reader_moments

    return reader_moments(cap, f"blocks.{teacher_layer}.{site}", f"blocks.{j}.{site}", v_in, c)


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
    """Replace ``model``'s readers by their ridge fits (writers, embedding, head unchanged), every
    block from the one capture ``cap`` of the native student."""
    for j in range(get_adapter(model).num_layers):
        tl, v_in = layer_map[j], bases.read(j)
        ridge_block_(
            model,
            student,
            projected,
            j,
            attn[j],
            lam,
            attn_moments=block_moments(cap, "attn_in", j, tl, v_in, c),
            mlp_moments=block_moments(cap, "mlp_in", j, tl, v_in, c),
        )


def _target_moment(cap: Capture, tkey: str, v: torch.Tensor, c: float) -> torch.Tensor:
    """E[ũ ũᵀ] with the constant feature, u = Vᵀx_T/c (the teacher side of the reader loss)."""
    ts = cap.stats("teacher", tkey)
    vc = f64(v) / c
    d = vc.shape[1]
    u = torch.ones(d + 1, d + 1, dtype=torch.float64)
    u[:d, :d] = vc.T @ ts.second_moment() @ vc
    u[:d, d] = u[d, :d] = vc.T @ ts.mean()
    return u


@torch.no_grad()
def reader_errors(
    cap: Capture,
    model: nn.Module,
    projected: nn.Module,
    bases: BasisSet,
    layer_map: Sequence[int],
    attn: Sequence[AttentionPlan],
    c: float,
) -> list[dict[str, float]]:
    """Per block, the relative reader loss E‖W̃ x̃ − W'_T ũ‖² / E‖W'_T ũ‖² of ``model``'s
    attention (q rows of matched heads, k, v) and MLP (gate, up) readers, on the tokens of a
    paired capture of (teacher, ``model``) with attn_in and mlp_in: the objective the ridge fit
    minimises, measured where the model's own inputs are (e.g. on held-out documents)."""
    from gradfree.compress.interpolate import _aug, attn_group_rows

    mm, p = get_adapter(model), get_adapter(projected)
    out = []
    for j in range(mm.num_layers):
        tl, v_in = layer_map[j], bases.read(j)
        q_rows = torch.cat(
            [attn_group_rows(mm, attn[j], g)[0] for g in range(mm.geometry.num_kv_heads)]
        )
        row = {}
        for site, names in (
            ("attn_in", ("q_proj", "k_proj", "v_proj")),
            ("mlp_in", ("gate_proj", "up_proj")),
        ):
            a, m = block_moments(cap, site, j, tl, v_in, c)
            u = _target_moment(cap, f"blocks.{tl}.{site}", v_in, c)
            err = ref = 0.0
            for name in names:
                rows = q_rows if name == "q_proj" else None
                w = _aug(getattr(mm.layer(j), name), rows)
                wp = _aug(getattr(p.layer(j), name), rows)
                target = float(torch.trace(wp @ u @ wp.T))
                err += float(torch.trace(w @ a @ w.T) - 2 * torch.trace(w @ m @ wp.T)) + target
                ref += target
            row[site.removesuffix("_in")] = err / ref if ref > 0 else 0.0
        out.append(row)
    return out


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
