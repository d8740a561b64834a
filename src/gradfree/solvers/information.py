"""Information measures for seed 000's per-layer diagnostics: Gaussian mutual information from
(cross-)covariances, and causal attention distributions with their row-wise KL divergence.

Mutual information under a joint-Gaussian model (Kullback 1959; canonical correlation analysis,
Hotelling 1936): with ρ_i the canonical correlations of a and b, the singular values of
Σ_a^{-1/2} Σ_ab Σ_b^{-1/2}, I(a; b) = −½ Σ_i log(1 − ρ_i²) nats. It depends on a and b only
through the subspaces they span, so any invertible map of either side leaves it unchanged.

Finite samples bias it upward: for independent a, b and n tokens, E[ρ_i²] ≈ 1/n per pair, so the
estimate sits near d_a·d_b/(2n) nats instead of 0. Relative damping of Σ_a and Σ_b (the policy
of :mod:`gradfree.base.numerics`) bounds it for exact copies (ρ = 1),
which would otherwise be infinite.

Attention: ``causal_attention_logprobs`` forms log softmax(q kᵀ·scale + causal mask) per query
head, with grouped KV heads (query head h reads KV head h // group size, HF's repeat_kv layout);
``kl_rows`` is KL(p‖q) = Σ_k p_k (log p_k − log q_k) for every row of two such distributions.
"""

from __future__ import annotations

import torch

from gradfree.base.numerics import damp as damp_matrix
from gradfree.base.numerics import f64

# Canonical correlations are clipped to ρ² ≤ 1 − _RHO2_GAP: rounding can push an exact copy's ρ
# just above 1, where log(1 − ρ²) is undefined.
_RHO2_GAP = 1e-12


def _inv_sqrt(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """Σ^{-1/2} of a symmetric PSD matrix after relative damping; directions with no variance
    (eigenvalue ≤ d·eps·λ_max) are dropped (pseudo-inverse), since they carry no correlation."""
    c = f64(cov)
    c = damp_matrix(0.5 * (c + c.T), damp)
    vals, vecs = torch.linalg.eigh(c)
    tol = c.shape[0] * torch.finfo(c.dtype).eps * vals.abs().max().clamp_min(1e-300)
    inv = torch.where(vals > tol, vals.clamp_min(1e-300).rsqrt(), torch.zeros_like(vals))
    return (vecs * inv) @ vecs.T


def canonical_correlations(
    cov_a: torch.Tensor, cov_b: torch.Tensor, cross: torch.Tensor, damp: float = 1e-6
) -> torch.Tensor:
    """Canonical correlations (descending, in [0, 1]) from centered covariances Σ_a (d_a×d_a),
    Σ_b (d_b×d_b) and the centered cross-covariance Σ_ab (d_a×d_b); ``damp`` is relative."""
    if cov_a.ndim != 2 or cov_a.shape[0] != cov_a.shape[1]:
        raise ValueError(f"cov_a must be square, got {tuple(cov_a.shape)}")
    if cov_b.ndim != 2 or cov_b.shape[0] != cov_b.shape[1]:
        raise ValueError(f"cov_b must be square, got {tuple(cov_b.shape)}")
    if cross.shape != (cov_a.shape[0], cov_b.shape[0]):
        raise ValueError(f"cross must be {cov_a.shape[0]}×{cov_b.shape[0]}, got {cross.shape}")
    if damp < 0:
        raise ValueError("damp cannot be negative")
    k = _inv_sqrt(cov_a, damp) @ f64(cross) @ _inv_sqrt(cov_b, damp)
    return torch.linalg.svdvals(k).clamp(0.0, 1.0)


def mi_from_correlations(rho: torch.Tensor) -> torch.Tensor:
    """−½ log(1 − ρ²) elementwise (nats), ρ² clipped just below 1."""
    rho2 = (f64(rho) ** 2).clamp(0.0, 1.0 - _RHO2_GAP)
    return -0.5 * torch.log1p(-rho2)


def gaussian_mutual_information(
    cov_a: torch.Tensor, cov_b: torch.Tensor, cross: torch.Tensor, damp: float = 1e-6
) -> float:
    """I(a; b) = −½ Σ_i log(1 − ρ_i²) in nats under a joint-Gaussian model (see the module
    docstring), from centered (cross-)covariances; invariant to invertible maps of a or b."""
    return float(mi_from_correlations(canonical_correlations(cov_a, cov_b, cross, damp)).sum())


def gaussian_mi_per_dim(
    var_a: torch.Tensor, var_b: torch.Tensor, cov_ab: torch.Tensor, damp: float = 1e-6
) -> torch.Tensor:
    """I(a_i; b_i) per matched coordinate pair (nats), from the variances of a_i and b_i and
    their covariance: −½ log(1 − ρ_i²) with ρ_i the Pearson correlation, the variances damped as
    in :func:`canonical_correlations` (so exact copies meet the same ceiling). Unlike the joint
    MI it depends on which coordinate of a is paired with which of b (the alignment)."""
    if not var_a.shape == var_b.shape == cov_ab.shape or var_a.ndim != 1:
        raise ValueError("var_a, var_b and cov_ab must be vectors of one length")
    if damp < 0:
        raise ValueError("damp cannot be negative")
    va, vb = f64(var_a).clamp_min(0.0), f64(var_b).clamp_min(0.0)
    den = ((va + damp * va.mean()) * (vb + damp * vb.mean())).sqrt()
    rho = torch.where(den > 0, f64(cov_ab) / den.clamp_min(1e-300), torch.zeros_like(den))
    return mi_from_correlations(rho.abs().clamp(max=1.0))


def causal_attention_logprobs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """log softmax(q kᵀ·scale + causal mask) in float64, shape (heads, tokens, tokens).

    ``q`` is (heads, tokens, head_dim) and ``k`` (kv_heads, tokens, head_dim); query head h reads
    KV head h // (heads / kv_heads). Masked (future) entries are −inf.
    """
    if q.ndim != 3 or k.ndim != 3 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (H, T, h) and k (KV, T, h), got {q.shape} and {k.shape}")
    n_heads, t, _ = q.shape
    if n_heads % k.shape[0]:
        raise ValueError(f"{n_heads} query heads do not split into {k.shape[0]} KV groups")
    kk = f64(k).repeat_interleave(n_heads // k.shape[0], dim=0)
    logits = (f64(q) @ kk.transpose(1, 2)) * scale
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.log_softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) of every row (last axis) of two log-distributions; entries where p = 0 count 0
    (so the −inf of masked positions on both sides is harmless)."""
    if logp.shape != logq.shape:
        raise ValueError(f"shapes differ: {tuple(logp.shape)} vs {tuple(logq.shape)}")
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    # KL ≥ 0 (Gibbs); two equal rows can sum to −1e-17 in float64, which is rounding.
    return terms.sum(-1).clamp_min(0.0)
