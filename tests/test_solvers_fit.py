"""Fitting solvers on planted problems: ridge, assignment, layer maps / CKA, merge weights.

References are independent: numpy lstsq on the stacked ridge system, brute-force enumeration,
numpy correlation / CKA on the raw data, and a dense grid search for α.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gradfree.capture.similarity import correlation_from_stats, linear_cka_from_stats
from gradfree.capture.stats import CrossStats, MomentStats
from gradfree.solvers import (
    grouped_hungarian,
    hungarian,
    iter_ridge_chunks,
    linear_cka_from_moments,
    linear_loss_from_stats,
    monotone_layer_map,
    optimal_alpha,
    optimal_alpha_per_row,
    resolve_lambda,
    ridge_from_stats,
    ridge_from_stats_chunked,
)


def _problem(seed: int = 0, n: int = 200, d_in: int = 8, d_out: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in)) @ rng.standard_normal((d_in, d_in))
    y = x @ rng.standard_normal((d_in, d_out)) + 0.5 * rng.standard_normal((n, d_out))
    prior = rng.standard_normal((d_out, d_in))
    return x, y, prior


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


# Ridge -------------------------------------------------------------------------------------------
def test_ridge_equals_lstsq_of_the_stacked_augmented_system() -> None:
    x, y, prior = _problem()
    lam = 7.0
    a = np.vstack([x, np.sqrt(lam) * np.eye(x.shape[1])])
    b = np.vstack([y, np.sqrt(lam) * prior.T])
    ref = np.linalg.lstsq(a, b, rcond=None)[0].T
    w = ridge_from_stats(_t(x.T @ x), _t(x.T @ y), lam, _t(prior))
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-10)
    ref0 = np.linalg.lstsq(np.vstack([x, np.sqrt(lam) * np.eye(8)]), np.vstack([y, 0 * prior.T]))
    np.testing.assert_allclose(ridge_from_stats(_t(x.T @ x), _t(x.T @ y), lam).numpy(), ref0[0].T)


def test_ridge_limits_prior_and_ols() -> None:
    x, y, prior = _problem(1)
    xtx, xty = _t(x.T @ x), _t(x.T @ y)
    w_big = ridge_from_stats(xtx, xty, 1e12, _t(prior))
    np.testing.assert_allclose(w_big.numpy(), prior, atol=1e-6)
    ols = np.linalg.lstsq(x, y, rcond=None)[0].T
    np.testing.assert_allclose(ridge_from_stats(xtx, xty, 0.0, _t(prior)).numpy(), ols, atol=1e-9)
    np.testing.assert_allclose(ridge_from_stats(xtx, xty, 1e-12).numpy(), ols, atol=1e-8)


def test_ridge_relative_and_per_sample_lambda() -> None:
    x, y, prior = _problem(2)
    xtx, xty, p = _t(x.T @ x), _t(x.T @ y), _t(prior)
    lam_abs = 0.05 * float(np.diag(x.T @ x).mean())
    assert resolve_lambda(xtx, rel_lam=0.05) == pytest.approx(lam_abs)
    w_rel = ridge_from_stats(xtx, xty, prior=p, rel_lam=0.05)
    assert torch.allclose(w_rel, ridge_from_stats(xtx, xty, lam_abs, p), atol=1e-12)
    assert torch.allclose(
        ridge_from_stats(xtx, xty, 0.1, p, n=200), ridge_from_stats(xtx, xty, 20.0, p), atol=1e-12
    )
    with pytest.raises(ValueError, match="not both"):
        ridge_from_stats(xtx, xty, 1.0, rel_lam=0.1)


def test_ridge_falls_back_to_minimum_norm_lstsq_when_singular() -> None:
    x, y, _ = _problem(3)
    x[:, 2] = 0.0  # XᵀX is exactly singular: Cholesky fails
    w = ridge_from_stats(_t(x.T @ x), _t(x.T @ y), 0.0)
    ref = np.linalg.lstsq(x, y, rcond=None)[0].T  # minimum-norm: column 2 gets weight 0
    assert torch.isfinite(w).all()
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-8)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_ridge_chunked_equals_unchunked(chunk: int) -> None:
    x, y, prior = _problem(4, d_out=11)
    xtx, xty, p = _t(x.T @ x), _t(x.T @ y), _t(prior)
    full = ridge_from_stats(xtx, xty, 3.0, p)

    def xty_fn(lo: int, hi: int) -> torch.Tensor:
        return xty[:, lo:hi]

    w = ridge_from_stats_chunked(xtx, xty_fn, 11, 3.0, p, chunk)
    assert torch.allclose(w, full, atol=1e-12)
    w_fn = ridge_from_stats_chunked(xtx, xty_fn, 11, 3.0, lambda lo, hi: p[lo:hi], chunk)
    assert torch.allclose(w_fn, full, atol=1e-12)
    ranges = [(lo, hi) for lo, hi, _ in iter_ridge_chunks(xtx, xty_fn, 11, 3.0, p, chunk)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 11 and len(ranges) == -(-11 // chunk)
    w16 = ridge_from_stats_chunked(xtx, xty_fn, 11, 3.0, p, chunk, dtype=torch.bfloat16)
    assert w16.dtype == torch.bfloat16 and torch.allclose(w16.double(), full, rtol=1e-2, atol=1e-2)


# Assignment --------------------------------------------------------------------------------------
def test_hungarian_recovers_planted_permutation_from_noisy_similarity() -> None:
    rng = np.random.default_rng(5)
    perm = rng.permutation(20)
    sim = np.eye(20)[perm] + 0.3 * rng.standard_normal((20, 20))  # row i matches column perm[i]
    assert hungarian(_t(sim)).tolist() == perm.tolist()
    assert hungarian(_t(-sim), maximize=False).tolist() == perm.tolist()


def test_hungarian_is_optimal_against_brute_force_and_selects_columns() -> None:
    rng = np.random.default_rng(6)
    sim = rng.standard_normal((6, 6))
    best = max(itertools.permutations(range(6)), key=lambda p: sim[range(6), p].sum())
    assert hungarian(_t(sim)).tolist() == list(best)
    rect = rng.standard_normal((3, 5))
    best_r = max(itertools.permutations(range(5), 3), key=lambda p: rect[range(3), p].sum())
    assert hungarian(_t(rect)).tolist() == list(best_r)
    with pytest.raises(ValueError, match="m <= n"):
        hungarian(_t(rect.T))


def test_grouped_hungarian_never_crosses_groups() -> None:
    rng = np.random.default_rng(7)
    groups_a = [0, 0, 0, 1, 1, 2, 2, 2]
    groups_b = [2, 2, 2, 1, 1, 1, 0, 0, 0]  # group 1 has a spare column
    ga, gb = np.array(groups_a), np.array(groups_b)
    sim = np.where(ga[:, None] == gb[None, :], rng.random((8, 9)), 10.0)  # crossing pays more
    cols = grouped_hungarian(_t(sim), groups_a, groups_b).tolist()
    assert len(set(cols)) == 8 and all(gb[c] == ga[i] for i, c in enumerate(cols))
    for g in (0, 1, 2):  # and within each group it is the optimal matching
        rows, cand = np.nonzero(ga == g)[0], np.nonzero(gb == g)[0]
        sub = hungarian(_t(sim[np.ix_(rows, cand)]))
        assert [cols[r] for r in rows] == cand[sub.numpy()].tolist()
    assert hungarian(_t(sim)).tolist() != cols  # the ungrouped solve would cross
    with pytest.raises(ValueError, match="only"):
        grouped_hungarian(_t(sim.T), groups_b, groups_a)


def test_correlation_from_stats_equals_numpy() -> None:
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 4)) + 2.0
    b = np.hstack([a[:, :2] @ rng.standard_normal((2, 3)), rng.standard_normal((300, 2))])
    b[:, 4] = 7.3  # constant (its raw-moment variance rounds to ~1e-13): correlation 0
    ta, tb = _t(a), _t(b)
    cross = CrossStats.empty(4, 5).update(ta, tb)
    ref = np.zeros((4, 5))
    ref[:, :4] = np.corrcoef(a.T, b[:, :4].T)[:4, 4:]
    for full in (True, False):
        sa, sb = MomentStats.empty(4, full).update(ta), MomentStats.empty(5, full).update(tb)
        np.testing.assert_allclose(correlation_from_stats(sa, sb, cross).numpy(), ref, atol=1e-10)
    with pytest.raises(ValueError, match="same tokens"):
        correlation_from_stats(MomentStats.empty(4).update(ta[:10]), sb, cross)


# Layer maps and CKA ------------------------------------------------------------------------------
def _brute(score: np.ndarray, strict: bool, anchor: bool) -> list[int]:
    n_s, n_t = score.shape
    gen = itertools.combinations if strict else itertools.combinations_with_replacement
    maps = [m for m in gen(range(n_t), n_s) if not anchor or (m[0] == 0 and m[-1] == n_t - 1)]
    return list(max(maps, key=lambda m: score[range(n_s), list(m)].sum()))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("anchor", [False, True])
def test_monotone_layer_map_equals_brute_force(seed: int, strict: bool, anchor: bool) -> None:
    rng = np.random.default_rng(seed)
    score = rng.standard_normal((4, 7))
    assert monotone_layer_map(_t(score), strict=strict, anchor_ends=anchor) == _brute(
        score, strict, anchor
    )


def test_monotone_layer_map_recovers_planted_path_and_validates() -> None:
    planted = [0, 0, 2, 3, 3, 6]
    score = np.random.default_rng(9).random((6, 7)) * 0.5
    score[range(6), planted] += 1.0
    assert monotone_layer_map(score) == planted
    with pytest.raises(ValueError, match="L_t >= L_s"):
        monotone_layer_map(score.T, strict=True)


def _cka_np(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _cka_stats(x: np.ndarray, y: np.ndarray) -> float:
    tx, ty = _t(x), _t(y)
    cross = CrossStats.empty(x.shape[1], y.shape[1]).update(tx, ty)
    sx, sy = MomentStats.empty(x.shape[1]).update(tx), MomentStats.empty(y.shape[1]).update(ty)
    return linear_cka_from_stats(sx, sy, cross)


def test_linear_cka_equals_numpy_and_is_invariant() -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    y = np.hstack([x[:, :3], rng.standard_normal((400, 5))]) + 1.0
    value = _cka_stats(x, y)
    assert value == pytest.approx(_cka_np(x, y), rel=1e-10) and 0.0 < value < 1.0
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    assert _cka_stats(3.7 * x @ q + 5.0, y) == pytest.approx(value, rel=1e-10)
    assert _cka_stats(x, x) == pytest.approx(1.0, rel=1e-12)
    assert _cka_stats(x, 2.0 * x @ q) == pytest.approx(1.0, rel=1e-10)
    xc = x - x.mean(0)
    cxx = _t(xc.T @ xc)
    assert linear_cka_from_moments(cxx, cxx, cxx) == pytest.approx(1.0)
    # Not invariant to a non-isotropic scaling: the test above can fail.
    assert _cka_stats(x * np.arange(1, 7), y) != pytest.approx(value, rel=1e-3)


def test_linear_cka_of_a_constant_side_is_undefined() -> None:
    x = _t(np.random.default_rng(11).standard_normal((50, 3)))
    c = torch.full((50, 2), 4.0, dtype=torch.float64)
    sx, sc = MomentStats.empty(3).update(x), MomentStats.empty(2).update(c)
    cross = CrossStats.empty(3, 2).update(x, c)
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka_from_stats(sx, sc, cross)
    assert linear_cka_from_stats(sx, sc, cross, undefined=0.0) == 0.0
    with pytest.raises(ValueError, match="same tokens"):
        linear_cka_from_stats(MomentStats.empty(3).update(x[:5]), sc, cross, undefined=0.0)


# Merge weight ------------------------------------------------------------------------------------
def _merge_problem(seed: int, alpha: float | None, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 6))
    w_s, w_t = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    if alpha is None:
        y = x @ rng.standard_normal((6, 4))
    else:
        y = x @ (alpha * w_t + (1 - alpha) * w_s).T + noise * rng.standard_normal((300, 4))
    return x, y, w_s, w_t


def test_optimal_alpha_recovers_planted_alpha_and_clips() -> None:
    x, y, w_s, w_t = _merge_problem(11, 0.3)
    xtx, xty, ts, tt = _t(x.T @ x), _t(x.T @ y), _t(w_s), _t(w_t)
    assert optimal_alpha(xtx, xty, ts, tt) == pytest.approx(0.3, abs=1e-10)
    x, y, w_s, w_t = _merge_problem(12, 1.7)
    args = (_t(x.T @ x), _t(x.T @ y), _t(w_s), _t(w_t))
    assert optimal_alpha(*args) == 1.0
    assert optimal_alpha(*args, clip=False) == pytest.approx(1.7, abs=1e-10)
    assert optimal_alpha(args[0], args[1], args[2], args[2]) == 0.0  # D = 0: keep the student


@pytest.mark.parametrize("seed", range(4))
def test_optimal_alpha_equals_dense_grid_minimum(seed: int) -> None:
    x, y, w_s, w_t = _merge_problem(20 + seed, None)
    grid = np.linspace(-2.0, 3.0, 50001)
    d = x @ (w_t - w_s).T
    r0 = x @ w_s.T - y
    loss = (
        (r0**2).sum() + 2 * grid * (r0 * d).sum() + grid**2 * (d**2).sum()
    )  # ‖r0 + α d‖², expanded
    brute = [np.square(x @ (a * w_t + (1 - a) * w_s).T - y).sum() for a in grid[::5000]]
    np.testing.assert_allclose(loss[::5000], brute, rtol=1e-10)
    alpha = optimal_alpha(_t(x.T @ x), _t(x.T @ y), _t(w_s), _t(w_t), clip=False)
    assert alpha == pytest.approx(grid[np.argmin(loss)], abs=2e-4)
    stats = (_t(x.T @ x), _t(x.T @ y), float((y**2).sum()))
    w_star = _t(alpha * w_t + (1 - alpha) * w_s)
    assert linear_loss_from_stats(*stats, w_star) <= loss.min() + 1e-8
    assert linear_loss_from_stats(*stats, _t(w_s)) == pytest.approx((r0**2).sum(), rel=1e-10)


def test_optimal_alpha_per_row_recovers_planted_rows() -> None:
    rng = np.random.default_rng(30)
    x = rng.standard_normal((200, 5))
    w_s, w_t = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    alphas = np.array([0.1, 0.5, 0.9])
    y = x @ (alphas[:, None] * w_t + (1 - alphas[:, None]) * w_s).T
    got = optimal_alpha_per_row(_t(x.T @ x), _t(x.T @ y), _t(w_s), _t(w_t))
    np.testing.assert_allclose(got.numpy(), alphas, atol=1e-10)
    one = optimal_alpha(_t(x.T @ x), _t(x.T @ y[:, 1:2]), _t(w_s[1:2]), _t(w_t[1:2]))
    assert one == pytest.approx(0.5, abs=1e-10)
