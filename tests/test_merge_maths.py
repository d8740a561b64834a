"""Merge maths on hand-built float64 tensors, each against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.merge import get_method, make_recipe
from gradfree.merge.fisher import fisher_average
from gradfree.merge.linear import linear_combination, slerp
from gradfree.merge.regmean import gram, reduce_off_diagonal, regmean_solve
from gradfree.merge.sparse import dare, drop_seed, magnitude_mask, sign_consensus


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_combination_weights_and_exact_first() -> None:
    a, b, c = _rand(5, 3, seed=1), _rand(5, 3, seed=2), _rand(5, 3, seed=3)
    assert torch.equal(linear_combination([a, b], [1.0, 0.0]), a)
    got = linear_combination([a, b, c], [1.0, 2.0, 3.0])
    assert torch.allclose(got, (a + 2 * b + 3 * c) / 6, atol=1e-14)
    raw = linear_combination([a, b], [0.5, 2.0], normalize=False)
    assert torch.allclose(raw, 0.5 * a + 2 * b, atol=1e-14)
    with pytest.raises(GradfreeError, match="sum to zero"):
        linear_combination([a, b], [1.0, -1.0])


def test_slerp_of_orthogonal_vectors_follows_the_great_circle() -> None:
    a = torch.zeros(6, dtype=torch.float64)
    b = torch.zeros(6, dtype=torch.float64)
    a[0], b[3] = 2.0, 2.0  # orthogonal, same norm
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        got, fell_back = slerp(t, a, b)
        ref = math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
        assert not fell_back
        assert torch.allclose(got, ref, atol=1e-14)
        assert abs(float(got.norm()) - 2.0) < 1e-12  # stays on the sphere (lerp would not)
    assert torch.equal(slerp(0.0, a, b)[0], a)


def test_slerp_near_parallel_and_zero_fall_back_to_lerp() -> None:
    a = _rand(10, seed=4)
    b = a * 3.0 + 1e-9 * _rand(10, seed=5)
    got, fell_back = slerp(0.3, a, b)
    assert fell_back and torch.allclose(got, 0.7 * a + 0.3 * b, atol=1e-14)
    z = torch.zeros(10, dtype=torch.float64)
    got, fell_back = slerp(0.5, a, z)
    assert fell_back and torch.allclose(got, 0.5 * a)
    assert torch.isfinite(slerp(0.5, a, -a)[0]).all()  # antiparallel: no division by sin 0


def test_magnitude_mask_keeps_the_largest_entries() -> None:
    tau = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]], dtype=torch.float64)
    mask = magnitude_mask(tau, 0.5)  # 3 of 6
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert magnitude_mask(tau, 1.0).all()
    big = _rand(40, 25, seed=6)
    m = magnitude_mask(big, 0.2)
    assert int(m.sum()) == 200
    assert float(big.abs()[m].min()) >= float(big.abs()[~m].max())


def _ties_reference(taus: list[list[float]], weights: list[float]) -> list[float]:
    """Element by element in plain Python: elect the sign of the weighted sum, average agreeing."""
    out = []
    for j in range(len(taus[0])):
        vals = [w * t[j] for t, w in zip(taus, weights, strict=True)]
        total = sum(vals)
        sign = (total > 0) - (total < 0)
        agree = [
            (v, w)
            for v, w in zip(vals, weights, strict=True)
            if v != 0 and (v > 0) - (v < 0) == sign
        ]
        out.append(sum(v for v, _ in agree) / sum(w for _, w in agree) if agree else 0.0)
    return out


def test_ties_sign_election_on_hand_built_task_vectors() -> None:
    taus = [[1.0, -2.0, 3.0, 0.0, -1.0], [2.0, 1.0, -4.0, 0.0, 1.0], [-0.5, 1.5, 1.0, 2.0, 0.0]]
    weights = [1.0, 1.0, 2.0]
    merged, conflict = sign_consensus([torch.tensor(t, dtype=torch.float64) for t in taus], weights)
    ref = _ties_reference(taus, weights)
    assert torch.allclose(merged, torch.tensor(ref, dtype=torch.float64), atol=1e-15)
    # Entry 0: elected +, model 3 (-0.5·2) outvoted; entry 2: 3 - 4 + 2 = + : model 2 outvoted.
    assert conflict.tolist() == [True, True, True, False, True]
    # Entry 1 by hand: -2 + 1 + 3 = 2 > 0, agreeing 1 (w 1) and 3 (w 2): (1 + 3) / 3.
    assert abs(float(merged[1]) - 4.0 / 3.0) < 1e-15


def test_dare_is_seeded_and_keeps_the_expectation() -> None:
    tau = torch.full((200, 50), 0.3, dtype=torch.float64)
    d1, kept = dare(tau, 0.25, seed=7)
    assert torch.equal(d1, dare(tau, 0.25, seed=7)[0])
    assert not torch.equal(d1, dare(tau, 0.25, seed=8)[0])
    survivors = d1[d1 != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 0.3 / 0.25))  # rescaled by 1/p
    n = tau.numel()
    assert kept == survivors.numel()
    assert abs(kept / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # E[dare(τ)] = τ: the mean is within 4 standard errors of 0.3.
    se = 0.3 * math.sqrt(0.75 / 0.25) / math.sqrt(n)
    assert abs(float(d1.mean()) - 0.3) < 4 * se
    assert dare(tau, 1.0, seed=7)[0] is tau
    assert drop_seed(0, 1, "a") != drop_seed(0, 2, "a") != drop_seed(1, 1, "a")


def test_fisher_average_with_equal_fishers_is_the_weighted_average() -> None:
    xs = [_rand(4, 6, seed=s) for s in (10, 11, 12)]
    f = _rand(4, 6, seed=13).abs()
    got = fisher_average(xs, [f, f, f], [1.0, 2.0, 1.0])
    assert torch.allclose(got, (xs[0] + 2 * xs[1] + xs[2]) / 4, atol=1e-13)
    assert torch.equal(fisher_average(xs, [f, f * 3, f], [1.0, 0.0, 0.0]), xs[0])


def test_fisher_average_matches_the_formula_and_follows_the_confident_model() -> None:
    xs = [_rand(30, seed=20), _rand(30, seed=21)]
    fs = [_rand(30, seed=22).abs(), _rand(30, seed=23).abs()]
    got = fisher_average(xs, fs, [1.0, 1.0], floor=0.0)
    ref = (fs[0] * xs[0] + fs[1] * xs[1]) / (fs[0] + fs[1])
    assert torch.allclose(got, ref, atol=1e-13)
    fs[1][:5] = 1e6  # model 2 is far more certain of its first five entries
    got = fisher_average(xs, fs, [1.0, 1.0], floor=0.0)
    assert torch.allclose(got[:5], xs[1][:5], atol=1e-5)


def _stacked_lstsq(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² by least squares on the stacked rows."""
    x = torch.cat(xs)
    y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws, strict=True)])
    return torch.linalg.lstsq(x, y).solution.T


