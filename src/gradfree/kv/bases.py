"""What a low-rank KV cache stores: one linear coder per layer for keys and one for values, the
byte budget, and rank allocation by water-filling.

A budget F in (0, 1] is the kept share of the KV cache's bytes: per layer the cache stores an
R-dimensional latent z = E (x − μ) of each token's keys (and one of its values) instead of their
n_kv · head_dim entries, x̂ = D z + μ, and Σ R = floor(F · Σ n_kv · head_dim) over every layer's
keys and values. How E, D and μ are fitted (key modes, metrics) is :mod:`gradfree.kv.solve`.

A coder is *per head* when its latent is a concatenation of one block per KV head
(``head_ranks``: the block widths; E and D block-diagonal), as PCA per head is, or *mixing* when
a latent dimension reads several KV heads (``head_ranks`` None: the ``complex`` key mode).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:  # torch is imported lazily so that `import gradfree` stays light
    import torch
    from torch import nn

KEY_MODES = ("pre_rope", "pairs", "complex", "post_rope")
METRICS = ("attention", "none")
ALLOCATIONS = ("waterfill", "uniform")
FORMAT = "gradfree.kv-bases/2"


def check_budget(budget: Any) -> float:
    """``budget`` as a float when it lies in (0, 1]; otherwise one sentence (GradfreeError)."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(budget, bool) or not (0.0 < value <= 1.0):
        raise GradfreeError(f"The budget must be in (0, 1], not {budget}.")
    return value


def check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise GradfreeError(f"The {what} must be one of {', '.join(choices)}, not {value!r}.")


@dataclass
class LayerCoder:
    """One layer's keys or values, flattened over KV heads (d = n_kv · head_dim):
    z = (x − ``mean``) ``encoder``ᵀ (R latents), x̂ = z ``decoder``ᵀ + ``mean``.

    ``head_ranks``: the latent's block width per KV head when E and D are block-diagonal (the
    latent of head h is columns Σ_{g<h} r_g … of z), None when latents mix heads. ``spectra``:
    each fitted component's eigenvalues in ranking order (reports only)."""

    encoder: torch.Tensor
    decoder: torch.Tensor
    mean: torch.Tensor
    head_ranks: list[int] | None
    spectra: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.encoder.shape[0])

    def head_slices(self) -> list[slice] | None:
        """The latent columns of each KV head (per-head coders), else None."""
        if self.head_ranks is None:
            return None
        out, start = [], 0
        for r in self.head_ranks:
            out.append(slice(start, start + r))
            start += r
        return out


