"""Principal component bases from a covariance (Pearson 1901; Hotelling 1933).

The top-k eigenvectors of a (damped) symmetric PSD matrix, in float64 and with the deterministic
sign convention of :mod:`gradfree.base.numerics`, so that bases compare across runs. Works on a
centered covariance or an un-centered second moment alike: which one to use is the caller's
choice (seed 002's lesson: the un-centered moment is dominated by the mean).
"""

from __future__ import annotations

import torch

from gradfree.base.numerics import f64, sym_eigh


def _check_k(k: int, d: int) -> None:
    if not 1 <= k <= d:
        raise ValueError(f"k must be in 1..{d}, got {k}")


def pca_basis(cov: torch.Tensor, k: int, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k eigenvalues descending, V of shape d×k with orthonormal columns, signs fixed).

    V maximises tr(Vᵀ C V) over orthonormal d×k frames (Ky Fan 1949). ``damping`` is relative
    (``numerics.damp``): it shifts every eigenvalue by damping·mean(diag C) and leaves the
    eigenvectors unchanged; the returned eigenvalues are those of the damped matrix.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"expected a square covariance, got {tuple(cov.shape)}")
    _check_k(k, cov.shape[0])
    vals, vecs = sym_eigh(cov, damping=damping)
    return vals[:k], vecs[:, :k]


def variance_preserved(cov: torch.Tensor, v: torch.Tensor) -> float:
    """tr(Vᵀ C V) / tr(C): the share of the (co)variance kept by projecting onto span(V).

    V must have orthonormal columns; for the PCA basis this is Σ_{i≤k} λ_i / Σ_i λ_i.
    """
    c, v64 = f64(cov), f64(v)
    total = float(torch.trace(c))
    if total <= 0:
        raise ValueError("the covariance has zero trace")
    return float(((c @ v64) * v64).sum()) / total
