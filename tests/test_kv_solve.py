"""The maths of fitting low-rank KV coders (gradfree.kv.solve), checked against brute force:
weighted PCA is exact at full rank and optimal in its metric, the rotation average equals an
explicit average of 2×2 RoPE rotations, complex coders commute with RoPE, and rank allocation
with floors, groups and shares keeps the largest normalised energies exactly."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.kv import allocate_ranks
from gradfree.kv.solve import (
    complex_components,
    pair_isotropic,
    pair_order,
    query_metrics,
    rotation_averaged,
    weighted_pca,
)

D64 = torch.float64


def _spd(d: int, seed: int, decay: float = 0.5) -> torch.Tensor:
    """A random SPD matrix with a decaying spectrum (so that truncation drops something)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    vals = torch.exp(-decay * torch.arange(d, dtype=D64)) * (1 + torch.rand(d, generator=g))
    return (q * vals) @ q.T


def _m_error(cov: torch.Tensor, m: torch.Tensor, e: torch.Tensor, d: torch.Tensor) -> float:
    """E[eᵀ M e] for centred data of covariance ``cov`` coded as x̂ = D E x."""
    res = torch.eye(cov.shape[0], dtype=D64) - d @ e
    return float(torch.trace(m @ res @ cov @ res.T))


# weighted PCA ---------------------------------------------------------------------------------
def test_plain_pca_is_the_eigendecomposition() -> None:
    cov = _spd(8, 0)
    vals, e, d = weighted_pca(cov, None)
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close(d @ e, torch.eye(8, dtype=D64), atol=1e-12, rtol=0)
    torch.testing.assert_close(e, d.T, atol=0, rtol=0)
    torch.testing.assert_close(cov @ d, d * vals, atol=1e-12, rtol=0)
    ref = torch.linalg.eigvalsh(cov).flip(0)
    torch.testing.assert_close(vals, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_pca_is_exact_at_full_rank_and_optimal_in_its_metric(seed: int) -> None:
    d = 10
    cov, m = _spd(d, seed), _spd(d, seed + 100, decay=0.3)
    vals, e, dec = weighted_pca(cov, m)
    eye = torch.eye(d, dtype=D64)
    torch.testing.assert_close(dec @ e, eye, atol=1e-9, rtol=0)
    torch.testing.assert_close(e @ dec, eye, atol=1e-9, rtol=0)
    # the eigenvalues of M^1/2 C M^1/2 are those of M C (computed without any square root)
    ref = torch.linalg.eigvals(m @ cov).real.sort(descending=True).values
    torch.testing.assert_close(vals, ref, rtol=1e-5, atol=0)
    _, e0, d0 = weighted_pca(cov, None)
    g = torch.Generator().manual_seed(seed)
    for r in (1, 3, 6, 9):
        err = _m_error(cov, m, e[:r], dec[:, :r])
        # the truncated error is the sum of the dropped eigenvalues (M is damped by 1e-6)
        assert err == pytest.approx(float(vals[r:].sum()), rel=1e-5)
        # it beats plain PCA in the M-metric, and random rank-r coders
        assert err < _m_error(cov, m, e0[:r], d0[:, :r]) * (1 - 1e-3)
        for _ in range(5):
            a = torch.randn(r, d, generator=g, dtype=D64)
            b = torch.randn(d, r, generator=g, dtype=D64)
            # the best decoder for encoder a (M-weighted least squares) still loses
            best = cov @ a.T @ torch.linalg.inv(a @ cov @ a.T)
            assert err <= _m_error(cov, m, a, best) + 1e-9
            assert err <= _m_error(cov, m, a, b)


# RoPE maths -----------------------------------------------------------------------------------
def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """The (hd, hd) RoPE matrix in HF's rotate-half layout from explicit 2×2 blocks: pair j is
    (dims j, j + hd/2), turned by ``angles[j]``."""
    h = int(angles.shape[0])
    r = torch.zeros(2 * h, 2 * h, dtype=D64)
    for j, a in enumerate(angles.tolist()):
        c, s = math.cos(a), math.sin(a)
        r[j, j], r[j, j + h] = c, -s
        r[j + h, j], r[j + h, j + h] = s, c
    return r


def _hf_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) rows (N, hd) as HF's rotary emits them for angles (N, hd/2)."""
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def test_rotation_matrix_is_hf_rope() -> None:
    """The explicit 2×2 rotation is what x cos + rotate_half(x) sin does (the test's own
    reference is itself right)."""
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(4, generator=g, dtype=D64) * 6
    x = torch.randn(8, generator=g, dtype=D64)
    cos, sin = _hf_cos_sin(angles[None])
    half = torch.cat([-x[4:], x[:4]])
    torch.testing.assert_close(_rotation(angles) @ x, x * cos[0] + half * sin[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_rotation_averaged_equals_brute_force(seed: int) -> None:
    hd = 8
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(hd, hd, generator=g, dtype=D64)
    m = a @ a.T  # a dense, non-isotropic metric
    theta = 1.0 / 100.0 ** (torch.arange(hd // 2, dtype=D64) / (hd // 2))
    lags = torch.arange(7, dtype=D64)
    weights = torch.rand(7, generator=g, dtype=D64) + 0.1
    angles = lags[:, None] * theta[None, :]
    cos, sin = _hf_cos_sin(angles)
    want = sum(
        w * _rotation(-ang).T @ m @ _rotation(-ang)
        for w, ang in zip(weights.tolist(), angles, strict=True)
    ) / float(weights.sum())
    got = rotation_averaged(m, cos, sin, weights)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)  # type: ignore[arg-type]
    # one lag 0: M itself; a pair-isotropic diagonal metric is left as it is
    torch.testing.assert_close(rotation_averaged(m, cos[:1], sin[:1], weights[:1]), m)
    iso = torch.diag(pair_isotropic(torch.diagonal(m)))
    torch.testing.assert_close(rotation_averaged(iso, cos, sin, weights), iso)


def test_rope_lags_are_the_models_rotary_at_each_lag() -> None:
    from gradfree.kv.fit import rope_lags
    from gradfree.testing.tiny import tiny_model

    model = tiny_model("qwen3")
    hd, base = model.config.head_dim, float(model.config.rope_parameters["rope_theta"])
    cos, sin, w = rope_lags(model, 5)
    theta = 1.0 / base ** (torch.arange(0, hd, 2, dtype=D64) / hd)
    ref_cos, ref_sin = _hf_cos_sin(torch.arange(5, dtype=D64)[:, None] * theta[None, :])
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)  # float32 rotary
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
    assert w.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]  # (query, key) pairs of a causal window


def test_pair_isotropic_and_pair_order() -> None:
    diag = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=D64)
    assert pair_isotropic(diag).tolist() == [3.0, 4.0, 5.0, 6.0, 3.0, 4.0, 5.0, 6.0]
    energy = torch.tensor([1.0, 9.0, 0.0, 5.0, 1.0, 0.0, 2.0, 5.0], dtype=D64)
    # pair energies: j0 2, j1 9, j2 2, j3 10 → j3, j1, then the tie j0 before j2
    assert pair_order(energy).tolist() == [3, 7, 1, 5, 0, 4, 2, 6]