def test_regmean_equals_the_stacked_least_squares_solution() -> None:
    from gradfree.capture import MomentStats

    xs = [_rand(80, 7, seed=30) + 0.5, _rand(60, 7, seed=31) * 2.0]
    ws = [_rand(4, 7, seed=32), _rand(4, 7, seed=33)]
    grams = [x.T @ x for x in xs]
    got = regmean_solve(ws, grams, [1.0, 1.0], alpha=1.0, ridge=0.0)
    assert torch.allclose(got, _stacked_lstsq(xs, ws), atol=1e-10)
    # With a bias: the augmented Gram from streamed moments solves [W b] on [x 1].
    bs = [_rand(4, seed=34), _rand(4, seed=35)]
    stats = [MomentStats.empty(7).update(x) for x in xs]
    aug = [torch.cat([w, b[:, None]], 1) for w, b in zip(ws, bs, strict=True)]
    got = regmean_solve(aug, [gram(s, bias=True) for s in stats], [1.0, 1.0], 1.0, 0.0)
    ones = [torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in xs]
    assert torch.allclose(got, _stacked_lstsq(ones, aug), atol=1e-10)


def test_regmean_shrinkage_weights_and_exact_cases() -> None:
    xs = [_rand(50, 5, seed=40), _rand(50, 5, seed=41)]
    ws = [_rand(3, 5, seed=42), _rand(3, 5, seed=43)]
    g = [x.T @ x for x in xs]
    got = regmean_solve(ws, g, [2.0, 1.0], alpha=0.5, ridge=0.0)
    gt = [reduce_off_diagonal(gi, 0.5) for gi in g]
    assert torch.allclose(gt[0], 0.5 * g[0] + 0.5 * torch.diag(torch.diagonal(g[0])))
    ref = (2 * ws[0] @ gt[0] + ws[1] @ gt[1]) @ torch.linalg.inv(2 * gt[0] + gt[1])
    assert torch.allclose(got, ref, atol=1e-10)
    assert torch.equal(regmean_solve(ws, g, [1.0, 0.0], 0.9, 1e-3), ws[0])
    assert torch.equal(regmean_solve([ws[0], ws[0]], g, [1.0, 1.0], 0.9, 1e-3), ws[0])
    # A huge ridge pulls the solution to the weighted average.
    far = regmean_solve(ws, g, [1.0, 1.0], 1.0, 1e9)
    assert torch.allclose(far, (ws[0] + ws[1]) / 2, atol=1e-6)


def _recipe(**kw: object) -> dict[str, object]:
    return {"method": "linear", "models": ["a", "b"], **kw}


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (_recipe(method="tiez"), "Unknown merge method 'tiez' (did you mean 'ties'?)"),
        (_recipe(colour="red"), "Unknown recipe field 'colour'."),
        ({"method": "linear"}, "a recipe needs at least one model"),
        (_recipe(parameters={"densty": 0.5}), "Method 'linear' has no parameter 'densty'"),
        (
            _recipe(models=[{"model": "a", "parameters": {"t": 1}}]),
            "no per-model parameter 't' (model 1)",
        ),
        (_recipe(method="slerp", models=["a", "b", "c"]), "merges exactly 2 models, not 3"),
        (_recipe(method="ties"), "needs a base_model"),
        (_recipe(base_model="a"), "does not use a base_model"),
        (_recipe(method="fisher"), "needs a calibration section"),
        (_recipe(method="greedy_soup"), "needs a selection section"),
        (_recipe(method="slerp", parameters={"t": 2}), "Invalid parameter 't' of method 'slerp'"),
        (_recipe(selection={"metric": "kl"}), "the kl metric needs a teacher model"),
    ],
)
def test_recipe_errors_are_one_sentence(recipe: dict[str, object], message: str) -> None:
    with pytest.raises(GradfreeError) as e:
        get_method(make_recipe(recipe).method).configure(make_recipe(recipe))
    text = str(e.value)
    assert message in text
    assert "\n" not in text and text.endswith(".")


def test_global_per_model_parameters_are_defaults() -> None:
    r = make_recipe(
        {
            "method": "ties",
            "base_model": "c",
            "models": [{"model": "a", "parameters": {"density": 0.3}}, "b"],
            "parameters": {"density": 0.7, "scaling": 0.5},
        }
    )
    m = get_method("ties").configure(r)
    assert [p.density for p in m.model_params] == [0.3, 0.7]
    assert m.params.scaling == 0.5
    assert {"weight", "density"} == set(m.tensor_parameters())
