"""Project a (norm-folded) teacher into the student's exact shape: W' = V_outᵀ W V_in.

Both models have unit RMSNorm weights (``fuse_norms_``). With r = Vᵀx and most of x's energy in
span(V), ‖r‖ ≈ ‖x‖, so rms_S(r) = ‖r‖/√d_S ≈ √(d_T/d_S)·rms_T(x) and

    n_S(r) ≈ √(d_S/d_T) · Vᵀ n_T(x).

A teacher reader computes W n_T(x) ≈ W V Vᵀ n_T(x) = √(d_T/d_S) · W V n_S(r): readers of the
normed stream (q, k, v, gate, up, LM head) get the factor c = √(d_T/d_S); biases do not (they are
added after the product). Writers (o, down) map their outputs by V_outᵀ; the embedding is E V.
The relation is exact when x lies in span(V) and the epsilons agree (eps_S = eps_T · d_T/d_S);
the planted test builds such a teacher.

Heads and neurons follow :mod:`.attention` and :mod:`.mlp`: q/k keep the selected RoPE pairs of
the mapped teacher head (q scaled by √(h_S/h_T), or Qwen3's q_norm weight when the head has a
q_norm, which would undo a scale of q), values are compressed by P_g, o reads through P_g, MLP
neurons are selected, ordered and sign-flipped. The result is a copy of the student's module
tree with the teacher's projected weights: same config, same parameter names.

With ``kv="reuse"`` (:mod:`.kv`) k_proj, v_proj, their biases and k_norm stay the student's (the
copy already holds them); each query head's rows and bias are turned by its group's R_g and o reads
the student's values through M_g. Qwen3's q_norm weight w acts after the rotation, and
diag(w') R ≠ R diag(w) unless w is equal on the two dims of each pair; one w' is shared by every
head, so it gets the least-squares diagonal of the R_g diag(w) R_gᵀ, averaged over the groups
(exact when every R_g = I, as on a planted pair). With ``head_rotation="dense"`` v_proj is
Pᵀ W_v (all groups mixed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from gradfree.adapters import HeadGeometry, LayerAdapter, get_adapter
from gradfree.base.numerics import f64
from gradfree.compress.attention import AttentionPlan
from gradfree.compress.bases import BasisSet
from gradfree.compress.mlp import MlpPlan
from gradfree.surgery.edit import assign_, maybe_param, param

_CHUNK = 8192


def _rows_times(w: torch.Tensor, m: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale · W M, computed in float64 a block of rows at a time, returned in ``dtype``."""
    out = torch.empty(w.shape[0], m.shape[1], dtype=dtype, device=w.device)
    mm = f64(m).to(w.device)
    for a in range(0, w.shape[0], _CHUNK):
        out[a : a + _CHUNK] = (scale * (f64(w[a : a + _CHUNK]) @ mm)).to(dtype)
    return out


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if maybe_param(module, name) is not None:
        assign_(module, name, value)


@torch.no_grad()
def project_teacher(
    teacher: nn.Module,
    student: nn.Module,
    bases: BasisSet,
    layer_map: Sequence[int],
    attn: Sequence[AttentionPlan],
    mlp: Sequence[MlpPlan],
) -> nn.Module:
    """A copy of ``student`` holding the teacher's weights projected into its shape."""
    t, s = get_adapter(teacher), get_adapter(student)
    out = copy.deepcopy(student)
    p = get_adapter(out)
    c = math.sqrt(t.hidden_size / s.hidden_size)
    dtype = param(s.embed_tokens).dtype
    assign_(p.embed_tokens, "weight", _rows_times(param(t.embed_tokens), bases.read(0), 1.0, dtype))
    assign_(p.lm_head, "weight", _rows_times(param(t.lm_head), bases.bases[-1], c, dtype))
    for j in range(s.num_layers):
        lt, lp = t.layer(layer_map[j]), p.layer(j)
        v_in, v_out = f64(bases.read(j)), f64(bases.write(j))
        _project_qo_(lp, lt, attn[j], c, v_in, v_out, s.geometry)
        if attn[j].kv != "reuse":  # reuse: the copy already holds the student's k/v and k_norm
            _project_kv_(lp, lt, attn[j], c, v_in)
        _project_mlp_(lp, [t.layer(i) for i in mlp[j].sources], mlp[j], c, v_in, v_out)
    return out