def test_query_metrics_sum_each_groups_query_heads() -> None:
    hd, n_q, n_kv = 2, 4, 2
    second = torch.arange((n_q * hd) ** 2, dtype=D64).reshape(n_q * hd, n_q * hd)
    got = query_metrics(second, n_kv, hd)
    for grp in range(n_kv):
        want = torch.zeros(hd, hd, dtype=D64)
        for h in (2 * grp, 2 * grp + 1):
            want += second[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd]
        assert torch.equal(got[grp], want)


# complex coders -------------------------------------------------------------------------------
def _complex_setup(
    seed: int, weighted: bool
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, int, int]:
    n_kv, hd = 3, 8
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_kv * hd, n_kv * hd, generator=g, dtype=D64)
    x = torch.randn(400, n_kv * hd, generator=g, dtype=D64) @ mix  # keys correlated across heads
    second = x.T @ x / x.shape[0]
    weights = None
    if weighted:
        w = torch.rand(n_kv, hd // 2, generator=g, dtype=D64) + 0.2
        weights = torch.cat([w, w], 1)  # pair-isotropic, as fit_bases hands it over
    return x, [second], weights, n_kv, hd


def _freq_of_rows(e: torch.Tensor, hd: int) -> list[int]:
    """The RoPE frequency j each latent pair (rows 2k, 2k + 1) reads (its support is dims j and
    j + hd/2 of the heads)."""
    out = []
    for k in range(e.shape[0] // 2):
        dims = {
            int(i) % hd % (hd // 2) for i in torch.nonzero(e[2 * k : 2 * k + 2]).flatten()[1::2]
        }
        assert len(dims) == 1
        out.append(dims.pop())
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_complex_components_commute_with_rope(weighted: bool) -> None:
    x, (second,), weights, n_kv, hd = _complex_setup(0, weighted)
    comps = complex_components(second, weights, n_kv, hd, 0)
    assert len(comps) == hd // 2 and all(c.paired and c.floor == 0 for c in comps)
    g = torch.Generator().manual_seed(5)
    angles = torch.rand(hd // 2, generator=g, dtype=D64) * 6
    rot = torch.block_diag(*[_rotation(angles)] * n_kv)  # every head turned alike
    keys = x[:20]
    for ranks in ([2, 4, 0, 6], [2 * n_kv] * (hd // 2)):
        parts = [c.make(r) for c, r in zip(comps, ranks, strict=True)]
        e = torch.cat([p[0] for p in parts], 0)
        d = torch.cat([p[1] for p in parts], 1)
        z, z_rot = keys @ e.T, (keys @ rot.T) @ e.T
        # the latent of R k is the latent of k, each pair turned by its frequency's angle
        for k, j in enumerate(_freq_of_rows(e, hd)):
            zc = torch.complex(z[:, 2 * k], z[:, 2 * k + 1]) * torch.exp(1j * angles[j])
            torch.testing.assert_close(z_rot[:, 2 * k], zc.real, atol=1e-10, rtol=0)
            torch.testing.assert_close(z_rot[:, 2 * k + 1], zc.imag, atol=1e-10, rtol=0)
        # so decode(encode(R k)) = R decode(encode(k))
        torch.testing.assert_close(z_rot @ d.T, (z @ d.T) @ rot.T, atol=1e-10, rtol=0)
        if sum(ranks) == n_kv * hd:
            torch.testing.assert_close(d @ e, torch.eye(n_kv * hd, dtype=D64), atol=1e-9, rtol=0)
        else:
            assert float((z @ d.T - keys).norm()) > 1e-3 * float(keys.norm())


def test_complex_spectrum_is_that_of_the_complex_second_moment() -> None:
    x, (second,), _, n_kv, hd = _complex_setup(1, False)
    comps = complex_components(second, None, n_kv, hd, 0)
    half = hd // 2
    for j, c in enumerate(comps):
        re = x[:, [h * hd + j for h in range(n_kv)]]
        im = x[:, [h * hd + j + half for h in range(n_kv)]]
        cx = torch.complex(re, im)  # (N, n_kv): one complex vector per token
        cc = cx.T @ cx.conj() / x.shape[0]  # E[c cᴴ]
        vals = torch.linalg.eigvalsh(cc).flip(0)
        torch.testing.assert_close(c.spectrum, vals.repeat_interleave(2), atol=1e-9, rtol=1e-9)
        # the truncated coder loses exactly the dropped complex eigenvalues
        for r in range(n_kv + 1):
            e, d = c.make(2 * r)
            dims = [h * hd + j for h in range(n_kv)] + [h * hd + j + half for h in range(n_kv)]
            xj = x[:, dims]
            err = float(((x @ e.T @ d.T)[:, dims] - xj).pow(2).sum(1).mean())
            assert err == pytest.approx(float(vals[r:].sum()), rel=1e-9, abs=1e-9)


# rank allocation: floors, groups, shares -----------------------------------------------------
def _desc(rng: random.Random, d: int) -> torch.Tensor:
    decay = rng.uniform(0.05, 2.0)
    vals = [
        rng.uniform(0.5, 1.5) * math.exp(-decay * j) * rng.choice([1.0, 10.0]) for j in range(d)
    ]
    return torch.tensor(sorted(vals, reverse=True), dtype=D64)


def test_waterfill_with_floors_groups_and_shares_keeps_the_largest_energies() -> None:
    """Without pairs and with floors 0 the greedy equals sorting every eigenvalue divided by its
    group's total and multiplied by its component's share: the kept sum is the top of that list."""
    rng = random.Random(3)
    for _ in range(200):
        n, d = rng.randint(1, 8), rng.choice([2, 4, 8])
        spectra = [_desc(rng, d) for _ in range(n)]
        groups = [rng.choice("abc") for _ in range(n)]
        shares = [rng.uniform(0.2, 4.0) for _ in range(n)]
        budget = rng.uniform(0.01, 1.0)
        target = math.floor(budget * n * d + 1e-9)
        if target == 0:
            continue
        ranks = allocate_ranks(spectra, budget, floors=[0] * n, groups=groups, shares=shares)
        assert sum(ranks) == target and all(0 <= r <= d for r in ranks)
        totals = {gr: 0.0 for gr in groups}
        for s, gr in zip(spectra, groups, strict=True):
            totals[gr] += float(s.sum())
        norm = [s * x / totals[gr] for s, gr, x in zip(spectra, groups, shares, strict=True)]
        best = sorted((float(v) for s in norm for v in s), reverse=True)[:target]
        kept = sum(float(s[:r].sum()) for s, r in zip(norm, ranks, strict=True))
        assert kept == pytest.approx(sum(best), rel=1e-12)


def test_floors_paired_and_the_hand_examples() -> None:
    flat = torch.ones(8, dtype=D64)
    peaked = torch.tensor([100.0] + [1e-3] * 7, dtype=D64)
    # floors 0: one dimension goes where the energy is; the default floor of 1 each cannot
    assert allocate_ranks([flat, peaked], 1 / 16, floors=[0, 0]) == [0, 1]
    with pytest.raises(GradfreeError, match="fewer than the 2 needed"):
        allocate_ranks([flat, peaked], 1 / 16)
    # shares: ten times the flat component's normalised energy (1.25 per dim) beats 0.99998
    assert allocate_ranks([flat, peaked], 1 / 16, floors=[0, 0], shares=[10, 1]) == [1, 0]
    # groups: in one group the flat dims (1/108 each) still beat peaked's tail (1e-5 each)
    assert allocate_ranks([flat, peaked], 0.5, groups=["g", "g"]) == [7, 1]
    # floors above 1 are honoured, in units (pairs for paired components)
    assert allocate_ranks([flat, peaked], 0.5, floors=[1, 3], paired=[False, True]) == [2, 6]
    rng = random.Random(4)
    for _ in range(200):
        n, d = rng.randint(1, 8), rng.choice([2, 4, 8])
        spectra = [_desc(rng, d) for _ in range(n)]
        paired = [rng.random() < 0.5 for _ in range(n)]
        floors = [rng.choice([0, 0, 1, 2]) for _ in range(n)]
        cost = [2 if p else 1 for p in paired]
        floors = [min(f, d // c) for f, c in zip(floors, cost, strict=True)]
        need = sum(c * f for c, f in zip(cost, floors, strict=True))
        budget = rng.uniform(max(need, 1) / (n * d), 1.0)
        target = math.floor(budget * n * d + 1e-9)
        try:
            ranks = allocate_ranks(spectra, budget, paired=paired, floors=floors)
        except GradfreeError as e:
            assert "whole pairs" in str(e)
            # only when no split of the target into singles and whole pairs exists
            lo_s = sum(f for f, p in zip(floors, paired, strict=True) if not p)
            hi_s = sum(d for p in paired if not p)
            lo_p = sum(2 * f for f, p in zip(floors, paired, strict=True) if p)
            hi_p = sum(d for p in paired if p)
            assert not any(lo_s <= target - q <= hi_s for q in range(lo_p, hi_p + 1, 2))
            continue
        assert sum(ranks) == target
        for r, p, f, c in zip(ranks, paired, floors, cost, strict=True):
            assert c * f <= r <= d and (not p or r % 2 == 0)


def test_allocation_argument_errors() -> None:
    s = [torch.ones(4, dtype=D64)] * 2
    with pytest.raises(ValueError, match="one entry per spectrum"):
        allocate_ranks(s, 0.5, floors=[0])
    with pytest.raises(GradfreeError, match="even dimension"):
        allocate_ranks([torch.ones(3, dtype=D64)], 0.5, paired=[True])
    with pytest.raises(GradfreeError, match="no components"):
        allocate_ranks([], 0.5)
