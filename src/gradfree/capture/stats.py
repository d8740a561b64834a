"""Streaming sufficient statistics of activations, in float64, that combine associatively.

:class:`MomentStats` holds, for vectors x in R^d seen so far: the count n, Σx, Σxxᵀ (full, or
only its diagonal for very wide sites), Σx³, Σx⁴ per dimension and max|x| per dimension.
:class:`CrossStats` holds Σaᵀb between two paired streams (teacher and student tokens).

Both follow scikit-learn's streaming convention: ``update`` (alias ``partial_fit``) folds a batch
in and returns ``self``; ``combine`` (``+``) adds two accumulators over disjoint data into the
accumulator of the union, exactly up to float64 rounding, so captures shard across workers.
Everything derived (mean, covariance, correlation, kurtosis) is computed from raw sums on demand.

Accumulators are device-aware: they live on the device given to ``empty`` (default CPU), batches
are moved there and upcast to float64 once, and ``to("cpu")`` moves them back for saving. The
Gram matrix ``XᵀX`` is accumulated in place, in strips on and above the diagonal only (the blocks
below are mirrored), which saves a third to a half of the float64 flops on wide sites.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_F64 = "float64"


_GRAM_BLOCK = 256


def gram_add_(m: torch.Tensor, x: torch.Tensor) -> None:
    """``m += xᵀx`` for a symmetric ``m``: only blocks on/above the diagonal are multiplied, each
    in place into a view of ``m``; the blocks below the diagonal are mirrored copies."""
    d = x.shape[1]
    if d <= 2 * _GRAM_BLOCK:
        m.addmm_(x.T, x)
        return
    edges = [*range(0, d, _GRAM_BLOCK), d]
    blocks = list(itertools.pairwise(edges))
    for i, (a0, a1) in enumerate(blocks):
        xa = x[:, a0:a1]
        # One product for the whole row strip right of (and including) the diagonal block.
        m[a0:a1, a0:].addmm_(xa.T, x[:, a0:])
        for b0, b1 in blocks[i + 1 :]:
            m[b0:b1, a0:a1].copy_(m[a0:a1, b0:b1].T)


def _ones(x: torch.Tensor) -> torch.Tensor:
    """A ones vector over the rows of ``x``: column sums as one BLAS matrix-vector product
    (``Xᵀ1``), several times faster on CPU than ``x.sum(0)``'s strided reduction."""
    import torch

    return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)


def _zeros(*shape: int, device: torch.device | str | None = None) -> torch.Tensor:
    import torch

    return torch.zeros(*shape, dtype=torch.float64, device=device)


