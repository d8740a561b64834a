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
most important d_ff(student) of the union are kept. Attention is not folded: heads of different
blocks have different keys and values, which one KV group cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradfree.adapters import ModelAdapter
from gradfree.capture import Capture
from gradfree.numerics import f64
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
) -> MlpPlan:
    """The neuron plan of student block ``j`` fed by teacher block ``tl`` (and, folded, by the
    further teacher blocks ``fold``)."""
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
    signs = torch.ones(n_s, dtype=torch.float64)
    method = "importance order"
    corr_mean = 0.0
    dumped = set(cap.dump_keys("teacher"))
    if match == "hungarian" and set(tkeys) <= dumped and skey in cap.dump_keys("student"):
        parts = [cap.dumps("teacher", k) for k in tkeys]
        ds = cap.dumps("student", skey)
        same = all(
            torch.equal(dt["doc"], ds["doc"]) and torch.equal(dt["pos"], ds["pos"]) for dt in parts
        )
        x_t = torch.cat([dt["x"] for dt in parts], dim=1)
        if same and x_t.shape[0] > 2:
            corr = _standardise(x_t[:, keep]).T @ _standardise(ds["x"])  # n_s × n_s
            cols = hungarian(corr.abs())  # kept teacher neuron a -> student neuron cols[a]
            neurons = torch.empty(n_s, dtype=torch.int64)
            neurons[cols] = keep
            matched = corr[torch.arange(n_s), cols]
            signs[cols] = torch.where(matched < 0, -1.0, 1.0).to(torch.float64)
            corr_mean = float(matched.abs().mean())
            return MlpPlan(
                tl, neurons, signs, corr_mean, kept_share, "hungarian |corr|", sources
            )
    return MlpPlan(tl, keep, signs, corr_mean, kept_share, method, sources)


def fold_spans(layer_map: Sequence[int], n_teacher: int) -> list[list[int]]:
    """For each student block, the teacher blocks after m(j) up to the next mapped block (the
    blocks a proportional map skips); empty where the map does not move forward."""
    spans = []
    for j, tl in enumerate(layer_map):
        nxt = layer_map[j + 1] if j + 1 < len(layer_map) else n_teacher
        spans.append(list(range(tl + 1, nxt)) if nxt > tl else [])
    return spans
