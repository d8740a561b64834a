"""The two KV options of the head plan, from seed 000's "GQA-Aware Symmetry Strategies".

``kv="reuse"`` (KV-basis reuse: "freeze the student's KV basis and only rotate the Q projections
into that space"). The projected teacher keeps the student's k_proj, v_proj, k_norm and biases.

* Keys: per KV group g, the teacher's pre-RoPE keys on the kept RoPE pairs (``qk_dims``) are
  mapped onto the student's by the per-pair SO(2) rotation R_g of
  :func:`~gradfree.solvers.rope_pair_procrustes` (R_g k_T ≈ k_S), solved from the captured
  teacher×student ``k_pre`` cross-moment. ``k_pre`` is hooked on k_norm's output where the model
  has one (Qwen3), so these are the keys RoPE actually turns, k_norm weight included. R_g commutes
  with RoPE, so queries turned by the same R_g keep the teacher's scores: (R q)·(R k) = q·k at
  every position. The teacher's queries become R_g q_T for each query head of the group.
* Values: teacher head h (group g) writes O_h a_h with a_h a convex mix of v_T; o must read the
  student's values instead, through the least-squares prediction v_T ≈ M_g v_S,
  M_g = E[v_T v_Sᵀ](E[v_S v_Sᵀ] + δ)⁻¹ (un-centered: a_h is a convex mix of the v themselves, so a
  linear map of v carries over to a_h exactly; δ relative, as :func:`gradfree.base.numerics.damp`).
  Then o'_h = Vᵀ O_h M_g.

``head_rotation="dense"`` (the ablation of the per-group value compression): one PCA of all the
teacher's value dims (kv_dim_T → kv_dim_S), Procrustes-aligned to the student's whole value vector,
groups ignored: v' = Pᵀ v_T mixes groups. A query head of group g only attends with its own
group's keys, so its output can only read block g of the compressed values: o'_h = Vᵀ O_h
P[rows of g, cols of g]. That drops the off-diagonal blocks of P, which is the cost the ablation
measures (``dense_in_group`` = the share of ‖P‖² inside the diagonal blocks; 1 = no cost).

:func:`value_variance` reports, whatever the option, the share of the teacher's value second
moment that each compression keeps (block-diagonal: Σ_g top-h_S eigenvalues of Σ_gg; dense: top
kv_dim_S eigenvalues of Σ), divided by tr Σ; Procrustes alignment rotates within the span, so it
does not change these numbers.
"""

from __future__ import annotations

import torch

from gradfree.adapters import ModelAdapter
from gradfree.base.numerics import damp, sym_eigh
from gradfree.capture import Capture
from gradfree.solvers import (
    pca_basis,
    procrustes_from_cross,
    ridge_from_stats,
    rope_pair_procrustes,
)

# Relative damping of E[v_S v_Sᵀ] for M_g: it only guards invertibility (the fit uses every captured
# token of a h_S-dim group, so it needs no regularisation) and keeps planted pairs exact.
VALUE_DAMPING = 1e-6


