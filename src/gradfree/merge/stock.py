"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522): the fine-tuned models'
average pulled toward the base by how much their task vectors agree.

With N fine-tuned models θᵢ of one base θ₀ and cos θ the mean pairwise cosine of their task
vectors θᵢ − θ₀ (per tensor, or per row with ``filter_wise``), the merge is::

    θ = t · mean(θᵢ) + (1 − t) · θ₀,   t = N cos θ / (1 + (N − 1) cos θ)

so identical fine-tunes (cos 1) give their average and unrelated ones (cos 0) the base. Where
1 + (N − 1) cos θ vanishes there is no finite estimate and the base is kept, as mergekit does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gradfree.merge.registry import TensorwiseMethod, register

if TYPE_CHECKING:
    import torch


def model_stock(
    xs: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(The merged tensor, the interpolation ratio t: one value, or one per row)."""
    import torch

    if filter_wise and base.ndim >= 1:
        rows = base.shape[0] if base.ndim > 1 else 1
        w0 = base.reshape(rows, -1)
        ws = [x.reshape(rows, -1) for x in xs]
    else:
        w0 = base.reshape(1, -1)
        ws = [x.reshape(1, -1) for x in xs]
    offs = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offs):
        for b in offs[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
            cos.append(((a * b).sum(1) / norms.clamp_min(1e-6)).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(0)[:, None]
    n = len(ws)
    den = 1.0 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, 1.0, den))
    avg = sum(ws[1:], ws[0]) / n
    return (t * avg + (1.0 - t) * w0).reshape(base.shape), t.flatten()


class ModelStockParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter_wise: bool = Field(False, description="one ratio per row instead of per tensor")


@register
class ModelStock(TensorwiseMethod):
    name = "model_stock"
    reference_url = "https://arxiv.org/abs/2403.19522"
    description = "average of the fine-tunes, pulled toward the base by their task vectors' angle"
    Params = ModelStockParams
    needs_base = True
    min_models = 2

    def __init__(self, params: BaseModel, model_params: list[BaseModel]) -> None:
        super().__init__(params, model_params)
        self.stats = {"tensors": 0, "mean_t": 0.0}

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        assert base is not None
        out, t = model_stock(xs, base, bool(self.params.filter_wise))
        k = self.stats["tensors"]
        self.stats["mean_t"] = (self.stats["mean_t"] * k + float(t.mean())) / (k + 1)
        self.stats["tensors"] = k + 1
        return out


__all__ = ["ModelStock", "model_stock"]
