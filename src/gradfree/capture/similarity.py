"""Similarity of two paired streams from their streamed statistics: Pearson correlation and CKA.

The statistics live here; the maths is in :mod:`gradfree.solvers` (tensor in, tensor out). Both
functions take the per-stream moments of a and b and their cross moments (``cross`` accumulated
as ``update(a, b)``), in that order, check that they cover the same tokens, and hand centered
(cross-)covariances to the solver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gradfree.capture.stats import CrossStats, MomentStats


def _check_paired(stats_a: MomentStats, stats_b: MomentStats, cross: CrossStats) -> None:
    if not cross.count == stats_a.count == stats_b.count:
        raise ValueError("the cross and per-stream statistics must cover the same tokens")
    if (cross.dim_a, cross.dim_b) != (stats_a.dim, stats_b.dim):
        raise ValueError("the cross statistics' widths do not match the per-stream statistics")


def correlation_from_stats(
    stats_a: MomentStats, stats_b: MomentStats, cross: CrossStats
) -> torch.Tensor:
    """Pearson correlation (da×db) between the dimensions of two paired streams a and b.

    corr[i, j] = Cov(a_i, b_j) / (σ(a_i) σ(b_j)), from ``cross`` (Σ a bᵀ) and the per-stream
    moments (full or diagonal-only). A dimension whose variance is zero (below 1e-10·E[x²], the
    resolution of raw moments) correlates 0 with everything.
    """
    from gradfree.solvers.assign import correlation_from_covariance

    _check_paired(stats_a, stats_b, cross)
    cov = cross.cross_covariance(centered=True)
    sd_a, sd_b = _resolved_sd(stats_a).to(cov.device), _resolved_sd(stats_b).to(cov.device)
    return correlation_from_covariance(cov, sd_a, sd_b)


def _resolved_sd(stats: MomentStats) -> torch.Tensor:
    import torch

    # Var = E[x²] − μ² from raw sums carries a rounding error of ~1e-16·E[x²]: a constant
    # dimension shows a tiny spurious variance (and covariance), whose ratio is noise. Variances
    # below 1e-10·E[x²] cannot be resolved from raw moments and count as zero.
    var = stats.variance(centered=True)
    floor = 1e-10 * stats.variance(centered=False)
    return torch.where(var > floor, var, torch.zeros_like(var)).sqrt()


def linear_cka_from_stats(
    stats_x: MomentStats,
    stats_y: MomentStats,
    cross: CrossStats,
    undefined: float | None = None,
) -> float:
    """Linear CKA of X and Y (:func:`gradfree.solvers.linear_cka_from_moments`) from streamed
    statistics (full moments needed).

    CKA is undefined when a side has zero variance: the solver's ValueError is raised, or, when
    ``undefined`` is given, that value is returned instead (the evaluation report prints 0.0).
    """
    from gradfree.solvers.layermap import linear_cka_from_moments

    _check_paired(stats_x, stats_y, cross)
    cxx, cyy = stats_x.covariance(centered=True), stats_y.covariance(centered=True)
    cxy = cross.cross_covariance(centered=True)
    if undefined is None:
        return linear_cka_from_moments(cxx, cyy, cxy)
    try:
        return linear_cka_from_moments(cxx, cyy, cxy)
    except ValueError:  # the shapes were checked above: only zero variance is left
        return undefined
