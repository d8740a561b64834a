"""Unmerging solvers (gradfree.taskvec.solve) on planted problems built in numpy.

The synthetic dictionaries imitate real task vectors: every atom is a shared dense component
(the common fine-tuning direction, pairwise cosines of about 0.02–0.09) plus its own sparse,
heavy-tailed part (Student-t, 5 % of the entries), with norms spread log-uniformly over 10×.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradfree.base.errors import GradfreeError
from gradfree.taskvec.solve import (
    SOLVERS,
    coef_error,
    noisy,
    recover,
    recover_all,
    recover_ties,
    support_metrics,
)

N, T = 10_000, 8


def dictionary(seed: int, n: int = N, t: int = T) -> tuple[np.ndarray, np.ndarray]:
    """(D (n, t), one more atom z of the same kind that is NOT in D)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(n)
    g /= np.linalg.norm(g)
    cols = []
    for _ in range(t + 1):
        e = np.zeros(n)
        idx = rng.choice(n, size=n // 20, replace=False)
        e[idx] = rng.standard_t(3, size=idx.size)
        e /= np.linalg.norm(e)
        a = rng.uniform(0.15, 0.3)  # share of the common component
        cols.append(a * g + np.sqrt(1 - a * a) * e)
    A = np.stack(cols, axis=1) * np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=t + 1))
    return A[:, :t], A[:, t]


def planted(rng: np.random.Generator, k: int, t: int = T) -> np.ndarray:
    w = np.zeros(t)
    w[rng.choice(t, size=k, replace=False)] = rng.uniform(0.2, 1.0, size=k)
    return w


# --------------------------------------------------------------------------------------------
# Task arithmetic: y = D w exactly


@pytest.mark.parametrize("k", range(2, T + 1))
def test_planted_task_arithmetic_is_recovered_exactly(k: int) -> None:
    D, _ = dictionary(seed=k)
    w = planted(np.random.default_rng(100 + k), k)
    y = D @ w
    results = recover_all(D, y)
    assert set(results) == set(SOLVERS)
    for name in ("nnls", "omp", "lasso"):
        r = results[name]
        assert support_metrics(w, r.weights)["f1"] == 1.0, name
        assert coef_error(w, r.weights)["max_abs"] <= 1e-6, name
        assert r.residual <= 1e-9, name
    assert results["omp"].params["atoms"] == k
    assert results["lasso"].params["debiased"] is True
    # Ridge: for y = D w the error in normalised units is Δv = −λ (G + λI)⁻¹ v, so
    # ‖Δv‖ ≤ λ / (σ_min(G) + λ) · ‖v‖ and |Δwᵢ| = |Δvᵢ| / ‖Dᵢ‖ ≤ that bound / ‖Dᵢ‖.
    r = results["ridge"]
    c = np.linalg.norm(D, axis=0)
    G = (D / c).T @ (D / c)
    lam = r.params["lambda"]
    bound = lam / (np.linalg.eigvalsh(G)[0] + lam) * np.linalg.norm(w * c) / c
    assert np.all(np.abs(r.weights - w) <= bound * (1 + 1e-9))
    assert support_metrics(w, r.weights)["f1"] == 1.0


def test_lasso_keeps_its_raw_shrunk_weights() -> None:
    D, _ = dictionary(seed=3)
    w = planted(np.random.default_rng(3), 4)
    r = recover(D, D @ w, "lasso")
    raw = np.array(r.params["raw_weights"])
    # The Lasso shrinks: its own weights lie below the debiased ones on the support.
    on = w > 0
    assert np.all(raw[on] < r.weights[on]) and np.all(raw[on] > 0)
    raw_only = recover(D, D @ w, "lasso", debias=False)
    np.testing.assert_allclose(raw_only.weights, raw, rtol=0, atol=1e-12)


def test_omp_with_a_given_number_of_atoms() -> None:
    D, _ = dictionary(seed=4)
    w = planted(np.random.default_rng(4), 5)
    full = recover(D, D @ w, "omp", n_nonzero=5)
    assert coef_error(w, full.weights)["max_abs"] <= 1e-6
    short = recover(D, D @ w, "omp", n_nonzero=2)
    assert short.params["atoms"] == 2 and int((short.weights != 0).sum()) <= 2
    assert short.residual > full.residual


# --------------------------------------------------------------------------------------------
# A task that is not in the dictionary


