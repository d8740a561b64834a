"""Task-vector merges: task arithmetic, TIES and DARE as configured variants of one class.

With task vectors τᵢ = θᵢ − θ_base (per tensor), every variant computes
θ = θ_base + λ · combine(sparsify(τᵢ)):

* sparsify: none; ``magnitude`` keeps the ``density`` fraction of entries of largest |τᵢ| (TIES'
  trim step); ``random`` drops each entry with probability p = 1 − density and rescales the kept
  ones by 1/density, so E[sparsified τ] = τ (DARE); ``outliers`` drops the ``gamma`` fraction of
  largest |τᵢ| and then the smallest, keeping ``density`` of the entries (Model Breadcrumbs);
  ``magprune`` keeps each entry with a probability that rises linearly with its magnitude rank in
  its row, from density − ε to density + ε, and rescales survivors by 1/probability (DELLA's
  MagPrune). Drops are seeded per (seed, model, tensor), so a merge is reproducible and
  independent of tensor order.
* combine: ``sum`` gives Σ wᵢ τ̂ᵢ (task arithmetic; DARE-linear); ``sign`` elects, per entry, the
  sign of Σ wᵢ τ̂ᵢ and averages only the agreeing non-zero entries, Σ_{agree} wᵢ τ̂ᵢ / Σ_{agree} wᵢ
  (TIES' elect + disjoint merge; DARE-TIES), or sums them when ``normalize`` is false.

References: task arithmetic, Ilharco et al. 2023 (https://arxiv.org/abs/2212.04089); TIES-Merging,
Yadav et al. 2023 (https://arxiv.org/abs/2306.01708); DARE, Yu et al. 2024
(https://arxiv.org/abs/2311.03099); Model Breadcrumbs, Davari & Belilovsky 2023
(https://arxiv.org/abs/2312.06795); DELLA, Deep et al. 2024 (https://arxiv.org/abs/2406.11617).
The layout follows mergekit's generalized task arithmetic. Deliberate differences: DARE and
DELLA rescale each survivor by exactly 1/(its keep probability), the papers' unbiased rule
(mergekit rescales the tensor to keep its L1 norm).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from gradfree.base.errors import GradfreeError
from gradfree.merge.registry import MergeMethod, TensorwiseMethod

if TYPE_CHECKING:
    import torch


def magnitude_mask(tau: torch.Tensor, density: float, floor: bool = False) -> torch.Tensor:
    """Boolean mask of the ``round(density · n)`` entries of largest |τ| (with ``floor``:
    ``max(1, int(density · n))``, mergekit's count) (ties broken by position,
    deterministically); density 1 keeps everything."""
    import torch

    n = tau.numel()
    k = max(1, int(density * n)) if floor else round(density * n)
    if k >= n:
        return torch.ones_like(tau, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    if k > 0:
        # A stable sort makes the choice among equal magnitudes reproducible.
        order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.view_as(tau)


def drop_seed(seed: int, model: int, name: str) -> int:
    """The generator seed of DARE's drops for one model's tensor (order-independent)."""
    h = hashlib.sha256(f"{seed}:{model}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def dare(
    tau: torch.Tensor, density: float, seed: int, rescale: bool = True
) -> tuple[torch.Tensor, int]:
    """Drop each entry with probability 1 − density, rescale survivors by 1/density (DARE;
    not with ``rescale`` False). Returns (sparsified τ, entries kept). Density 1 returns τ."""
    import torch

    if density >= 1.0:
        return tau, tau.numel()
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(tau.shape, generator=g, dtype=torch.float64) < density
    keep = keep.to(tau.device)
    kept = tau / density if rescale else tau
    return torch.where(keep, kept, torch.zeros_like(tau)), int(keep.sum())


def outlier_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: the ``int(gamma · n)`` entries of largest |τ| are removed, then
    the smallest, so that ``int(density · n)`` are kept (the outlier cut shrinks when both do not
    fit); stable order on ties. Density 1 keeps everything."""
    import torch

    n = tau.numel()
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(tau.abs().flatten(), stable=True).indices  # ascending magnitude
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bottom : bottom + keep]] = True
    return mask.view_as(tau)