@dataclass
class KVBases:
    """The coders of every layer (``keys[layer]``, ``values[layer]``) and what they were fitted
    for: key mode, metric, budget, allocation and the model (``model_type``, ``num_layers``,
    ``num_kv_heads``, ``head_dim``, ``fingerprint``: its config sha256 or None)."""

    key_mode: str
    metric: str
    head_dim: int
    keys: list[LayerCoder]
    values: list[LayerCoder]
    budget: float
    allocation: str
    model: dict[str, Any]

    @property
    def num_kv_heads(self) -> int:
        return int(self.model["num_kv_heads"])

    def ranks(self) -> dict[str, list[int]]:
        """``{"keys": [R per layer], "values": [R per layer]}``."""
        return {
            "keys": [c.rank for c in self.keys],
            "values": [c.rank for c in self.values],
        }

    def head_ranks(self) -> dict[str, list[list[int] | None]]:
        return {
            "keys": [c.head_ranks for c in self.keys],
            "values": [c.head_ranks for c in self.values],
        }

    def kept_share(self) -> float:
        """Σ ranks / Σ n_kv · head_dim over every layer's keys and values."""
        coders = self.keys + self.values
        return sum(c.rank for c in coders) / (len(coders) * self.num_kv_heads * self.head_dim)

    # files ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``bases.safetensors`` then ``bases.json`` (which records the tensors' sha256)
        into ``folder`` (created if needed), each atomically: ``bases.json`` exists only once
        both are complete, so a half-written folder never loads."""
        import torch

        from gradfree.base.io import write_json_atomic
        from gradfree.capture.store import save_shard

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for kind, table in (("k", self.keys), ("v", self.values)):
            for i, c in enumerate(table):
                for name in ("encoder", "decoder", "mean"):
                    tensors[f"{kind}.{i}.{name}"] = getattr(c, name).to(torch.float32).contiguous()
                for j, s in enumerate(c.spectra):
                    tensors[f"{kind}.{i}.spectrum.{j}"] = s.to(torch.float32).contiguous()
        files = {"bases.safetensors": save_shard(folder / "bases.safetensors", tensors)}
        write_json_atomic(
            folder / "bases.json",
            {
                "format": FORMAT,
                "key_mode": self.key_mode,
                "metric": self.metric,
                "head_dim": self.head_dim,
                "budget": self.budget,
                "allocation": self.allocation,
                "model": self.model,
                "kept_share": self.kept_share(),
                "ranks": self.ranks(),
                "head_ranks": self.head_ranks(),
                "spectra": {
                    "keys": [len(c.spectra) for c in self.keys],
                    "values": [len(c.spectra) for c in self.values],
                },
                "files": files,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> KVBases:
        """Read bases written by :meth:`save`, checking the tensors' file against its recorded
        sha256; with ``model``, refuse (one sentence) bases fitted for a model of other type,
        depth, KV heads, head_dim or config fingerprint."""
        from gradfree.base.io import read_json
        from gradfree.capture.store import read_shard

        folder = Path(folder)
        meta = read_json(folder / "bases.json", "KV bases description")
        if meta.get("format") != FORMAT:
            raise GradfreeError(
                f"The folder {folder} does not hold gradfree KV bases of format {FORMAT}."
            )
        path = folder / "bases.safetensors"
        if not path.is_file():
            raise GradfreeError(f"The KV bases file {path} does not exist.")
        _check_sha256(path, meta.get("files", {}).get("bases.safetensors"))
        try:
            tensors = read_shard(path)
            ranks, heads, spectra = meta["ranks"], meta["head_ranks"], meta["spectra"]

            def table(kind: str, key: str) -> list[LayerCoder]:
                return [
                    LayerCoder(
                        tensors[f"{kind}.{i}.encoder"],
                        tensors[f"{kind}.{i}.decoder"],
                        tensors[f"{kind}.{i}.mean"],
                        None if heads[key][i] is None else [int(r) for r in heads[key][i]],
                        [tensors[f"{kind}.{i}.spectrum.{j}"] for j in range(spectra[key][i])],
                    )
                    for i in range(len(ranks[key]))
                ]

            bases = cls(
                str(meta["key_mode"]),
                str(meta["metric"]),
                int(meta["head_dim"]),
                table("k", "keys"),
                table("v", "values"),
                float(meta["budget"]),
                str(meta["allocation"]),
                dict(meta["model"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GradfreeError(f"The KV bases in {folder} are incomplete ({err}).") from None
        bases._check_shapes(folder)
        if model is not None:
            bases.check_model(model)
        return bases

    def _check_shapes(self, folder: Path) -> None:
        d = self.num_kv_heads * self.head_dim
        for kind, table in (("keys", self.keys), ("values", self.values)):
            for i, c in enumerate(table):
                r = c.rank
                ok = (
                    tuple(c.encoder.shape) == (r, d)
                    and tuple(c.decoder.shape) == (d, r)
                    and tuple(c.mean.shape) == (d,)
                    and (c.head_ranks is None or sum(c.head_ranks) == r)
                )
                if not ok:
                    raise GradfreeError(
                        f"The KV bases in {folder} are inconsistent (the {kind} of layer {i} "
                        "have the wrong shapes)."
                    )

    def check_model(self, model: nn.Module) -> None:
        """GradfreeError (one sentence) unless these bases were fitted for ``model``."""
        from gradfree.adapters import get_adapter
        from gradfree.models import config_fingerprint

        a = get_adapter(model)
        ours = {
            "model_type": a.model_type,
            "num_layers": a.num_layers,
            "num_kv_heads": a.geometry.num_kv_heads,
            "head_dim": a.geometry.head_dim,
        }
        for key, value in ours.items():
            if self.model.get(key) != value:
                raise GradfreeError(
                    f"These KV bases were fitted for another model ({key} "
                    f"{self.model.get(key)}, this model has {value})."
                )
        theirs = self.model.get("fingerprint")
        if theirs is not None and theirs != config_fingerprint(model.config):
            raise GradfreeError(
                "These KV bases were fitted for another model (its config fingerprint differs)."
            )


def _check_sha256(path: Path, recorded: Any) -> None:
    """One sentence when ``path``'s bytes do not hash to what bases.json recorded."""
    from gradfree.base.io import sha256_file

    want = recorded.get("sha256") if isinstance(recorded, dict) else recorded
    if not isinstance(want, str):
        raise GradfreeError(f"The KV bases description does not record the hash of {path}.")
    if sha256_file(path) != want:
        raise GradfreeError(
            f"The KV bases file {path} is corrupted (its sha256 differs from bases.json's)."
        )


