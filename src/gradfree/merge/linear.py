"""Weight averaging: linear and uniform model soups, and spherical interpolation (SLERP).

* ``linear``: θ = Σ wᵢ θᵢ / Σ wᵢ (or unnormalised Σ wᵢ θᵢ) — the "model soup" of Wortsman et al.
  2022, https://arxiv.org/abs/2203.05482 (uniform soup: all wᵢ = 1, method ``uniform``).
* ``passthrough``: one model's tensors unchanged (times ``scale``), as mergekit's frankenmerges
  use it.
* ``slerp``: per tensor, the great-circle interpolation between two models (Shoemake 1985, as
  used for model merging by mergekit): with Ω the angle between the flattened tensors,
  θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁ on the *unnormalised* tensors. When the two are
  (anti-)parallel within ``dot_threshold`` (|cos Ω| ≥ 0.9995) sin Ω ≈ 0 makes the formula
  ill-conditioned and linear interpolation is used instead; so it is for zero tensors.

Pure tensor functions (``linear_combination``, ``slerp``) are separate from the plugins so they
are tested on hand-built tensors; everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gradfree.base.errors import GradfreeError
from gradfree.merge.registry import NoParams, TensorwiseMethod, Weighted, register

if TYPE_CHECKING:
    import torch


def linear_combination(
    xs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Σ wᵢ xᵢ (divided by Σ wᵢ when ``normalize``); models with weight 0 are skipped, so a
    (1, 0) merge returns the first tensor exactly."""
    total = float(sum(weights))
    if normalize and total == 0.0:
        raise GradfreeError("The model weights sum to zero; a normalised average is undefined.")
    out = None
    for x, w in zip(xs, weights, strict=True):
        if w == 0.0:
            continue
        term = x * (w / total if normalize else w)
        out = term if out is None else out + term
    return xs[0] * 0.0 if out is None else out


def slerp(
    t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995
) -> tuple[torch.Tensor, bool]:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1); (result, fell back to lerp)."""
    import torch

    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return (1 - t) * a + t * b, True
    cos = float((a.flatten() @ b.flatten()) / (na * nb))
    if abs(cos) >= dot_threshold:
        return (1 - t) * a + t * b, True
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b, False


class LinearParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(True, description="divide by the sum of the weights")


@register
class Linear(TensorwiseMethod):
    name = "linear"
    reference_url = "https://arxiv.org/abs/2203.05482"
    description = "weighted average of the models' weights (model soup)"
    Params = LinearParams
    ModelParams = Weighted

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        return linear_combination(xs, self.weights(), self.params.normalize)


@register
class Uniform(TensorwiseMethod):
    name = "uniform"
    reference_url = "https://arxiv.org/abs/2203.05482"
    description = "uniform soup: the plain average of the models' weights"

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        return linear_combination(xs, [1.0] * len(xs))


class SlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    t: float = Field(0.5, ge=0.0, le=1.0, description="0 gives the first model, 1 the second")
    dot_threshold: float = Field(
        0.9995, gt=0.0, le=1.0, description="|cos| above which linear interpolation is used"
    )


@register
class Slerp(TensorwiseMethod):
    name = "slerp"
    reference_url = "https://dl.acm.org/doi/10.1145/325165.325242"
    description = "spherical interpolation between two models, tensor by tensor"
    Params = SlerpParams
    ModelParams = NoParams
    min_models = 2
    max_models = 2

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        super().__init__(params, model_params)
        self.stats = {"tensors": 0, "lerp_fallbacks": 0}

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        out, fell_back = slerp(self.params.t, xs[0], xs[1], self.params.dot_threshold)
        self.stats["tensors"] += 1
        self.stats["lerp_fallbacks"] += int(fell_back)
        return out


class Scaled(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, description="multiplies every tensor of the model")


@register
class Passthrough(TensorwiseMethod):
    name = "passthrough"
    reference_url = "https://github.com/arcee-ai/mergekit"
    description = "one model's tensors as they are (optionally scaled): the frankenmerge step"
    ModelParams = Scaled
    min_models = 1
    max_models = 1

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        scale = float(self.model_params[0].scale)
        return xs[0].clone() if scale == 1.0 else xs[0] * scale


__all__ = ["Linear", "Passthrough", "Slerp", "Uniform", "linear_combination", "slerp"]
