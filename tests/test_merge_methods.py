"""The merge methods mergekit users reach for (issue 18 part 2), on hand-built tensors where the
answer is known: Model Stock, Breadcrumbs, DELLA, NuSLERP, Multi-SLERP, Karcher, passthrough."""

from __future__ import annotations

import math

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.merge import get_method, make_recipe
from gradfree.merge.linear import slerp
from gradfree.merge.sparse import magprune, outlier_mask
from gradfree.merge.spherical import karcher_mean, multislerp, nuslerp
from gradfree.merge.stock import model_stock

D = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_model_stock_of_identical_fine_tunes_is_that_model_and_of_orthogonal_ones_the_base() -> (
    None
):
    base = torch.randn(6, 5, generator=_g(0), dtype=D)
    ft = base + torch.randn(6, 5, generator=_g(1), dtype=D)
    out, t = model_stock([ft, ft.clone(), ft.clone()], base)
    assert torch.allclose(out, ft, atol=1e-12) and float(t) == pytest.approx(1.0)
    e1, e2 = torch.zeros(4, dtype=D), torch.zeros(4, dtype=D)
    e1[0], e2[1] = 1.0, 1.0
    out, t = model_stock([e1, e2], torch.zeros(4, dtype=D))
    assert float(t) == 0.0 and torch.equal(out, torch.zeros(4, dtype=D))
    # cos 0.5 between two task vectors: t = 2·0.5 / (1 + 0.5) = 2/3
    a, b = torch.tensor([1.0, 0.0], dtype=D), torch.tensor([0.5, math.sqrt(0.75)], dtype=D)
    out, t = model_stock([a, b], torch.zeros(2, dtype=D))
    assert float(t) == pytest.approx(2 / 3) and torch.allclose(out, (2 / 3) * (a + b) / 2)
    # opposite task vectors: 1 + cos = 0 has no estimate, the base is kept
    one = torch.ones(2, dtype=D)
    out, t = model_stock([one + a, one - a], one)
    assert float(t) == 0.0 and torch.equal(out, torch.ones(2, dtype=D))
    # filter-wise: one ratio per row
    rows = torch.stack([a, a])
    _, t = model_stock([rows, torch.stack([b, a])], torch.zeros(2, 2, dtype=D), filter_wise=True)
    assert t.tolist() == pytest.approx([2 / 3, 1.0])


