"""Assignment problems for permuting heads and neurons (Kuhn 1955, "The Hungarian method").

Seed 001 permutes attention heads and SwiGLU neurons before rotating; Git Re-Basin (Ainsworth et
al. 2023) and Li et al. 2016 ("Convergent learning") match units by the correlation of their
activations. :func:`correlation_from_covariance` gives that correlation (from streamed
statistics: :func:`gradfree.capture.similarity.correlation_from_stats`), :func:`hungarian` the
optimal one-to-one matching (scipy's ``linear_sum_assignment``), and :func:`grouped_hungarian`
the matching restricted to groups (KV groups, stages) so that no unit moves across a group
boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.optimize
import torch


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


def correlation_from_covariance(
    cov: torch.Tensor, sd_a: torch.Tensor, sd_b: torch.Tensor
) -> torch.Tensor:
    """Pearson correlation cov[i, j] / (sd_a[i] sd_b[j]) from a centered cross-covariance (da×db)
    and the two streams' standard deviations; a dimension with zero deviation correlates 0 with
    everything. From streamed statistics: ``gradfree.capture.similarity.correlation_from_stats``.
    """
    denom = sd_a[:, None] * sd_b[None, :]
    return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