# rank allocation ------------------------------------------------------------------------------
def _units(spectrum: torch.Tensor, paired: bool, total: float) -> list[float]:
    """Energy per kept dimension of each successive unit (a dim, or a pair), over ``total``."""
    import torch

    s = spectrum.detach().to(torch.float64).clamp_min(0.0)
    e = (s / total if total > 0 else torch.zeros_like(s)).tolist()
    if paired:
        return [(e[2 * i] + e[2 * i + 1]) / 2 for i in range(len(e) // 2)]
    return e


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    budget: float,
    allocation: str = "waterfill",
    *,
    paired: Sequence[bool] | None = None,
    floors: Sequence[int] | None = None,
    groups: Sequence[Hashable] | None = None,
    shares: Sequence[float] | None = None,
) -> list[int]:
    """One rank per component (a spectrum of its eigenvalues each), Σ ranks =
    floor(budget · Σ dims) exactly.

    ``waterfill`` keeps the largest normalised eigenvalues across all components, each
    spectrum divided by the total of its group (``groups``; default: every component its own,
    i.e. trace-normalised); ``uniform`` gives every component the same rank (remainder to the
    first ones). Components flagged in ``paired`` take whole pairs (RoPE frequency pairs, or the
    real and imaginary part of a complex latent): their ranks are even, their spectrum lists
    per-dim energies pair by pair and a pair competes with its mean energy. Every component
    keeps at least ``floors`` units (default 1; 0 lets a component drop out). ``shares``
    multiply a component's normalised energies (default 1).
    """
    budget = check_budget(budget)
    check_choice(allocation, ALLOCATIONS, "allocation")
    n = len(spectra)
    flags = [False] * n if paired is None else [bool(p) for p in paired]
    lows = [1] * n if floors is None else [int(f) for f in floors]
    keys = list(range(n)) if groups is None else list(groups)
    mult = [1.0] * n if shares is None else [float(x) for x in shares]
    if len(flags) != n or len(lows) != n or len(keys) != n or len(mult) != n:
        raise ValueError("paired, floors, groups and shares must have one entry per spectrum")
    if not spectra:
        raise GradfreeError("There are no components to allocate ranks to.")
    dims = [int(s.shape[0]) for s in spectra]
    if any(p and d % 2 for p, d in zip(flags, dims, strict=True)):
        raise GradfreeError("A paired component needs an even dimension.")
    target = math.floor(budget * sum(dims) + 1e-9)
    cost = [2 if p else 1 for p in flags]
    ranks = [c * f for c, f in zip(cost, lows, strict=True)]
    if target < sum(ranks):
        raise GradfreeError(
            f"The budget {budget:g} keeps {target} dimensions, fewer than the {sum(ranks)} "
            "needed to keep one per head; raise the budget."
        )
    totals: dict[Hashable, float] = {}
    for g, s in zip(keys, spectra, strict=True):
        totals[g] = totals.get(g, 0.0) + float(s.double().clamp_min(0.0).sum())
    units = [
        [u * x for u in _units(s, p, totals[g])]
        for s, p, g, x in zip(spectra, flags, keys, mult, strict=True)
    ]
    left = target - sum(ranks)
    waterfill = allocation == "waterfill"

    def key(c: int) -> tuple[float, int]:
        # heapq pops the smallest: the largest energy first, or the smallest rank first.
        u = ranks[c] // cost[c]
        return (-units[c][u], c) if waterfill else (ranks[c], c)

    heap = [(key(c), c) for c in range(n) if ranks[c] < dims[c]]
    heapq.heapify(heap)
    skipped: list[int] = []  # paired components that did not fit the last odd dimension
    while left > 0 and heap:
        _, c = heapq.heappop(heap)
        if cost[c] > left:
            skipped.append(c)
            continue
        ranks[c] += cost[c]
        left -= cost[c]
        if ranks[c] < dims[c]:
            heapq.heappush(heap, (key(c), c))
    if left == 1:
        # Only pairs fit what is left: give back the weakest extra single dim for one more pair.
        singles = [c for c in range(n) if cost[c] == 1 and ranks[c] > lows[c]]
        if not skipped or not singles:
            raise GradfreeError(f"The budget {budget:g} cannot be met exactly with whole pairs.")
        if waterfill:
            give = min(singles, key=lambda c: (units[c][ranks[c] - 1], -c))
            take = min(skipped, key=lambda c: (-units[c][ranks[c] // 2], c))
        else:
            give = max(singles, key=lambda c: (ranks[c], c))
            take = min(skipped, key=lambda c: (ranks[c], c))
        ranks[give] -= 1
        ranks[take] += 2
    assert sum(ranks) == target
    return ranks


__all__ = [
    "ALLOCATIONS",
    "FORMAT",
    "KEY_MODES",
    "METRICS",
    "KVBases",
    "LayerCoder",
    "allocate_ranks",
    "check_budget",
    "check_choice",
]
