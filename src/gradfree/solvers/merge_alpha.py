"""Closed-form merge weights between a student layer and a mapped teacher layer.

Seed 000 merges W = α W_t + (1 − α) W_s per layer (and per KV group) with an "activation-informed"
α. Here α is the least-squares optimum on the layer's own input/target statistics: for inputs X
(n×in), target outputs Y (n×out) and D = W_t − W_s (weights are out×in),

    α* = argmin_α ‖X (W_s + α D)ᵀ − Y‖_F² = tr(D (XᵀY − XᵀX W_sᵀ)) / tr(D XᵀX Dᵀ),

a one-dimensional least-squares problem (the line search of "model interpolation" in weight
space, e.g. Wortsman et al. 2022 "Model soups", solved exactly for a linear layer). Only XᵀX
(in×in) and XᵀY (in×out) are needed. :func:`optimal_alpha_per_row` solves the same problem for
each output row separately (each row's loss is independent), which also gives group-wise α by
slicing rows.
"""

from __future__ import annotations

import torch

from gradfree.base.numerics import f64


def _check(xtx: torch.Tensor, xty: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor) -> None:
    out, inp = w_s.shape
    if w_t.shape != w_s.shape or xtx.shape != (inp, inp) or xty.shape != (inp, out):
        raise ValueError(
            f"shapes: w_s/w_t out×in {tuple(w_s.shape)}/{tuple(w_t.shape)}, xtx in×in "
            f"{tuple(xtx.shape)}, xty in×out {tuple(xty.shape)}"
        )


def linear_loss_from_stats(
    xtx: torch.Tensor, xty: torch.Tensor, yty_trace: float, w: torch.Tensor
) -> float:
    """‖X Wᵀ − Y‖_F² = tr(W XᵀX Wᵀ) − 2 tr(W XᵀY) + tr(YᵀY), from statistics (W out×in)."""
    w64 = f64(w)
    quad = float(((w64 @ f64(xtx)) * w64).sum())
    lin = float((w64 * f64(xty).T).sum())
    return quad - 2.0 * lin + float(yty_trace)


def optimal_alpha(
    xtx: torch.Tensor,
    xty: torch.Tensor,
    w_s: torch.Tensor,
    w_t: torch.Tensor,
    clip: bool = True,
) -> float:
    """α* minimising ‖X (α W_t + (1 − α) W_s)ᵀ − Y‖_F², clipped to [0, 1] unless ``clip=False``.

    Shapes: w_s, w_t out×in; xtx = XᵀX in×in; xty = XᵀY in×out. When X D = 0 every α gives the
    same output and 0.0 (keep the student) is returned.
    """
    _check(xtx, xty, w_s, w_t)
    a, ws = f64(xtx), f64(w_s)
    d = f64(w_t) - ws
    num = float((d * (f64(xty) - a @ ws.T).T).sum())  # tr(D M) = Σ D ⊙ Mᵀ
    den = float(((d @ a) * d).sum())  # tr(D XᵀX Dᵀ) = ‖X Dᵀ‖² >= 0
    if den <= 0.0:
        return 0.0
    alpha = num / den
    return min(1.0, max(0.0, alpha)) if clip else alpha


def optimal_alpha_per_row(
    xtx: torch.Tensor,
    xty: torch.Tensor,
    w_s: torch.Tensor,
    w_t: torch.Tensor,
    clip: bool = True,
) -> torch.Tensor:
    """α*_r for each output row r (shape (out,)): the row-wise version of :func:`optimal_alpha`,
    α_r = d_rᵀ (XᵀY[:, r] − XᵀX w_s,r) / (d_rᵀ XᵀX d_r); 0 where d_rᵀ XᵀX d_r = 0."""
    _check(xtx, xty, w_s, w_t)
    a, ws = f64(xtx), f64(w_s)
    d = f64(w_t) - ws
    num = (d * (f64(xty) - a @ ws.T).T).sum(1)
    den = ((d @ a) * d).sum(1)
    alpha = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return alpha.clamp(0.0, 1.0) if clip else alpha
