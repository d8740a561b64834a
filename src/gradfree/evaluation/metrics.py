"""Evaluation metrics as pure tensor maths, shared by evaluation, compression and alignment.

- Token-level comparisons of two models' logits: KL(p‖q) from log-softmaxes, top-1 agreement,
  negative log-likelihood of the targets, perplexity = exp(Σ NLL / tokens).
- Representation similarity: per-row cosine, and linear CKA (Kornblith et al., 2019, "Similarity
  of Neural Network Representations Revisited") of two token matrices, in its feature-space form
  computed from streaming sufficient statistics (the statistics-level function is
  :func:`gradfree.capture.similarity.linear_cka_from_stats`): with centered (cross-)covariances C,
  CKA(X, Y) = ‖C_xy‖_F² / (‖C_xx‖_F ‖C_yy‖_F). This equals the Gram-matrix form
  ⟨K̃, L̃⟩ / (‖K̃‖ ‖L̃‖) with K = XXᵀ, L = YYᵀ, but needs memory in the widths only, so it streams
  over any number of tokens and works for different widths (teacher vs student).
- Answer matching for short free-text answers: both sides normalised (Unicode accents stripped,
  case folded, punctuation to spaces); an accepted answer matches when it occurs in the generated
  text as a whole word or phrase.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    import torch

    # Low-precision logits are upcast: a 150k-way softmax in bf16 loses the tail entirely.
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dtype), dim=-1)


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) for each row of (…, V) logits; p is the reference
    (the teacher), q the model evaluated."""
    lp, lq = _log_probs(p_logits), _log_probs(q_logits)
    return (lp.exp() * (lp - lq)).sum(-1)


def top1_agreement(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per row: do both models put their largest logit on the same token? (bool tensor)"""
    return p_logits.argmax(-1) == q_logits.argmax(-1)


def nll_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[target] for each row of (N, V) logits and (N,) target ids."""
    return -_log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL): token-weighted, so long documents count in proportion to their tokens."""
    if count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / count)


def cosine_per_row(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of matching rows of (N, d) tensors, in float64."""
    import torch

    a, b = a.to(torch.float64), b.to(torch.float64)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (N, ·) representations of the same N tokens, via the streaming form
    (:func:`gradfree.capture.similarity.linear_cka_from_stats`); 0.0 when a side is constant."""
    from gradfree.capture.similarity import linear_cka_from_stats
    from gradfree.capture.stats import CrossStats, MomentStats

    sx = MomentStats.empty(x.shape[1]).update(x)
    sy = MomentStats.empty(y.shape[1]).update(y)
    cross = CrossStats.empty(x.shape[1], y.shape[1]).update(x, y)
    return linear_cka_from_stats(sx, sy, cross, undefined=0.0)


_NON_WORD = re.compile(r"[\W_]+", flags=re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, accents stripped (NFKD minus combining marks), punctuation and underscores
    turned into single spaces: "Curaçao!" → "curacao", "São  Paulo" → "sao paulo"."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(_NON_WORD.sub(" ", stripped.casefold()).split())


def answer_match(generated: str, answers: Iterable[str]) -> bool:
    """True when any accepted answer appears in ``generated`` as a whole word or phrase (after
    :func:`normalize_answer` on both sides); empty answers never match."""
    text = f" {normalize_answer(generated)} "
    for answer in answers:
        norm = normalize_answer(answer)
        if norm and f" {norm} " in text:
            return True
    return False