def test_breadcrumbs_removes_the_largest_and_the_smallest_entries() -> None:
    tau = torch.tensor([3.0, -10.0, 1.0, 7.0, -5.0, 2.0, 9.0, -4.0, 6.0, 8.0], dtype=D)
    mask = outlier_mask(tau, density=0.5, gamma=0.2)  # drop 10, 9 (outliers), then 1, 2, 3
    assert sorted(tau[mask].abs().tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    # not enough room for both cuts: the outlier cut shrinks to keep the density
    mask = outlier_mask(tau, density=0.9, gamma=0.5)
    assert sorted(tau[mask].abs().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert bool(outlier_mask(tau, 1.0, 0.3).all())


def test_magprune_keeps_large_entries_more_often_and_is_unbiased() -> None:
    row = torch.linspace(0.01, 1.0, 2000, dtype=D)
    tau = torch.stack([row, -row.flip(0)])  # every row ranks its own entries
    out, kept = magprune(tau, density=0.5, epsilon=0.3, seed=7)
    again, _ = magprune(tau, density=0.5, epsilon=0.3, seed=7)
    assert torch.equal(out, again)  # seeded
    assert kept / tau.numel() == pytest.approx(0.5, abs=0.03)
    small = (out[0, :200] != 0).double().mean()  # keep probability near 0.2
    large = (out[0, -200:] != 0).double().mean()  # near 0.8
    assert float(small) == pytest.approx(0.2 + 0.3 * 0.1, abs=0.07)
    assert float(large) == pytest.approx(0.8 - 0.3 * 0.1, abs=0.07)
    # survivors are rescaled by 1/q: the average over seeds approaches τ
    mean = sum(magprune(tau[:, ::50], 0.5, 0.3, s)[0] for s in range(3000)) / 3000
    assert torch.allclose(mean, tau[:, ::50], rtol=0.12, atol=0.02)
    same, n = magprune(tau, 1.0, 0.3, 0)
    assert same is tau and n == tau.numel()


def test_della_refuses_keep_probabilities_outside_zero_one() -> None:
    r = make_recipe(
        {
            "method": "della",
            "base_model": "c",
            "models": ["a", "b"],
            "parameters": {"density": 0.2, "epsilon": 0.3},
        }
    )
    with pytest.raises(GradfreeError, match=r"density ± epsilon inside \(0, 1\) \(model 1"):
        get_method("della").configure(r)


def test_nuslerp_is_slerp_at_the_weights_ratio_flat_row_and_column_wise() -> None:
    a = torch.randn(4, 6, generator=_g(2), dtype=D)
    b = torch.randn(4, 6, generator=_g(3), dtype=D)
    assert torch.allclose(nuslerp(0.75, a, b), slerp(0.75, a, b)[0], atol=1e-12)
    rows = nuslerp(0.3, a, b, flatten=False)
    for i in range(4):
        assert torch.allclose(rows[i], slerp(0.3, a[i], b[i])[0], atol=1e-12)
    cols = nuslerp(0.3, a, b, flatten=False, row_wise=True)
    for j in range(6):
        assert torch.allclose(cols[:, j], slerp(0.3, a[:, j], b[:, j])[0], atol=1e-12)
    assert torch.allclose(nuslerp(0.4, a, 2 * a), 0.6 * a + 0.8 * a)  # colinear: straight line
    m = get_method("nuslerp").configure(
        make_recipe(
            {
                "method": "nuslerp",
                "models": [
                    {"model": "x", "parameters": {"weight": 1}},
                    {"model": "y", "parameters": {"weight": 3}},
                ],
            }
        )
    )
    assert torch.allclose(m.merge_tensor("w", [a, b], None), slerp(0.75, a, b)[0], atol=1e-12)


def test_multislerp_of_two_orthogonal_directions_is_their_normalised_midpoint() -> None:
    e1, e2 = torch.tensor([1.0, 0.0, 0.0], dtype=D), torch.tensor([0.0, 3.0, 0.0], dtype=D)
    out = multislerp([e1, e2], [0.5, 0.5])
    assert torch.allclose(out, 2.0 * torch.tensor([1.0, 1.0, 0.0], dtype=D) / math.sqrt(2.0))
    x = torch.randn(5, generator=_g(4), dtype=D)
    assert torch.allclose(multislerp([x, x, x], [0.2, 0.3, 0.5]), x, atol=1e-7)
    with pytest.raises(GradfreeError, match="cancel out"):
        multislerp([x, -x, torch.zeros_like(x)], [0.5, 0.5, 0.0])
    # an antipodal pair: the heavier direction, or, balanced, the straight line through 0
    assert torch.allclose(multislerp([x, -x], [0.75, 0.25]), x)
    assert torch.allclose(multislerp([x, -x], [0.5, 0.5]), torch.zeros_like(x))


def test_karcher_mean_is_the_slerp_midpoint_for_two_and_a_critical_point_for_more() -> None:
    a = torch.randn(7, generator=_g(5), dtype=D)
    b = 2.0 * torch.randn(7, generator=_g(6), dtype=D)
    out, _ = karcher_mean([a, b], max_iter=50, tol=1e-12)
    na, nb = a.norm(), b.norm()
    mid = slerp(0.5, a / na, b / nb)[0]
    assert torch.allclose(out, (na + nb) / 2 * mid / mid.norm(), atol=1e-9)
    xs = [torch.randn(7, generator=_g(10 + i), dtype=D) for i in range(4)]
    out, used = karcher_mean(xs, max_iter=100, tol=1e-13)
    mu = out / out.norm()
    # the mean of the log maps at the result vanishes (first-order optimality on the sphere)
    logs = []
    for x in xs:
        u = x / x.norm()
        c = float(mu @ u)
        th = math.acos(max(-1.0, min(1.0, c)))
        logs.append(th / math.sin(th) * (u - c * mu))
    assert float(torch.stack(logs).mean(0).norm()) < 1e-10 and used < 100
    assert float(out.norm()) == pytest.approx(float(sum(x.norm() for x in xs) / 4))
    assert torch.equal(karcher_mean([a], 10, 1e-5)[0], a)


def test_passthrough_copies_one_model_and_refuses_two() -> None:
    x = torch.randn(3, 3, generator=_g(8), dtype=D)
    m = get_method("passthrough").configure(make_recipe({"method": "passthrough", "models": ["a"]}))
    assert torch.equal(m.merge_tensor("w", [x], None), x)
    with pytest.raises(GradfreeError, match="merges exactly 1 models, not 2"):
        get_method("passthrough").configure(
            make_recipe({"method": "passthrough", "models": ["a", "b"]})
        )
