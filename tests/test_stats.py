"""MomentStats / CrossStats against direct float64 numpy computations, and exact merging."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from gradfree.capture.stats import CrossStats, MomentStats


def _data(n: int = 600, d: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d) * 3


def test_moments_equal_numpy() -> None:
    x = _data()
    s = MomentStats.empty(x.shape[1]).update(torch.from_numpy(x))
    assert s.count == x.shape[0]
    np.testing.assert_allclose(s.mean().numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        s.covariance().numpy(), np.cov(x.T, bias=True), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(s.covariance(centered=False).numpy(), x.T @ x / len(x), rtol=1e-12)
    np.testing.assert_allclose(s.correlation().numpy(), np.corrcoef(x.T), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        s.excess_kurtosis().numpy(), scipy.stats.kurtosis(x, axis=0), rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose(s.skewness().numpy(), scipy.stats.skew(x, axis=0), atol=1e-10)
    np.testing.assert_allclose(s.absmax.numpy(), np.abs(x).max(0))


def test_diagonal_only_matches_full_diagonal() -> None:
    x = torch.from_numpy(_data())
    full = MomentStats.empty(7).update(x)
    diag = MomentStats.empty(7, full=False).update(x)
    assert torch.allclose(diag.variance(), torch.diagonal(full.covariance()), rtol=1e-12)
    with pytest.raises(ValueError, match="diagonal"):
        diag.covariance()


@pytest.mark.parametrize("cut", [0, 1, 250, 599])
def test_merge_is_exact_and_subtract_inverts(cut: int) -> None:
    x = torch.from_numpy(_data())
    whole = MomentStats.empty(7).update(x)
    a, b = MomentStats.empty(7).update(x[:cut]), MomentStats.empty(7).update(x[cut:])
    merged = a + b
    for k, v in whole.to_tensors().items():
        assert torch.allclose(merged.to_tensors()[k].double(), v.double(), rtol=1e-12, atol=1e-9)
    rest = whole - a
    assert rest.count == b.count
    assert torch.allclose(rest.m2, b.m2, rtol=1e-10, atol=1e-8)


def test_serialisation_round_trip() -> None:
    s = MomentStats.empty(7).update(torch.from_numpy(_data()))
    t = MomentStats.from_tensors(s.to_tensors())
    assert t.count == s.count and t.full and torch.equal(t.m2, s.m2)


def test_cross_stats_equal_numpy_and_merge() -> None:
    a, b = _data(seed=1), _data(d=4, seed=2)
    c = CrossStats.empty(7, 4).update(torch.from_numpy(a[:300]), torch.from_numpy(b[:300]))
    c = c + CrossStats.empty(7, 4).update(torch.from_numpy(a[300:]), torch.from_numpy(b[300:]))
    ref = (a - a.mean(0)).T @ (b - b.mean(0)) / len(a)
    np.testing.assert_allclose(c.cross_covariance().numpy(), ref, rtol=1e-10, atol=1e-12)
    r = CrossStats.from_tensors(c.to_tensors())
    assert torch.equal(r.m_ab, c.m_ab) and r.count == 600


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        MomentStats.empty(3).update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="equal n"):
        CrossStats.empty(3, 2).update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="no tokens"):
        MomentStats.empty(3).mean()


@pytest.mark.parametrize("d", [5, 300, 700])
def test_blocked_gram_equals_the_full_product(d: int) -> None:
    from gradfree.capture.stats import gram_add_

    g = torch.Generator().manual_seed(d)
    x = torch.randn(64, d, generator=g, dtype=torch.float64)
    m = torch.eye(d, dtype=torch.float64)
    gram_add_(m, x)
    torch.testing.assert_close(
        m, torch.eye(d, dtype=torch.float64) + x.T @ x, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(m, m.T, rtol=0, atol=1e-12)  # lower blocks mirror the upper
