"""Merges on the hypersphere, for more than two models or with weights: NuSLERP, Multi-SLERP and
the Karcher mean (mergekit's ``nuslerp``, ``multislerp`` and ``karcher``).

Each tensor is a point; its direction lives on the unit sphere and its norm is averaged apart.

* ``nuslerp``: SLERP of two models with the weights' ratio as ``t = w₂/(w₁ + w₂)``, over the
  flattened tensors (default) or per row/column, optionally of the task vectors from a base.
  Colinear pairs (1 − cos² ≤ eps²) are interpolated linearly.
* ``multislerp``: a weighted barycentre on the sphere in one step — the unit directions are
  projected onto the tangent space at their normalised weighted mean, averaged there with the
  weights, and mapped back by the exponential map; the result takes the weighted mean norm.
  Optionally of the task vectors from a base (Goddard 2024,
  https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).
* ``karcher``: the Riemannian (Karcher/Fréchet) mean of the unit directions, by fixed-point
  iteration of the mean of the log maps (Karcher 1977, https://doi.org/10.1002/cpa.3160300502),
  scaled by the mean norm. For two models it is the SLERP midpoint of their directions.

Pure functions on float64 tensors (``nuslerp``, ``multislerp``, ``karcher_mean``) beside the
plugins. Where a formula has no answer (antipodal directions with balancing weights) the merge
says so in one sentence instead of returning NaNs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gradfree.base.errors import GradfreeError
from gradfree.merge.registry import TensorwiseMethod, Weighted, register

if TYPE_CHECKING:
    import torch


def nuslerp(
    t: float,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    flatten: bool = True,
    row_wise: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """SLERP from ``a`` (t = 0) to ``b`` (t = 1) of the whole tensors (``flatten``), or of each
    vector along the last dimension (each row), or along the first (``row_wise``, mergekit's
    naming: vectors indexed by the other dimensions)."""
    import torch

    shape = a.shape
    if flatten or a.ndim < 2:
        u, v = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        u, v = a.transpose(0, -1), b.transpose(0, -1)
    else:
        u, v = a, b
    nu = torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(1e-7)
    nv = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-7)
    cos = ((u / nu) * (v / nv)).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1.0 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.ones_like(cos), cos))
    s = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    out = (torch.sin((1.0 - t) * theta) * u + torch.sin(t * theta) * v) / s
    out = torch.where(colinear, (1.0 - t) * u + t * v, out)
    if not (flatten or a.ndim < 2) and row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(
    xs: Sequence[torch.Tensor], weights: Sequence[float], eps: float = 1e-8
) -> torch.Tensor:
    """The one-step barycentre on the sphere of ``xs`` with (normalised) ``weights``."""
    import torch

    if len(xs) == 1:
        return xs[0].clone()
    flat = torch.stack([x.reshape(-1) for x in xs])
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (w[:, None] * units).sum(0)
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if len(xs) == 2:  # two opposite directions: the straight line is all there is
            return (w[0] * xs[0] + w[1] * xs[1]).reshape(xs[0].shape)
        raise GradfreeError(
            "The weighted directions cancel out (e.g. a tensor and its negative with equal "
            "weights), so multislerp has no barycentre; change the weights."
        )
    mean = mean / mean_norm
    tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    tn = float(torch.linalg.vector_norm(tangent)) + eps
    out = math.cos(tn) * mean + (math.sin(tn) / tn) * tangent
    return (out * float((w * norms[:, 0]).sum())).reshape(xs[0].shape)


def karcher_mean(
    xs: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5
) -> tuple[torch.Tensor, int]:
    """(The Karcher mean of the directions of ``xs`` times their mean norm, iterations used).
    Tensors of norm ≤ ``tol`` have no direction and only count in the norm."""
    import torch

    if len(xs) == 1:
        return xs[0].clone(), 0
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    units = [x.reshape(-1) / n for x, n in zip(xs, norms, strict=True) if n > tol]
    scale = sum(norms) / len(norms)
    if not units:
        return torch.zeros_like(xs[0]), 0
    mean = torch.stack(units).mean(0)
    mn = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mn < tol else mean / mn
    used = 0
    for used in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        tangent = torch.zeros_like(mean)
        for u in units:
            c = float((mean @ u).clamp(-1.0, 1.0))
            theta = math.acos(c)
            if theta >= tol:  # log map of u at the mean
                tangent += (theta / math.sin(theta)) * (u - c * mean) / len(units)
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)  # exponential map
        mean = mean / torch.linalg.vector_norm(mean)
    return (scale * mean).reshape(xs[0].shape), used


class NuSlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nuslerp_flatten: bool = Field(True, description="interpolate the flattened tensors")
    nuslerp_row_wise: bool = Field(False, description="vectors along the first dimension")


@register
class NuSlerp(TensorwiseMethod):
    name = "nuslerp"
    reference_url = "https://dl.acm.org/doi/10.1145/325165.325242"
    description = "SLERP of two models weighted by their weights (of task vectors with a base)"
    Params = NuSlerpParams
    ModelParams = Weighted
    base_optional = True
    min_models = 2
    max_models = 2

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        w = self.weights()
        total = w[0] + w[1]
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        p = self.params
        if base is None:
            return nuslerp(t, xs[0], xs[1], flatten=p.nuslerp_flatten, row_wise=p.nuslerp_row_wise)
        return base + nuslerp(
            t, xs[0] - base, xs[1] - base, flatten=p.nuslerp_flatten, row_wise=p.nuslerp_row_wise
        )


class MultiSlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="guards the norms")


@register
class MultiSlerp(TensorwiseMethod):
    name = "multislerp"
    reference_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    description = "weighted barycentre on the hypersphere (of task vectors with a base)"
    Params = MultiSlerpParams
    ModelParams = Weighted
    base_optional = True

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        w = self.weights()
        if self.params.normalize_weights:
            total = sum(w)
            if total == 0:
                raise GradfreeError("The model weights sum to zero; they cannot be normalised.")
            w = [x / total for x in w]
        if base is None:
            return multislerp(xs, w, self.params.eps)
        return base + multislerp([x - base for x in xs], w, self.params.eps)


class KarcherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_iter: int = Field(10, ge=1, description="fixed-point iterations at most")
    tol: float = Field(1e-5, gt=0.0, description="stop when the mean log map is shorter")


@register
class Karcher(TensorwiseMethod):
    name = "karcher"
    reference_url = "https://doi.org/10.1002/cpa.3160300502"
    description = "Riemannian (Karcher) mean of the directions, times the mean norm"
    Params = KarcherParams

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        super().__init__(params, model_params)
        self.stats = {"tensors": 0, "max_iterations": 0}

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        out, used = karcher_mean(xs, self.params.max_iter, self.params.tol)
        self.stats["tensors"] += 1
        self.stats["max_iterations"] = max(self.stats["max_iterations"], used)
        return out


__all__ = ["Karcher", "MultiSlerp", "NuSlerp", "karcher_mean", "multislerp", "nuslerp"]
