"""The numerics policy, in one place: every solver in gradfree goes through these helpers.

1. Statistics are accumulated and every decomposition is solved in float64, then results are cast
   back to the model's dtype at the very end.
2. A matrix that may be singular is damped before it is factorised: ``A + damp * mean(diag(A)) I``
   (relative damping, as SliceGPT/GPTQ do), or solved as a ridge problem.
3. Eigen/singular vectors have arbitrary signs; we fix them deterministically so that results
   compare across runs: the entry of largest magnitude in each vector is made positive.
4. Eigenvalues are returned in descending order, clipped at zero for PSD matrices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE = "float64"


def f64(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x.detach().to(torch.float64)


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive (ties: first index)."""
    import torch

    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def damp(a: torch.Tensor, damp: float) -> torch.Tensor:
    """``a + damp * mean(diag(a)) * I``: relative damping that keeps a PSD matrix invertible."""
    import torch

    if damp <= 0:
        return a
    scale = torch.diagonal(a).mean().clamp_min(torch.finfo(a.dtype).tiny)
    return a + damp * scale * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)


def sym_eigh(a: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix in float64.

    Returns (eigenvalues descending and clipped at 0, eigenvectors as columns, signs fixed).
    """
    import torch

    a = f64(a)
    a = 0.5 * (a + a.T)
    a = damp(a, damping)
    vals, vecs = torch.linalg.eigh(a)
    order = torch.argsort(vals, descending=True)
    vals = vals[order].clamp_min(0.0)
    vecs = fix_signs(vecs[:, order])
    return vals, vecs


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 with deterministic signs: the largest-magnitude entry of each left
    singular vector is positive (and the right vector flips with it)."""
    import torch

    u, s, vh = torch.linalg.svd(f64(a), full_matrices=False)
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, s, vh * signs[:, None]
