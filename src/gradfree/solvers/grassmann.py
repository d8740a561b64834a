"""Comparing and blending per-layer orthonormal bases (Grassmann geometry).

``transition_cost`` (``transition_costs`` along a stack of layers) is seed 000's check that
consecutive per-layer bases agree: the transition matrix T = V_bᵀ V_a between two bases is the
identity when they coincide column by column.

``geodesic_average`` blends two k-dimensional subspaces along the Grassmann geodesic (Edelman,
Arias & Smith 1998, "The geometry of algorithms with orthogonality constraints"; Absil, Mahony &
Sepulchre 2004): with V1ᵀ V2 = U cos(Θ) Wᵀ (principal angles Θ), the subspace at t is spanned by
V1 U cos(tΘ) + Q sin(tΘ), Q = (V2 W − V1 U cos Θ) sin(Θ)⁻¹. Seed 000 asks for this to blend
task-specific rotations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from gradfree.base.numerics import f64, svd
from gradfree.solvers.procrustes import procrustes_from_cross


def _check_frames(v1: torch.Tensor, v2: torch.Tensor) -> None:
    if v1.ndim != 2 or v1.shape != v2.shape or v1.shape[1] > v1.shape[0]:
        raise ValueError(f"expected two d×k frames with k <= d: {tuple(v1.shape)}, {v2.shape}")


def transition_cost(v_a: torch.Tensor, v_b: torch.Tensor) -> float:
    """‖V_bᵀ V_a − I‖_F / √k: 0 when the two d×k bases coincide column by column.

    The normalisation makes it comparable across widths; 2 is the value for V_b = −V_a.
    """
    _check_frames(v_a, v_b)
    k = v_a.shape[1]
    t = f64(v_b).T @ f64(v_a)
    eye = torch.eye(k, dtype=t.dtype, device=t.device)
    return float(torch.linalg.matrix_norm(t - eye)) / math.sqrt(k)


def transition_costs(bases: Sequence[torch.Tensor]) -> list[float]:
    """:func:`transition_cost` of each consecutive pair of per-layer bases (Q_l, Q_{l+1})."""
    return [transition_cost(a, b) for a, b in itertools.pairwise(bases)]


def principal_angles(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Principal angles (ascending, radians) between span(V1) and span(V2) (orthonormal frames)."""
    _check_frames(v1, v2)
    s = torch.linalg.svdvals(f64(v1).T @ f64(v2)).clamp(-1.0, 1.0)
    return torch.arccos(s)  # svdvals descend, so the angles ascend


def geodesic_average(v1: torch.Tensor, v2: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """The point at fraction t of the Grassmann geodesic from span(V1) to span(V2), as a d×k
    orthonormal frame.

    The subspace follows the geodesic (principal angles to V1 are t·Θ, to V2 (1−t)·Θ). Within it
    the frame is the Procrustes rotation closest to the linear blend (1−t)V1 + tV2, so columns keep
    their meaning: t=0 returns V1 and t=1 returns V2 exactly, not just their spans. The geodesic
    is unique while all principal angles are < π/2.
    """
    _check_frames(v1, v2)
    a, b = f64(v1), f64(v2)
    u, cos, wh = svd(a.T @ b)
    y1, y2 = a @ u, b @ wh.T  # principal vectors: y1[:, i]·y2[:, i] = cos θ_i
    z = y2 - y1 * cos  # the part of each principal vector of V2 orthogonal to V1
    sin = torch.linalg.vector_norm(z, dim=0)
    theta = torch.atan2(sin, cos)  # stabler than arccos near θ = 0
    # Where θ ≈ 0 the direction is shared: sin(tθ) = 0 there and the column of Q is unused.
    q = torch.where(sin > 1e-12, z / sin.clamp_min(1e-300), torch.zeros_like(z))
    y = y1 * torch.cos(t * theta) + q * torch.sin(t * theta)
    target = (1.0 - t) * a + t * b
    return y @ procrustes_from_cross(y.T @ target)
