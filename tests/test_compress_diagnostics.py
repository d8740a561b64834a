"""Seed 000's per-layer diagnostics: Gaussian mutual information (closed form, invariance, zero
for independent data) and attention-logit KL per KV group (zero for a planted teacher compressed
back, positive exactly where a model was perturbed, shapes for the Qwen2.5-pair geometry)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject
from gradfree.compress import compress, make_recipe
from gradfree.compress.attention_kl import attention_kl
from gradfree.solvers import (
    causal_attention_logprobs,
    gaussian_mi_per_dim,
    gaussian_mutual_information,
    kl_rows,
)
from gradfree.testing.planted import embed_student
from gradfree.testing.tiny import HARBOUR_DOCS, tiny_model, tiny_tokenizer
from gradfree.texts.windows import token_windows

DOCS = HARBOUR_DOCS
FAST = {"max_length": 48, "batch_size": 4, "dump_rate": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _moments(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a, b = a - a.mean(0), b - b.mean(0)
    n = a.shape[0]
    return a.T @ a / n, b.T @ b / n, a.T @ b / n


# mutual information ------------------------------------------------------------------------------
def test_gaussian_mi_matches_the_closed_form() -> None:
    # b = ρ a + sqrt(1 − ρ²) n per dimension: I = −Σ_i ½ log(1 − ρ_i²).
    rho = torch.tensor([0.9, 0.5, 0.0, -0.7], dtype=torch.float64)
    exact = float(-0.5 * torch.log(1 - rho**2).sum())
    eye = torch.eye(4, dtype=torch.float64)
    assert abs(gaussian_mutual_information(eye, eye, torch.diag(rho), damp=0.0) - exact) < 1e-12
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    b = rho * a + (1 - rho**2).sqrt() * torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    assert abs(gaussian_mutual_information(*_moments(a, b)) - exact) < 0.01
    # Everything diagonal: the per-dimension variant sums to the joint MI.
    per_dim = gaussian_mi_per_dim(torch.ones(4), torch.ones(4), rho, damp=0.0)
    assert abs(float(per_dim.sum()) - exact) < 1e-12
    # Identical constant-d example of the brief: I = −d/2 log(1 − ρ²).
    r = 0.6
    d = 5
    eye5 = torch.eye(d, dtype=torch.float64)
    mi = gaussian_mutual_information(eye5, eye5, r * eye5, damp=0.0)
    assert abs(mi + d / 2 * math.log(1 - r**2)) < 1e-12


def test_gaussian_mi_is_invariant_under_invertible_maps() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5000, 5, generator=g, dtype=torch.float64)
    b = a[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    b = b + torch.randn(5000, 3, generator=g, dtype=torch.float64)
    ma = torch.randn(5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5)
    mb = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3)
    ref = gaussian_mutual_information(*_moments(a, b), damp=0.0)
    mapped = gaussian_mutual_information(*_moments(a @ ma.T, b @ mb.T), damp=0.0)
    assert ref > 0.1
    assert abs(mapped - ref) < 1e-9 * max(1.0, ref)
    # The per-dimension variant is not invariant: it depends on the pairing.
    ca, cb, cab = _moments(a[:, :3], b)
    swapped = gaussian_mi_per_dim(torch.diagonal(ca), torch.diagonal(cb), cab.diagonal())
    ca2, _, cab2 = _moments(a[:, [2, 0, 1]], b)
    other = gaussian_mi_per_dim(torch.diagonal(ca2), torch.diagonal(cb), cab2.diagonal())
    assert not torch.allclose(swapped, other)


def test_gaussian_mi_is_near_zero_for_independent_samples() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    mi = gaussian_mutual_information(*_moments(a, b))
    assert 0.0 <= mi < 1e-3  # the finite-sample bias is about d_a·d_b/(2n) = 3e-5


def test_gaussian_mi_is_finite_for_exact_and_rank_deficient_copies() -> None:
    # x_T = Q [x_S; 0]: a singular teacher covariance and canonical correlations of exactly 1.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    xt = x @ q[:, :3].T
    for damp in (0.0, 1e-6):
        mi = gaussian_mutual_information(*_moments(xt, x), damp=damp)
        assert math.isfinite(mi) and mi > 10
    with pytest.raises(ValueError, match="cross must be"):
        gaussian_mutual_information(torch.eye(2), torch.eye(3), torch.zeros(3, 2))


# attention maths ---------------------------------------------------------------------------------
def test_causal_attention_logprobs_match_a_loop_with_grouped_kv() -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    lp = causal_attention_logprobs(q, k, 1 / math.sqrt(8))
    for h in range(4):
        for i in range(6):
            logits = q[h, i] @ k[h // 2, : i + 1].T / math.sqrt(8)
            assert torch.allclose(lp[h, i, : i + 1], torch.log_softmax(logits, -1), atol=1e-12)
            assert torch.isinf(lp[h, i, i + 1 :]).all()
    assert torch.allclose(kl_rows(lp, lp), torch.zeros(4, 6, dtype=torch.float64))
    other = causal_attention_logprobs(q.flip(0), k, 1 / math.sqrt(8))
    kl = kl_rows(lp, other)
    assert (kl >= -1e-12).all() and float(kl[:, 1:].sum()) > 0
    assert torch.allclose(kl[:, 0], torch.zeros(4, dtype=torch.float64))  # one key: no choice


# attention KL on models --------------------------------------------------------------------------
def _planted(tmp_path: Path) -> tuple[torch.nn.Module, object]:
    student = tiny_model(
        "qwen2",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    teacher, _ = embed_student(student, 48, seed=3, permute=True)
    tok = tiny_tokenizer()
    sol, out = compress(
        Subject(teacher, tok),
        Subject(copy.deepcopy(student), tok),
        DOCS,
        tmp_path / "out",
        make_recipe(merge="none", attention_kl_windows=2, **FAST),
    )
    return teacher, (sol, out)


def test_planted_teacher_has_zero_attention_kl_and_a_perturbed_block_does_not(
    tmp_path: Path,
) -> None:
    teacher, (sol, out) = _planted(tmp_path)  # type: ignore[misc]
    kl = sol.attention_kl
    assert kl is not None and len(kl) == 3 and all(len(row) == 2 for row in kl)
    assert all(0 <= v < 1e-6 for row in kl for v in row)
    report = json.loads((out / "report.json").read_text())
    assert len(report["attention_kl"]["per_group"]) == 3
    assert report["attention_kl"]["windows"] == 2
    assert all(r["attention_kl"] is not None for r in report["merge_profile"])
    assert {"attention_kl.png", "mutual_information.png"} <= set(report["plots"])
    assert (out / "plots" / "attention_kl.png").is_file()
    # V spans the planted teacher's whole stream, so truncating to span(V) loses nothing: the
    # projected and the full teacher streams carry the same Gaussian MI about the student (exact
    # copies: both sit at the damping ceiling, whose scale differs slightly with the width).
    for d in sol.bases.diagnostics:
        assert d["mutual_information"] > 10
        assert abs(d["mutual_information"] - d["mi_teacher"]) < 0.05 * d["mi_teacher"]

    # Noise on the queries of KV group 1's heads in the last block: that block and group only
    # (perturbing an earlier block would also change every later block's inputs).
    model = copy.deepcopy(sol.model)
    rows = slice(2 * 8, 4 * 8)  # heads 2, 3 (group 1), head_dim 8
    with torch.no_grad():
        w = model.model.layers[2].self_attn.q_proj.weight
        w[rows] += 0.5 * torch.randn(w[rows].shape, generator=torch.Generator().manual_seed(0))
    windows = token_windows(tiny_tokenizer(), DOCS, 48, 2)
    assert len(windows) == 2 and all(len(w) == 48 for w in windows)
    bad = attention_kl(teacher, model, sol.attention, sol.layer_map, windows)
    assert bad[2][1] > 1e-3
    assert bad[2][0] < 1e-6
    assert all(v < 1e-6 for row in bad[:2] for v in row)


def test_attention_kl_shapes_for_the_qwen25_pair_geometry(tmp_path: Path) -> None:
    # Teacher head_dim 16, student 8; 12 vs 14 query heads in 2 KV groups; 7 → 6 blocks.
    tm, sm = tiny_model("qwen2.5-1.5b-like", seed=1), tiny_model("qwen2.5-0.5b-like", seed=2)
    tok = tiny_tokenizer()
    recipe = make_recipe(merge="optimal", attention_kl_windows=1, **FAST)
    sol, out = compress(Subject(tm, tok), Subject(sm, tok), DOCS[:2], tmp_path / "c", recipe)
    kl = sol.attention_kl
    assert kl is not None and len(kl) == 6 and all(len(row) == 2 for row in kl)
    assert all(math.isfinite(v) and v > 0 for row in kl for v in row)  # unrelated random models
    prof = sol.merge_profile()
    assert all(
        abs(r["attention_kl"] - sum(kl[r["layer"]]) / 2) < 1e-3 * r["attention_kl"] for r in prof
    )
    assert "attention KL" in (out / "report.md").read_text()


def test_attention_kl_off_and_bad_values() -> None:
    assert make_recipe(attention_kl_windows=0).attention_kl_windows == 0
    with pytest.raises(GradfreeError, match=r"^Invalid recipe: attention_kl_windows must be"):
        make_recipe(attention_kl_windows=-1)
    m = tiny_model("qwen2", num_hidden_layers=2)
    with pytest.raises(GradfreeError, match="head plan"):
        attention_kl(m, m, [], [0, 1], [[1, 2, 3]])


def test_token_windows_are_the_captures_windows() -> None:
    from gradfree.capture import make_config
    from gradfree.capture.plan import make_plan
    from gradfree.capture.runner import _batches

    tok = tiny_tokenizer()
    cfg = make_config({"max_length": 40, "batch_size": 3})
    plan = make_plan({"model": Subject(tiny_model("llama"), tok)}, DOCS, cfg)
    ref = [w.ids for batch in _batches(plan) for w in batch]
    assert len(ref) > 5
    assert token_windows(tok, DOCS, 40, 5) == ref[:5]
    assert token_windows(tok, DOCS, 40, 10**6) == ref