def out_of_dictionary(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """y = 3 in-dictionary tasks + 0.5 × an absent task z of the dictionary's typical norm."""
    D, z = dictionary(seed=seed)
    c = np.linalg.norm(D, axis=0)
    z = z / np.linalg.norm(z) * np.exp(np.log(c).mean())
    w = planted(np.random.default_rng(seed), 3)
    return D, w, 0.5 * z, D @ w + 0.5 * z


@pytest.mark.parametrize("seed", range(10))
def test_out_of_dictionary_task_stays_in_the_residual(seed: int) -> None:
    D, w, z, y = out_of_dictionary(seed)
    absent = w == 0
    # What no solver can avoid: the part of z inside span(D). Its least-squares coefficients
    # `leak` are what the absent task lends the atoms, and ‖(I − P_D) y‖ / ‖y‖ is the residual
    # floor (the part of z outside the span).
    leak = np.linalg.lstsq(D, z, rcond=None)[0]
    floor = np.linalg.norm(y - D @ np.linalg.lstsq(D, y, rcond=None)[0]) / np.linalg.norm(y)
    assert floor > 0.2  # z is a sizeable part of y, so "explained" would be visibly wrong
    results = recover_all(D, y, solvers=("nnls", "omp"))
    for r in results.values():
        assert r.residual >= floor - 1e-12
    # NNLS is least squares whenever the least-squares answer is non-negative: it reports the
    # projection exactly, so an absent task shows up above 0.05 exactly when z's projection on
    # some atom exceeds 0.05 (here: seeds 1, 6, 7). That is a property of the data, not a bug.
    assert np.all(w + leak >= 0)
    np.testing.assert_allclose(results["nnls"].weights, w + leak, rtol=0, atol=1e-9)
    assert results["nnls"].residual == pytest.approx(floor, abs=1e-12)
    assert (results["nnls"].weights[absent].max() > 0.05) == (leak[absent].max() > 0.05)
    # OMP's stopping rule (an atom must lower the relative residual by ≥ 1e-3) leaves the
    # absent task in the residual instead of spreading it over the dictionary.
    assert results["omp"].weights[absent].max() <= 0.05
    assert support_metrics(w, results["omp"].weights)["recall"] == 1.0


# --------------------------------------------------------------------------------------------
# Noise


@pytest.mark.parametrize("k", [2, 5, 8])
def test_noise_keeps_support_and_error_within_the_least_squares_spread(k: int) -> None:
    D, _ = dictionary(seed=20 + k)
    w = planted(np.random.default_rng(20 + k), k)
    y0 = D @ w
    rel = 1e-2
    y = noisy(y0, rel, seed=k)
    sigma = rel * np.sqrt(np.mean(y0**2))
    # Least squares on any support P ⊇ true support is unbiased with covariance σ² G_P⁻¹ (in
    # normalised units), and [G_P⁻¹]ᵢᵢ ≤ [G⁻¹]ᵢᵢ for P ⊆ all atoms; so 6 standard deviations of
    # the full-dictionary fit bound every solver that refits least squares on its support
    # (nnls, omp, debiased lasso). Ridge's covariance is smaller still, plus its bias bound.
    c = np.linalg.norm(D, axis=0)
    Dn = D / c
    G = Dn.T @ Dn
    tol = 6 * sigma * np.sqrt(np.diag(np.linalg.inv(G))) / c
    results = recover_all(D, y)
    for name, r in results.items():
        assert support_metrics(w, r.weights)["f1"] == 1.0, name
        err = np.abs(r.weights - w)
        if name == "ridge":
            lam = r.params["lambda"]
            bias = lam / (np.linalg.eigvalsh(G)[0] + lam) * np.linalg.norm(w * c) / c
            assert np.all(err <= tol + bias), name
        else:
            assert np.all(err <= tol), name
        # The residual is the noise: ‖ε‖/‖y‖ ≈ rel, less what the fit absorbs.
        assert r.residual == pytest.approx(rel, rel=0.1), name


def test_noisy_is_seeded_with_the_stated_spread() -> None:
    y = np.linspace(-3.0, 5.0, 200_000)
    a, b = noisy(y, 0.1, seed=7), noisy(y, 0.1, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, noisy(y, 0.1, seed=8))
    rms = np.sqrt(np.mean(y**2))
    # The sample std of 2e5 normals is within 1 % of σ (its relative std is 1/√(2n) ≈ 0.16 %).
    assert np.std(a - y) == pytest.approx(0.1 * rms, rel=0.01)
    np.testing.assert_array_equal(noisy(y, 0.0, seed=1), y)


# --------------------------------------------------------------------------------------------
# TIES


def trim(D: np.ndarray, density: float) -> np.ndarray:
    """TIES' trim: each task keeps its round(density·n) entries of largest magnitude."""
    out = np.zeros_like(D)
    keep = round(density * D.shape[0])
    for i in range(D.shape[1]):
        top = np.argsort(-np.abs(D[:, i]), kind="stable")[:keep]
        out[top, i] = D[top, i]
    return out


def ties_merge(Tt: np.ndarray, w: np.ndarray, lam: float, normalize: bool) -> np.ndarray:
    """TIES elect + disjoint merge, written task by task from the description."""
    total = np.zeros(Tt.shape[0])
    for i in range(Tt.shape[1]):
        total += w[i] * Tt[:, i]
    elected = np.sign(total)
    num = np.zeros_like(total)
    den = np.zeros_like(total)
    for i in range(Tt.shape[1]):
        agrees = (Tt[:, i] != 0) & (w[i] > 0) & (np.sign(Tt[:, i]) == elected)
        num[agrees] += w[i] * Tt[agrees, i]
        den[agrees] += w[i]
    if normalize:
        num = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return lam * num


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [2, 5, 8])
def test_planted_ties_merge_is_recovered(normalize: bool, k: int) -> None:
    D, _ = dictionary(seed=40 + k)
    Tt = trim(D, 0.2)
    rng = np.random.default_rng(40 + k)
    w = np.zeros(T)
    # Weights in [0.5, 1] give every present task a share ≥ 0.5 / (0.5 + 7) > 0.05 (threshold).
    w[rng.choice(T, size=k, replace=False)] = rng.uniform(0.5, 1.0, size=k)
    lam = rng.uniform(0.5, 1.5)
    y = ties_merge(Tt, w, lam, normalize)
    r = recover_ties(Tt, y, normalize=normalize)
    share = w / w.sum()
    assert support_metrics(share, r.weights)["f1"] == 1.0
    assert coef_error(share, r.weights)["max_abs"] <= 1e-6
    # Normalised: λ itself is identifiable; summed: only λ·w, i.e. λ·Σw goes with the shares.
    expected = lam if normalize else lam * w.sum()
    assert r.params["scaling"] == pytest.approx(expected, rel=1e-6)
    assert r.residual <= 1e-9 and r.params["converged"]
    if not normalize:
        np.testing.assert_allclose(r.params["effective_weights"], lam * w, atol=1e-6)
    # The linear solvers do not fit this model: the sign election is not linear in w.
    assert recover(Tt, y, "nnls").residual > 1e-3


