"""Seed 000's two-tier ("trunk" / "residual") teacher basis and its per-tier alignment.

Seed 000 builds a teacher basis of width k from a trunk (the top ``trunk`` principal directions of
the teacher covariance C) and a residual tier (the top k − trunk principal directions of the
residual covariance P⊥ C P⊥, P⊥ = I − V_trunk V_trunkᵀ). For a single covariance this *is* plain
PCA: the trunk columns are eigenvectors of C, so P⊥ C P⊥ = Σ_{i>trunk} λ_i v_i v_iᵀ and its top
eigenvectors are v_{trunk+1}, …, v_k. The seed's claim that it is "better than pure SVD" cannot
come from the basis; it can only come from aligning each tier separately to the student's
corresponding tier (:func:`align_tiers`: a block-diagonal Procrustes rotation, one block per
tier) instead of one joint map (:func:`joint_semi_orthogonal`). The two alignments are compared
by measurement, not assumed.

Conventions: cross-moments are teacher × student, C_ts = Σ x_t x_sᵀ (d_t×d_s), as
:class:`~gradfree.capture.stats.CrossStats` accumulates them with a = teacher, b = student.
"""

from __future__ import annotations

import torch

from gradfree.base.numerics import f64, fix_signs, sym_eigh
from gradfree.solvers.pca import pca_basis
from gradfree.solvers.procrustes import blockwise_procrustes, semi_orthogonal_map


def _check_trunk(k: int, trunk: int, d: int) -> None:
    if not 1 <= k <= d or not 0 <= trunk <= k:
        raise ValueError(f"need 0 <= trunk <= k <= d: trunk={trunk}, k={k}, d={d}")


def two_tier_basis(cov_t: torch.Tensor, k: int, trunk: int) -> torch.Tensor:
    """V (d_t×k): ``trunk`` top principal directions of C, then the top k − trunk principal
    directions of the residual covariance P⊥ C P⊥.

    The residual tier is computed inside an orthonormal basis Q of the trunk's complement (as
    Qᵀ C Q), so its columns are exactly orthogonal to the trunk even when the residual has fewer
    than k − trunk non-zero eigenvalues (P⊥ C P⊥ itself has zero eigenvalues along the trunk that
    a plain ``eigh`` could pick). For a single covariance the result equals ``pca_basis(C, k)``
    (see the module docstring); the tiers matter only once aligned separately.
    """
    d = cov_t.shape[0]
    _check_trunk(k, trunk, d)
    _, vecs = sym_eigh(cov_t)
    v_trunk, q = vecs[:, :trunk], vecs[:, trunk:]
    if trunk == k:
        return v_trunk
    c = f64(cov_t)
    _, w = pca_basis(q.T @ c @ q, k - trunk)
    v_res = fix_signs(q @ w)
    return torch.cat([v_trunk, v_res], dim=1)


def project_cross(c_ts: torch.Tensor, v_t: torch.Tensor, v_s: torch.Tensor) -> torch.Tensor:
    """V_tᵀ C_ts V_s (k×k): the cross-moment between teacher and student tier coordinates."""
    return f64(v_t).T @ f64(c_ts) @ f64(v_s)


def align_tiers(v_t: torch.Tensor, cross_projected: torch.Tensor, trunk: int) -> torch.Tensor:
    """Rotate each tier of V_t (d_t×k) by its own Procrustes rotation: returns V_t R.

    ``cross_projected`` = V_tᵀ C_ts V_s (see :func:`project_cross`), with V_s the student's basis
    whose first ``trunk`` columns are its trunk. R = blockdiag(R_trunk, R_res) minimises
    ‖X_t V_t R − X_s V_s‖_F over rotations that do not mix the tiers, so column i of the result
    is the teacher direction paired with the student's tier coordinate i.
    """
    k = v_t.shape[1]
    _check_trunk(k, trunk, v_t.shape[0])
    if cross_projected.shape != (k, k):
        raise ValueError(f"cross_projected must be {k}×{k}, got {tuple(cross_projected.shape)}")
    blocks = [(0, trunk), (trunk, k)] if 0 < trunk < k else [(0, k)]
    return f64(v_t) @ blockwise_procrustes(cross_projected, blocks)


def joint_semi_orthogonal(cross_ts: torch.Tensor) -> torch.Tensor:
    """Seed 000's "joint" variant: one semi-orthogonal V (d_t×d_s) from the full C_ts.

    Same as :func:`~gradfree.solvers.procrustes.semi_orthogonal_map`: V maximises tr(Vᵀ C_ts),
    i.e. x_t ≈ V x_s without any tier structure.
    """
    return semi_orthogonal_map(cross_ts)
