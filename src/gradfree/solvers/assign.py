"""Assignment problems for permuting heads and neurons (Kuhn 1955, "The Hungarian method").

Seed 001 permutes attention heads and SwiGLU neurons before rotating; Git Re-Basin (Ainsworth et
al. 2023) and Li et al. 2016 ("Convergent learning") match units by the correlation of their
activations. :func:`correlation_from_stats` gives that correlation from streamed statistics,
:func:`hungarian` the optimal one-to-one matching (scipy's ``linear_sum_assignment``), and
:func:`grouped_hungarian` the matching restricted to groups (KV groups, stages) so that no unit
moves across a group boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.optimize
import torch

from gradfree.capture.stats import CrossStats, MomentStats


def hungarian(similarity: torch.Tensor, maximize: bool = True) -> torch.Tensor:
    """For an m×n similarity (m <= n) the columns ``cols`` (length m, distinct) that maximise
    Σ_i S[i, cols[i]] (or minimise, for a cost, with ``maximize=False``).

    m == n gives a permutation; m < n selects m of the n columns. Ties resolve deterministically
    (scipy's algorithm is deterministic for a given matrix).
    """
    s = similarity.detach().to("cpu", torch.float64).numpy()
    if s.ndim != 2 or s.shape[0] > s.shape[1]:
        raise ValueError(f"need an m×n matrix with m <= n (transpose it), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("the similarity matrix has non-finite entries")
    rows, cols = scipy.optimize.linear_sum_assignment(s, maximize=maximize)
    out = np.empty(s.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out)


def grouped_hungarian(
    similarity: torch.Tensor,
    groups_a: Sequence[int] | torch.Tensor,
    groups_b: Sequence[int] | torch.Tensor,
    maximize: bool = True,
) -> torch.Tensor:
    """:func:`hungarian` solved independently within each group: row i may only be matched to a
    column j with groups_b[j] == groups_a[i]. Each group needs at most as many rows as columns."""
    ga = torch.as_tensor(groups_a).cpu()
    gb = torch.as_tensor(groups_b).cpu()
    m, n = similarity.shape
    if ga.shape != (m,) or gb.shape != (n,):
        raise ValueError(f"group labels must have lengths {m} and {n}")
    out = torch.full((m,), -1, dtype=torch.int64)
    for g in torch.unique(ga).tolist():
        rows = torch.nonzero(ga == g).flatten()
        cols = torch.nonzero(gb == g).flatten()
        if len(rows) > len(cols):
            raise ValueError(f"group {g} has {len(rows)} rows but only {len(cols)} columns")
        sub = similarity.detach().cpu()[rows][:, cols]
        out[rows] = cols[hungarian(sub, maximize=maximize)]
    return out


def correlation_from_stats(
    cross: CrossStats, stats_a: MomentStats, stats_b: MomentStats
) -> torch.Tensor:
    """Pearson correlation (da×db) between the dimensions of two paired streams a and b.

    corr[i, j] = Cov(a_i, b_j) / (σ(a_i) σ(b_j)), from ``cross`` (Σ a bᵀ) and the per-stream
    moments (full or diagonal-only). A dimension whose variance is zero (below 1e-10·E[x²], the
    resolution of raw moments) correlates 0 with everything.
    """
    if not cross.count == stats_a.count == stats_b.count:
        raise ValueError("the cross and per-stream statistics must cover the same tokens")
    if (cross.dim_a, cross.dim_b) != (stats_a.dim, stats_b.dim):
        raise ValueError("the cross statistics' widths do not match the per-stream statistics")
    cov = cross.cross_covariance(centered=True)
    sd_a, sd_b = _resolved_sd(stats_a).to(cov.device), _resolved_sd(stats_b).to(cov.device)
    denom = sd_a[:, None] * sd_b[None, :]
    return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def _resolved_sd(stats: MomentStats) -> torch.Tensor:
    # Var = E[x²] − μ² from raw sums carries a rounding error of ~1e-16·E[x²]: a constant
    # dimension shows a tiny spurious variance (and covariance), whose ratio is noise. Variances
    # below 1e-10·E[x²] cannot be resolved from raw moments and count as zero.
    var = stats.variance(centered=True)
    floor = 1e-10 * stats.variance(centered=False)
    return torch.where(var > floor, var, torch.zeros_like(var)).sqrt()
