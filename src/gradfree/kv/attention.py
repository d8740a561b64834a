"""Attention on the latents of a :class:`~gradfree.kv.cache.LowRankCache`, registered through
transformers' attention interface as ``gradfree_lowrank``.

With per-KV-head decoders D_g (hd, r_g) and means μ_g, keys x̂ = D_g z + μ_g and values likewise:

* scores q · k̂ = (D_gᵀ q) · z_k + q · μ_k: the query is projected into the key latent space once
  per query token, and the cached keys are never reconstructed (seed 002's "attention in
  k-space"; exact for every key mode whose latents commute with RoPE: pairs, complex,
  post_rope). In pre_rope mode the cache hands over reconstructed, re-rotated keys instead;
* output Σ a z_v D_vᵀ + μ_v (softmax rows sum to 1): attention runs over the value latents and
  D_v is applied once per query token, which is D_v folded into o_proj, computed on the fly.

For any other cache (or none) the function is transformers' own ``sdpa`` attention, so switching
a model to it changes nothing else. The mask is transformers' sdpa mask (a bool tensor, True =
attend, or None for plain causal attention). A fully masked query row (a padded position of a
left-padded batch) outputs zeros where sdpa outputs something else: no real token reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

NAME = "gradfree_lowrank"
MARK = "_gradfree_lowrank"  # the attribute on the value tensor that carries the latents
SCORES = 1 << 26  # floats of attention scores per block of queries (256 MiB)


def register() -> None:
    """Register ``gradfree_lowrank`` (attention and mask) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, lowrank_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)


def use_lowrank_attention(model: nn.Module) -> None:
    """Switch ``model`` to ``gradfree_lowrank`` attention (sdpa for every other cache)."""
    register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)  # type: ignore[operator]


def _allowed(mask: torch.Tensor | None, t: int, total: int, device: torch.device) -> torch.Tensor:
    """A bool mask (…, t, total), True where a query may attend: ``mask`` as given, or causal
    with the t queries at the last t positions."""
    if mask is None:
        q = torch.arange(total - t, total, device=device)[:, None]
        return torch.arange(total, device=device)[None, :] <= q
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # an additive float mask


def lowrank_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(b, t, n_q, hd) attention output; latent when ``value`` carries a low-rank cache's mark
    (module docstring), else transformers' sdpa attention."""
    mark = getattr(value, MARK, None)
    if mark is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    keys, values, key_full = mark
    b, n_q, t, hd = query.shape
    n_kv = len(values.heads)
    rep = n_q // n_kv
    scale = hd**-0.5 if scaling is None else scaling
    total = values.latents.shape[1]
    allowed = _allowed(attention_mask, t, total, query.device)
    q = query.float()
    # Queries in blocks, so that a long prefill's scores stay within SCORES floats per group.
    step = max(1, SCORES // max(1, b * rep * total))
    outs = []
    for g in range(n_kv):
        qg = q[:, g * rep : (g + 1) * rep]  # (b, rep, t, hd)
        parts = [
            _group(
                qg[:, :, s : s + step],
                allowed[..., s : s + step, :],
                g,
                keys,
                values,
                key_full,
                scale,
            )
            for s in range(0, t, step)
        ]
        outs.append(torch.cat(parts, dim=2))
    out = torch.cat(outs, dim=1).transpose(1, 2).to(query.dtype).contiguous()
    return out, None


def _group(
    qg: torch.Tensor,
    allowed: torch.Tensor,
    g: int,
    keys: Any,
    values: Any,
    key_full: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of KV group ``g``'s queries (b, rep, t, hd) in float32: (b, rep, t, hd)."""
    if key_full is not None:
        scores = qg @ key_full[:, g : g + 1].transpose(-1, -2)
    else:
        d_k, mu_k, cols = keys.heads[g]
        zg = keys.latents[:, None, :, cols]  # (b, 1, T, r)
        scores = (qg @ d_k) @ zg.transpose(-1, -2) + (qg @ mu_k)[..., None]
    scores = (scores * scale).masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a fully masked row: zeros
    d_v, mu_v, cols = values.heads[g]
    return (attn @ values.latents[:, None, :, cols]) @ d_v.T + mu_v


__all__ = ["MARK", "NAME", "lowrank_attention", "register", "use_lowrank_attention"]
