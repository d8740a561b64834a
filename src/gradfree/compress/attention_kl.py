"""Attention-logit KL per KV group (seed 000, "GQA symmetry validation"): how far a compressed or
merged model's attention patterns are from the teacher's, head by matched head.

For student block j (fed by teacher block m(j)) and every student head s with a teacher head
``plan.head_map[s]`` ≥ 0, both models' causal attention distributions softmax(q kᵀ/√h + mask) are
formed from their post-RoPE queries and keys (the capture hooks' ``q_rope``/``k_rope`` sites, each
model scaled by its own head_dim h, query head h reading KV head h // group size), and
KL(teacher head ‖ model head) is averaged over query positions and windows. A KV group's value is
the mean over its matched student heads. Heads without a teacher head are left out: the teacher
says nothing about them.

Memory: one window at a time (batch 1, no padding); per window the hooks keep only the q/k of the
needed blocks, and attention probabilities exist for one block at a time. A KV group without a
matched head (impossible when both models have heads in every group) reads NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gradfree.adapters import ModelAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture.hooks import site_hooks
from gradfree.compress.attention import AttentionPlan
from gradfree.solvers import causal_attention_logprobs, kl_rows


def _queries_keys(
    a: ModelAdapter, layers: Sequence[int], ids: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q (heads, T, h), k (kv_heads, T, h))} after RoPE, for one window of ``ids``."""
    keys = [f"blocks.{i}.{site}" for i in sorted(set(layers)) for site in ("q_rope", "k_rope")]
    got: dict[str, torch.Tensor] = {}

    def sink(key: str, x: torch.Tensor) -> None:
        x = x[0].detach()  # (T, width): batch of one
        got[key] = x.cpu() if x.device.type == "mps" else x  # the KL is float64 (no MPS)

    dev = next(a.model.parameters()).device
    ids = ids.to(dev)
    with torch.inference_mode(), site_hooks(a, keys, sink) as hooks:
        hooks.forward(ids[None], torch.ones_like(ids)[None])
    hd, t = a.geometry.head_dim, ids.shape[0]

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(t, -1, hd).transpose(0, 1)

    return {
        i: (heads(got[f"blocks.{i}.q_rope"]), heads(got[f"blocks.{i}.k_rope"]))
        for i in sorted(set(layers))
    }


def _logprobs(a: ModelAdapter, qk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return causal_attention_logprobs(qk[0], qk[1], 1.0 / math.sqrt(a.geometry.head_dim))


@torch.no_grad()
def attention_kl(
    teacher: nn.Module,
    model: nn.Module,
    plans: Sequence[AttentionPlan],
    layer_map: Sequence[int],
    windows: Sequence[Sequence[int] | torch.Tensor],
) -> list[list[float]]:
    """Mean KL(teacher ‖ model) of matched heads' attention, ``[block j][KV group g]`` (nats).

    ``model`` is student-shaped (the projected teacher or a merge), ``plans[j]`` its block j's
    head plan, ``layer_map[j]`` the teacher block feeding it, ``windows`` token-id windows.
    """
    t, m = get_adapter(teacher), get_adapter(model)
    n, gm = m.num_layers, m.geometry
    if len(plans) != n or len(layer_map) != n:
        raise GradfreeError(f"Attention KL needs a head plan and a teacher block for each of {n}.")
    if t.geometry.num_kv_heads != gm.num_kv_heads:
        raise GradfreeError("Attention KL compares KV groups, so both need as many KV heads.")
    if not windows:
        raise GradfreeError("Attention KL needs at least one token window.")
    total = torch.zeros(n, gm.num_heads, dtype=torch.float64)  # Σ over positions of the KL
    positions = 0
    for w in windows:
        ids = torch.as_tensor(w, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise GradfreeError("Each attention KL window must be a non-empty list of token ids.")
        qk_t = _queries_keys(t, layer_map, ids)
        qk_m = _queries_keys(m, range(n), ids)
        for j in range(n):  # one block's probabilities at a time
            lp_t = _logprobs(t, qk_t[layer_map[j]])
            lp_m = _logprobs(m, qk_m[j]).to(lp_t.device)
            hm = torch.as_tensor(plans[j].head_map, device=lp_t.device)
            s_idx = (hm >= 0).nonzero().squeeze(1)  # matched student heads
            kl = kl_rows(lp_t[hm[s_idx]], lp_m[s_idx]).sum(-1)  # Σ over positions, per head
            total[j, s_idx.cpu()] += kl.cpu()
        positions += ids.numel()
    out = []
    for j in range(n):
        row = []
        for g in range(gm.num_kv_heads):
            heads = [s for s in gm.heads_in_group(g) if plans[j].head_map[s] >= 0]
            row.append(float(total[j, heads].mean()) / positions if heads else math.nan)
        out.append(row)
    return out
