"""Seed 001's alignment maths on planted problems: rotations to the teacher's principal
coordinates, Householder refinement, Hungarian orders of heads and neurons."""

from __future__ import annotations

import pytest
import torch

from gradfree.align import rotations as rot
from gradfree.align.permutations import head_permutation, neuron_permutation, order_by_match
from gradfree.surgery import orthogonality, random_orthogonal


def planted(n: int = 400, d_s: int = 12, d_t: int = 20, seed: int = 0, noise: float = 0.0):
    """Teacher states x_t = (x_s Q0ᵀ) Pᵀ + noise: the teacher's principal frame is span(P) and
    the rotation that maps student coordinates onto it is known (Q0 up to the PCA's order)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.5, d_s, dtype=torch.float64)
    x_s = torch.randn(n, d_s, generator=g, dtype=torch.float64) * scales
    q0 = random_orthogonal(d_s, seed + 1)
    p = torch.linalg.qr(torch.randn(d_t, d_s, generator=g, dtype=torch.float64))[0]
    x_t = x_s @ q0.T @ p.T + noise * torch.randn(n, d_t, generator=g, dtype=torch.float64)
    return x_s, x_t


def moments(x_s: torch.Tensor, x_t: torch.Tensor, name: str = "blocks.0") -> rot.LayerMoments:
    xs, xt = x_s - x_s.mean(0), x_t - x_t.mean(0)
    n = x_s.shape[0]
    return rot.LayerMoments(name, 0, 0, xs.T @ xs / n, xt.T @ xt / n, xt.T @ xs / n, n)


@pytest.mark.parametrize("whiten", [False, True])
def test_planted_rotation_is_recovered_and_orthogonal(whiten: bool) -> None:
    x_s, x_t = planted()
    m = moments(x_s, x_t)
    t = rot.make_target(m, 12, whiten=whiten, ridge=1e-9)
    q, sv = rot.solve_basis([t])
    stats = orthogonality(q)
    assert stats["max_abs_rtr_minus_i"] < 1e-5 and stats["max_abs_rrt_minus_i"] < 1e-5
    assert rot.fit_cosine(t, q, m.c_s) > 1 - 1e-8
    assert rot.residual_ratio(t, q, m.c_s) < 1e-6
    eye = torch.eye(12, dtype=torch.float64)
    assert rot.fit_cosine(t, eye, m.c_s) < 0.9  # the identity is not the answer
    # per token: the student's coordinates in the new basis are the teacher's principal ones
    xs, xt = x_s - x_s.mean(0), x_t - x_t.mean(0)
    assert torch.allclose(xs @ q, xt @ t.p_t, atol=1e-8)
    # round trips of random residual vectors
    r = torch.randn(7, 12, dtype=torch.float64)
    assert torch.allclose((r @ q) @ q.T, r, atol=1e-10)
    assert torch.allclose((r @ q.T) @ q, r, atol=1e-10)
    assert sv.shape == (12,)


def test_shrunk_k_still_gives_a_full_orthogonal_basis() -> None:
    x_s, x_t = planted(noise=0.05)
    m = moments(x_s, x_t)
    t = rot.make_target(m, 8)
    q, _ = rot.solve_basis([t], m.c_s)
    assert q.shape == (12, 12) and max(orthogonality(q).values()) < 1e-10
    assert rot.fit_cosine(t, q, m.c_s) > 0.99


def test_one_basis_over_layers_beats_each_layers_own_identity() -> None:
    """The global basis pools the layers: on each layer it is at most as good as that layer's
    own solution and better than not rotating."""
    layers = [moments(*planted(seed=s, noise=0.3)) for s in (0, 0, 5)]
    ts = [rot.make_target(m, 12) for m in layers]
    q, _ = rot.solve_basis(ts)
    eye = torch.eye(12, dtype=torch.float64)
    for t, m in zip(ts, layers, strict=True):
        own, _ = rot.solve_basis([t])
        assert rot.fit_cosine(t, own, m.c_s) >= rot.fit_cosine(t, q, m.c_s) - 1e-12
    assert sum(rot.fit_cosine(t, q, m.c_s) for t, m in zip(ts, layers, strict=True)) > sum(
        rot.fit_cosine(t, eye, m.c_s) for t, m in zip(ts, layers, strict=True)
    )


def test_householder_refinement_helps_a_stage_and_stops_at_the_target() -> None:
    layers = [moments(*planted(seed=s, noise=0.1)) for s in (0, 3)]
    ts = [rot.make_target(m, 12) for m in layers]
    q_global, _ = rot.solve_basis(ts)
    stage = [ts[1]]
    q_ref, gains, hist = rot.refine_stage(stage, [layers[1].c_s], q_global, 2, 0.999)
    assert len(gains) <= 2 and all(g > 0 for g in gains)
    assert hist == sorted(hist) and hist[-1] > hist[0]
    assert max(orthogonality(q_ref).values()) < 1e-10
    # target already met: no reflection at all
    q_same, gains0, _ = rot.refine_stage(stage, [layers[1].c_s], q_global, 2, 1e-6)
    assert gains0 == [] and torch.equal(q_same, q_global)


def test_order_by_match_recovers_a_planted_order() -> None:
    perm = torch.tensor([3, 0, 4, 1, 2])
    sim = torch.full((3, 5), 0.1, dtype=torch.float64)
    for i in range(3):
        sim[i, perm[i]] = 1.0  # teacher unit i is student unit perm[i]
    got, after, before = order_by_match(sim)
    assert got[:3].tolist() == perm[:3].tolist() and sorted(got.tolist()) == list(range(5))
    assert after == pytest.approx(1.0) and before < after
    got_t, after_t, _ = order_by_match(sim.T.contiguous()[:3])  # more teacher units than student
    assert sorted(got_t.tolist()) == [0, 1, 2] and after_t <= 1.0


def test_head_permutation_stays_within_kv_groups() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(12, 14, generator=g, dtype=torch.float64)  # 2 groups: 6 vs 7 heads
    gperm, hperm, scores = head_permutation(sim, 2, 2)
    assert sorted(gperm.tolist()) == [0, 1] and sorted(hperm.tolist()) == list(range(14))
    assert all(h // 7 == int(p) // 7 for h, p in enumerate(hperm))  # within groups
    assert scores["similarity_after"] >= scores["similarity_before"] - 1e-12


def test_neuron_permutation_recovers_planted_neurons() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(300, 10, generator=g, dtype=torch.float64)
    order = torch.tensor([7, 2, 9, 0, 5, 1])
    student = teacher[:, order] * 2.0 + 0.5 + 0.01 * torch.randn(300, 6, generator=g)
    perm, scores = neuron_permutation(teacher, student)
    # student neuron perm[i] is placed i-th, in the teacher's order of their partners
    partners = order[perm]
    assert partners.tolist() == sorted(partners.tolist())
    assert scores["correlation_after"] > 0.99


def test_head_permutation_with_more_teacher_groups_pairs_the_matched_groups() -> None:
    """4 teacher KV groups, 2 student groups: student group 1 resembles teacher group 3, whose
    heads it must be matched with (not teacher group 0's)."""
    sim = torch.zeros(8, 4, dtype=torch.float64)  # 2 heads per group on both sides
    sim[6, 3] = sim[7, 2] = 1.0  # teacher group 3 ~ student group 1, heads crossed
    sim[0, 0] = sim[1, 1] = 0.5  # teacher group 0 ~ student group 0
    gperm, hperm, _ = head_permutation(sim, 4, 2)
    assert gperm.tolist() == [0, 1]
    assert hperm.tolist() == [0, 1, 3, 2]