@dataclass
class MomentStats:
    """Raw moments of a stream of d-dimensional vectors (float64)."""

    dim: int
    full: bool
    count: int
    sum: torch.Tensor  # (d,)
    m2: torch.Tensor  # (d, d) = Σ x xᵀ when full, else (d,) = Σ x²
    m3: torch.Tensor  # (d,)
    m4: torch.Tensor  # (d,)
    absmax: torch.Tensor  # (d,)

    @classmethod
    def empty(
        cls, dim: int, full: bool = True, device: torch.device | str | None = None
    ) -> MomentStats:
        m2 = _zeros(dim, dim, device=device) if full else _zeros(dim, device=device)
        z = [_zeros(dim, device=device) for _ in range(4)]
        return cls(dim, full, 0, z[0], m2, z[1], z[2], z[3])

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def to(self, device: torch.device | str) -> MomentStats:
        """The same statistics on ``device`` (a new object; no copy if already there)."""
        return MomentStats(
            self.dim,
            self.full,
            self.count,
            self.sum.to(device),
            self.m2.to(device),
            self.m3.to(device),
            self.m4.to(device),
            self.absmax.to(device),
        )

    # accumulation -------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> MomentStats:
        """Fold in a batch ``x`` of shape (n, d); returns self."""
        import torch

        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected a batch of shape (n, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.detach().to(device=self.sum.device, dtype=torch.float64)
        self.count += int(x.shape[0])
        ones = _ones(x)
        self.sum.addmv_(x.T, ones)
        if self.full:
            gram_add_(self.m2, x)
        # One scratch buffer raised to the 2nd, 3rd and 4th power in place: the per-dimension
        # moments are memory-bound, so passes and allocations are what they cost.
        p = x * x
        if not self.full:
            self.m2.addmv_(p.T, ones)
        self.m3.addmv_(p.mul_(x).T, ones)
        self.m4.addmv_(p.mul_(x).T, ones)
        lo, hi = torch.aminmax(x, dim=0)
        torch.maximum(self.absmax, torch.maximum(hi, lo.neg_()), out=self.absmax)
        return self

    partial_fit = update

    def _check_compatible(self, other: MomentStats) -> None:
        if self.dim != other.dim or self.full != other.full:
            raise ValueError("cannot combine statistics of different widths or kinds")

    def combine(self, other: MomentStats) -> MomentStats:
        """The statistics of the union of two disjoint streams (a new object on self's device)."""
        import torch

        self._check_compatible(other)
        return MomentStats(
            self.dim,
            self.full,
            self.count + other.count,
            self.sum + other.sum.to(self.device),
            self.m2 + other.m2.to(self.device),
            self.m3 + other.m3.to(self.device),
            self.m4 + other.m4.to(self.device),
            torch.maximum(self.absmax, other.absmax.to(self.device)),
        )

    __add__ = combine

    def subtract(self, other: MomentStats) -> MomentStats:
        """Remove a sub-stream (e.g. first-token statistics); ``absmax`` stays an upper bound."""
        self._check_compatible(other)
        if other.count > self.count:
            raise ValueError("cannot subtract more tokens than were accumulated")
        return MomentStats(
            self.dim,
            self.full,
            self.count - other.count,
            self.sum - other.sum.to(self.device),
            self.m2 - other.m2.to(self.device),
            self.m3 - other.m3.to(self.device),
            self.m4 - other.m4.to(self.device),
            self.absmax.clone(),
        )

    __sub__ = subtract

    # derived quantities -----------------------------------------------------------------------
    def _n(self) -> int:
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.count

    def mean(self) -> torch.Tensor:
        return self.sum / self._n()

    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ] (or E[x²] per dimension when not full): the un-centered covariance."""
        return self.m2 / self._n()

    def covariance(self, centered: bool = True) -> torch.Tensor:
        """Population covariance E[(x-μ)(x-μ)ᵀ] (centered) or E[x xᵀ] (un-centered)."""
        if not self.full:
            raise ValueError("only the diagonal was accumulated for this site; use variance()")
        c = self.second_moment()
        if centered:
            mu = self.mean()
            c = c - mu[:, None] * mu[None, :]
        return 0.5 * (c + c.T)

    def variance(self, centered: bool = True) -> torch.Tensor:
        import torch

        ex2 = torch.diagonal(self.m2) / self._n() if self.full else self.m2 / self._n()
        return (ex2 - self.mean() ** 2).clamp_min(0.0) if centered else ex2

    def correlation(self) -> torch.Tensor:
        """Pearson correlation matrix (per-dimension standardised covariance)."""
        import torch

        c = self.covariance(centered=True)
        sd = torch.sqrt(torch.diagonal(c).clamp_min(1e-300))
        return c / sd[:, None] / sd[None, :]

    def excess_kurtosis(self) -> torch.Tensor:
        """Per-dimension excess kurtosis E[(x-μ)⁴]/σ⁴ - 3, from the raw moments."""
        n = self._n()
        mu = self.mean()
        e2, e3, e4 = self.variance(centered=False), self.m3 / n, self.m4 / n
        c4 = e4 - 4 * mu * e3 + 6 * mu**2 * e2 - 3 * mu**4
        var = (e2 - mu**2).clamp_min(1e-300)
        return c4 / var**2 - 3.0

    def skewness(self) -> torch.Tensor:
        n = self._n()
        mu = self.mean()
        e2, e3 = self.variance(centered=False), self.m3 / n
        c3 = e3 - 3 * mu * e2 + 2 * mu**3
        var = (e2 - mu**2).clamp_min(1e-300)
        return c3 / var**1.5

    # serialisation -----------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        import torch

        return {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sum": self.sum,
            "m2": self.m2,
            "m3": self.m3,
            "m4": self.m4,
            "absmax": self.absmax,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> MomentStats:
        import torch

        s = t["sum"].to(torch.float64)
        m2 = t["m2"].to(torch.float64)
        return cls(
            int(s.shape[0]),
            m2.ndim == 2,
            int(t["count"].item()),
            s,
            m2,
            t["m3"].to(torch.float64),
            t["m4"].to(torch.float64),
            t["absmax"].to(torch.float64),
        )


@dataclass
class CrossStats:
    """Σ a bᵀ between paired token streams a (teacher, width da) and b (student, width db)."""

    dim_a: int
    dim_b: int
    count: int
    sum_a: torch.Tensor  # (da,)
    sum_b: torch.Tensor  # (db,)
    m_ab: torch.Tensor  # (da, db)

    @classmethod
    def empty(cls, dim_a: int, dim_b: int, device: torch.device | str | None = None) -> CrossStats:
        return cls(
            dim_a,
            dim_b,
            0,
            _zeros(dim_a, device=device),
            _zeros(dim_b, device=device),
            _zeros(dim_a, dim_b, device=device),
        )

    @property
    def device(self) -> torch.device:
        return self.m_ab.device

    def to(self, device: torch.device | str) -> CrossStats:
        """The same statistics on ``device`` (a new object; no copy if already there)."""
        return CrossStats(
            self.dim_a,
            self.dim_b,
            self.count,
            self.sum_a.to(device),
            self.sum_b.to(device),
            self.m_ab.to(device),
        )

    def update(self, a: torch.Tensor, b: torch.Tensor) -> CrossStats:
        """Fold in paired batches a (n, da) and b (n, db) of the same tokens; returns self."""
        import torch

        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
            raise ValueError(f"paired batches must be (n, d) with equal n: {a.shape} vs {b.shape}")
        if a.shape[1] != self.dim_a or b.shape[1] != self.dim_b:
            raise ValueError("paired batch widths do not match the accumulator")
        a = a.detach().to(device=self.m_ab.device, dtype=torch.float64)
        b = b.detach().to(device=self.m_ab.device, dtype=torch.float64)
        self.count += int(a.shape[0])
        self.sum_a.addmv_(a.T, _ones(a))
        self.sum_b.addmv_(b.T, _ones(b))
        self.m_ab.addmm_(a.T, b)
        return self

    partial_fit = update

    def combine(self, other: CrossStats) -> CrossStats:
        if (self.dim_a, self.dim_b) != (other.dim_a, other.dim_b):
            raise ValueError("cannot combine cross statistics of different widths")
        return CrossStats(
            self.dim_a,
            self.dim_b,
            self.count + other.count,
            self.sum_a + other.sum_a.to(self.device),
            self.sum_b + other.sum_b.to(self.device),
            self.m_ab + other.m_ab.to(self.device),
        )

    __add__ = combine

    def cross_covariance(self, centered: bool = True) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        c = self.m_ab / self.count
        if centered:
            c = c - (self.sum_a / self.count)[:, None] * (self.sum_b / self.count)[None, :]
        return c

    def to_tensors(self) -> dict[str, torch.Tensor]:
        import torch

        return {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sum_a": self.sum_a,
            "sum_b": self.sum_b,
            "m_ab": self.m_ab,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> CrossStats:
        import torch

        m = t["m_ab"].to(torch.float64)
        return cls(
            int(m.shape[0]),
            int(m.shape[1]),
            int(t["count"].item()),
            t["sum_a"].to(torch.float64),
            t["sum_b"].to(torch.float64),
            m,
        )