def test_ties_under_noise_keeps_the_support() -> None:
    D, _ = dictionary(seed=50)
    Tt = trim(D, 0.2)
    w = np.array([0.0, 0.9, 0.6, 0.0, 0.7, 0.8, 0.0, 0.5])
    y = noisy(ties_merge(Tt, w, 1.2, True), 1e-2, seed=0)
    r = recover_ties(Tt, y)
    assert support_metrics(w, r.weights)["f1"] == 1.0
    # λ is pinned by every entry where one task agrees alone (y_j = λ T_ij), so it is well
    # determined; the shares only through the overlaps, hence looser (measured ≈ 1e-2).
    assert r.params["scaling"] == pytest.approx(1.2, rel=1e-2)
    assert coef_error(w / w.sum(), r.weights)["max_abs"] < 0.05


# --------------------------------------------------------------------------------------------
# Degenerate inputs


def test_zero_column_gets_weight_zero_and_is_reported() -> None:
    D, _ = dictionary(seed=60)
    D[:, 3] = 0.0
    w = planted(np.random.default_rng(60), 4)
    w[3] = 0.0
    y = D @ w
    for r in recover_all(D, y).values():
        assert r.weights[3] == 0.0 and r.params["zero_columns"] == [3]
    r = recover_ties(trim(D, 0.2), ties_merge(trim(D, 0.2), w, 1.0, True))
    assert r.weights[3] == 0.0 and r.params["zero_columns"] == [3]


def test_zero_target_gives_zero_weights_and_zero_residual() -> None:
    D, _ = dictionary(seed=61, n=500)
    for r in [*recover_all(D, np.zeros(500)).values(), recover_ties(D, np.zeros(500))]:
        assert np.all(r.weights == 0) and r.residual == 0.0 and r.params["zero_target"]
        assert not r.support.any()


def test_all_zero_dictionary_explains_nothing() -> None:
    r = recover(np.zeros((50, 3)), np.ones(50), "nnls")
    assert np.all(r.weights == 0) and r.residual == 1.0 and r.params["zero_columns"] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Scoring, JSON


