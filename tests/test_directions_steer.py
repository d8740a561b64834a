"""Steering hooks, the steering measurement and the teacher→student direction transfer, on tiny
models built in code."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject, hook_count, make_config, run_capture
from gradfree.directions.steer import (
    plot_steering,
    rise_at_cost,
    steering,
    steering_effect,
    word_token,
)
from gradfree.directions.transfer import (
    PairedMoments,
    cosines,
    fit_transfer,
    split_pairs,
    transfer_directions,
)
from gradfree.surgery.fold import fuse_norms_
from gradfree.surgery.maths import random_orthogonal
from gradfree.surgery.rotate import rotate_residual_
from gradfree.testing.tiny import HARBOUR_DOCS, tiny_model, tiny_tokenizer

PROMPTS = ["The harbour is", "Stop 3: the old", "I walked to the", "abc"]


def _ids(tok, texts):
    enc = [tok(t)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), 258, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(enc):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2", seed=0, num_hidden_layers=3)
    tok = tiny_tokenizer()
    ids, mask = _ids(tok, PROMPTS)
    vec = np.random.default_rng(0).standard_normal(get_adapter(model).hidden_size)
    return model, tok, ids, mask, vec


def test_strength_zero_is_bit_identical_and_hooks_are_removed(setup) -> None:
    model, _, ids, mask, vec = setup
    before = hook_count(model)
    base = _logits(model, ids, mask)
    with steering(model, 1, vec, 0.0):
        assert hook_count(model) == before + 1
        zero = _logits(model, ids, mask)
    assert torch.equal(base, zero)
    assert hook_count(model) == before
    assert torch.equal(_logits(model, ids, mask), base)


def test_hook_removed_after_exception(setup) -> None:
    model, _, ids, mask, vec = setup
    before = hook_count(model)
    base = _logits(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom"), steering(model, 0, vec, 3.0):
        assert hook_count(model) == before + 1
        raise RuntimeError("boom")
    assert hook_count(model) == before
    assert torch.equal(_logits(model, ids, mask), base)


def _next_block_input(model, layer, ids, mask):
    """What block ``layer + 1`` reads: the residual stream after block ``layer``."""
    seen = {}
    norm = get_adapter(model).layer(layer + 1).attn_norm
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        logits = _logits(model, ids, mask)
    finally:
        handle.remove()
    return seen["x"], logits


def test_nonzero_strength_adds_the_vector_to_the_block_output(setup) -> None:
    model, _, ids, mask, vec = setup
    layer, s = 1, 0.7
    x0, base = _next_block_input(model, layer, ids, mask)
    with steering(model, layer, vec, s):
        x1, steered = _next_block_input(model, layer, ids, mask)
    assert not torch.equal(base, steered)
    # The residual stream after block L moves by exactly s·v at every position.
    diff = (x1 - x0).double()
    torch.testing.assert_close(diff, torch.from_numpy(s * vec).expand_as(diff), rtol=0, atol=1e-5)


def test_bad_input_is_one_sentence(setup) -> None:
    model, _, _, _, vec = setup
    before = hook_count(model)
    with (
        pytest.raises(GradfreeError, match="residual stream is 64 wide"),
        steering(model, 0, vec[:10], 1.0),
    ):
        pass
    with pytest.raises(GradfreeError, match="has no layer 3"), steering(model, 3, vec, 1.0):
        pass
    with pytest.raises(GradfreeError, match="integer block index"), steering(model, "1", vec, 1.0):
        pass
    with pytest.raises(GradfreeError, match="finite"), steering(model, 0, vec, float("nan")):
        pass
    assert hook_count(model) == before


def test_steering_effect_rows_and_a_rise_toward_the_target(setup) -> None:
    model, tok, _, _, _ = setup
    a = get_adapter(model)
    target = "q"
    t_id = word_token(tok, target)
    # A vector that, after the final norm, points at the target's unembedding row.
    g = a.final_norm.weight.detach().double()
    vec = (a.lm_head.weight[t_id].detach().double() * g).numpy()
    vec = vec / np.linalg.norm(vec)
    last = a.num_layers - 1
    rows = steering_effect(
        model,
        tok,
        vec,
        last,
        [0.0, 5.0, 50.0],
        PROMPTS,
        [target],
        HARBOUR_DOCS[:2],
        related_words=["r"],
        max_length=64,
    )
    assert [r["strength"] for r in rows] == [0.0, 5.0, 50.0]
    assert rows[0]["rise"] == 0.0 and rows[0]["ppl_ratio"] == 1.0
    assert rows[2]["rise"] > rows[1]["rise"] > 0.0
    # Steering this hard moves the neutral-text perplexity (a random model may even improve).
    assert rows[2]["ppl_ratio"] != 1.0
    assert math.isclose(rows[2]["ppl"], rows[2]["ppl_ratio"] * rows[0]["base"]["ppl"])
    # The rise is log p_steered − log p_base of the target after each prompt, averaged.
    base_lp = np.asarray(rows[0]["base"]["logprobs"])[:, 0]
    ids, mask = _ids(tok, PROMPTS)
    last_pos = mask.sum(1) - 1
    with steering(model, last, vec, 50.0):
        lg = _logits(model, ids, mask)[torch.arange(len(PROMPTS)), last_pos]
    direct = torch.log_softmax(lg.double(), -1)[:, t_id].numpy() - base_lp
    assert math.isclose(rows[2]["rise"], float(direct.mean()), rel_tol=1e-9, abs_tol=1e-9)
    # A baseline from a previous call gives the same rows without recomputing it.
    again = steering_effect(
        model,
        tok,
        vec,
        last,
        [5.0],
        PROMPTS,
        [target],
        HARBOUR_DOCS[:2],
        related_words=["r"],
        max_length=64,
        baseline=rows[0]["base"],
    )
    assert math.isclose(again[0]["rise"], rows[1]["rise"], rel_tol=1e-12)
    assert hook_count(model) == 0


def test_rise_at_cost_interpolates_and_plot(tmp_path: Path) -> None:
    curve = [
        {"strength": s, "ppl_ratio": 1.0 + s * s, "rise": 2.0 * s} for s in (1.0, 0.0, 0.5, 2.0)
    ]
    # ppl_ratio 1.5 lies between s=0.5 (1.25) and s=1 (2.0): a third of the way.
    s_lo, s_hi = 0.5, 1.0
    frac = (1.5 - (1 + s_lo**2)) / ((1 + s_hi**2) - (1 + s_lo**2))
    assert math.isclose(rise_at_cost(curve, 1.5), 2 * s_lo + frac * (2 * s_hi - 2 * s_lo))
    assert math.isnan(rise_at_cost(curve, 100.0))
    out = plot_steering({"a": curve}, tmp_path / "c.png", title="t")
    assert out.stat().st_size > 0


# transfer ---------------------------------------------------------------------------------------


def _planted(n=3000, dt=24, ds=16, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(-1.5, 1.5, dt))  # anisotropic teacher stream
    t = rng.standard_normal((n, dt)) * scales + rng.standard_normal(dt)
    a = rng.standard_normal((ds, dt)) / math.sqrt(dt)
    b = rng.standard_normal(ds)
    s = t @ a.T + b + noise * rng.standard_normal((n, ds))
    return t, s, a, b


@pytest.mark.parametrize("space", ["ridge", "whitened"])
def test_transfer_recovers_a_planted_rectangular_map(space) -> None:
    t, s, a, b = _planted()
    fit, held = split_pairs(t, s, 0.25, seed=1)
    if space == "ridge":
        m = fit_transfer(fit, "ridge", heldout=held)
    else:
        m = fit_transfer(fit, "procrustes", space="whitened", heldout=held)
    assert m.A.shape == a.shape
    assert np.linalg.norm(m.A - a) / np.linalg.norm(a) < 0.02
    assert np.linalg.norm(m.b - b) / np.linalg.norm(b) < 0.02
    assert m.info["heldout_fvu"] < 1e-3
    # Directions (differences of means) transfer by the linear part alone.
    d = t[:5] - t.mean(0)
    np.testing.assert_allclose(transfer_directions(d, m), (d @ a.T).astype(np.float32), atol=0.05)
    assert cosines(transfer_directions(d, m), d @ a.T).min() > 0.999


def test_ridge_lambda_is_chosen_on_heldout() -> None:
    t, s, _, _ = _planted(n=60, dt=40, ds=8, noise=0.5, seed=2)  # few, noisy pairs: shrink
    fit, held = split_pairs(t, s, 0.3, seed=0)
    m = fit_transfer(fit, "ridge", heldout=held)
    scores = {g["param"]: g["heldout_fvu"] for g in m.info["grid"]}
    assert m.param == min(scores, key=scores.__getitem__)
    assert m.info["heldout_fvu"] == min(scores.values())
    with pytest.raises(GradfreeError, match="needs held-out pairs"):
        fit_transfer(fit, "ridge")
    fixed = fit_transfer(fit, "ridge", lam=0.1)
    assert fixed.param == 0.1


def test_transfer_between_two_tiny_models_through_a_paired_capture(tmp_path: Path) -> None:
    """The student is the teacher with its residual stream rotated by a planted Q (student
    stream = Qᵀ · teacher stream): every method fitted from the capture's cross-moments finds
    Qᵀ, and transferred teacher directions equal the student's own."""
    tok = tiny_tokenizer()
    teacher = tiny_model("qwen2", seed=3, dtype=torch.float64)
    fuse_norms_(teacher)  # unit norms: rotations then change no output
    student = copy.deepcopy(teacher)
    d = get_adapter(student).hidden_size
    q = random_orthogonal(d, 4)
    rotate_residual_(student, q)
    docs = HARBOUR_DOCS + [t[::-1] for t in HARBOUR_DOCS] + [t.upper() for t in HARBOUR_DOCS]
    cap = run_capture(
        {"teacher": Subject(teacher, tok), "student": Subject(student, tok)},
        docs,
        tmp_path / "cap",
        make_config(sites=["resid_pre"], layers=[1], layer_map=[0, 1], max_length=64),
        progress=False,
    )
    key = "blocks.1.resid_pre"
    pairs = PairedMoments.from_capture(cap, key, key)
    assert pairs.count > 4 * d
    planted = q.T.numpy()
    for kw in (
        {"method": "ridge", "lam": 1e-9},
        {"method": "procrustes", "eps": 1e-9},
        {"method": "procrustes", "space": "pca", "k": d},
    ):
        m = fit_transfer(pairs, **kw)
        err = np.linalg.norm(m.A - planted) / np.linalg.norm(planted)
        assert err < 1e-4, (kw, err)
    # Directions: concept-like differences of means of teacher states map onto the student's.
    with torch.no_grad():
        hts, hss = [], []
        for x in ("The harbour", "Stop 7: ", "old square"):
            ids = torch.tensor([tok(x)["input_ids"]], dtype=torch.long)
            hts.append(teacher(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1])
            hss.append(student(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1])
        ht, hs = torch.stack(hts), torch.stack(hss)
    dt = (ht - ht.mean(0)).numpy()
    ds = (hs - hs.mean(0)).numpy()
    assert cosines(transfer_directions(dt, m), ds).min() > 0.9999


def test_transfer_bad_input() -> None:
    t, s, _, _ = _planted(n=50)
    with pytest.raises(GradfreeError, match="Unknown transfer method"):
        fit_transfer((t, s), "lasso", lam=1.0)
    with pytest.raises(GradfreeError, match="equal n"):
        PairedMoments.from_arrays(t, s[:10])
    m = fit_transfer((t, s), "ridge", lam=1e-3)
    with pytest.raises(GradfreeError, match="width 24"):
        m.transfer(np.zeros((2, 7)))
    with pytest.raises(GradfreeError, match="PCA subspace size"):
        fit_transfer((t, s), "procrustes", space="pca", k=999)
