"""Hungarian matching of the student's attention heads and MLP neurons to the teacher's
(seed 001 §5), constrained so that the student's function is unchanged.

* Heads: for a mapped layer pair, the similarity of head a (teacher) and head b (student) is the
  cosine of their attention patterns over the same tokens, averaged over documents (the key and
  query of position 0 are left out: every head parks attention on the first token, which would
  make all heads look alike). KV groups are matched first (mean similarity of their heads), then
  query heads within the matched groups (:func:`gradfree.solvers.grouped_hungarian`'s constraint:
  a query head never leaves its KV group), so ``surgery.permute_kv_groups_`` and
  ``permute_heads_`` apply the result exactly.
* Neurons: Pearson correlation of the gated activations ``act(gate) * up`` on paired token dumps
  (:func:`gradfree.capture.similarity.correlation_from_stats`), Hungarian on the correlation.

Widths differ (14 vs 12 query heads, 4864 vs 8960 neurons): the smaller side is matched into the
larger, and the student's units are put in the order of their matched teacher units (unmatched
student units last, in their old order). The result maps new position → old index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradfree.adapters import get_adapter
from gradfree.capture import CrossStats, MomentStats, site_hooks
from gradfree.capture.similarity import correlation_from_stats
from gradfree.solvers import hungarian


def order_by_match(sim: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Order the student units (columns of the teacher×student ``sim``) by their matched teacher
    unit. Returns (perm new → old, mean similarity of the matched pairs, mean similarity of the
    pairs (i, i) before any permutation)."""
    n_t, n_s = sim.shape
    if n_t <= n_s:
        cols = hungarian(sim)  # teacher i -> student cols[i]
        matched = [int(c) for c in cols]
        after = float(sim[torch.arange(n_t), cols].mean())
    else:
        rows = hungarian(sim.T)  # student j -> teacher rows[j]
        matched = [int(j) for j in torch.argsort(rows).tolist()]
        after = float(sim[rows, torch.arange(n_s)].mean())
    taken = set(matched)
    perm = torch.tensor(matched + [j for j in range(n_s) if j not in taken], dtype=torch.long)
    idx = torch.arange(min(n_t, n_s))
    return perm, after, float(sim[idx, idx].mean())


def _partners(sim: torch.Tensor) -> dict[int, int]:
    """Student unit -> teacher unit, from the Hungarian matching of ``sim`` (teacher×student)."""
    n_t, n_s = sim.shape
    if n_t <= n_s:
        return {int(c): i for i, c in enumerate(hungarian(sim))}
    return {j: int(r) for j, r in enumerate(hungarian(sim.T))}


def _patterns(q: torch.Tensor, k: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Causal attention patterns (heads, T, T) from post-RoPE q (T, H·hd) and k (T, KV·hd)."""
    t = q.shape[0]
    hd = q.shape[1] // n_heads
    qh = q.double().view(t, n_heads, hd).transpose(0, 1)
    kh = k.double().view(t, n_kv, hd).transpose(0, 1).repeat_interleave(n_heads // n_kv, dim=0)
    scores = qh @ kh.transpose(1, 2) / hd**0.5
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


@torch.no_grad()
def _collect(model: Any, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    a = get_adapter(model)
    g = a.geometry
    keys = [f"blocks.{i}.{s}" for i in layers for s in ("q_rope", "k_rope")]
    got: dict[str, torch.Tensor] = {}

    def sink(key: str, x: torch.Tensor) -> None:
        got[key] = x[0].detach()

    dev = next(model.parameters()).device
    with site_hooks(a, keys, sink) as hooks:
        ids2 = ids.to(dev).unsqueeze(0)
        hooks.forward(ids2, torch.ones_like(ids2))
    out = {}
    for i in layers:
        p = _patterns(
            got[f"blocks.{i}.q_rope"], got[f"blocks.{i}.k_rope"], g.num_heads, g.num_kv_heads
        )
        out[i] = p[:, 1:, 1:].reshape(g.num_heads, -1)  # drop query/key 0 (attention sink)
    return out


def head_similarity(
    teacher: Any, student: Any, docs: Sequence[torch.Tensor], layer_map: Sequence[int]
) -> list[torch.Tensor]:
    """Per student layer j: mean cosine (teacher heads × student heads) of attention patterns
    against teacher layer ``layer_map[j]`` over the token sequences ``docs``."""
    n_s = len(layer_map)
    t_layers = sorted(set(layer_map))
    sims: list[torch.Tensor] = []
    acc: list[torch.Tensor | None] = [None] * n_s
    for ids in docs:
        if ids.numel() < 3:
            continue
        pt = _collect(teacher, ids, t_layers)
        ps = _collect(student, ids, list(range(n_s)))
        for j in range(n_s):
            a = torch.nn.functional.normalize(pt[layer_map[j]].cpu(), dim=1)
            b = torch.nn.functional.normalize(ps[j].cpu(), dim=1)
            prev = acc[j]
            acc[j] = a @ b.T if prev is None else prev + a @ b.T
    for total in acc:
        if total is None:
            raise ValueError("no document had enough tokens for attention patterns")
        sims.append(total / len(docs))
    return sims


def head_permutation(
    sim: torch.Tensor, teacher_kv: int, student_kv: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(KV-group perm, head perm to apply after it, scores) for one layer's teacher×student
    head similarity. Heads only move within KV groups, whole groups move together."""
    n_t, n_s = sim.shape
    gt, gs = n_t // teacher_kv, n_s // student_kv
    gsim = sim.reshape(teacher_kv, gt, student_kv, gs).mean(dim=(1, 3))
    gperm, _, _ = order_by_match(gsim)
    partner = _partners(gsim)  # student group -> its matched teacher group
    parts = []
    scores_after, scores_before = [], []
    for new_g, old_g in enumerate(gperm.tolist()):
        s_cols = list(range(old_g * gs, (old_g + 1) * gs))
        tg = partner.get(old_g)
        t_rows = [] if tg is None else list(range(tg * gt, (tg + 1) * gt))
        if t_rows:
            p, after, _ = order_by_match(sim[t_rows][:, s_cols])
            scores_after.append(after)
        else:
            p = torch.arange(gs)
        parts.append(new_g * gs + p)  # positions after the group permutation
    hperm = torch.cat(parts)
    m = min(teacher_kv, student_kv)
    for g in range(m):
        t_rows = list(range(g * gt, (g + 1) * gt))
        s_cols = list(range(g * gs, (g + 1) * gs))
        k = min(gt, gs)
        block = sim[t_rows][:, s_cols]
        scores_before.append(float(block[torch.arange(k), torch.arange(k)].mean()))
    return (
        gperm,
        hperm,
        {
            "similarity_before": sum(scores_before) / len(scores_before),
            "similarity_after": sum(scores_after) / max(1, len(scores_after)),
        },
    )


def neuron_permutation(
    teacher_x: torch.Tensor, student_x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """(perm new → old, scores) of the student's neurons from paired activation dumps
    (n tokens × neurons each): Hungarian on the Pearson correlation."""
    n = teacher_x.shape[0]
    st = MomentStats.empty(teacher_x.shape[1], full=False).update(teacher_x)
    ss = MomentStats.empty(student_x.shape[1], full=False).update(student_x)
    cross = CrossStats.empty(teacher_x.shape[1], student_x.shape[1]).update(teacher_x, student_x)
    corr = correlation_from_stats(st, ss, cross)
    perm, after, before = order_by_match(corr)
    return perm, {"correlation_before": before, "correlation_after": after, "tokens": n}
