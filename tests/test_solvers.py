"""Geometry solvers on planted problems: Procrustes, PCA, two-tier bases, Grassmann, Householder.

Each test plants a known answer (a rotation, an embedding, eigenvectors, a reflection) or checks
against an independent reference (scipy, brute force, the data-side objective).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from gradfree.capture.stats import CrossStats
from gradfree.solvers import (
    align_tiers,
    best_reflection,
    best_reflection_from_cross,
    blockwise_procrustes,
    geodesic_average,
    householder_from_vectors,
    joint_semi_orthogonal,
    pca_basis,
    principal_angles,
    procrustes,
    procrustes_from_cross,
    project_cross,
    refine_with_reflections,
    reflection_gain,
    semi_orthogonal_map,
    transition_cost,
    two_tier_basis,
    variance_preserved,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _gauss(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape))


def _orth(rng: np.random.Generator, d: int, k: int | None = None) -> torch.Tensor:
    q, _ = torch.linalg.qr(_gauss(rng, d, k or d))
    return q


def _err(a: torch.Tensor, r: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a @ r - b) ** 2)


def _eye(d: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64)


# Procrustes --------------------------------------------------------------------------------------
def test_procrustes_recovers_planted_rotation_from_data_and_streamed_stats() -> None:
    rng = _rng()
    a, r0 = _gauss(rng, 300, 12), _orth(rng, 12)
    b = a @ r0
    assert torch.allclose(procrustes(a, b), r0, atol=1e-10)
    cross = CrossStats.empty(12, 12)
    for lo in range(0, 300, 70):  # streamed in uneven batches
        cross.update(a[lo : lo + 70], b[lo : lo + 70])
    assert torch.allclose(procrustes_from_cross(cross.m_ab), r0, atol=1e-10)


def test_procrustes_matches_scipy_and_is_optimal() -> None:
    rng = _rng(1)
    a, b = _gauss(rng, 200, 8), _gauss(rng, 200, 8)
    r = procrustes(a, b)
    ref, _ = scipy.linalg.orthogonal_procrustes(a.numpy(), b.numpy())
    np.testing.assert_allclose(r.numpy(), ref, atol=1e-10)
    assert torch.allclose(r.T @ r, _eye(8), atol=1e-12)
    assert all(_err(a, r, b) <= _err(a, _orth(rng, 8), b) for _ in range(20))


def test_procrustes_scale_recovers_planted_scalar() -> None:
    rng = _rng(2)
    a, r0 = _gauss(rng, 100, 6), _orth(rng, 6)
    r, s = procrustes(a, 2.5 * a @ r0, scale=True)
    assert torch.allclose(r, r0, atol=1e-10) and s == pytest.approx(2.5, abs=1e-10)


def test_semi_orthogonal_map_recovers_planted_embedding() -> None:
    rng = _rng(3)
    x_s, e = _gauss(rng, 400, 5), _orth(rng, 9, 5)  # teacher = student embedded in 9 dims
    x_t = x_s @ e.T
    cross = CrossStats.empty(9, 5).update(x_t, x_s)
    v = semi_orthogonal_map(cross.m_ab)
    assert v.shape == (9, 5) and torch.allclose(v, e, atol=1e-10)
    v2, s = semi_orthogonal_map((3.0 * x_t).T @ x_s, scale=True, sq_norm_s=float((x_s**2).sum()))
    assert torch.allclose(v2, e, atol=1e-10) and s == pytest.approx(3.0, abs=1e-10)
    assert torch.allclose(joint_semi_orthogonal(cross.m_ab), v)
    with pytest.raises(ValueError, match="d_t >= d_s"):
        semi_orthogonal_map(cross.m_ab.T)


def test_blockwise_procrustes_recovers_block_rotation_and_is_bounded_by_joint() -> None:
    rng = _rng(4)
    a = _gauss(rng, 300, 7)
    r0 = torch.block_diag(_orth(rng, 3), _orth(rng, 4))
    blocks = [(3, 7), (0, 3)]  # order does not matter
    assert torch.allclose(blockwise_procrustes(a.T @ (a @ r0), blocks), r0, atol=1e-10)
    c = a.T @ _gauss(rng, 300, 7)
    rb, rj = blockwise_procrustes(c, blocks), procrustes_from_cross(c)
    assert torch.allclose(rb.T @ rb, _eye(7), atol=1e-12) and rb[:3, 3:].abs().max() == 0
    fit = [float((r * c).sum()) for r in (rj, rb)]
    rand = torch.block_diag(_orth(rng, 3), _orth(rng, 4))
    assert fit[0] >= fit[1] - 1e-9 and fit[1] >= float((rand * c).sum())
    with pytest.raises(ValueError, match="partition"):
        blockwise_procrustes(c, [(0, 3), (4, 7)])


# PCA and the two tiers ---------------------------------------------------------------------------
def _planted_cov(
    rng: np.random.Generator, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v0 = _orth(rng, d)
    lam = torch.linspace(10.0, 0.5, d, dtype=torch.float64)
    return v0 @ torch.diag(lam) @ v0.T, v0, lam


def test_pca_recovers_eigenvectors_with_deterministic_signs() -> None:
    cov, v0, lam = _planted_cov(_rng(5), 10)
    vals, v = pca_basis(cov, 4)
    assert torch.allclose(vals, lam[:4], atol=1e-10)
    assert torch.allclose((v.T @ v0[:, :4]).abs(), _eye(4), atol=1e-10)
    cols = torch.arange(4)
    assert (v[v.abs().argmax(0), cols] > 0).all()  # the sign convention of numerics.fix_signs
    # The same covariance built from −V, summed in another order (not bit-identical): same basis.
    flipped = sum(lam[i] * torch.outer(-v0[:, i], -v0[:, i]) for i in reversed(range(10)))
    assert isinstance(flipped, torch.Tensor) and not torch.equal(flipped, cov)
    assert torch.allclose(pca_basis(flipped, 4)[1], v, atol=1e-10)
    assert torch.equal(pca_basis(cov, 4)[1], v)


def test_pca_damping_shifts_eigenvalues_only() -> None:
    cov, _, lam = _planted_cov(_rng(6), 6)
    vals, v = pca_basis(cov, 3, damping=0.1)
    assert torch.allclose(vals, lam[:3] + 0.1 * lam.mean(), atol=1e-10)
    assert torch.allclose(v, pca_basis(cov, 3)[1], atol=1e-10)
    with pytest.raises(ValueError, match="k must be"):
        pca_basis(cov, 7)


def test_variance_preserved_matches_data_and_eigenvalues() -> None:
    rng = _rng(7)
    x = _gauss(rng, 500, 8) @ _gauss(rng, 8, 8)
    x = x - x.mean(0)
    cov = x.T @ x / len(x)
    vals, v = pca_basis(cov, 3)
    ratio = variance_preserved(cov, v)
    assert ratio == pytest.approx(float(vals.sum() / torch.trace(cov)), rel=1e-12)
    assert ratio == pytest.approx(float((x @ v @ v.T).square().sum() / x.square().sum()), rel=1e-10)


@pytest.mark.parametrize(("k", "trunk"), [(6, 3), (6, 0), (6, 6), (9, 1)])
def test_two_tier_basis_equals_pca_for_one_covariance(k: int, trunk: int) -> None:
    cov, _, _ = _planted_cov(_rng(8), 12)
    assert torch.allclose(two_tier_basis(cov, k, trunk), pca_basis(cov, k)[1], atol=1e-10)


def test_two_tier_basis_stays_orthonormal_when_residual_is_rank_deficient() -> None:
    rng = _rng(9)
    x = _gauss(rng, 50, 3) @ _gauss(rng, 3, 10)  # rank 3 < k = 6
    v = two_tier_basis(x.T @ x, 6, 2)
    assert torch.allclose(v.T @ v, _eye(6), atol=1e-10)


def test_align_tiers_recovers_planted_per_tier_rotation() -> None:
    rng = _rng(10)
    k, trunk = 6, 2
    z = _gauss(rng, 400, k)  # shared tier coordinates
    v_t, v_s = _orth(rng, 15, k), _orth(rng, 8, k)
    r_block = torch.block_diag(_orth(rng, trunk), _orth(rng, k - trunk))
    x_s, x_t = z @ v_s.T, z @ r_block.T @ v_t.T  # X_t V_t R = X_s V_s
    cross = project_cross(x_t.T @ x_s, v_t, v_s)
    assert torch.allclose(align_tiers(v_t, cross, trunk), v_t @ r_block, atol=1e-10)
    # A dense (tier-mixing) rotation is recovered by the joint solve but not by the tiers.
    r_dense = _orth(rng, k)
    cross = project_cross((z @ r_dense.T @ v_t.T).T @ x_s, v_t, v_s)
    assert torch.allclose(procrustes_from_cross(cross), r_dense, atol=1e-10)
    assert not torch.allclose(align_tiers(v_t, cross, trunk), v_t @ r_dense, atol=1e-3)


# Grassmann ---------------------------------------------------------------------------------------
def test_transition_cost_values() -> None:
    v = _orth(_rng(11), 10, 4)
    assert transition_cost(v, v) == pytest.approx(0.0, abs=1e-12)
    assert transition_cost(v, -v) == pytest.approx(2.0, abs=1e-12)
    swapped = v[:, [1, 0, 2, 3]]  # one transposition: ‖P − I‖_F = 2
    assert transition_cost(v, swapped) == pytest.approx(2.0 / 2.0, abs=1e-12)


def test_geodesic_average_endpoints_angles_and_symmetry() -> None:
    rng = _rng(12)
    v1, v2 = _orth(rng, 12, 4), _orth(rng, 12, 4)
    assert torch.allclose(geodesic_average(v1, v2, 0.0), v1, atol=1e-10)
    assert torch.allclose(geodesic_average(v1, v2, 1.0), v2, atol=1e-10)
    theta = principal_angles(v1, v2)
    y = geodesic_average(v1, v2, 0.3)
    assert torch.allclose(y.T @ y, _eye(4), atol=1e-12)
    assert torch.allclose(principal_angles(v1, y), 0.3 * theta, atol=1e-8)
    assert torch.allclose(principal_angles(y, v2), 0.7 * theta, atol=1e-8)
    m12, m21 = geodesic_average(v1, v2), geodesic_average(v2, v1)
    assert torch.allclose(m12 @ m12.T, m21 @ m21.T, atol=1e-10)  # same midpoint subspace


def test_geodesic_average_with_a_shared_direction() -> None:
    rng = _rng(13)
    q = _orth(rng, 8, 5)
    v1 = q[:, [0, 1, 2]]
    v2 = torch.linalg.qr(q[:, [0, 3, 4]] + 0.5 * v1)[0]  # shares q0 exactly (angle 0)
    theta = principal_angles(v1, v2)
    assert theta[0] == pytest.approx(0.0, abs=1e-7) and (theta[1:] > 0.5).all()
    y = geodesic_average(v1, v2, 0.5)
    assert torch.isfinite(y).all() and torch.allclose(y.T @ y, _eye(3), atol=1e-10)
    assert torch.allclose(principal_angles(v1, y), 0.5 * theta, atol=1e-7)
    assert float((y.T @ q[:, 0]).norm()) == pytest.approx(1.0, abs=1e-10)  # q0 stays in span


# Householder -------------------------------------------------------------------------------------
def test_householder_maps_u_to_v_and_is_an_orthogonal_symmetric_reflection() -> None:
    rng = _rng(14)
    u, v = _gauss(rng, 7), _gauss(rng, 7)
    h = householder_from_vectors(u, v)
    assert torch.allclose(h @ (u / u.norm()), v / v.norm(), atol=1e-12)
    assert torch.allclose(h, h.T) and torch.allclose(h @ h, _eye(7), atol=1e-12)
    assert float(torch.linalg.det(h)) == pytest.approx(-1.0)
    assert torch.equal(householder_from_vectors(u, 3 * u), _eye(7))


def test_best_reflection_recovers_planted_reflection() -> None:
    rng = _rng(15)
    a = _gauss(rng, 200, 6)
    h0 = householder_from_vectors(_gauss(rng, 6), _gauss(rng, 6))
    assert torch.allclose(best_reflection(a, a @ h0), h0, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_best_reflection_never_increases_error_and_beats_alternatives(seed: int) -> None:
    rng = _rng(100 + seed)
    a = _gauss(rng, 120, 6) + 2.0
    b = a @ _orth(rng, 6) + 0.3 * _gauss(rng, 120, 6)
    m, base = a.T @ b, _err(a, _eye(6), b)
    h, gain = best_reflection_from_cross(m)
    assert _err(a, h, b) == pytest.approx(base - gain, rel=1e-9) and gain >= 0
    assert _err(a, best_reflection(a, b, method="mean"), b) <= base + 1e-9
    for _ in range(30):
        hr = householder_from_vectors(_gauss(rng, 6), _gauss(rng, 6))
        assert reflection_gain(m, hr) <= gain + 1e-9
        assert reflection_gain(m, hr) == pytest.approx(base - _err(a, hr, b), rel=1e-8, abs=1e-8)
    q, gains = refine_with_reflections(m, max_steps=3)
    assert _err(a, q, b) == pytest.approx(base - sum(gains), rel=1e-9)
    assert len(gains) <= 3 and all(g > 0 for g in gains)


def test_no_reflection_improves_a_procrustes_solution_and_bad_heuristic_is_rejected() -> None:
    rng = _rng(16)
    a, b = _gauss(rng, 150, 5), _gauss(rng, 150, 5)
    a_rot = a @ procrustes(a, b)
    h, gain = best_reflection_from_cross(a_rot.T @ b)
    assert gain == 0.0 and torch.equal(h, _eye(5))
    # Seed 001's mean heuristic on a slightly rotated, off-centre cloud: the raw reflection hurts.
    x = _gauss(rng, 150, 5) + torch.tensor([3.0, 0, 0, 0, 0], dtype=torch.float64)
    g = _gauss(rng, 5, 5)
    small = torch.linalg.matrix_exp(0.05 * (g - g.T))  # a rotation close to I
    y = x @ small
    raw = householder_from_vectors(x.mean(0), y.mean(0))
    assert _err(x, raw, y) > _err(x, _eye(5), y)
    assert torch.equal(best_reflection(x, y, method="mean"), _eye(5))