def magprune(
    tau: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool = True
) -> tuple[torch.Tensor, int]:
    """DELLA's MagPrune: per row (a 1-D tensor is one row), the entry of magnitude rank r
    (0 = smallest, of n) is kept with probability ``q = density − ε + 2ε · r/(n − 1)`` and
    rescaled by 1/q (unless ``rescale`` is False), so E[result] = τ and the mean keep rate is
    ``density``. Returns (result, entries kept)."""
    import torch

    if density >= 1.0:
        return tau, tau.numel()
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
    frac = rank.to(torch.float64) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    q = (density - epsilon) + 2.0 * epsilon * frac
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(rows.shape, generator=g, dtype=torch.float64).to(rows.device) < q
    kept = rows / q.to(rows.dtype) if rescale else rows
    out = torch.where(keep, kept, torch.zeros_like(rows))
    return out.reshape(tau.shape), int(keep.sum())


def sign_consensus(
    taus: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES' elect + disjoint merge of (already trimmed) task vectors.

    The elected sign of each entry is sign(Σ wᵢ τᵢ); only non-zero entries with that sign
    contribute, averaged with their weights (``normalize``) or summed. Returns (merged τ, a
    boolean mask of entries where some non-zero entry was outvoted)."""
    import torch

    weighted = torch.stack([w * t for t, w in zip(taus, weights, strict=True)])
    elected = torch.sign(weighted.sum(0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    mixed = (weighted * agree).sum(0)
    if normalize:
        w = torch.tensor(list(weights), dtype=weighted.dtype, device=weighted.device)
        divisor = (w.view(-1, *[1] * (weighted.ndim - 1)) * agree).sum(0)
        mixed = torch.where(divisor != 0, mixed / torch.where(divisor != 0, divisor, 1.0), 0.0)
    conflict = ((weighted != 0) & ~agree).any(0)
    return mixed, conflict


_RESCALE = "DARE/DELLA: divide survivors by their keep probability (no effect elsewhere)"


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scaling: float = Field(1.0, description="λ: how much of the combined task vector is added")
    normalize: bool = Field(True, description="average agreeing entries (sign consensus only)")
    rescale: bool = Field(True, description=_RESCALE)


class TaskModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = 1.0
    density: float = Field(1.0, gt=0.0, le=1.0, description="fraction of entries kept")


class OutlierModelParams(TaskModelParams):
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest entries removed")


class MagPruneModelParams(TaskModelParams):
    epsilon: float = Field(
        0.15, ge=0.0, description="keep probabilities span density ± epsilon by magnitude rank"
    )


class TaskArithmeticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scaling: float = Field(1.0, description="λ: how much of the summed task vector is added")
    normalize: bool = Field(False, description="divide the sum by the sum of the weights")
    rescale: bool = Field(True, description=_RESCALE)


class WeightOnly(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = 1.0


class GeneralizedTaskArithmetic(TensorwiseMethod):
    """θ_base + λ · combine(sparsify(θᵢ − θ_base)); variants set ``sparsify`` and ``consensus``."""

    sparsify: ClassVar[str | None] = None  # None, "magnitude", "random", "outliers", "magprune"
    consensus: ClassVar[str | None] = None  # None (sum) or "sign"
    Params = TaskParams
    ModelParams = TaskModelParams
    needs_base = True

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        super().__init__(params, model_params)
        self.seed = 0
        self.floor_count = False  # mergekit's max(1, int(density·n)) for TIES' trim
        self.stats = {"entries": 0, "kept": 0, "sign_conflicts": 0}

    def check(self, recipe: Any) -> None:
        self.seed = int(recipe.seed)
        self.floor_count = getattr(recipe, "dialect", "gradfree") == "mergekit"
        if self.sparsify == "magprune":
            for i, p in enumerate(self.model_params, 1):
                if p.density < 1.0 and not 0.0 < p.density - p.epsilon < p.density + p.epsilon < 1:
                    raise GradfreeError(
                        f"Method '{self.name}' needs density ± epsilon inside (0, 1) (model {i}: "
                        f"density {p.density}, epsilon {p.epsilon})."
                    )

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        assert base is not None
        weights = self.weights()
        scaling = float(self.params.scaling)
        if scaling == 0.0 or all(w == 0.0 for w in weights):
            return base.clone()  # nothing is added: the base model exactly
        taus = []
        for i, (x, p) in enumerate(zip(xs, self.model_params, strict=True)):
            tau = x - base
            density = float(getattr(p, "density", 1.0))
            kept = tau.numel()
            rescale = bool(getattr(self.params, "rescale", True))
            if self.sparsify == "magnitude":
                mask = magnitude_mask(tau, density, self.floor_count)
                tau, kept = tau * mask, int(mask.sum())
            elif self.sparsify == "random":
                tau, kept = dare(tau, density, drop_seed(self.seed, i, name), rescale)
            elif self.sparsify == "outliers":
                mask = outlier_mask(tau, density, float(p.gamma))
                tau, kept = tau * mask, int(mask.sum())
            elif self.sparsify == "magprune":
                seed = drop_seed(self.seed, i, name)
                tau, kept = magprune(tau, density, float(p.epsilon), seed, rescale)
            self.stats["entries"] += tau.numel()
            self.stats["kept"] += kept
            taus.append(tau)
        if self.consensus == "sign":
            merged, conflict = sign_consensus(taus, weights, bool(self.params.normalize))
            self.stats["sign_conflicts"] += int(conflict.sum())
        else:
            merged = sum((w * t for t, w in zip(taus, weights, strict=True) if w != 0.0), base * 0)
            total = sum(weights)
            if getattr(self.params, "normalize", False) and abs(total) > 1e-8:
                merged = merged / total
        return base + scaling * merged

    def summary(self) -> dict[str, Any]:
        s = dict(self.stats)
        if s["entries"]:
            s["kept_fraction"] = s["kept"] / s["entries"]
            s["sign_conflict_fraction"] = s["sign_conflicts"] / (
                s["entries"] / len(self.model_params)
            )
        return s


_TA = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"

GeneralizedTaskArithmetic.variant(
    "task_arithmetic",
    _TA,
    "base + λ Σ wᵢ (θᵢ − θ_base)",
    Params=TaskArithmeticParams,
    ModelParams=WeightOnly,
)
GeneralizedTaskArithmetic.variant(
    "ties",
    _TIES,
    "trim by magnitude, elect sign, disjoint merge",
    sparsify="magnitude",
    consensus="sign",
)
GeneralizedTaskArithmetic.variant(
    "dare_ties",
    _DARE,
    "DARE drop-and-rescale, then TIES sign election",
    sparsify="random",
    consensus="sign",
)
GeneralizedTaskArithmetic.variant(
    "dare_linear",
    _DARE,
    "DARE drop-and-rescale, then task arithmetic",
    sparsify="random",
    Params=TaskArithmeticParams,
)

_CRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

GeneralizedTaskArithmetic.variant(
    "breadcrumbs",
    _CRUMBS,
    "drop the largest (outliers) and the smallest entries, then task arithmetic",
    sparsify="outliers",
    ModelParams=OutlierModelParams,
    Params=TaskArithmeticParams,
)
GeneralizedTaskArithmetic.variant(
    "breadcrumbs_ties",
    _CRUMBS,
    "breadcrumbs' mask, then TIES sign election",
    sparsify="outliers",
    consensus="sign",
    ModelParams=OutlierModelParams,
)
GeneralizedTaskArithmetic.variant(
    "della",
    _DELLA,
    "magnitude-ranked drop-and-rescale (MagPrune), then TIES sign election",
    sparsify="magprune",
    consensus="sign",
    ModelParams=MagPruneModelParams,
)
GeneralizedTaskArithmetic.variant(
    "della_linear",
    _DELLA,
    "magnitude-ranked drop-and-rescale (MagPrune), then task arithmetic",
    sparsify="magprune",
    ModelParams=MagPruneModelParams,
    Params=TaskArithmeticParams,
)

__all__ = [
    "GeneralizedTaskArithmetic",
    "MergeMethod",
    "dare",
    "drop_seed",
    "magnitude_mask",
    "magprune",
    "outlier_mask",
    "sign_consensus",
]
