"""Orthogonal and semi-orthogonal Procrustes, from data or from streamed cross-moments.

Orthogonal Procrustes (Schönemann 1966, "A generalized solution of the orthogonal Procrustes
problem"): the orthogonal R minimising ‖A R − B‖_F is R = U Vᵀ, where U Σ Vᵀ is the SVD of the
cross-moment C = AᵀB. Only C enters, so the solve works from a :class:`~gradfree.capture.stats.
CrossStats` accumulated over any number of tokens. With a scale (Gower 1975), the best s in
‖s A R − B‖_F is s = tr(Rᵀ C) / ‖A‖_F² = ΣΣ / ‖A‖_F².

The semi-orthogonal case (a student of width d_s embedded in a teacher of width d_t ≥ d_s) is the
same solve on a rectangular C: V = U Vᵀ, the polar factor of C, maximises tr(Vᵀ C) over all
V with VᵀV = I (Higham 1986, "Computing the polar decomposition").

All results are float64 on the input's device (numerics policy: the caller casts once, when the
map is folded into weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch

from gradfree.base.numerics import f64, svd


def _polar(c: torch.Tensor) -> torch.Tensor:
    # U Vᵀ is sign-invariant (a sign flip of a singular pair cancels), and unique when C has full
    # column rank; numerics.svd keeps the arbitrary choices deterministic otherwise.
    u, _, vh = svd(c)
    return u @ vh


def procrustes_from_cross(c: torch.Tensor) -> torch.Tensor:
    """Orthogonal R (d×d) maximising tr(Rᵀ C), i.e. minimising ‖A R − B‖_F for C = AᵀB (d×d)."""
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"procrustes needs a square cross-moment, got {tuple(c.shape)}")
    return _polar(f64(c))


def procrustes_scale(c: torch.Tensor, r: torch.Tensor, sq_norm_a: float | torch.Tensor) -> float:
    """Best scalar s for ‖s A R − B‖_F given C = AᵀB, the map R and ‖A‖_F² = tr(AᵀA)."""
    denom = float(sq_norm_a)
    if denom <= 0:
        raise ValueError("the source stream has zero energy; the scale is undefined")
    return float((f64(r) * f64(c)).sum()) / denom


@overload
def procrustes(a: torch.Tensor, b: torch.Tensor, scale: Literal[False] = False) -> torch.Tensor: ...
@overload
def procrustes(
    a: torch.Tensor, b: torch.Tensor, scale: Literal[True]
) -> tuple[torch.Tensor, float]: ...
def procrustes(
    a: torch.Tensor, b: torch.Tensor, scale: bool = False
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Orthogonal R minimising ‖A R − B‖_F for A, B of shape (n, d); with ``scale`` also s.

    Equivalent to :func:`procrustes_from_cross` on C = AᵀB (computed here in float64).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"A and B must be (n, d) of equal shape: {tuple(a.shape)} vs {b.shape}")
    a64, b64 = f64(a), f64(b)
    c = a64.T @ b64
    r = procrustes_from_cross(c)
    if scale:
        return r, procrustes_scale(c, r, (a64 * a64).sum())
    return r


@overload
def semi_orthogonal_map(
    c: torch.Tensor, scale: Literal[False] = False, sq_norm_s: float | None = None
) -> torch.Tensor: ...
@overload
def semi_orthogonal_map(
    c: torch.Tensor, scale: Literal[True], sq_norm_s: float | None = None
) -> tuple[torch.Tensor, float]: ...
def semi_orthogonal_map(
    c: torch.Tensor, scale: bool = False, sq_norm_s: float | None = None
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Semi-orthogonal V (d_t×d_s, VᵀV = I) maximising tr(Vᵀ C) for C = X_tᵀ X_s (d_t ≥ d_s).

    Because ‖X_s Vᵀ‖_F = ‖X_s‖_F for any such V, this V also minimises ‖X_s Vᵀ − X_t‖_F: it
    embeds student coordinates in the teacher's space (x_t ≈ V x_s), and Vᵀ projects teacher
    vectors onto student coordinates. V is the polar factor of C. With ``scale`` (which needs
    ``sq_norm_s`` = ‖X_s‖_F²) also the best s in ‖s X_s Vᵀ − X_t‖_F.
    """
    if c.ndim != 2 or c.shape[0] < c.shape[1]:
        raise ValueError(f"expected C of shape (d_t, d_s) with d_t >= d_s, got {tuple(c.shape)}")
    c64 = f64(c)
    v = _polar(c64)
    if scale:
        if sq_norm_s is None:
            raise ValueError("scale=True needs sq_norm_s = ‖X_s‖_F² (trace of Σ x_s x_sᵀ)")
        return v, procrustes_scale(c64, v, sq_norm_s)
    return v


def _check_blocks(blocks: Sequence[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    ordered = sorted((int(a), int(b)) for a, b in blocks)
    pos = 0
    for start, stop in ordered:
        if start != pos or stop <= start:
            raise ValueError(f"blocks must partition 0..{k} into non-empty ranges: {list(blocks)}")
        pos = stop
    if pos != k:
        raise ValueError(f"blocks must partition 0..{k} into non-empty ranges: {list(blocks)}")
    return ordered


def blockwise_procrustes(c: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Block-diagonal orthogonal R maximising tr(Rᵀ C), one Procrustes solve per block.

    ``blocks`` are [start, stop) column ranges that partition 0..k (k×k C = AᵀB). Since an
    orthogonal R keeps ‖A R‖_F fixed, min ‖A R − B‖_F over block-diagonal R splits into
    independent solves on the diagonal blocks C[b, b]; the off-diagonal blocks of C are ignored.
    This is seed 000's per-tier (trunk / residual) alignment and its block-diagonal per-KV-group
    rotations.
    """
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"blockwise_procrustes needs a square cross-moment, got {c.shape}")
    c64 = f64(c)
    r = torch.zeros_like(c64)
    for start, stop in _check_blocks(blocks, c64.shape[0]):
        r[start:stop, start:stop] = _polar(c64[start:stop, start:stop])
    return r
