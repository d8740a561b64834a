"""Residual bases V (d_T×d_S, orthonormal columns) that map the teacher's residual stream onto
the student's residual coordinates, from captured teacher×student statistics (seed 000).

For every paired stream point p (student block inputs ``blocks.j.resid_pre`` paired with the
teacher's mapped block, then the final normed stream) we read the un-centered second moments
Σ_T = E[x_T x_Tᵀ], Σ_S and the cross-moment C = E[x_T x_Sᵀ]. Un-centered, because the weights act
on x itself, not on x − μ. Variants:

* ``svd``: V = top-d_S principal directions of Σ_T ("pure SVD"), then, with ``align``, rotated by
  the Procrustes R = polar(VᵀC) so that Vᵀx_T ≈ x_S in the student's own coordinates.
* ``two_tier``: trunk = top t directions, residual tier = PCA of what the trunk leaves
  (:func:`~gradfree.solvers.two_tier_basis`), each tier aligned to the student's tier of the same
  rank by its own Procrustes rotation (:func:`~gradfree.solvers.align_tiers`), then expressed in
  the student's coordinates (V = V_t R V_sᵀ).
* ``joint``: V = polar(C), the semi-orthogonal Procrustes map (:func:`semi_orthogonal_map`).

A global basis pools the points (each normalised by its trace so that no depth dominates);
per-layer bases solve each point alone. The first token's massive activations (absmax ~1700 in a
few dimensions of the Qwen2.5 residual) dominate the "all" second moments, which is what keeps
those dimensions inside span(V); ``basis_stats="body"`` drops the first token instead.

Diagnostics (body statistics, per point) include seed 000's "pairwise mutual information" under a
joint-Gaussian model (:func:`~gradfree.solvers.gaussian_mutual_information`): the joint
I(Vᵀx_T; x_S), the same for the whole teacher stream I(x_T; x_S) (its upper bound), and the mean
per matched coordinate I((Vᵀx_T)_i; x_S,i), which alone depends on how V is aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gradfree.base.numerics import f64
from gradfree.capture import Capture
from gradfree.capture.similarity import linear_cka_from_stats
from gradfree.solvers import (
    align_tiers,
    gaussian_mi_per_dim,
    gaussian_mutual_information,
    joint_semi_orthogonal,
    pca_basis,
    procrustes_from_cross,
    project_cross,
    transition_cost,
    two_tier_basis,
    variance_preserved,
)


@dataclass
class StreamMoments:
    """Un-centered moments of one paired stream point (float64)."""

    name: str
    sigma_t: torch.Tensor  # d_T×d_T
    sigma_s: torch.Tensor  # d_S×d_S
    cross: torch.Tensor  # d_T×d_S


@dataclass
class BasisSet:
    """Bases for every stream point: ``bases[j]`` for student block j's input, ``bases[-1]`` for
    the final normed stream (what the LM head reads). A global basis repeats one tensor."""

    bases: list[torch.Tensor]
    kind: str
    diagnostics: list[dict[str, Any]] = field(default_factory=list)

    def read(self, j: int) -> torch.Tensor:
        """The basis block j reads in."""
        return self.bases[j]

    def write(self, j: int) -> torch.Tensor:
        """The basis block j writes in: the next stream point's."""
        return self.bases[j + 1]


def stream_points(cap: Capture, n_student: int, layer_map: list[int]) -> list[tuple[str, str]]:
    """(teacher key, student key) of each stream point: block inputs, then the final normed."""
    pts = [(f"blocks.{layer_map[j]}.resid_pre", f"blocks.{j}.resid_pre") for j in range(n_student)]
    return [*pts, ("final.normed", "final.normed")]


def read_moments(cap: Capture, tk: str, sk: str, part: str) -> StreamMoments:
    st, ss = cap.stats("teacher", tk, part), cap.stats("student", sk, part)
    cr = cap.cross(tk, sk, part)
    return StreamMoments(
        f"{tk}~{sk}",
        st.covariance(centered=False),
        ss.covariance(centered=False),
        cr.cross_covariance(centered=False),
    )


def solve_basis(m: StreamMoments, kind: str, trunk_fraction: float, align: bool) -> torch.Tensor:
    """V (d_T×d_S) for one set of moments (see the module docstring)."""
    d_t, d_s = m.cross.shape
    if kind == "identity":
        return torch.eye(d_t, d_s, dtype=torch.float64)
    if kind == "joint":
        return joint_semi_orthogonal(m.cross)
    if kind == "svd":
        _, v = pca_basis(m.sigma_t, d_s)
        return v @ procrustes_from_cross(v.T @ f64(m.cross)) if align else v
    if kind == "two_tier":
        trunk = round(trunk_fraction * d_s)
        v_t = two_tier_basis(m.sigma_t, d_s, trunk)
        if not align:
            return v_t
        _, v_s = pca_basis(m.sigma_s, d_s)
        return align_tiers(v_t, project_cross(m.cross, v_t, v_s), trunk) @ v_s.T
    raise ValueError(f"unknown basis kind {kind!r}")


