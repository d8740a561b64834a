"""The LM-head ridge fit (seed 001 §8, §16.1.6): a new head for the student, fitted in closed
form from its final hidden states to the teacher's logits, and blended with the original head.

Teacher logits are linear in the teacher's final normed states h_t: y = W_t h_t. So with X the
student's final normed states (n×d_s) and Y = H_t W_tᵀ the teacher logits (n×V), the ridge
statistics need no logits at all: XᵀX is the student's raw second moment and XᵀY[:, c] =
(H_tᵀ X)ᵀ W_t[c]ᵀ, from the paired cross-moment that capture accumulates. The solve
W = (YᵀX + λ W_s)(XᵀX + λ I)⁻¹ shrinks toward the student's own head W_s and is done chunk by
chunk over the 151,936-row vocabulary (``solvers.iter_ridge_chunks``: one Cholesky factor, one
d_s×chunk right-hand side at a time), so no V×n or V×d_t float64 matrix ever exists. The
installed head is (1 − α) W_s + α W.

The fit is equivariant under a rotation of the student's stream (XQ gives WQ), so it composes
with the function-preserving rotations: fit once, install before the rotation, and the rotation
folds it like any other reader.
"""

from __future__ import annotations

from typing import Any

import torch

from gradfree.capture import CrossStats, MomentStats
from gradfree.solvers import iter_ridge_chunks


def fit_ridge_head(
    student_final: MomentStats,
    cross_final: CrossStats,
    teacher_head: torch.Tensor,
    student_head: torch.Tensor,
    *,
    rel_lambda: float = 1e-2,
    blend: float = 1.0,
    chunk: int = 8192,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(head V×d_s, info): the blended ridge head from raw statistics of the final normed states
    (``cross_final`` accumulated as teacher a × student b over the same tokens)."""
    if not student_final.full:
        raise ValueError("the student's final states need a full second moment")
    if cross_final.count != student_final.count:
        raise ValueError("the cross and student statistics must cover the same tokens")
    v, d_s = student_head.shape
    if teacher_head.shape[0] != v or teacher_head.shape[1] != cross_final.dim_a:
        raise ValueError("the teacher head does not match the vocabulary or the teacher width")
    xtx = student_final.m2
    cross_sx = cross_final.m_ab.T  # d_s×d_t: Σ x_s h_tᵀ
    dev = xtx.device
    w_t = teacher_head.detach()
    w_s = student_head.detach()

    def xty(start: int, stop: int) -> torch.Tensor:
        return cross_sx @ w_t[start:stop].to(dev, torch.float64).T

    def prior(start: int, stop: int) -> torch.Tensor:
        return w_s[start:stop].to(dev, torch.float64)

    out = torch.empty(v, d_s, dtype=dtype or student_head.dtype, device=student_head.device)
    change = 0.0
    base = 0.0
    for start, stop, w in iter_ridge_chunks(
        xtx, xty, v, prior=prior, chunk=chunk, rel_lam=rel_lambda
    ):
        p = prior(start, stop)
        blended = (1.0 - blend) * p + blend * w
        change += float(((blended - p) ** 2).sum())
        base += float((p**2).sum())
        out[start:stop] = blended.to(out.dtype).to(out.device)
    info = {
        "tokens": student_final.count,
        "rel_lambda": rel_lambda,
        "blend": blend,
        "chunk": chunk,
        "vocab": v,
        "relative_change": (change / base) ** 0.5 if base > 0 else 0.0,
    }
    return out, info
