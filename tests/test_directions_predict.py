"""Predictors of concept directions (directions.predict): synthetic data, tiny tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gradfree.base.errors import GradfreeError
from gradfree.directions import predict as P


def planted(n: int = 400, d_in: int = 12, d_out: int = 9, noise: float = 0.05, seed: int = 0):
    """X, Y = X W + b + noise, with the planted W and b."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_in))
    W = rng.normal(size=(d_in, d_out))
    b = rng.normal(size=d_out)
    Y = X @ W + b + noise * rng.normal(size=(n, d_out))
    return X, Y, W, b


def test_ridge_recovers_planted_map_and_matches_reference_lstsq():
    X, Y, W, b = planted()
    Xv, Yv, _, _ = planted(seed=1)
    Yv = Xv @ W + b  # the same map on fresh inputs
    m = P.fit_ridge(X[:300], Y[:300], Xv, Yv)
    assert np.abs(m.W - W).max() < 0.05 and np.abs(m.b - b).max() < 0.05
    assert m.val_cos > 0.99
    # reference: least squares on [X 1; sqrt(lam) I 0] (intercept unpenalised)
    n, d = 300, X.shape[1]
    A = np.zeros((n + d, d + 1))
    A[:n, :d], A[:n, d] = X[:300], 1.0
    A[n:, :d] = np.sqrt(m.lam) * np.eye(d)
    B = np.vstack([Y[:300], np.zeros((d, Y.shape[1]))])
    ref = np.linalg.lstsq(A, B, rcond=None)[0]
    np.testing.assert_allclose(m.W, ref[:d], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m.b, ref[d], rtol=1e-8, atol=1e-10)
    # the single-lambda solver agrees with the eigen path
    W1, b1 = P.ridge_solve(X[:300], Y[:300], m.lam)
    np.testing.assert_allclose(W1, m.W, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b1, m.b, rtol=1e-8, atol=1e-10)


def test_lambda_selection_grows_with_noise_and_beats_extremes():
    rng = np.random.default_rng(3)
    n, d = 60, 40  # few samples per feature: regularisation matters
    X = rng.normal(size=(n, d))
    Xv = rng.normal(size=(200, d))
    W = rng.normal(size=(d, 5))
    clean = P.fit_ridge(X, X @ W + 0.01 * rng.normal(size=(n, 5)), Xv, Xv @ W)
    noisy = P.fit_ridge(X, X @ W + 5.0 * rng.normal(size=(n, 5)), Xv, Xv @ W)
    assert noisy.lam > clean.lam
    # interior optimum for the noisy fit, and the chosen point is the grid's best
    cos = [g["val_cos"] for g in noisy.grid]
    assert noisy.val_cos == max(cos)
    assert noisy.val_cos > cos[0] and noisy.val_cos > cos[-1]
    assert [g["lam"] for g in noisy.grid] == sorted(g["lam"] for g in noisy.grid)


