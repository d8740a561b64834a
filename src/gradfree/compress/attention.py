"""KV-group-aware head plans: which teacher head feeds which student head, which RoPE frequency
pairs a reduced query/key head keeps, and the per-KV-head value compression.

* KV groups are kept: teacher group g feeds student group g (both models must have the same
  number of KV heads, as Qwen3-32B/4B (8/8) and Qwen2.5-Coder-1.5B/0.5B (2/2) do).
* Head importance = output energy E‖O_h a_h‖² = tr(O_h Σ_hh O_hᵀ), from the teacher's captured
  ``attn_heads`` second moment. Within each group the top-k teacher heads are kept (k = the
  smaller group size) and matched to the student's heads by Hungarian assignment on the
  similarity of their residual-stream outputs, E⟨Vᵀ O_h a_h, O_s a_s⟩ / sqrt(E_h E_s), from the
  teacher×student ``attn_heads`` cross-moment.
* A student head left without a teacher head (Qwen2.5 pair: 7 student vs 6 teacher heads per
  group) gets zero output weights in the projected teacher, so the projected teacher computes the
  teacher's function; in a merge it keeps the student's own head (its α is 0): the teacher has
  nothing to say about it.
* RoPE: in HF's rotate-half layout pair i of a head of dim h is (i, i + h/2) and turns at
  θ^(−2i/h). A student head of dim h_S keeps, for each of its pairs, the teacher pair with the
  nearest frequency (Hungarian on |log f_T − log f_S|): for equal θ and h_T = 2 h_S that is
  exactly the teacher's even pairs. Scores are q·k/√h, so q is scaled by √(h_S/h_T) (exact when
  the dropped pairs contribute nothing to the logits).
* Values: per KV head the top-h_S principal directions P_g of the teacher's values; a is a convex
  mix of values, so O_h P_g P_gᵀ a_h is exact on span(P_g). With ``value_align`` P_g is rotated by
  Procrustes onto the student's value coordinates (needed for merging).
* ``kv="reuse"`` (student keys/values kept, queries turned into the student's key coordinates)
  and ``head_rotation="dense"`` (one value PCA over all groups) are in :mod:`.kv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from gradfree.adapters import LayerAdapter, ModelAdapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import f64
from gradfree.capture import Capture
from gradfree.compress.kv import dense_values, key_rotations, student_value_maps, value_variance
from gradfree.solvers import hungarian, pca_basis, procrustes_from_cross


@dataclass
class AttentionPlan:
    """Head map of one student block: ``head_map[s]`` = teacher head feeding student head s
    (−1: none), ``qk_dims`` teacher in-head dims per student dim, ``values[g]`` (h_T×h_S): what o
    of a group-g teacher head reads the student-shaped values through (P_g, the dense P's block
    g, or with ``kv="reuse"`` the map M_g of the student's values onto the teacher's).
    ``key_rotations[g]`` (``kv="reuse"`` only): R_g with R_g k_T[qk_dims] ≈ k_S; ``dense_values``
    (``head_rotation="dense"`` only): P (kv_dim_T×kv_dim_S)."""

    teacher_layer: int
    head_map: list[int]
    qk_dims: torch.Tensor
    q_scale: float
    values: list[torch.Tensor]
    importance: list[float]
    similarity: list[float]
    value_alignment: list[float] = field(default_factory=list)
    kv: str = "rotate"
    head_rotation: str = "block_diagonal"
    key_rotations: list[torch.Tensor] = field(default_factory=list)
    key_alignment: list[float] = field(default_factory=list)
    dense_values: torch.Tensor | None = None
    value_variance: dict[str, float] = field(default_factory=dict)

    def group_certainty(self) -> list[float]:
        """Per KV group, the weakest of its value (and, with reused keys, key) cosines."""
        if not self.key_alignment:
            return list(self.value_alignment)
        return [min(v, k) for v, k in zip(self.value_alignment, self.key_alignment, strict=True)]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "teacher_layer": self.teacher_layer,
            "head_map": self.head_map,
            "q_scale": self.q_scale,
            "kv": self.kv,
            "head_rotation": self.head_rotation,
            "head_similarity": [round(s, 4) for s in self.similarity],
            "value_alignment": [round(s, 4) for s in self.value_alignment],
            "value_variance": {k: round(v, 4) for k, v in self.value_variance.items()},
        }
        if self.key_alignment:
            out["key_alignment"] = [round(s, 4) for s in self.key_alignment]
        return out


def check_geometry(t: ModelAdapter, s: ModelAdapter) -> None:
    gt, gs = t.geometry, s.geometry
    if gt.num_kv_heads != gs.num_kv_heads:
        raise GradfreeError(
            f"The teacher has {gt.num_kv_heads} KV heads and the student {gs.num_kv_heads}; "
            "compression keeps KV groups, so they must be equal."
        )
    if gs.head_dim > gt.head_dim:
        raise GradfreeError(
            f"The student's head_dim {gs.head_dim} exceeds the teacher's {gt.head_dim}."
        )
    for a, who in ((t, "teacher"), (s, "student")):
        if a.rope.rotary_dim != a.geometry.head_dim:
            raise GradfreeError(f"The {who} uses partial rotary embeddings, not supported.")


def rope_pairs(t: ModelAdapter, s: ModelAdapter) -> tuple[torch.Tensor, float]:
    """Teacher in-head dims (length h_S) for the student's dims, and the largest |log f| gap."""
    ht, hs = t.geometry.head_dim, s.geometry.head_dim
    ft, fs = t.rope.inv_freq().log(), s.rope.inv_freq().log()
    cost = (fs[:, None] - ft[None, :]).abs()
    pairs = hungarian(cost, maximize=False)  # student pair i -> teacher pair pairs[i]
    pairs, _ = torch.sort(pairs)  # frequencies are monotone in i; keep the order
    gap = float(cost[torch.arange(hs // 2), pairs].max())
    return torch.cat([pairs, pairs + ht // 2]), gap


def _head_block(w: torch.Tensor, h: int, hd: int) -> torch.Tensor:
    return w[:, h * hd : (h + 1) * hd]


def plan_attention(
    cap: Capture,
    t: ModelAdapter,
    s: ModelAdapter,
    j: int,
    tl: int,
    v_out: torch.Tensor,
    qk_dims: torch.Tensor,
    *,
    select: str = "importance",
    match: str = "hungarian",
    value_align: bool = True,
    kv: str = "rotate",
    head_rotation: str = "block_diagonal",
) -> AttentionPlan:
    """The head plan of student block ``j`` fed by teacher block ``tl``."""
    gt, gs = t.geometry, s.geometry
    lt, ls = t.layer(tl), s.layer(j)
    tkey, skey = f"blocks.{tl}.attn_heads", f"blocks.{j}.attn_heads"
    sig_t = cap.stats("teacher", tkey).second_moment()
    sig_s = cap.stats("student", skey).second_moment()
    cross = cap.cross(tkey, skey).cross_covariance(centered=False)
    o_t = v_out.T @ f64(lt.o_proj.weight)  # d_S × q_dim_T: teacher heads' writes, projected
    o_s = f64(ls.o_proj.weight)
    ht, hs = gt.head_dim, gs.head_dim

    def energy(o: torch.Tensor, sig: torch.Tensor, h: int, hd: int) -> float:
        ob, sb = _head_block(o, h, hd), sig[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd]
        return float(((ob @ sb) * ob).sum())

    imp_t = [energy(o_t, sig_t, h, ht) for h in range(gt.num_heads)]
    imp_s = [energy(o_s, sig_s, h, hs) for h in range(gs.num_heads)]
    head_map = [-1] * gs.num_heads
    sims = [0.0] * gs.num_heads
    for g in range(gt.num_kv_heads):
        th = list(gt.heads_in_group(g))
        sh = list(gs.heads_in_group(g))
        k = min(len(th), len(sh))
        chosen = sorted(th, key=lambda h: -imp_t[h])[:k] if select == "importance" else th[:k]
        sim = torch.zeros(k, len(sh), dtype=torch.float64)
        for a, h in enumerate(chosen):
            left = _head_block(o_t, h, ht) @ cross[h * ht : (h + 1) * ht]  # d_S × q_dim_S
            for b, sidx in enumerate(sh):
                val = float((_head_block(left, sidx, hs) * _head_block(o_s, sidx, hs)).sum())
                sim[a, b] = val / math.sqrt(max(imp_t[h] * imp_s[sidx], 1e-300))
        cols = hungarian(sim).tolist() if match == "hungarian" else list(range(k))
        for a, c in enumerate(cols):
            head_map[sh[c]] = chosen[a]
            sims[sh[c]] = float(sim[a, c])
    rots: list[torch.Tensor] = []
    k_align: list[float] = []
    dense = None
    if kv == "reuse":
        rots, k_align = key_rotations(cap, t, s, j, tl, qk_dims)
        values, v_align = student_value_maps(cap, t, s, j, tl)
    elif head_rotation == "dense":
        dense, values, v_align = dense_values(cap, t, s, j, tl, align=value_align)
    else:
        values, v_align = value_bases(cap, t, s, j, tl, align=value_align)
    return AttentionPlan(
        tl,
        head_map,
        qk_dims,
        math.sqrt(hs / ht),
        values,
        imp_t,
        sims,
        v_align,
        kv=kv,
        head_rotation=head_rotation,
        key_rotations=rots,
        key_alignment=k_align,
        dense_values=dense,
        value_variance=value_variance(cap, t, s, tl, dense),
    )


def value_bases(
    cap: Capture, t: ModelAdapter, s: ModelAdapter, j: int, tl: int, align: bool = True
) -> tuple[list[torch.Tensor], list[float]]:
    """Per KV head: P_g (h_T×h_S) and the alignment cosine of P_gᵀ v_T with the student's v."""
    ht, hs = t.geometry.head_dim, s.geometry.head_dim
    tkey, skey = f"blocks.{tl}.v", f"blocks.{j}.v"
    sig_t = cap.stats("teacher", tkey).second_moment()
    sig_s = cap.stats("student", skey).second_moment()
    cross = cap.cross(tkey, skey).cross_covariance(centered=False)
    out, cos = [], []
    for g in range(t.geometry.num_kv_heads):
        st = sig_t[g * ht : (g + 1) * ht, g * ht : (g + 1) * ht]
        ss = sig_s[g * hs : (g + 1) * hs, g * hs : (g + 1) * hs]
        c = cross[g * ht : (g + 1) * ht, g * hs : (g + 1) * hs]
        _, p = pca_basis(st, hs)
        if align:
            p = p @ procrustes_from_cross(p.T @ c)
        num = float((p * c).sum())
        den = float(((p.T @ st) * p.T).sum() * torch.trace(ss)) ** 0.5
        out.append(p)
        cos.append(num / den if den > 0 else 0.0)
    return out, cos


def head_rows(layer: LayerAdapter, head: int, hd: int, dims: torch.Tensor) -> torch.Tensor:
    """Row indices of head ``head``'s selected in-head ``dims`` in a q/k projection."""
    return head * hd + dims
