"""Which input groups of a linear to remove so that a least-squares refit loses least (structured
Optimal Brain Surgeon, as SlimGPT applies it to heads and MLP neurons).

A linear ``W`` (out × n) reads inputs whose (damped) second moment is ``H = C + λI``. Forcing the
columns ``G`` of the least-squares optimum to zero and refitting the others raises the quadratic
error by exactly::

    ΔE(G) = tr(W_G [(H⁻¹)_GG]⁻¹ W_Gᵀ)

and the refit is the update ``W ← W − W_G [(H⁻¹)_GG]⁻¹ (H⁻¹)_G,:`` (the least-squares
compensation of the remaining columns). Removing a group also changes every other group's
score, so groups are removed greedily, a few at a time, with ``H⁻¹`` and ``W`` downdated after
each removal (the Schur complement: ``H⁻¹ ← H⁻¹ − (H⁻¹)_:,G [(H⁻¹)_GG]⁻¹ (H⁻¹)_G,:``).

Groups are equal-sized blocks of columns (a neuron: one column; an attention head: ``head_dim``
columns). Groups may be pooled with a fixed number to keep per pool (query heads of one KV
group: every KV group must keep the same number of heads for the checkpoint to have one
``num_attention_heads``). Pure maths, float64, deterministic (ties go to the lower index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradfree.base.errors import GradfreeError


@dataclass(frozen=True)
class Selection:
    """The groups kept (sorted), the groups removed in removal order, and the predicted error
    increase ``ΔE`` of each removal step (relative to the full least-squares fit)."""

    kept: list[int]
    removed: list[int]
    step_errors: list[float]

    @property
    def predicted_error(self) -> float:
        return float(sum(self.step_errors))


def _group_scores(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``tr(W_G [(H⁻¹)_GG]⁻¹ W_Gᵀ)`` for every group, ``idx`` holding each group's columns
    (groups × size) in the current matrices."""
    if idx.shape[1] == 1:
        diag = hinv.diagonal()[idx[:, 0]]
        return (w[:, idx[:, 0]] ** 2).sum(0) / diag
    blocks = hinv[idx[:, :, None], idx[:, None, :]]  # groups × size × size
    wg = w[:, idx].permute(1, 0, 2)  # groups × out × size
    sol = torch.linalg.solve(blocks, wg.transpose(1, 2))  # groups × size × out
    return (wg.transpose(1, 2) * sol).sum(dim=(1, 2))


def obs_select(
    w: torch.Tensor,
    h: torch.Tensor,
    keep: int,
    *,
    group_size: int = 1,
    pools: Sequence[Sequence[int]] | None = None,
    steps: int = 64,
) -> Selection:
    """Greedy structured OBS: keep ``keep`` groups per pool (all groups form one pool when
    ``pools`` is None) of the columns of ``w`` (out × n) under the damped Hessian ``h`` (n × n,
    positive definite: damp it before calling).

    About ``steps`` removal rounds are made per pool (a round removes the lowest-scoring groups
    at once; ``steps`` ≥ the number to remove gives one group per round, exact greedy).
    """
    n = int(w.shape[1])
    if tuple(h.shape) != (n, n):
        raise GradfreeError(f"The Hessian must be {n} x {n}, not {tuple(h.shape)}.")
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h.detach().to(torch.float64)))
    except RuntimeError as e:  # torch's LinAlgError is a RuntimeError
        raise GradfreeError("The Hessian is not positive definite: damp it first.") from e
    return obs_select_inverse(w, hinv, keep, group_size=group_size, pools=pools, steps=steps)


def obs_select_inverse(
    w: torch.Tensor,
    hinv: torch.Tensor,
    keep: int,
    *,
    group_size: int = 1,
    pools: Sequence[Sequence[int]] | None = None,
    steps: int = 64,
) -> Selection:
    """:func:`obs_select` from the inverse Hessian ``hinv`` (float64, n × n), which is
    overwritten: a caller that already factorised ``H`` saves a second factorisation."""
    n = int(w.shape[1])
    if group_size < 1 or n % group_size:
        raise GradfreeError(f"{n} columns do not split into groups of {group_size}.")
    n_groups = n // group_size
    if tuple(hinv.shape) != (n, n) or hinv.dtype != torch.float64:
        raise GradfreeError(f"The inverse Hessian must be a float64 {n} x {n} matrix.")
    pool_list = [list(range(n_groups))] if pools is None else [list(p) for p in pools]
    flat = sorted(g for p in pool_list for g in p)
    if flat != list(range(n_groups)):
        raise GradfreeError("The pools must partition the groups, each group in one pool.")
    sizes = {len(p) for p in pool_list}
    if not 0 < keep <= min(sizes):
        raise GradfreeError(f"Cannot keep {keep} groups per pool of sizes {sorted(sizes)}.")
    w64 = w.detach().to(torch.float64).clone()
    pool_of = {g: i for i, p in enumerate(pool_list) for g in p}
    quota = [len(p) - keep for p in pool_list]
    alive = flat[:]
    # the matrices hold the columns of ``held`` groups, in that order; removed groups are
    # dropped from them once they make up a quarter (later rounds then cost less)
    held = flat[:]
    slot = {g: i for i, g in enumerate(held)}
    offs = torch.arange(group_size, device=w64.device)
    removed: list[int] = []
    errors: list[float] = []
    per_round = max(1, math.ceil(max(quota) / max(int(steps), 1)))
    while any(q > 0 for q in quota):
        eligible = [g for g in alive if quota[pool_of[g]] > 0]
        local = torch.tensor([slot[g] for g in eligible], device=w64.device)
        scores = _group_scores(w64, hinv, local[:, None] * group_size + offs[None, :])
        order = sorted(range(len(eligible)), key=lambda i: (float(scores[i]), eligible[i]))
        batch: list[int] = []
        taken = [0] * len(pool_list)
        for i in order:
            g = eligible[i]
            p = pool_of[g]
            if taken[p] < min(quota[p], per_round):
                batch.append(g)
                taken[p] += 1
        lb = torch.tensor([slot[g] for g in batch], device=w64.device)
        cols = (lb[:, None] * group_size + offs[None, :]).reshape(-1)
        block = hinv[cols[:, None], cols[None, :]]
        # the batch's joint ΔE and the downdate of W and H⁻¹ (Schur complement), in place
        sol_w = torch.linalg.solve(block, w64[:, cols].T)  # |G| × out
        errors.append(float((w64[:, cols].T * sol_w).sum()))
        rows = hinv[cols, :]  # |G| × n
        w64.addmm_(sol_w.T, rows, alpha=-1.0)
        hinv.addmm_(rows.T, torch.linalg.solve(block, rows), alpha=-1.0)
        w64[:, cols] = 0.0
        for g in batch:
            alive.remove(g)
            removed.append(g)
            quota[pool_of[g]] -= 1
        if 4 * (len(held) - len(alive)) >= len(held) and any(q > 0 for q in quota):
            lk = torch.tensor([slot[g] for g in alive], device=w64.device)
            kc = (lk[:, None] * group_size + offs[None, :]).reshape(-1)
            hinv = hinv.index_select(0, kc).index_select(1, kc)
            w64 = w64.index_select(1, kc)
            held = alive[:]
            slot = {g: i for i, g in enumerate(held)}
    return Selection(kept=sorted(alive), removed=removed, step_errors=errors)


def group_columns(groups: Sequence[int], group_size: int) -> torch.Tensor:
    """Column indices of ``groups`` (blocks of ``group_size``), in the order given."""
    return torch.tensor([g * group_size + i for g in groups for i in range(group_size)])
