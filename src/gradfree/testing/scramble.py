"""Every exact surgery transform at once, with random parameters, on the tiny model families.

:func:`scramble` fuses the norms, untying a tied head, then applies a random residual rotation,
KV-group, head and neuron permutations, per-head value rotations and, where exact (no QK-norm),
RoPE-pair rotations; the logits on :data:`IDS` must not change (:func:`rel_err` of
:func:`logits`). Used by the surgery tests and ``scripts/surgery_errors.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.surgery import (
    exact_rmsnorm,
    fuse_norms_,
    permute_heads_,
    permute_kv_groups_,
    permute_neurons_,
    random_orthogonal,
    random_permutation,
    rotate_head_values_,
    rotate_qk_pairs_,
    rotate_residual_,
)
from gradfree.testing.tiny import tiny_model

CASES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3-untied",
    "qwen3-4b-like",
    "qwen2.5-0.5b-like",
    "llama-tied",
]
IDS = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(0))


def make(case: str, dtype: torch.dtype = torch.float32, **kw: Any) -> nn.Module:
    """The tiny model of ``case`` (a family name, or one of the tied/untied variants)."""
    if case == "qwen3-untied":
        return tiny_model("qwen3", dtype=dtype, tie_word_embeddings=False, **kw)
    if case == "llama-tied":
        return tiny_model("llama", dtype=dtype, tie_word_embeddings=True, **kw)
    return tiny_model(case, dtype=dtype, **kw)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |Δ| / max |ref|``."""
    return float((out - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def logits(model: nn.Module, exact: bool = False) -> torch.Tensor:
    """Logits on :data:`IDS`; ``exact``: with RMSNorm computed in float64."""
    with exact_rmsnorm(model) if exact else contextlib.nullcontext():
        return model(IDS).logits


def within_group_perm(model: nn.Module, seed: int) -> torch.Tensor:
    """A random permutation of the query heads that keeps each head in its KV group."""
    g = get_adapter(model).geometry
    parts = [
        torch.tensor(list(g.heads_in_group(grp)))[random_permutation(g.group_size, seed + grp)]
        for grp in range(g.num_kv_heads)
    ]
    return torch.cat(parts)


def scramble(model: nn.Module, seed: int = 0) -> None:
    """Every exact transform at once, with random parameters (in place)."""
    a = get_adapter(model)
    g = a.geometry
    fuse_norms_(model)
    rotate_residual_(model, random_orthogonal(a.hidden_size, seed))
    for i in range(a.num_layers):
        s = 1000 * (seed + 1) + 100 * i
        permute_kv_groups_(model, i, random_permutation(g.num_kv_heads, s))
        permute_heads_(model, i, within_group_perm(model, s + 1))
        permute_neurons_(model, i, random_permutation(a.intermediate_size, s + 2))
        for grp in range(g.num_kv_heads):
            rotate_head_values_(model, i, grp, random_orthogonal(g.head_dim, s + 3 + grp))
        if not a.has_qk_norm:
            gen = torch.Generator().manual_seed(s + 50)
            rotate_qk_pairs_(
                model, i, 6 * torch.rand(g.num_kv_heads, g.head_dim // 2, generator=gen)
            )
