"""RegMean: merge every linear layer in closed form from its input Gram matrices (Jin et al. 2023,
"Dataless Knowledge Fusion by Merging Weights of Language Models", https://arxiv.org/abs/2212.09849).

For a linear y = W x (+ b) and models i with inputs Xᵢ (rows = tokens) and Grams Gᵢ = XᵢᵀXᵢ, the
merged W minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖², so W = (Σᵢ Wᵢ Gᵢ)(Σᵢ Gᵢ)⁻¹. A bias is solved jointly by
appending a constant 1 to x: the augmented Gram is [[Σxxᵀ, Σx], [Σxᵀ, n]] and [W b] is solved at
once. Per-model weights scale the Grams (as if model i had wᵢ times the data).

As in the paper, off-diagonal Gram entries are scaled by ``alpha`` (G̃ = α G + (1−α) diag G;
α = 1 is plain least squares). A relative ridge ``ridge · mean(diag)`` keeps the sum invertible;
it pulls toward the weighted average W̄ rather than toward 0, by solving for the correction:

    W = W̄ + (Σᵢ wᵢ (Wᵢ − W̄) G̃ᵢ)(Σᵢ wᵢ G̃ᵢ + λ I)⁻¹,

which equals the formula above when λ = 0, and returns Wᵢ exactly when every other weight is 0.

Grams come from :mod:`gradfree.capture` on the calibration text: ``attn_in`` for q/k/v,
``mlp_in`` for gate/up, ``attn_heads`` for o and ``mlp_hidden`` (full covariance) for down.
Everything else (embeddings, norms, the LM head) is a weighted linear average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gradfree.merge.linear import linear_combination
from gradfree.merge.registry import MergeMethod, Weighted, register

if TYPE_CHECKING:
    import torch

    from gradfree.capture import Capture, MomentStats
    from gradfree.merge.context import MergeContext

# The capture site whose statistics are each linear's input, by the adapter's canonical name.
LINEAR_SITES = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "gate": "mlp_in",
    "up": "mlp_in",
    "o": "attn_heads",
    "down": "mlp_hidden",
}


def gram(stats: MomentStats, bias: bool) -> torch.Tensor:
    """Σxxᵀ, or with ``bias`` the augmented [[Σxxᵀ, Σx], [Σxᵀ, n]] (float64)."""
    import torch

    if not bias:
        return stats.m2.clone()
    d = stats.dim
    g = torch.empty(d + 1, d + 1, dtype=torch.float64, device=stats.m2.device)
    g[:d, :d] = stats.m2
    g[:d, d] = stats.sum
    g[d, :d] = stats.sum
    g[d, d] = float(stats.count)
    return g


def reduce_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): RegMean's shrinkage of the off-diagonal Gram entries."""
    import torch

    if alpha == 1.0:
        return g
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def regmean_solve(
    ws: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float = 1.0,
    ridge: float = 0.0,
) -> torch.Tensor:
    """The RegMean weight (out × in) from each model's weight (out × in) and Gram (in × in)."""
    import torch

    from gradfree.base.numerics import damp

    keep = [i for i, w in enumerate(weights) if w != 0.0]
    wbar = linear_combination([ws[i] for i in keep], [weights[i] for i in keep])
    r = torch.zeros_like(wbar)
    m = torch.zeros_like(grams[keep[0]])
    for i in keep:
        gi = weights[i] * reduce_off_diagonal(grams[i], alpha)
        r += (ws[i] - wbar) @ gi
        m += gi
    if not bool(r.any()):
        return wbar  # every kept model has the same weight (or only one is kept)
    m = damp(0.5 * (m + m.T), ridge)
    # Δ M = R with M symmetric: solve M Δᵀ = Rᵀ.
    delta = torch.linalg.solve(m, r.T).T
    return wbar + delta


class RegMeanParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="scale of off-diagonal Gram entries")
    ridge: float = Field(1e-6, ge=0.0, description="relative ridge toward the weighted average")


@register
class RegMean(MergeMethod):
    name = "regmean"
    reference_url = "https://arxiv.org/abs/2212.09849"
    description = "closed-form least-squares merge of every linear from its input Grams"
    Params = RegMeanParams
    ModelParams = Weighted
    needs_calibration = True

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        super().__init__(params, model_params)
        self.captures: list[Capture] = []
        self.linear_key: dict[str, tuple[str, str | None]] = {}  # weight → (capture key, bias)

    def weights(self) -> list[float]:
        return [float(p.weight) for p in self.model_params]

    def prepare(self, ctx: MergeContext) -> None:
        from gradfree.adapters import get_adapter
        from gradfree.capture import make_config, run_capture
        from gradfree.texts.corpora import corpus_manifest

        spec = ctx.calibration()
        docs = ctx.documents(spec)
        cfg = make_config(
            sites=sorted(set(LINEAR_SITES.values())),
            full=["mlp_hidden"],
            split_first=0,  # one accumulator over every position
            max_length=spec.max_length,
            batch_size=spec.batch_size,
        )
        names = set(ctx.names)
        for i, m in enumerate(ctx.models):
            ctx.say(f"regmean: Gram matrices of model {m.label}")
            loaded = ctx.load(i)
            if i == 0:
                modules = {id(mod): n for n, mod in loaded.model.named_modules()}
                for layer in get_adapter(loaded.model).layers:
                    for short, lin in layer.linears().items():
                        prefix = modules[id(lin)]
                        if f"{prefix}.weight" not in names:
                            continue
                        bias = f"{prefix}.bias" if f"{prefix}.bias" in names else None
                        key = f"blocks.{layer.index}.{LINEAR_SITES[short]}"
                        self.linear_key[f"{prefix}.weight"] = (key, bias)
            cap = run_capture(
                loaded,
                docs,
                ctx.work / f"grams_{i}",
                cfg,
                corpus=corpus_manifest(docs, spec.corpus),
                progress=False,
            )
            self.captures.append(cap)
            del loaded
        self.stats = {
            "linears": len(self.linear_key),
            "tokens_per_model": [c.tokens("model") for c in self.captures],
            "averaged_tensors": 0,
        }

    def groups(self, names: Sequence[str]) -> list[list[str]]:
        biases = {b for _, b in self.linear_key.values() if b is not None}
        out = []
        for n in names:
            if n in biases:
                continue
            bias = self.linear_key.get(n, (None, None))[1]
            out.append([n] if bias is None else [n, bias])
        return out

    def merge_group(
        self,
        names: Sequence[str],
        xs: dict[str, list[torch.Tensor]],
        base: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        import torch

        weights = self.weights()
        wname = names[0]
        if wname not in self.linear_key:
            self.stats["averaged_tensors"] += len(names)
            return {n: linear_combination(xs[n], weights) for n in names}
        key, bias = self.linear_key[wname]
        ws = xs[wname]
        if bias is not None:
            ws = [torch.cat([w, b[:, None]], dim=1) for w, b in zip(ws, xs[bias], strict=True)]
        grams = [
            gram(c.stats("model", key).to(ws[0].device), bias is not None) for c in self.captures
        ]
        merged = regmean_solve(ws, grams, weights, self.params.alpha, self.params.ridge)
        if bias is None:
            return {wname: merged}
        return {wname: merged[:, :-1].contiguous(), bias: merged[:, -1].contiguous()}

    def summary(self) -> dict[str, Any]:
        return dict(self.stats)


__all__ = ["LINEAR_SITES", "RegMean", "gram", "reduce_off_diagonal", "regmean_solve"]
