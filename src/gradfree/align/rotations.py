"""Orthogonal bases that rotate the student's residual stream to the teacher's principal
coordinates (seed 001 §4: PCA to a shared k, optional whitening with ridge, Procrustes).

For a mapped layer pair l (student block j, teacher block map[j]) with centered covariances C_s,
C_t and cross-covariance C_ts, the teacher's top-k principal frame P_t (d_t×k) gives the teacher
coordinates t = x_t P_t. We look for an orthogonal Q (d_s×d_s) whose first k columns Q_k make the
student coordinates x_s Q_k match them: max tr(Q_kᵀ N), N = Σ_l w_l C_st^l P_t^l, the polar factor
of N (orthogonal Procrustes; Schönemann 1966). Summing over all layers gives *one* basis for the
whole stream, which folds into the weights exactly (``surgery.rotate_residual_``); summing over a
stage or one layer gives per-stage / per-layer bases, which without transitions are an
approximation.

When k < d_s the seed first projects the student onto its own top-k principal frame P_s: Q_k =
P_s polar(P_sᵀ N), and the remaining columns of Q are the student's lower principal directions.

Whitening (z-scoring in principal coordinates, ridge-damped) only changes *which* rotation is
chosen (it matches correlations instead of covariances): a non-orthogonal map of the residual
stream would not be function-preserving, so the applied map stays orthogonal. The layer weight
w_l = 1 / sqrt(tr C_s · tr(P_tᵀ C_t P_t)) makes every layer count alike (residual norms grow with
depth).

Pure maths over tensors: the statistics come from :mod:`gradfree.capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradfree.base.numerics import f64, sym_eigh
from gradfree.solvers import best_reflection_from_cross, pca_basis, procrustes_from_cross
from gradfree.solvers.procrustes import semi_orthogonal_map


@dataclass
class LayerMoments:
    """Centered statistics of one mapped layer pair (student j ↔ teacher i)."""

    name: str  # "blocks.3" or "final"
    student_layer: int | None
    teacher_layer: int | None
    c_s: torch.Tensor  # d_s×d_s
    c_t: torch.Tensor  # d_t×d_t
    c_ts: torch.Tensor  # d_t×d_s
    tokens: int

    def teacher_frame(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k eigenvalues, P_t d_t×k) of the teacher covariance."""
        return pca_basis(self.c_t, k)


@dataclass
class Target:
    """One layer's objective: N_l = C_st P_t (d_s×k), possibly whitened, and its traces."""

    n: torch.Tensor  # d_s×k, unweighted and unwhitened
    n_fit: torch.Tensor  # what the solve uses (weighted; whitened if asked)
    p_t: torch.Tensor  # d_t×k
    lam_t: torch.Tensor  # k
    tr_s: float  # tr C_s
    tr_t: float  # Σ top-k teacher eigenvalues


def _inv_sqrt_psd(c: torch.Tensor, ridge: float) -> torch.Tensor:
    vals, vecs = sym_eigh(c)
    shift = ridge * float(vals.mean())
    return (vecs / (vals + shift).clamp_min(1e-300).sqrt()) @ vecs.T


def make_target(m: LayerMoments, k: int, whiten: bool = False, ridge: float = 1e-3) -> Target:
    lam_t, p_t = m.teacher_frame(k)
    n = f64(m.c_ts).T @ p_t
    tr_s, tr_t = float(torch.trace(f64(m.c_s))), float(lam_t.sum())
    if whiten:
        z_t = (lam_t + ridge * float(lam_t.mean())).clamp_min(1e-300).rsqrt()
        n_fit = _inv_sqrt_psd(m.c_s, ridge) @ n * z_t / k
    else:
        n_fit = n / max(1e-300, (tr_s * tr_t) ** 0.5)
    return Target(n, n_fit, p_t, lam_t, tr_s, tr_t)


