"""MLP neuron plans: which teacher neurons a student block keeps, in which order, with which sign.

Importance of teacher neuron j = E[h_j²] · ‖Vᵀ d_j‖² (its mean squared activation, from the
diagonal ``mlp_hidden`` moment, times the energy its down-projection column writes into the
student's residual coordinates). The top d_ff(student) neurons are kept and ordered to match the
student's neurons by Hungarian assignment on |Pearson correlation| of the hidden activations,
computed from the capture's paired token dumps (a full 8960×4864 cross-moment for every layer
would hold 350 MB per layer; dumps hold a few thousand tokens). A gated MLP
``down(act(gate x) ⊙ up x)`` is unchanged when one neuron's up row and down column both change
sign, so a negatively correlated pair is matched with sign −1: merging then averages neurons that
do the same thing.

Depth reduction (``depth="fold"``): when the layer map skips teacher blocks, student block j may
draw its neurons from every teacher block of its span [m(j), m(j+1)) instead of block m(j)
alone. Residual blocks add their outputs, so to first order (ignoring that a later block reads
the earlier blocks' writes) the span's MLPs are one wider MLP whose neurons are the union; the
most important d_ff(student) of the union are kept (``mlp_reduce="cluster"``: the others are
merged into them). Attention is not folded: heads of different blocks have different keys and
values, which one KV group cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradfree.adapters import ModelAdapter
from gradfree.base.numerics import f64
from gradfree.capture import Capture
from gradfree.solvers import hungarian


@dataclass
class MlpPlan:
    """``neurons[s]`` = teacher neuron feeding student neuron s, an index into the neurons of
    the ``sources`` blocks laid end to end (one block unless folded); ``signs[s]`` = ±1."""

    teacher_layer: int
    neurons: torch.Tensor
    signs: torch.Tensor
    matched_correlation: float
    kept_importance: float
    method: str
    sources: list[int] = field(default_factory=list)
    # (dropped neuron, student slot, weight) when dropped neurons are merged into kept ones
    merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = [self.teacher_layer]

    def describe(self) -> dict[str, Any]:
        return {
            "teacher_layer": self.teacher_layer,
            "kept_importance": round(self.kept_importance, 6),
            "mean_abs_correlation": round(self.matched_correlation, 4),
            "flipped": int((self.signs < 0).sum()),
            "method": self.method,
            "sources": self.sources,
            "merged_neurons": 0 if self.merged is None else len(self.merged[0]),
        }


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = f64(x)
    x = x - x.mean(0)
    return x / x.norm(dim=0).clamp_min(1e-12)


def plan_mlp(
    cap: Capture,
    t: ModelAdapter,
    s: ModelAdapter,
    j: int,
    tl: int,
    v_out: torch.Tensor,
    match: str = "hungarian",
    fold: Sequence[int] = (),
    reduce: str = "select",
) -> MlpPlan:
    """The neuron plan of student block ``j`` fed by teacher block ``tl`` (and, folded, by the
    further teacher blocks ``fold``); ``reduce="cluster"`` merges the dropped neurons into the
    kept ones (:func:`absorb_dropped`) instead of dropping them."""
    n_s = s.intermediate_size
    sources = [tl, *fold]
    tkeys = [f"blocks.{i}.mlp_hidden" for i in sources]
    skey = f"blocks.{j}.mlp_hidden"
    eh2 = torch.cat([cap.stats("teacher", k).variance(centered=False) for k in tkeys])
    down = torch.cat(
        [v_out.T @ f64(t.layer(i).down_proj.weight) for i in sources], dim=1
    )  # d_S × (d_ff_T · blocks)
    imp = eh2 * (down * down).sum(0)
    order = torch.argsort(imp, descending=True, stable=True)
    keep = order[:n_s]
    kept_share = float(imp[keep].sum() / imp.sum().clamp_min(1e-300))
    plan = MlpPlan(
        tl, keep, torch.ones(n_s, dtype=torch.float64), 0.0, kept_share, "importance order", sources
    )
    x_t, x_s = _paired_dumps(cap, tkeys, skey)
    if match == "hungarian" and x_t is not None and x_s is not None:
        corr = _standardise(x_t[:, keep]).T @ _standardise(x_s)  # n_s × n_s
        cols = hungarian(corr.abs())  # kept teacher neuron a -> student neuron cols[a]
        plan.neurons = torch.empty(n_s, dtype=torch.int64)
        plan.neurons[cols] = keep
        matched = corr[torch.arange(n_s), cols]
        plan.signs[cols] = torch.where(matched < 0, -1.0, 1.0).to(torch.float64)
        plan.matched_correlation = float(matched.abs().mean())
        plan.method = "hungarian |corr|"
    if reduce == "cluster" and x_t is not None:
        plan.merged = absorb_dropped(x_t, plan.neurons)
        plan.method += " + clusters merged"
    return plan


def _paired_dumps(
    cap: Capture, tkeys: list[str], skey: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The teacher's dumped hidden activations (blocks side by side) and the student's, when
    both exist for the same tokens."""
    if not set(tkeys) <= set(cap.dump_keys("teacher")) or skey not in cap.dump_keys("student"):
        return None, None
    parts = [cap.dumps("teacher", k) for k in tkeys]
    ds = cap.dumps("student", skey)
    same = all(
        torch.equal(dt["doc"], ds["doc"]) and torch.equal(dt["pos"], ds["pos"]) for dt in parts
    )
    if not same or ds["x"].shape[0] <= 2:
        return None, None
    return torch.cat([dt["x"] for dt in parts], dim=1), ds["x"]


def absorb_dropped(
    x: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every dropped neuron into the kept neuron that best predicts it.

    With h_i ≈ a·h_k (least squares without intercept over the dumped tokens, a = E[h_i h_k] /
    E[h_k²]), the dropped neuron's write d_i h_i is approximately a·d_i h_k, so student slot s
    (fed by kept neuron k) writes with d_k + a·d_i: the cluster's output survives, the
    neuron count does not grow. Each dropped neuron goes to the k with the most explained
    energy E[h_i h_k]²/E[h_k²]. Returns (dropped neuron, student slot, a) as three vectors."""
    x = f64(x)
    n = x.shape[1]
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    dropped = torch.arange(n)[mask]
    if len(dropped) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0, dtype=torch.float64)
    xk = x[:, kept]
    e_k = (xk * xk).mean(0).clamp_min(1e-300)
    slots, weights = [], []
    for a in range(0, len(dropped), 1024):  # blocks of dropped neurons: bounded memory
        c = x[:, dropped[a : a + 1024]].T @ xk / x.shape[0]  # dropped × kept
        best = (c * c / e_k).argmax(1)
        slots.append(best)
        weights.append(c[torch.arange(len(best)), best] / e_k[best])
    return dropped, torch.cat(slots), torch.cat(weights)


def fold_spans(layer_map: Sequence[int], n_teacher: int) -> list[list[int]]:
    """For each student block, the teacher blocks after m(j) up to the next mapped block (the
    blocks a proportional map skips); empty where the map does not move forward."""
    spans = []
    for j, tl in enumerate(layer_map):
        nxt = layer_map[j + 1] if j + 1 < len(layer_map) else n_teacher
        spans.append(list(range(tl + 1, nxt)) if nxt > tl else [])
    return spans
