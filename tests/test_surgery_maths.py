"""The pure maths behind surgery: orthogonal matrices, permutations, pair rotations, the ledger."""

from __future__ import annotations

import pytest
import torch

from gradfree.adapters import ModelAdapter
from gradfree.base.errors import GradfreeError
from gradfree.solvers import pair_rotation, transition_costs
from gradfree.surgery import (
    as_permutation,
    check_orthogonal,
    invert_permutation,
    is_orthogonal,
    orthogonality_error,
    random_orthogonal,
    random_permutation,
    rotation_entry,
    rotation_hash,
    rotation_ledger,
)


@pytest.mark.parametrize("d", [1, 2, 7, 64])
def test_random_orthogonal_is_orthogonal_and_deterministic(d: int) -> None:
    q = random_orthogonal(d, seed=3)
    assert q.dtype == torch.float64 and q.shape == (d, d)
    assert orthogonality_error(q) < 1e-13 and is_orthogonal(q)
    assert torch.equal(q, random_orthogonal(d, seed=3))
    if d > 1:
        assert not torch.allclose(q, random_orthogonal(d, seed=4))
    assert random_orthogonal(d, seed=3, dtype=torch.float32).dtype == torch.float32


def test_random_orthogonal_sign_convention_makes_qr_factor_positive() -> None:
    # With the sign fix, Q is the unique QR factor whose R has a positive diagonal.
    q = random_orthogonal(16, seed=0)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    r = q.T @ a
    assert torch.allclose(r, r.triu(), atol=1e-12)
    assert bool((torch.diagonal(r) > 0).all())


def test_is_orthogonal_rejects_non_rotations() -> None:
    q = random_orthogonal(8, seed=1)
    assert not is_orthogonal(1.01 * q)
    assert not is_orthogonal(q[:, :4])  # not square
    assert is_orthogonal(q.to(torch.float32), tol=1e-6)
    with pytest.raises(GradfreeError, match="not orthogonal"):
        check_orthogonal(q + 1e-3, 8, "rotation")
    with pytest.raises(GradfreeError, match="must be a 9x9 matrix"):
        check_orthogonal(q, 9, "rotation")


def test_permutations() -> None:
    p = random_permutation(10, seed=2)
    inv = invert_permutation(p)
    x = torch.arange(10) * 7
    assert torch.equal(x[p][inv], x) and torch.equal(x[inv][p], x)
    assert invert_permutation([2, 0, 1]).tolist() == [1, 2, 0]
    with pytest.raises(GradfreeError, match=r"permutation of 0\.\.2"):
        as_permutation([0, 0, 1], 3)
    with pytest.raises(GradfreeError, match=r"permutation of 0\.\.3"):
        as_permutation([0, 1, 2], 4)


def _rope_matrix(head_dim: int, angles: torch.Tensor) -> torch.Tensor:
    """RoPE at one position as a matrix, built with the adapter's own rotate-half code."""
    cos = torch.cat((angles, angles)).cos()[None, None, :]
    sin = torch.cat((angles, angles)).sin()[None, None, :]
    eye = torch.eye(head_dim, dtype=torch.float64)[None, None]  # rows are basis vectors
    return ModelAdapter.apply_rope(eye, cos, sin)[0, 0].T


def test_pair_rotation_commutes_with_rope_and_a_general_rotation_does_not() -> None:
    hd = 8
    p = pair_rotation(torch.tensor([0.3, -1.2, 2.0, 0.0]), hd)
    assert is_orthogonal(p, 1e-14)
    assert torch.allclose(p[[3, 7]][:, [3, 7]], torch.eye(2, dtype=torch.float64))  # angle 0
    for pos in (1.0, 5.0, 117.0):
        m = _rope_matrix(hd, pos * torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64))
        assert torch.allclose(p @ m, m @ p, atol=1e-14)
        # RoPE and P are both rotations of the same pairs: scores q·k survive
        q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
        assert torch.allclose((m @ p @ q) @ (p @ k), (m @ q) @ k)
    r = random_orthogonal(hd, seed=0)
    assert not torch.allclose(r @ m, m @ r, atol=1e-3)
    # Partial rotary: only the first 2p dims turn.
    pp = pair_rotation([0.5], 4)
    assert torch.equal(pp[2:, 2:], torch.eye(2, dtype=torch.float64))
    with pytest.raises(GradfreeError, match="do not fit"):
        pair_rotation([0.1, 0.2, 0.3], 4)


def test_transition_costs() -> None:
    q = random_orthogonal(12, seed=0)
    assert transition_costs([q, q, q]) == pytest.approx([0.0, 0.0], abs=1e-14)
    costs = transition_costs([q, random_orthogonal(12, seed=1)])
    # two independent random rotations: ‖AᵀB − I‖_F/√d ≈ √2
    assert len(costs) == 1 and 1.0 < costs[0] < 2.0


def test_rotation_ledger_entries() -> None:
    q = random_orthogonal(6, seed=5)
    e = rotation_entry(q, "Q", layer=2)
    assert e["name"] == "Q" and e["layer"] == 2 and e["shape"] == [6, 6]
    assert e["orthogonality_error"] < 1e-14
    assert e["sv_min"] == pytest.approx(1.0) and e["sv_max"] == pytest.approx(1.0)
    assert e["sha256"] == rotation_hash(q.clone()) != rotation_hash(random_orthogonal(6, seed=6))
    scaled = rotation_entry(2 * q[:, :3], "sliced")  # orthonormal columns scaled: not a rotation
    assert scaled["shape"] == [6, 3] and scaled["sv_min"] == pytest.approx(2.0)
    assert scaled["orthogonality_error"] == pytest.approx(3.0)
    rows = rotation_ledger([("a", None, q), ("b", 1, q.T)])
    assert [r["name"] for r in rows] == ["a", "b"] and rows[1]["layer"] == 1
