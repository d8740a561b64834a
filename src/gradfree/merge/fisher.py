"""Fisher-weighted averaging with a diagonal Fisher (Matena & Raffel 2022,
https://arxiv.org/abs/2111.09832).

θ = Σᵢ wᵢ Fᵢ ⊙ θᵢ / Σᵢ wᵢ Fᵢ, entry by entry, where Fᵢ is model i's diagonal empirical Fisher:
the mean over calibration windows of the squared gradient of the window's mean token
log-likelihood, (∂ log p(x) / ∂θ)². Gradients come from plain backward passes, one window at a
time (a per-window Fisher: squaring a batch gradient would mix windows); no optimiser runs and
no weight changes. Squares are accumulated in float64 and stored (float32) in the scratch folder,
one safetensors file per model, then read tensor by tensor while merging.

Where every model's Fisher is ~0 (e.g. embedding rows of tokens absent from the calibration
text) the ratio is undefined; a floor ``fisher_floor · mean(F)`` (relative to the tensor's mean
Fisher over models) is added to every Fᵢ, so such entries fall back to the weighted average.
With equal Fishers the result is exactly the weighted average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gradfree.merge.registry import TensorwiseMethod, Weighted, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradfree.merge.context import MergeContext


def fisher_average(
    xs: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    floor: float = 1e-6,
) -> torch.Tensor:
    """Σ wᵢ Fᵢ θᵢ / Σ wᵢ Fᵢ with Fᵢ ← Fᵢ + floor · mean(F), in float64; weight-0 models are
    skipped."""
    import torch

    mean = torch.stack([f.mean() for f in fishers]).mean()
    eps = floor * float(mean) if float(mean) > 0 else 1.0
    kept = [(x, w * (f + eps)) for x, f, w in zip(xs, fishers, weights, strict=True) if w != 0.0]
    if not kept:
        raise ValueError("all Fisher weights are zero")
    den = kept[0][1].clone()
    for _, fw in kept[1:]:
        den += fw
    # Coefficients first: with one model left, fw / den is exactly 1 and θ is returned exactly.
    out = (kept[0][1] / den) * kept[0][0]
    for x, fw in kept[1:]:
        out += (fw / den) * x
    return out


def diagonal_fisher(
    model: nn.Module, windows: Sequence[Sequence[int]], device: str
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-parameter mean of squared per-window gradients of the mean token log-likelihood.

    Returns ({parameter name: float64 Fisher}, tokens scored). The model's parameters are
    switched to requires_grad for the passes and restored; nothing else is changed."""
    import torch

    params = dict(model.named_parameters())  # tied parameters appear once
    was = {n: p.requires_grad for n, p in params.items()}
    fisher = {
        n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()
    }
    tokens = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for ids in windows:
            x = torch.tensor([list(ids)], dtype=torch.long, device=device)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:])  # −mean log p
            nll.backward()
            tokens += int(x.shape[1] - 1)
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().to(torch.float64) ** 2
        model.zero_grad(set_to_none=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
    for f in fisher.values():
        f /= max(1, len(windows))
    return fisher, tokens


def calibration_windows(ctx: MergeContext, tokenizer: Any) -> list[list[int]]:
    """Consecutive windows of the calibration documents (at least two tokens each)."""
    from gradfree.texts.windows import iter_windows

    spec = ctx.calibration()
    windows = iter_windows(tokenizer, ctx.documents(spec), spec.max_length)
    return [w for _, w in windows if len(w) >= 2]


class FisherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fisher_floor: float = Field(
        1e-6, ge=0.0, description="added to every Fisher, relative to the tensor's mean Fisher"
    )


@register
class FisherMerge(TensorwiseMethod):
    name = "fisher"
    reference_url = "https://arxiv.org/abs/2111.09832"
    description = "diagonal-Fisher-weighted average (Fisher from calibration backward passes)"
    Params = FisherParams
    ModelParams = Weighted
    needs_calibration = True

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        super().__init__(params, model_params)
        self._files: list[Any] = []

    def prepare(self, ctx: MergeContext) -> None:
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        self.stats = {"windows": 0, "tokens_per_model": []}
        for i, m in enumerate(ctx.models):
            ctx.say(f"fisher: backward passes of model {m.label}")
            loaded = ctx.load(i)
            windows = calibration_windows(ctx, loaded.tokenizer)
            fisher, tokens = diagonal_fisher(loaded.model, windows, ctx.device)
            del loaded
            path = ctx.work / f"fisher_{i}.safetensors"
            # Cast entry by entry, dropping each float64 tensor, so the copies never coexist.
            stored = {n: fisher.pop(n).to("cpu", torch.float32) for n in list(fisher)}
            save_file(stored, str(path))
            del stored
            self._files.append(safe_open(str(path), framework="pt"))
            self.stats["windows"] = len(windows)
            self.stats["tokens_per_model"].append(tokens)

    def _fisher(self, i: int, name: str, like: torch.Tensor) -> torch.Tensor:
        import torch

        f = self._files[i]
        if name in f.keys():  # noqa: SIM118
            return f.get_tensor(name).to(like.device, torch.float64)
        # A tensor with no parameter (e.g. a tied head stored twice): no Fisher, plain average.
        return torch.ones_like(like)

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        fishers = [self._fisher(i, name, x) for i, x in enumerate(xs)]
        return fisher_average(xs, fishers, self.weights(), float(self.params.fisher_floor))


__all__ = ["FisherMerge", "calibration_windows", "diagonal_fisher", "fisher_average"]
