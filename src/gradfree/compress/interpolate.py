"""Merge the projected teacher with the student: W = α·W'_T + (1 − α)·W_S, α per block and KV group.

Both sides are in the same parametrisation (student norms folded too, teacher projected onto the
student's residual, head and neuron coordinates), so a convex combination is meaningful. α modes:

* ``uniform``: one α everywhere.
* ``alignment``: α = α_max · cosine, with the value-stream cosine of each KV group for attention,
  the block-input cosine for the MLP and the final-stream cosine for the embedding/head; 0 (keep
  the student) below ``threshold``.
* ``optimal``: the least-squares α of :func:`gradfree.solvers.optimal_alpha` for each block's
  readers (q/k/v rows of a KV group; gate/up) and the LM head: the α whose merged reader, fed the
  student's inputs X_S, best reproduces the projected teacher's outputs on the teacher's inputs,
  Y = W'_T u with u = Vᵀ n_T(x_T)/c (c = √(d_T/d_S), see :mod:`.project`). Biases are included by
  a constant feature. Only E[x̃ x̃ᵀ] and E[x̃ ũᵀ] are needed (student moments and the captured
  teacher×student cross-moment), so the LM head's 151,936 rows are processed in chunks. A writer
  (o, down) takes the α of its block's readers.

Student heads without a teacher head keep the student's weights (α = 0 for them). With
``kv="reuse"`` the projected teacher's k/v (and k_norm) are the student's, so they are not
interpolated at all (α = 0 for k/v: the student's bits are kept); α, optimal or not, is that of the
query rows, and the alignment α of a group uses the weaker of its value and key cosines.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradfree.adapters import ModelAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import f64
from gradfree.capture import Capture
from gradfree.compress.attention import AttentionPlan
from gradfree.compress.bases import BasisSet
from gradfree.surgery.edit import assign_, maybe_param, param

_CHUNK = 8192


@dataclass
class AlphaPlan:
    """α for every block (``attn[j][g]`` per KV group, ``mlp[j]``), the embedding and the head."""

    mode: str
    attn: list[list[float]]
    mlp: list[float]
    embed: float
    head: float
    certainty: list[float] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "attn": [[round(a, 4) for a in row] for row in self.attn],
            "mlp": [round(a, 4) for a in self.mlp],
            "embed": round(self.embed, 4),
            "head": round(self.head, 4),
        }


def reader_moments(
    cap: Capture, tkey: str, skey: str, v: torch.Tensor, c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, M) with a constant feature appended: A = E[x̃_S x̃_Sᵀ], M = E[x̃_S ũᵀ], u = Vᵀx_T/c."""
    ss = cap.stats("student", skey)
    cr = cap.cross(tkey, skey)
    d = ss.dim
    a = torch.ones(d + 1, d + 1, dtype=torch.float64)
    a[:d, :d] = ss.second_moment()
    a[:d, d] = a[d, :d] = ss.mean()
    cross = cr.m_ab / cr.count  # E[x_T x_Sᵀ], d_T × d_S
    mean_u = (f64(v).T @ (cr.sum_a / cr.count)) / c
    m = torch.ones(d + 1, d + 1, dtype=torch.float64)
    m[:d, :d] = cross.T @ f64(v) / c
    m[:d, d] = cr.sum_b / cr.count
    m[d, :d] = mean_u
    return a, m


def alpha_terms(
    a: torch.Tensor, m: torch.Tensor, w_s: torch.Tensor, w_p: torch.Tensor
) -> tuple[float, float]:
    """(num, den) of α* = num/den for ‖X̃ (α W_p + (1−α) W_s)ᵀ − Y‖² with XᵀY = M W_pᵀ.

    The same formula as :func:`gradfree.solvers.optimal_alpha` (tr(D(XᵀY − XᵀX W_sᵀ)) over
    tr(D XᵀX Dᵀ)), computed in row chunks without forming XᵀY, so that an LM head fits."""
    num = den = 0.0
    for r in range(0, w_s.shape[0], _CHUNK):
        ws, wp = f64(w_s[r : r + _CHUNK]), f64(w_p[r : r + _CHUNK])
        d = wp - ws
        num += float((d * (wp @ m.T - ws @ a)).sum())
        den += float(((d @ a) * d).sum())
    return num, den


