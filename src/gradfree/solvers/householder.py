"""Householder reflections as a closed-form correction of an orthogonal map (seed 001, §7).

A Householder reflection (Householder 1958) H = I − 2 w wᵀ (‖w‖ = 1) is orthogonal and symmetric.
Seed 001 refines per-layer rotations "with at most one or two reflections per stage, solved in
closed form". For the residual error of an orthogonal map this has an exact answer: with
M = AᵀB and S = (M + Mᵀ)/2,

    ‖A H − B‖_F² = ‖A − B‖_F² + 4 wᵀ S w,

so the best single reflection takes w = the eigenvector of the smallest eigenvalue λ_min of S, and
it lowers the error (by −4 λ_min) iff λ_min < 0. Consequently no reflection can improve an
unconstrained Procrustes solution (there M = V Σ Vᵀ is PSD); reflections only help a map that was
constrained, e.g. one rotation tied across a stage of layers, a block-diagonal (per-tier or
per-KV-group) rotation, or a map lifted from a PCA subspace, applied to one layer's data.

Seed 001's own heuristic ("normalised difference": the reflection taking the mean of A's rows to
the direction of the mean of B's rows) is available as ``method="mean"`` for comparison; like the
optimal one it is returned only if it does not increase the error, otherwise the identity is.
"""

from __future__ import annotations

from typing import Literal

import torch

from gradfree.base.numerics import f64, fix_signs


def _eye(d: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64, device=like.device)


def householder_from_vectors(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """H = I − 2 w wᵀ with w = (û − v̂)/‖û − v̂‖, so that H û = v̂ (û, v̂ the unit vectors).

    If û = v̂ (to ``eps``) no reflection is needed and the identity is returned.
    """
    if u.ndim != 1 or u.shape != v.shape:
        raise ValueError(f"u and v must be vectors of equal length: {tuple(u.shape)}, {v.shape}")
    u64, v64 = f64(u), f64(v)
    nu, nv = torch.linalg.vector_norm(u64), torch.linalg.vector_norm(v64)
    if nu == 0 or nv == 0:
        raise ValueError("cannot reflect a zero vector")
    diff = u64 / nu - v64 / nv
    nd = torch.linalg.vector_norm(diff)
    if nd < eps:
        return _eye(u.shape[0], u64)
    w = diff / nd
    return _eye(u.shape[0], u64) - 2.0 * torch.outer(w, w)


def reflection_gain(m: torch.Tensor, h: torch.Tensor) -> float:
    """‖A − B‖_F² − ‖A H − B‖_F² for an orthogonal H and M = AᵀB: 2 tr((H − I) M)."""
    h64, m64 = f64(h), f64(m)
    return 2.0 * float(((h64 - _eye(h64.shape[0], h64)) * m64.T).sum())


def best_reflection_from_cross(m: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(H, gain): the single reflection minimising ‖A H − B‖_F² given only M = AᵀB (d×d), and the
    reduction of the squared error. Identity and 0.0 when no reflection helps."""
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"M must be square, got {tuple(m.shape)}")
    m64 = f64(m)
    # numerics.sym_eigh clips eigenvalues at 0 (it is for PSD matrices); sym(M) is indefinite and
    # its negative end is what matters here, so use eigh directly (float64, ascending order).
    vals, vecs = torch.linalg.eigh(0.5 * (m64 + m64.T))
    lam_min, w = float(vals[0]), fix_signs(vecs[:, :1])[:, 0]
    if lam_min >= 0.0:
        return _eye(m.shape[0], m), 0.0
    return _eye(m.shape[0], m) - 2.0 * torch.outer(w, w), -4.0 * lam_min


def best_reflection(
    a: torch.Tensor, b: torch.Tensor, method: Literal["optimal", "mean"] = "optimal"
) -> torch.Tensor:
    """A reflection H (d×d) with ‖A H − B‖_F <= ‖A − B‖_F for A, B of shape (n, d).

    ``optimal``: the best single reflection (exact, see the module docstring). ``mean``: seed
    001's heuristic, the reflection mapping the direction of mean(A) to that of mean(B). Either
    way the identity is returned if the reflection would increase the error.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"A and B must be (n, d) of equal shape: {tuple(a.shape)}, {b.shape}")
    a64, b64 = f64(a), f64(b)
    m = a64.T @ b64
    if method == "optimal":
        return best_reflection_from_cross(m)[0]
    if method != "mean":
        raise ValueError(f"unknown method {method!r}; use 'optimal' or 'mean'")
    h = householder_from_vectors(a64.mean(0), b64.mean(0))
    return h if reflection_gain(m, h) >= 0.0 else _eye(m.shape[0], m)


def refine_with_reflections(
    m: torch.Tensor, max_steps: int = 2
) -> tuple[torch.Tensor, list[float]]:
    """Greedily compose up to ``max_steps`` optimal reflections: (Q = H₁ H₂ …, gains per step).

    Apply as A Q. After H₁ the cross-moment of (A H₁, B) is H₁ M, so each step re-solves on it.
    Stops early when no reflection reduces the error.
    """
    m64 = f64(m)
    q = _eye(m64.shape[0], m64)
    gains: list[float] = []
    for _ in range(max_steps):
        h, gain = best_reflection_from_cross(m64)
        if gain <= 0.0:
            break
        q, m64 = q @ h, h @ m64
        gains.append(gain)
    return q, gains