def _pooled(moments: list[StreamMoments]) -> StreamMoments:
    def norm(t: torch.Tensor, s: torch.Tensor) -> float:
        return float(torch.trace(s).clamp_min(1e-300))

    st = sum(m.sigma_t / norm(m.sigma_t, m.sigma_t) for m in moments)
    ss = sum(m.sigma_s / norm(m.sigma_s, m.sigma_s) for m in moments)
    cr = sum(
        m.cross / (norm(m.sigma_t, m.sigma_t) * norm(m.sigma_s, m.sigma_s)) ** 0.5 for m in moments
    )
    return StreamMoments("pooled", st, ss, cr)  # type: ignore[arg-type]


def alignment_cosine(v: torch.Tensor, m: StreamMoments) -> float:
    """E⟨Vᵀx_T, x_S⟩ / sqrt(E‖Vᵀx_T‖² E‖x_S‖²): 1 when the projected teacher equals the student."""
    num = float((f64(v) * m.cross).sum())
    den = float(((v.T @ m.sigma_t) * v.T).sum() * torch.trace(m.sigma_s)) ** 0.5
    return num / den if den > 0 else 0.0


def mutual_information(
    v: torch.Tensor, cov_t: torch.Tensor, cov_s: torch.Tensor, cross: torch.Tensor
) -> dict[str, float]:
    """Gaussian MI diagnostics of one point from centered Σ_T, Σ_S and C = Cov(x_T, x_S).

    Canonical correlations ignore invertible maps, so V enters the joint MI only through span(V):
    Vᵀx_T is x_T with the directions outside span(V) dropped, and the rotation that aligns V to
    the student changes nothing. Hence ``mi_teacher`` = I(x_T; x_S) ≥ ``mutual_information`` =
    I(Vᵀx_T; x_S), with equality when the truncation keeps everything x_T knows about x_S.
    """
    v64 = f64(v)
    cov_p, cross_p = v64.T @ cov_t @ v64, v64.T @ cross  # moments of the projected teacher Vᵀx_T
    per_dim = gaussian_mi_per_dim(torch.diagonal(cov_p), torch.diagonal(cov_s), cross_p.diagonal())
    return {
        "mutual_information": gaussian_mutual_information(cov_p, cov_s, cross_p),
        "mi_teacher": gaussian_mutual_information(cov_t, cov_s, cross),
        "mi_per_dim": float(per_dim.mean()),
    }


def residual_bases(
    cap: Capture,
    n_student: int,
    layer_map: list[int],
    kind: str,
    *,
    trunk_fraction: float = 0.5,
    align: bool = True,
    per_layer: bool = False,
    part: str = "all",
) -> BasisSet:
    """Solve the residual bases and their per-point diagnostics (body statistics)."""
    points = stream_points(cap, n_student, layer_map)
    moments = [read_moments(cap, tk, sk, part) for tk, sk in points]
    if per_layer:
        bases = [solve_basis(m, kind, trunk_fraction, align) for m in moments]
    else:
        v = solve_basis(_pooled(moments), kind, trunk_fraction, align)
        bases = [v] * len(moments)
    out = BasisSet(bases, kind)
    for p, ((tk, sk), v) in enumerate(zip(points, bases, strict=True)):
        body = read_moments(cap, tk, sk, "body")
        st, ss = cap.stats("teacher", tk, "body"), cap.stats("student", sk, "body")
        mi = mutual_information(
            v,
            st.covariance(centered=True),
            ss.covariance(centered=True),
            cap.cross(tk, sk, "body").cross_covariance(centered=True),
        )
        kt = float(st.excess_kurtosis().mean())
        ks = float(ss.excess_kurtosis().mean())
        out.diagnostics.append(
            {
                "point": sk,
                "teacher": tk,
                "variance_preserved": variance_preserved(st.covariance(centered=True), v),
                "variance_preserved_uncentered": variance_preserved(body.sigma_t, v),
                "alignment_cosine": alignment_cosine(v, body),
                "cka": linear_cka_from_stats(st, ss, cap.cross(tk, sk, "body")),
                "kurtosis_teacher": kt,
                "kurtosis_student": ks,
                "kurtosis_gap": kt - ks,
                "transition_cost": transition_cost(v, bases[p + 1]) if p + 1 < len(bases) else 0.0,
                **mi,
            }
        )
    return out
