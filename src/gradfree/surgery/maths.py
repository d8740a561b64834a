"""Pure maths for function-preserving surgery: orthogonal matrices and permutations.

Tensor in, tensor out: nothing here touches a model, so every function is tested on its own.
Following the numerics policy (:mod:`gradfree.base.numerics`), matrices are built and checked in
float64; callers cast to the model's dtype only when they write weights. RoPE pair rotations
and the transition cost between bases are solvers (:mod:`gradfree.solvers.rope_pairs`,
:mod:`gradfree.solvers.grassmann`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradfree.base.errors import GradfreeError

Permutation = Sequence[int] | torch.Tensor


def random_orthogonal(d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal ``d x d`` matrix, deterministic for ``seed``.

    QR of a Gaussian matrix is orthogonal but its distribution depends on LAPACK's sign choices;
    multiplying column j by sign(R_jj) removes that freedom (Mezzadri 2007), so the result is
    unique for a seed and uniformly distributed over O(d).
    """
    if d < 1:
        raise GradfreeError(f"An orthogonal matrix needs a positive size, not {d}.")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype)


def orthogonality_error(r: torch.Tensor) -> float:
    """``max |RᵀR − I|`` in float64: 0 for a matrix with orthonormal columns."""
    r64 = r.detach().to(torch.float64)
    eye = torch.eye(r64.shape[1], dtype=torch.float64, device=r64.device)
    return float((r64.T @ r64 - eye).abs().max())


def is_orthogonal(r: torch.Tensor, tol: float = 1e-10) -> bool:
    """True when ``r`` is square and ``max |RᵀR − I| <= tol``."""
    return r.ndim == 2 and r.shape[0] == r.shape[1] and orthogonality_error(r) <= tol


def check_orthogonal(r: torch.Tensor, size: int, what: str, tol: float = 1e-6) -> torch.Tensor:
    """``r`` as float64 if it is an orthogonal ``size x size`` matrix; a GradfreeError otherwise.

    The default tolerance admits a float32 rotation (error ~1e-7) but not a non-rotation.
    """
    if r.ndim != 2 or tuple(r.shape) != (size, size):
        raise GradfreeError(f"The {what} must be a {size}x{size} matrix, not {tuple(r.shape)}.")
    err = orthogonality_error(r)
    if not err <= tol:
        raise GradfreeError(f"The {what} is not orthogonal: max |RᵀR − I| = {err:.3g} > {tol:g}.")
    return r.detach().to(torch.float64)


def as_permutation(p: Permutation, n: int, what: str = "permutation") -> torch.Tensor:
    """``p`` as a LongTensor after checking it is a permutation of ``range(n)``."""
    t = torch.as_tensor(p, dtype=torch.long).flatten().cpu()
    if t.numel() != n or not torch.equal(torch.sort(t).values, torch.arange(n)):
        raise GradfreeError(f"The {what} must be a permutation of 0..{n - 1}, got {t.tolist()}.")
    return t


def invert_permutation(p: Permutation) -> torch.Tensor:
    """The permutation ``q`` with ``q[p[i]] = i`` (so applying ``p`` then ``q`` is the identity)."""
    t = as_permutation(p, len(p))
    inv = torch.empty_like(t)
    inv[t] = torch.arange(t.numel())
    return inv


def random_permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def block_indices(blocks: Permutation, size: int) -> torch.Tensor:
    """Row indices of ``blocks`` (e.g. heads) of ``size`` consecutive rows each, in that order."""
    b = torch.as_tensor(blocks, dtype=torch.long).flatten()
    return (b[:, None] * size + torch.arange(size)[None, :]).flatten()