def _project_qo_(
    lp: LayerAdapter,
    lt: LayerAdapter,
    plan: AttentionPlan,
    c: float,
    v_in: torch.Tensor,
    v_out: torch.Tensor,
    gs: HeadGeometry,
) -> None:
    """Each matched teacher head's query rows (selected RoPE dims; turned by R_g when keys are
    reused) and o columns (reading the values through ``plan.values[g]``)."""
    ht, hs = plan.values[0].shape
    dims = plan.qk_dims
    reuse = plan.kv == "reuse"
    qk_norm = lt.q_norm is not None and lp.q_norm is not None
    q_scale = 1.0 if qk_norm else plan.q_scale  # a q_norm would undo a scale of q's rows
    wq, bq = f64(param(lt.q_proj)), maybe_param(lt.q_proj, "bias")
    wo = f64(param(lt.o_proj))
    q = torch.zeros(gs.q_dim, v_in.shape[1], dtype=torch.float64)
    qb = torch.zeros(gs.q_dim, dtype=torch.float64)
    o = torch.zeros(v_out.shape[1], gs.q_dim, dtype=torch.float64)
    for sh, th in enumerate(plan.head_map):
        if th < 0:
            continue  # no teacher head: zero output weights (see attention.py)
        rows, blk, g = th * ht + dims, slice(sh * hs, (sh + 1) * hs), gs.kv_group(sh)
        turn = plan.key_rotations[g] if reuse else torch.eye(hs, dtype=torch.float64)
        q[blk] = q_scale * c * turn @ wq[rows] @ v_in
        if bq is not None:
            qb[blk] = q_scale * turn @ f64(bq)[rows]
        o[:, blk] = v_out.T @ wo[:, th * ht : (th + 1) * ht] @ plan.values[g]
    assign_(lp.q_proj, "weight", q)
    assign_(lp.o_proj, "weight", o)
    _set(lp.q_proj, "bias", qb)
    bo = maybe_param(lt.o_proj, "bias")
    if bo is not None:
        _set(lp.o_proj, "bias", v_out.T @ f64(bo))
    if qk_norm and lt.q_norm is not None and lp.q_norm is not None:
        w = f64(param(lt.q_norm))[dims] * plan.q_scale
        if reuse:  # diag(R diag(w) Rᵀ) = (R∘R) w, averaged over the groups (module docstring)
            w = torch.stack([(r * r) @ w for r in plan.key_rotations]).mean(0)
        assign_(lp.q_norm, "weight", w)


def _project_kv_(
    lp: LayerAdapter, lt: LayerAdapter, plan: AttentionPlan, c: float, v_in: torch.Tensor
) -> None:
    """The teacher's k, v and k_norm in the student's head shape: k keeps the selected RoPE dims of
    every KV group, v is compressed by P_g per group or, dense, by one P over all groups."""
    ht, hs = plan.values[0].shape
    n_groups = len(plan.values)
    dims = plan.qk_dims
    wk, bk = f64(param(lt.k_proj)), maybe_param(lt.k_proj, "bias")
    wv, bv = f64(param(lt.v_proj)), maybe_param(lt.v_proj, "bias")
    k = torch.zeros(n_groups * hs, v_in.shape[1], dtype=torch.float64)
    kb = torch.zeros(n_groups * hs, dtype=torch.float64)
    v = torch.zeros_like(k)
    vb = torch.zeros_like(kb)
    for g in range(n_groups):
        rows, blk, tg = g * ht + dims, slice(g * hs, (g + 1) * hs), slice(g * ht, (g + 1) * ht)
        k[blk] = c * wk[rows] @ v_in
        if bk is not None:
            kb[blk] = f64(bk)[rows]
        if plan.dense_values is None:
            v[blk] = c * plan.values[g].T @ wv[tg] @ v_in
            if bv is not None:
                vb[blk] = plan.values[g].T @ f64(bv)[tg]
    if plan.dense_values is not None:
        p = f64(plan.dense_values)
        v = c * p.T @ wv @ v_in
        if bv is not None:
            vb = p.T @ f64(bv)
    assign_(lp.k_proj, "weight", k)
    assign_(lp.v_proj, "weight", v)
    _set(lp.k_proj, "bias", kb)
    _set(lp.v_proj, "bias", vb)
    if lt.k_norm is not None and lp.k_norm is not None:
        assign_(lp.k_norm, "weight", f64(param(lt.k_norm))[dims])


def _project_mlp_(
    lp: LayerAdapter,
    sources: Sequence[LayerAdapter],
    m: MlpPlan,
    c: float,
    v_in: torch.Tensor,
    v_out: torch.Tensor,
) -> None:
    """The teacher's selected, ordered and sign-flipped neurons, drawn from the neurons of the
    ``sources`` blocks laid end to end (one block unless the depth is folded)."""
    idx, sg = m.neurons, m.signs

    def rows(name: str, what: str) -> torch.Tensor | None:
        got = [maybe_param(getattr(lt, name), what) for lt in sources]
        if any(g is None for g in got):
            return None
        return torch.cat([f64(g) for g in got if g is not None], dim=0)

    gate, up = rows("gate_proj", "weight"), rows("up_proj", "weight")
    assert gate is not None and up is not None
    down = torch.cat([f64(param(lt.down_proj)) for lt in sources], dim=1)
    assign_(lp.gate_proj, "weight", c * gate[idx] @ v_in)
    assign_(lp.up_proj, "weight", c * sg[:, None] * up[idx] @ v_in)
    cols = down[:, idx].clone()
    if m.merged is not None:  # dropped neurons write through the kept neuron that predicts them
        dropped, slot, weight = m.merged
        cols.index_add_(1, slot, down[:, dropped] * weight[None, :])
    assign_(lp.down_proj, "weight", v_out.T @ cols * sg[None, :])
    for name, sign in (("gate", None), ("up", sg)):
        b = rows(f"{name}_proj", "bias")
        if b is not None:
            _set(getattr(lp, f"{name}_proj"), "bias", b[idx] * (sign if sign is not None else 1.0))
    bd = [maybe_param(lt.down_proj, "bias") for lt in sources]
    if all(b is not None for b in bd):  # every folded block adds its own output bias
        _set(lp.down_proj, "bias", v_out.T @ sum(f64(b) for b in bd if b is not None))
