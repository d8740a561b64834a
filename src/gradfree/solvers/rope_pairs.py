"""Rotations that commute with RoPE: one SO(2) rotation per frequency pair, and their Procrustes.

RoPE turns pair i of a head (dims (i, i + h/2) in Hugging Face's rotate-half layout) by the angle
p·f_i at position p. Two plane rotations commute, so a block-diagonal R made of one SO(2) block per
pair satisfies RoPE(p) R = R RoPE(p) for every p: queries and keys rotated by the same R give the
same attention scores after RoPE, (RoPE R q)·(RoPE R k) = (RoPE q)·(RoPE k). A reflection in a
pair would not commute (it turns RoPE's angle into its opposite), and neither would a rotation that
mixes two pairs of different frequencies, which is why the search is restricted to these R.

Procrustes over that set (seed 000's "KV-basis reuse": the student's keys kept, the teacher's
queries turned into the student's key coordinates) splits into one 2×2 problem per pair, and each
has a closed form: with C_p the 2×2 block of the cross-moment C = AᵀB on the pair's dims,
tr(R_pᵀ C_p) = cos θ (C_ii + C_jj) + sin θ (C_ji − C_ij), maximised at
θ = atan2(C_ji − C_ij, C_ii + C_jj).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import f64


def _pair_index(h: int) -> tuple[torch.Tensor, torch.Tensor]:
    if h < 2 or h % 2:
        raise ValueError(f"a rotate-half head has an even dimension, got {h}")
    i = torch.arange(h // 2)
    return i, i + h // 2


def pair_rotation(angles: torch.Tensor | Sequence[float], dim: int | None = None) -> torch.Tensor:
    """R (dim×dim, by default dim = 2p for p = len(angles)): pair i = dims (i, i + p) turned by
    ``angles[i]`` as RoPE turns it, (x_i, x_j) ↦ (x_i cos θ − x_j sin θ, x_i sin θ + x_j cos θ),
    i.e. x ↦ R x. Dimensions from 2p on (partial rotary: a head wider than its rotary part) are
    left alone."""
    a = torch.as_tensor(angles, dtype=torch.float64).detach().reshape(-1)
    p = a.numel()
    dim = 2 * p if dim is None else dim
    if 2 * p > dim:
        raise GradfreeError(f"{p} frequency pairs do not fit in a head of dimension {dim}.")
    i = torch.arange(p, device=a.device)
    j = i + p
    r = torch.eye(dim, dtype=torch.float64, device=a.device)
    r[i, i], r[i, j] = a.cos(), -a.sin()
    r[j, i], r[j, j] = a.sin(), a.cos()
    return r


def rope_pair_procrustes(c: torch.Tensor) -> torch.Tensor:
    """The R = :func:`pair_rotation` (θ) maximising tr(Rᵀ C) for C = AᵀB (h×h, rotate-half layout).

    As :func:`~gradfree.solvers.procrustes_from_cross`, R minimises ‖A R − B‖_F for row samples,
    so for column vectors Rᵀ a ≈ b. A pair with no signal (zero block) gets θ = 0.
    """
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"rope_pair_procrustes needs a square cross-moment, got {tuple(c.shape)}")
    c64 = f64(c)
    i, j = _pair_index(c64.shape[0])
    i, j = i.to(c64.device), j.to(c64.device)
    theta = torch.atan2(c64[j, i] - c64[i, j], c64[i, i] + c64[j, j])
    return pair_rotation(theta)