def test_support_metrics_and_conventions() -> None:
    m = support_metrics(np.array([1.0, 0.5, 0, 0]), np.array([0.9, 0.01, 0.2, 0]))
    assert (m["precision"], m["recall"]) == (0.5, 0.5) and m["f1"] == pytest.approx(0.5)
    both_empty = support_metrics(np.zeros(3), np.zeros(3))
    assert (both_empty["precision"], both_empty["recall"], both_empty["f1"]) == (1.0, 1.0, 1.0)
    missed = support_metrics(np.array([1.0, 0]), np.zeros(2))
    assert (missed["precision"], missed["recall"], missed["f1"]) == (1.0, 0.0, 0.0)
    invented = support_metrics(np.zeros(2), np.array([0.3, 0]))
    assert (invented["precision"], invented["recall"], invented["f1"]) == (0.0, 1.0, 0.0)


def test_coef_error() -> None:
    e = coef_error(np.array([1.0, 0.0, 2.0]), np.array([1.5, 0.0, 2.0]))
    assert e["max_abs"] == 0.5 and e["rel_l2"] == pytest.approx(0.5 / np.sqrt(5))
    assert coef_error(np.zeros(2), np.zeros(2))["rel_l2"] == 0.0
    assert coef_error(np.zeros(2), np.ones(2))["rel_l2"] == float("inf")


def test_to_json_is_plain_json_keyed_by_name() -> None:
    D, _ = dictionary(seed=62, n=2_000)
    w = planted(np.random.default_rng(62), 3)
    names = [f"task{i}" for i in range(T)]
    for r in [*recover_all(D, D @ w).values(), recover_ties(trim(D, 0.2), D @ w)]:
        out = json.loads(json.dumps(r.to_json(names)))
        assert list(out["weights"]) == names
        assert out["support"] == [n for n, s in zip(names, r.support, strict=True) if s]
        assert out["residual"] == r.residual and out["seconds"] >= 0
    with pytest.raises(GradfreeError, match="task names"):
        r.to_json(names[:3])


# --------------------------------------------------------------------------------------------
# Error paths


def poison(a: np.ndarray, value: float = np.nan) -> np.ndarray:
    out = a.copy()
    out.flat[0] = value
    return out


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda D, y: recover(D, y[:-1], "nnls"), "shape"),
        (lambda D, y: recover(D[:, 0], y, "nnls"), "2-D"),
        (lambda D, y: recover(D[:, :0], y, "nnls"), "no tasks"),
        (lambda D, y: recover(D[:0], y[:0], "nnls"), "no entries"),
        (lambda D, y: recover(D, y, "pinv"), "Unknown solver"),
        (lambda D, y: recover_all(D, y, solvers=("nnls", "pinv")), "Unknown solver"),
        (lambda D, y: recover(D, y, "nnls", alpha_ratio=0.1), "no option"),
        (lambda D, y: recover_all(D, y, solvers=("nnls",), alpha_ratio=0.1), "No chosen"),
        (lambda D, y: recover(D, y, "lasso", alpha_ratio=2.0), "alpha_ratio"),
        (lambda D, y: recover(D, y, "omp", n_nonzero=-1), "n_nonzero"),
        (lambda D, y: recover(D, y, "omp", omp_tol=float("nan")), "omp_tol"),
        (lambda D, y: recover(D, y, "ridge", ridge_ratio=-1.0), "ridge_ratio"),
        (lambda D, y: recover(D, y, "nnls", threshold=-0.1), "threshold"),
        (lambda D, y: recover(poison(D), y, "nnls"), "NaN"),
        (lambda D, y: recover(D, poison(y, np.inf), "omp"), "NaN"),
        (lambda D, y: recover_ties(D, y[:-1]), "shape"),
        (lambda D, y: recover_ties(poison(D), y), "NaN"),
        (lambda D, y: recover_ties(D, y, iterations=0), "iterations"),
        (lambda D, y: support_metrics(y[:3], y[:4]), "one length"),
        (lambda D, y: support_metrics(np.array([np.nan]), np.array([1.0])), "NaN"),
        (lambda D, y: coef_error(y[:3], y[:4]), "one length"),
        (lambda D, y: noisy(y, -1.0, seed=0), "relative noise"),
        (lambda D, y: noisy(np.array([np.nan]), 0.1, seed=0), "NaN"),
    ],
)
def test_error_paths_raise_one_sentence(call, match: str) -> None:
    D, _ = dictionary(seed=70, n=300, t=4)
    y = D @ np.array([0.5, 0.0, 1.0, 0.0])
    with pytest.raises(GradfreeError, match=match) as info:
        call(D, y)
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg
