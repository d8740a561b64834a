"""Ridge regression toward a prior, solved from sufficient statistics (Hoerl & Kennard 1970).

For inputs X (n×in) and targets Y (n×out) the weight W (out×in) minimising

    ‖X Wᵀ − Y‖_F² + λ ‖W − W_prior‖_F²

is W = (YᵀX + λ W_prior)(XᵀX + λ I)⁻¹. Only XᵀX (in×in) and XᵀY (in×out) are needed, so the fit
runs from streamed statistics. The system is solved by a float64 Cholesky factorisation of
XᵀX + λI, never an explicit inverse; if the matrix is not positive definite (λ = 0 on rank-
deficient data) the minimum-norm least-squares solution is used instead. An intercept is the
caller's: append a constant-1 feature to X.

For very wide outputs (an LM head with 151,936 rows, seed 001's ridge head),
:func:`iter_ridge_chunks` factorises once and solves row chunks whose XᵀY columns come from a
callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from gradfree.base.numerics import f64

PriorLike = torch.Tensor | Callable[[int, int], torch.Tensor] | None


def resolve_lambda(
    xtx: torch.Tensor, lam: float = 0.0, rel_lam: float | None = None, n: int | None = None
) -> float:
    """The absolute λ added to XᵀX.

    ``rel_lam`` is relative to the mean of diag(XᵀX) (scale-free, as ``numerics.damp``). An
    absolute ``lam`` with ``n`` given refers to the per-sample objective (1/n)‖XWᵀ − Y‖² + λ‖·‖²,
    so it is multiplied by n and does not depend on how many tokens were accumulated.
    """
    if rel_lam is not None:
        if lam != 0.0:
            raise ValueError("give either an absolute lam or a relative rel_lam, not both")
        if rel_lam < 0:
            raise ValueError("rel_lam must be >= 0")
        return float(rel_lam) * float(torch.diagonal(f64(xtx)).mean())
    if lam < 0:
        raise ValueError("lam must be >= 0")
    return float(lam) * (n if n is not None else 1)


class _Factor:
    """XᵀX + λI factorised once (Cholesky), or kept for a least-squares fallback."""

    def __init__(self, xtx: torch.Tensor, lam: float) -> None:
        a = f64(xtx)
        a = 0.5 * (a + a.T)
        self.a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        chol, info = torch.linalg.cholesky_ex(self.a)
        self.chol: torch.Tensor | None = chol if int(info) == 0 else None

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """(XᵀX + λI)⁻¹ b for b of shape (in, m)."""
        if self.chol is not None:
            return torch.cholesky_solve(b, self.chol)
        # gelsd (SVD-based, minimum norm, rank-revealing) exists on CPU only; the fallback is rare.
        sol = torch.linalg.lstsq(self.a.cpu(), b.cpu(), driver="gelsd").solution
        return sol.to(b.device)

    @property
    def used_cholesky(self) -> bool:
        return self.chol is not None


def _rhs(xty: torch.Tensor, prior: torch.Tensor | None, lam: float) -> torch.Tensor:
    b = f64(xty)
    if prior is not None and lam != 0.0:
        if prior.shape != (b.shape[1], b.shape[0]):
            raise ValueError(
                f"prior must be out×in = {(b.shape[1], b.shape[0])}, got {prior.shape}"
            )
        b = b + lam * f64(prior).T.to(b.device)
    return b


def ridge_from_stats(
    xtx: torch.Tensor,
    xty: torch.Tensor,
    lam: float = 0.0,
    prior: torch.Tensor | None = None,
    n: int | None = None,
    *,
    rel_lam: float | None = None,
) -> torch.Tensor:
    """W (out×in, float64) = (YᵀX + λ W_prior)(XᵀX + λI)⁻¹ from xtx = XᵀX (in×in), xty = XᵀY
    (in×out). ``prior`` None means shrinkage toward 0; λ from :func:`resolve_lambda`."""
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1] or xty.shape[0] != xtx.shape[0]:
        raise ValueError(f"expected xtx (in×in) and xty (in×out): {xtx.shape}, {xty.shape}")
    lam_abs = resolve_lambda(xtx, lam, rel_lam, n)
    factor = _Factor(xtx, lam_abs)
    return factor.solve(_rhs(xty, prior, lam_abs).to(factor.a.device)).T


def iter_ridge_chunks(
    xtx: torch.Tensor,
    xty_fn: Callable[[int, int], torch.Tensor],
    n_out: int,
    lam: float = 0.0,
    prior: PriorLike = None,
    chunk: int = 8192,
    *,
    rel_lam: float | None = None,
    n: int | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, W[start:stop]) for output rows in chunks, factorising XᵀX + λI once.

    ``xty_fn(start, stop)`` returns the columns start:stop of XᵀY (in×(stop−start)); ``prior`` is
    a full out×in tensor, a callable returning its rows start:stop, or None.
    """
    if chunk < 1 or n_out < 1:
        raise ValueError("chunk and n_out must be positive")
    lam_abs = resolve_lambda(xtx, lam, rel_lam, n)
    factor = _Factor(xtx, lam_abs)
    for start in range(0, n_out, chunk):
        stop = min(start + chunk, n_out)
        p = prior(start, stop) if callable(prior) else None if prior is None else prior[start:stop]
        b = _rhs(xty_fn(start, stop).to(factor.a.device), p, lam_abs)
        yield start, stop, factor.solve(b).T


def ridge_from_stats_chunked(
    xtx: torch.Tensor,
    xty_fn: Callable[[int, int], torch.Tensor],
    n_out: int,
    lam: float = 0.0,
    prior: PriorLike = None,
    chunk: int = 8192,
    *,
    rel_lam: float | None = None,
    n: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """:func:`ridge_from_stats` for very wide outputs: the whole W (n_out×in), solved in float64
    chunk by chunk and stored in ``dtype`` (e.g. bfloat16 to halve a 151,936-row head)."""
    out = torch.empty(n_out, xtx.shape[0], dtype=dtype, device=xtx.device)
    for start, stop, w in iter_ridge_chunks(
        xtx, xty_fn, n_out, lam, prior, chunk, rel_lam=rel_lam, n=n
    ):
        out[start:stop] = w.to(dtype)
    return out


def ridge_path_chunked(
    xtx: torch.Tensor,
    xty_fn: Callable[[int, int], torch.Tensor],
    n_out: int,
    rel_lams: Sequence[float],
    prior: PriorLike = None,
    chunk: int = 8192,
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """:func:`ridge_from_stats_chunked` for several relative λ at once: each chunk of XᵀY is
    computed once and solved for every λ (its most expensive part for an LM head, whose XᵀY
    columns are products with the teacher's head). One W (n_out×in, ``dtype``) per λ."""
    if chunk < 1 or n_out < 1:
        raise ValueError("chunk and n_out must be positive")
    lams = [resolve_lambda(xtx, rel_lam=r) for r in rel_lams]
    factors = [_Factor(xtx, lam) for lam in lams]
    outs = [torch.empty(n_out, xtx.shape[0], dtype=dtype, device=xtx.device) for _ in lams]
    for start in range(0, n_out, chunk):
        stop = min(start + chunk, n_out)
        p = prior(start, stop) if callable(prior) else None if prior is None else prior[start:stop]
        xty = xty_fn(start, stop).to(factors[0].a.device)
        for lam, factor, out in zip(lams, factors, outs, strict=True):
            out[start:stop] = factor.solve(_rhs(xty, p, lam)).T.to(dtype)
    return outs
