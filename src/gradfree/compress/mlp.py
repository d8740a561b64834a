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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gradfree.adapters import ModelAdapter
from gradfree.capture import Capture
from gradfree.numerics import f64
from gradfree.solvers import hungarian


@dataclass
class MlpPlan:
    """``neurons[s]`` = teacher neuron feeding student neuron s; ``signs[s]`` = ±1."""

    teacher_layer: int
    neurons: torch.Tensor
    signs: torch.Tensor
    matched_correlation: float
    kept_importance: float
    method: str

    def describe(self) -> dict[str, Any]:
        return {
            "teacher_layer": self.teacher_layer,
            "kept_importance": round(self.kept_importance, 6),
            "mean_abs_correlation": round(self.matched_correlation, 4),
            "flipped": int((self.signs < 0).sum()),
            "method": self.method,
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
) -> MlpPlan:
    """The neuron plan of student block ``j`` fed by teacher block ``tl``."""
    n_s = s.intermediate_size
    tkey, skey = f"blocks.{tl}.mlp_hidden", f"blocks.{j}.mlp_hidden"
    eh2 = cap.stats("teacher", tkey).variance(centered=False)
    down = v_out.T @ f64(t.layer(tl).down_proj.weight)  # d_S × d_ff_T
    imp = eh2 * (down * down).sum(0)
    order = torch.argsort(imp, descending=True, stable=True)
    keep = order[:n_s]
    kept_share = float(imp[keep].sum() / imp.sum().clamp_min(1e-300))
    signs = torch.ones(n_s, dtype=torch.float64)
    method = "importance order"
    corr_mean = 0.0
    if (
        match == "hungarian"
        and tkey in cap.dump_keys("teacher")
        and skey in cap.dump_keys("student")
    ):
        dt, ds = cap.dumps("teacher", tkey), cap.dumps("student", skey)
        same = torch.equal(dt["doc"], ds["doc"]) and torch.equal(dt["pos"], ds["pos"])
        if same and dt["x"].shape[0] > 2:
            corr = _standardise(dt["x"][:, keep]).T @ _standardise(ds["x"])  # n_s × n_s
            cols = hungarian(corr.abs())  # kept teacher neuron a -> student neuron cols[a]
            neurons = torch.empty(n_s, dtype=torch.int64)
            neurons[cols] = keep
            matched = corr[torch.arange(n_s), cols]
            signs[cols] = torch.where(matched < 0, -1.0, 1.0).to(torch.float64)
            corr_mean = float(matched.abs().mean())
            return MlpPlan(tl, neurons, signs, corr_mean, kept_share, "hungarian |corr|")
    return MlpPlan(tl, keep, signs, corr_mean, kept_share, method)