def test_evaluate_cos_against_direct_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    direct = np.mean(
        [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
    )
    assert P.evaluate_cos(a, b) == pytest.approx(direct, rel=1e-12)
    assert P.evaluate_cos(a, 3.0 * a) == pytest.approx(1.0)


def test_split_by_concept_is_disjoint_and_covers():
    concepts = [f"w{i}" for i in range(101)]
    s = P.split_by_concept(concepts, seed=4)
    sets = {k: {concepts[i] for i in v} for k, v in s.items()}
    assert not (
        sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"]
    )
    assert set().union(*sets.values()) == set(concepts)
    assert all(len(v) > 0 for v in s.values())
    assert len(s["train"]) == pytest.approx(0.7 * 101, abs=2)
    again = P.split_by_concept(concepts, seed=4)
    assert all(np.array_equal(s[k], again[k]) for k in s)


def test_inverse_map_recovers_an_invertible_map():
    X, Y, W, _ = planted(n=500, d_in=6, d_out=6, noise=0.0)
    fwd = P.fit_ridge(X[:300], Y[:300], X[300:400], Y[300:400])
    inv = P.inverse_map(Y[:300], X[:300], Y[300:400], X[300:400], Y[400:], X[400:], fwd)
    assert inv["test_cos"] > 0.99 and inv["pinv_test_cos"] > 0.99
    # a lossy forward map (rank 2 of 6) cannot be inverted
    U, _, Vt = np.linalg.svd(W)
    Wl = U[:, :2] @ Vt[:2]
    Yl = X @ Wl
    Xc = X - X.mean(axis=0)
    lossy = P.inverse_map(Yl[:300], Xc[:300], Yl[300:400], Xc[300:400], Yl[400:], Xc[400:])
    assert lossy["test_cos_centered"] < 0.8


def test_mlp_and_linear_probe_lower_their_loss():
    X, Y, _, _ = planted(n=300, d_in=10, d_out=8, noise=0.1)
    for hidden in (16, None):
        p = P.train_mlp(
            X[:200],
            Y[:200],
            X[200:],
            Y[200:],
            hidden=hidden,
            settings=P.TrainSettings(epochs=3, batch_size=32),
        )
        assert p.history[-1]["train_loss"] < p.history[0]["train_loss"]
        assert p.history[p.best_epoch]["val_cos"] == max(h["val_cos"] for h in p.history)
        pred = p.predict(X[200:])
        assert pred.shape == (100, 8) and pred.dtype == np.float64
        assert P.evaluate_cos(pred, Y[200:]) == pytest.approx(
            p.history[p.best_epoch]["val_cos"], abs=1e-5
        )
    probe = P.train_mlp(
        X[:200], Y[:200], X[200:], Y[200:], hidden=None, settings=P.TrainSettings(epochs=1)
    )
    assert probe.n_params == 10 * 8 + 8


def test_tiny_model_lowers_loss_and_counts_full_vocab():
    rng = np.random.default_rng(0)
    vocab, n = 50, 240
    tok_vec = rng.normal(size=(vocab, 6))
    ids = [list(rng.integers(0, vocab, size=rng.integers(1, 4))) for _ in range(n)]
    Y = np.stack([tok_vec[s].mean(axis=0) for s in ids])
    p = P.train_tiny(
        ids[:160],
        Y[:160],
        ids[160:200],
        Y[160:200],
        vocab_size=1000,
        extra_ids=ids[200:],
        embed_dim=8,
        hidden=16,
        settings=P.TrainSettings(epochs=3, batch_size=32),
    )
    assert p.history[-1]["train_loss"] < p.history[0]["train_loss"]
    assert p.n_params == 1000 * 8 + (8 * 16 + 16) + (16 * 6 + 6)
    assert p.extra["rows_materialised"] <= vocab
    assert p.predict(ids[200:]).shape == (40, 6)
    with pytest.raises(GradfreeError, match="not given"):
        p.predict([[999]])


def test_error_paths_are_one_sentence():
    X, Y, _, _ = planted(n=20)
    cases = [
        lambda: P.fit_ridge(X, Y[:10], X, Y),  # rows differ
        lambda: P.fit_ridge(X, Y, X[:, :5], Y),  # widths differ
        lambda: P.fit_ridge(X[:0], Y[:0], X, Y),  # empty split
        lambda: P.fit_ridge(X, Y, X, Y, lambdas=[0.0]),
        lambda: P.evaluate_cos(X, X[:, :3]),
        lambda: P.train_mlp(X, Y, X[:0], Y[:0], settings=P.TrainSettings(epochs=1)),
        lambda: P.split_by_concept(["a", "b", "a"]),
        lambda: P.split_by_concept([]),
        lambda: P.split_by_concept(["a", "b"]),
    ]
    for case in cases:
        with pytest.raises(GradfreeError) as e:
            case()
        msg = str(e.value)
        assert msg.endswith(".") and msg.count(". ") == 0, msg


def _fake_directions(concepts, Y):
    return SimpleNamespace(concepts=concepts, get=lambda layer, pooling: Y.astype(np.float32))


def test_concept_embeddings_use_the_in_template_form():
    from gradfree.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    table = np.random.default_rng(0).normal(size=(262, 4))
    E = P.concept_embeddings(tok, table, ["ab", "c"])
    ids = [
        tok(" ab", add_special_tokens=False)["input_ids"],
        tok(" c", add_special_tokens=False)["input_ids"],
    ]
    assert len(ids[0]) == 3  # the byte-level tokenizer: space, a, b
    np.testing.assert_allclose(E[0], table[ids[0]].mean(axis=0))
    np.testing.assert_allclose(E[1], table[ids[1]].mean(axis=0))
    bare = P.concept_embeddings(tok, table, ["ab"], prefix="")
    assert not np.allclose(bare[0], E[0])
    with pytest.raises(GradfreeError, match="outside the embedding table"):
        P.concept_embeddings(tok, table[:50], ["ab"])


def test_predictor_table_rows_on_a_planted_problem():
    from gradfree.testing.tiny import tiny_tokenizer

    rng = np.random.default_rng(0)
    tok = tiny_tokenizer()
    letters = "abcdefghijklmnopqrstuvwxyz"
    concepts = sorted(
        {"".join(rng.choice(list(letters), size=rng.integers(3, 6))) for _ in range(300)}
    )
    table = rng.normal(size=(262, 16))
    X = P.concept_embeddings(tok, table, concepts)
    W = rng.normal(size=(16, 12))
    Y = X @ W + 0.01 * rng.normal(size=(len(concepts), 12))
    rows = P.predictor_table(
        _fake_directions(concepts, Y),
        table,
        tok,
        layer=1,
        pooling="mean",
        methods=("ridge", "mlp_h8", "linear_probe", "tiny_e4_h8", "inverse"),
        epochs=2,
    )
    by = {r["method"]: r for r in rows}
    assert list(by) == ["ridge", "mlp_h8", "linear_probe", "tiny_e4_h8", "inverse"]
    assert by["ridge"]["test_cos"] > 0.99
    assert by["ridge"]["params"] == 16 * 12 + 12
    assert by["ridge"]["bytes_inference"] == 4 * (16 * 12 + 12 + 262 * 16)
    assert by["tiny_e4_h8"]["bytes_inference"] == 4 * by["tiny_e4_h8"]["params"]
    assert by["linear_probe"]["seed_test_cos"] == P.SEED_NUMBERS["linear_probe"]
    for r in rows:
        assert -1.0 <= r["test_cos"] <= 1.0 and r["fit_s"] >= 0
    with pytest.raises(GradfreeError, match="Unknown predictor method"):
        P.predictor_table(_fake_directions(concepts, Y), table, tok, 1, "mean", methods=("svm",))
    with pytest.raises(GradfreeError, match="rows for"):
        P.predictor_table(_fake_directions(concepts[:-1], Y), table, tok, 1, "mean")