def _moments(
    cap: Capture, site: str, j: int, tl: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_T, Σ_S, C = E[x_T x_Sᵀ]) of ``site``, un-centered (weights act on x itself)."""
    tkey, skey = f"blocks.{tl}.{site}", f"blocks.{j}.{site}"
    sig_t = cap.stats("teacher", tkey).second_moment()
    sig_s = cap.stats("student", skey).second_moment()
    return sig_t, sig_s, cap.cross(tkey, skey).cross_covariance(centered=False)


def _cosine(num: float, energy_a: float, energy_b: float) -> float:
    den = (energy_a * energy_b) ** 0.5
    return num / den if den > 0 else 0.0


def key_rotations(
    cap: Capture, t: ModelAdapter, s: ModelAdapter, j: int, tl: int, qk_dims: torch.Tensor
) -> tuple[list[torch.Tensor], list[float]]:
    """Per KV group: R_g (h_S×h_S, R_g k_T[qk_dims] ≈ k_S) and the cosine E⟨R_g k_T, k_S⟩ /
    sqrt(E‖k_T‖² E‖k_S‖²) over the kept dims (1 when the rotated teacher keys are the student's)."""
    ht, hs = t.geometry.head_dim, s.geometry.head_dim
    sig_t, sig_s, cross = _moments(cap, "k_pre", j, tl)
    rots, cos = [], []
    for g in range(t.geometry.num_kv_heads):
        rows, cols = g * ht + qk_dims.to(cross.device), slice(g * hs, (g + 1) * hs)
        c = cross[rows][:, cols]
        r = rope_pair_procrustes(c)  # row convention: k_Tᵀ R ≈ k_Sᵀ, so Rᵀ maps column vectors
        rots.append(r.T)
        num = float((r * c).sum())  # tr(Rᵀ C) = E⟨Rᵀ k_T, k_S⟩
        cos.append(
            _cosine(num, float(sig_t[rows][:, rows].trace()), float(sig_s[cols, cols].trace()))
        )
    return rots, cos


def student_value_maps(
    cap: Capture, t: ModelAdapter, s: ModelAdapter, j: int, tl: int
) -> tuple[list[torch.Tensor], list[float]]:
    """Per KV group: M_g (h_T×h_S, v_T ≈ M_g v_S) and the cosine of M_g v_S with v_T."""
    ht, hs = t.geometry.head_dim, s.geometry.head_dim
    sig_t, sig_s, cross = _moments(cap, "v", j, tl)
    maps, cos = [], []
    for g in range(t.geometry.num_kv_heads):
        tg, sg = slice(g * ht, (g + 1) * ht), slice(g * hs, (g + 1) * hs)
        ss, c = sig_s[sg, sg], cross[tg, sg]
        m = ridge_from_stats(damp(ss, VALUE_DAMPING), c.T)  # C (Σ_S + δ)⁻¹, by Cholesky
        maps.append(m)
        fit = float(((m @ ss) * m).sum())  # E‖M v_S‖²
        cos.append(_cosine(float((m * c).sum()), fit, float(sig_t[tg, tg].trace())))
    return maps, cos


def dense_values(
    cap: Capture, t: ModelAdapter, s: ModelAdapter, j: int, tl: int, align: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """(P (kv_T×kv_S), its diagonal blocks P[g, g] (what o reads), per-group cosines of
    (Pᵀ v_T)_g with v_S,g)."""
    ht, hs = t.geometry.head_dim, s.geometry.head_dim
    sig_t, sig_s, cross = _moments(cap, "v", j, tl)
    _, p = pca_basis(sig_t, s.geometry.kv_dim)
    if align:
        p = p @ procrustes_from_cross(p.T @ cross)
    blocks, cos = [], []
    for g in range(t.geometry.num_kv_heads):
        tg, sg = slice(g * ht, (g + 1) * ht), slice(g * hs, (g + 1) * hs)
        blocks.append(p[tg, sg])
        pg = p[:, sg]
        energy = float(((pg.T @ sig_t) * pg.T).sum())
        cos.append(_cosine(float((pg * cross[:, sg]).sum()), energy, float(sig_s[sg, sg].trace())))
    return p, blocks, cos


def value_variance(
    cap: Capture, t: ModelAdapter, s: ModelAdapter, tl: int, dense: torch.Tensor | None = None
) -> dict[str, float]:
    """Share of the teacher's value energy kept by the block-diagonal and the dense compression,
    and with a dense P the share of ‖P‖² inside the diagonal blocks (what o can read)."""
    ht, hs = t.geometry.head_dim, s.geometry.head_dim
    sig = cap.stats("teacher", f"blocks.{tl}.v").second_moment()
    total = float(sig.trace())
    if total <= 0:
        return {}
    block = 0.0
    for g in range(t.geometry.num_kv_heads):
        tg = slice(g * ht, (g + 1) * ht)
        block += float(sym_eigh(sig[tg, tg])[0][:hs].sum())
    out = {
        "block_diagonal": block / total,
        "dense": float(sym_eigh(sig)[0][: s.geometry.kv_dim].sum()) / total,
    }
    if dense is not None:
        inside = sum(
            float(dense[g * ht : (g + 1) * ht, g * hs : (g + 1) * hs].square().sum())
            for g in range(t.geometry.num_kv_heads)
        )
        out["dense_in_group"] = inside / float(dense.square().sum())
    return out