def _clip_alpha(num: float, den: float) -> float:
    return 0.0 if den <= 0 else min(1.0, max(0.0, num / den))


def _aug(lin: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    w = f64(param(lin))
    b = maybe_param(lin, "bias")
    col = f64(b)[:, None] if b is not None else torch.zeros(w.shape[0], 1, dtype=torch.float64)
    out = torch.cat([w, col], dim=1)
    return out if rows is None else out[rows]


def attn_group_rows(
    s: ModelAdapter, plan: AttentionPlan, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q rows of the matched student heads of group g, k/v rows of group g)."""
    hs = s.geometry.head_dim
    heads = [h for h in s.geometry.heads_in_group(g) if plan.head_map[h] >= 0]
    blocks = [torch.arange(h * hs, (h + 1) * hs) for h in heads]
    q = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.int64)
    return q, torch.arange(g * hs, (g + 1) * hs)


def optimal_plan(
    cap: Capture,
    student: nn.Module,
    projected: nn.Module,
    bases: BasisSet,
    layer_map: Sequence[int],
    attn: Sequence[AttentionPlan],
    c: float,
) -> AlphaPlan:
    """Closed-form α per block, KV group and for the head (see the module docstring)."""
    s, p = get_adapter(student), get_adapter(projected)
    a_attn: list[list[float]] = []
    a_mlp: list[float] = []
    for j in range(s.num_layers):
        ls, lp = s.layer(j), p.layer(j)
        tl = layer_map[j]
        v_in = bases.read(j)
        a, m = reader_moments(cap, f"blocks.{tl}.attn_in", f"blocks.{j}.attn_in", v_in, c)
        row = []
        for g in range(s.geometry.num_kv_heads):
            qr, kr = attn_group_rows(s, attn[j], g)
            num = den = 0.0
            readers = [(ls.q_proj, lp.q_proj, qr)]
            if attn[j].kv != "reuse":
                readers += [(ls.k_proj, lp.k_proj, kr), (ls.v_proj, lp.v_proj, kr)]
            for lin_s, lin_p, rows in readers:
                n_, d_ = alpha_terms(a, m, _aug(lin_s, rows), _aug(lin_p, rows))
                num, den = num + n_, den + d_
            row.append(_clip_alpha(num, den))
        a_attn.append(row)
        a, m = reader_moments(cap, f"blocks.{tl}.mlp_in", f"blocks.{j}.mlp_in", v_in, c)
        num = den = 0.0
        for lin_s, lin_p in ((ls.gate_proj, lp.gate_proj), (ls.up_proj, lp.up_proj)):
            n_, d_ = alpha_terms(a, m, _aug(lin_s), _aug(lin_p))
            num, den = num + n_, den + d_
        a_mlp.append(_clip_alpha(num, den))
    a, m = reader_moments(cap, "final.normed", "final.normed", bases.bases[-1], c)
    head = _clip_alpha(*alpha_terms(a, m, _aug(s.lm_head), _aug(p.lm_head)))
    return AlphaPlan("optimal", a_attn, a_mlp, head, head)


def alignment_plan(
    n_layers: int,
    attn: Sequence[AttentionPlan],
    diagnostics: Sequence[dict[str, Any]],
    alpha: float,
    threshold: float,
) -> AlphaPlan:
    """α = alpha · cosine, 0 below ``threshold`` (attention: each group's certainty)."""

    def f(cos: float) -> float:
        return alpha * max(cos, 0.0) if cos >= threshold else 0.0

    a_attn = [[f(cv) for cv in attn[j].group_certainty()] for j in range(n_layers)]
    a_mlp = [f(diagnostics[j]["alignment_cosine"]) for j in range(n_layers)]
    head = f(diagnostics[-1]["alignment_cosine"])
    return AlphaPlan("alignment", a_attn, a_mlp, head, head)


def uniform_plan(n_layers: int, n_groups: int, alpha: float, mode: str = "uniform") -> AlphaPlan:
    return AlphaPlan(
        mode, [[alpha] * n_groups for _ in range(n_layers)], [alpha] * n_layers, alpha, alpha
    )


def restrict_plan(plan: AlphaPlan, layers: Sequence[int]) -> AlphaPlan:
    """The plan with α = 0 (the student's weights) outside ``layers``, embedding and head too."""
    keep = set(layers)
    if any(j >= len(plan.mlp) for j in keep):
        raise GradfreeError(f"merge_layers names a block past the student's {len(plan.mlp)}.")
    return AlphaPlan(
        plan.mode,
        [row if j in keep else [0.0] * len(row) for j, row in enumerate(plan.attn)],
        [a if j in keep else 0.0 for j, a in enumerate(plan.mlp)],
        0.0,
        0.0,
        plan.certainty,
    )


def _lerp_(
    dst: nn.Module,
    src: nn.Module,
    alpha: float,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> None:
    """dst ← α·src + (1−α)·dst on all entries, or on a block of rows (weight, bias) / columns."""
    for name in ("weight", "bias"):
        d, s = maybe_param(dst, name), maybe_param(src, name)
        if d is None or s is None:
            continue
        if cols is not None and name == "bias":
            continue
        if rows is None and cols is None:  # in place, a block of rows at a time (embeddings)
            for r in range(0, d.shape[0], _CHUNK):
                blk = f64(d[r : r + _CHUNK])
                d[r : r + _CHUNK] = (alpha * f64(s[r : r + _CHUNK]) + (1 - alpha) * blk).to(d.dtype)
            continue
        full = f64(d).clone()
        sv = f64(s)
        if rows is not None:
            full[rows] = alpha * sv[rows] + (1 - alpha) * full[rows]
        elif cols is not None:
            full[:, cols] = alpha * sv[:, cols] + (1 - alpha) * full[:, cols]
        else:
            full = alpha * sv + (1 - alpha) * full
        assign_(dst, name, full)


@torch.no_grad()
def interpolate_models(
    student: nn.Module, projected: nn.Module, plan: AlphaPlan, attn: Sequence[AttentionPlan]
) -> nn.Module:
    """A new model: the student's copy with every weight interpolated toward ``projected``."""
    out = copy.deepcopy(student)
    m, p = get_adapter(out), get_adapter(projected)
    _lerp_(m.embed_tokens, p.embed_tokens, plan.embed)
    _lerp_(m.lm_head, p.lm_head, plan.head)
    for j in range(m.num_layers):
        lm, lp = m.layer(j), p.layer(j)
        reuse = attn[j].kv == "reuse"
        for g in range(m.geometry.num_kv_heads):
            a = plan.attn[j][g]
            qr, kr = attn_group_rows(m, attn[j], g)
            _lerp_(lm.q_proj, lp.q_proj, a, rows=qr)
            if not reuse:  # reuse: the student's k/v stay bit for bit (no float64 round trip)
                _lerp_(lm.k_proj, lp.k_proj, a, rows=kr)
                _lerp_(lm.v_proj, lp.v_proj, a, rows=kr)
            _lerp_(lm.o_proj, lp.o_proj, a, cols=qr)
        mean_a = sum(plan.attn[j]) / len(plan.attn[j])
        for name in ("q_norm",) if reuse else ("q_norm", "k_norm"):
            nm, np_ = getattr(lm, name), getattr(lp, name)
            if nm is not None and np_ is not None:
                _lerp_(nm, np_, mean_a)
        for lin in ("gate_proj", "up_proj", "down_proj"):
            _lerp_(getattr(lm, lin), getattr(lp, lin), plan.mlp[j])
    return out


def scale_factor(teacher: ModelAdapter, student: ModelAdapter) -> float:
    return math.sqrt(teacher.hidden_size / student.hidden_size)