def solve_basis(
    targets: Sequence[Target], c_s_pooled: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q d_s×d_s orthogonal, singular values of the solved cross-moment) for the layers given.

    With ``c_s_pooled`` (and k < d_s), the student is first restricted to its top-k principal
    frame of that covariance.
    """
    n = sum((t.n_fit for t in targets), torch.zeros_like(targets[0].n_fit))
    d, k = n.shape
    if k == d or c_s_pooled is None:
        if k == d:
            q = procrustes_from_cross(n)
            return q, torch.linalg.svdvals(n)
        q_k = semi_orthogonal_map(n)
        return _complete(q_k), torch.linalg.svdvals(n)
    _, vecs = sym_eigh(c_s_pooled)
    p_s, rest = vecs[:, :k], vecs[:, k:]
    small = p_s.T @ n
    r = procrustes_from_cross(small)
    return torch.cat([p_s @ r, rest], dim=1), torch.linalg.svdvals(small)


def _complete(q_k: torch.Tensor) -> torch.Tensor:
    """An orthogonal d×d matrix whose first k columns are the orthonormal ``q_k``."""
    d, k = q_k.shape
    proj = torch.eye(d, dtype=q_k.dtype, device=q_k.device) - q_k @ q_k.T
    _, vecs = sym_eigh(proj)
    return torch.cat([q_k, vecs[:, : d - k]], dim=1)


def fit_cosine(t: Target, q: torch.Tensor, c_s: torch.Tensor) -> float:
    """Pooled centered cosine between student coordinates x_s Q_k and teacher ones x_t P_t:
    tr(Q_kᵀ N) / sqrt(tr(Q_kᵀ C_s Q_k) · tr(P_tᵀ C_t P_t)), from statistics."""
    k = t.n.shape[1]
    q_k = f64(q)[:, :k]
    num = float((q_k * t.n).sum())
    den = float(((f64(c_s) @ q_k) * q_k).sum()) * t.tr_t
    return num / den**0.5 if den > 0 else 0.0


def residual_ratio(t: Target, q: torch.Tensor, c_s: torch.Tensor) -> float:
    """RMS of (x_s Q_k − x_t P_t) over RMS of x_t P_t (centered), from statistics."""
    k = t.n.shape[1]
    q_k = f64(q)[:, :k]
    ss = float(((f64(c_s) @ q_k) * q_k).sum())
    err = ss + t.tr_t - 2.0 * float((q_k * t.n).sum())
    return max(err, 0.0) ** 0.5 / t.tr_t**0.5 if t.tr_t > 0 else 0.0


def stage_cross(targets: Sequence[Target], q: torch.Tensor) -> torch.Tensor:
    """M = Σ_l Qᵀ [N_l/scale_l | 0] (d_s×d_s): the cross-moment of (x_s Q, [x_t P_t, 0]) pooled
    over a stage with each layer normalised, the input of a Householder step."""
    d = q.shape[0]
    m = torch.zeros(d, d, dtype=torch.float64, device=q.device)
    for t in targets:
        k = t.n.shape[1]
        scale = max(1e-300, (t.tr_s * t.tr_t) ** 0.5)
        m[:, :k] += f64(q).T @ t.n / scale
    return m


def refine_stage(
    targets: Sequence[Target],
    c_s: Sequence[torch.Tensor],
    q: torch.Tensor,
    max_reflections: int,
    target: float,
) -> tuple[torch.Tensor, list[float], list[float]]:
    """Compose at most ``max_reflections`` optimal Householder reflections with ``q`` for one
    stage, stopping as soon as the stage's mean fit cosine reaches ``target``.

    Returns (Q H₁ H₂…, gains of the steps taken, mean cosine before and after each step).
    """

    def cos(qq: torch.Tensor) -> float:
        return sum(fit_cosine(t, qq, c) for t, c in zip(targets, c_s, strict=True)) / len(targets)

    cur = f64(q)
    gains: list[float] = []
    history = [cos(cur)]
    for _ in range(max_reflections):
        if history[-1] >= target:
            break
        h, gain = best_reflection_from_cross(stage_cross(targets, cur))
        if gain <= 0.0:
            break
        cur = cur @ h
        gains.append(gain)
        history.append(cos(cur))
    return cur, gains, history


def stages(n_layers: int, size: int) -> list[list[int]]:
    """Consecutive blocks tied into stages of ``size`` (the last may be shorter)."""
    return [list(range(s, min(s + size, n_layers))) for s in range(0, n_layers, size)]
