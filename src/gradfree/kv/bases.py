"""Per-head PCA bases of keys and values for a low-rank KV cache, with ranks under a byte budget.

A budget F in (0, 1] is the kept share of the KV cache's bytes: the cache stores, per layer and
KV head, an r-dimensional latent of each key and each value instead of its head_dim entries, and
Σ r = floor(F · Σ head_dim) over every (layer, head, k|v) component.

Keys come in three modes (:data:`KEY_MODES`):

* ``pre_rope``: centered PCA of the keys before RoPE (capture site ``k_pre``, after k_norm). RoPE
  turns each key by a position-dependent rotation, so a fixed basis fits the pre-RoPE keys better;
  the cache un-rotates incoming keys, stores the latent and re-applies RoPE after reconstruction.
* ``pairs``: whole RoPE frequency pairs (dims j and j + head_dim/2 in HF's rotate-half layout) of
  the post-RoPE keys, ranked by their un-centered energy E[k_j²] + E[k_{j+h/2}²]. A pair is a plane
  that RoPE turns within itself, so keeping it commutes with RoPE and needs no mean or positions.
* ``post_rope``: centered PCA of the keys after RoPE (site ``k_rope``), stored directly.

Values are always a centered PCA of ``v``. Ranks are allocated by water-filling (greedily keep the
largest trace-normalised eigenvalues across all components, every component keeping at least one
dimension, a pair at a time in pairs mode) or uniformly. Eigen-decompositions are float64 with
deterministic signs (:func:`gradfree.base.numerics.sym_eigh`); the bases are stored as float32.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:  # torch is imported lazily so that `import gradfree` stays light
    import torch
    from torch import nn

KEY_MODES = ("pre_rope", "pairs", "post_rope")
ALLOCATIONS = ("waterfill", "uniform")
FORMAT = "gradfree.kv-bases/1"
KEY_SITE = {"pre_rope": "k_pre", "pairs": "k_rope", "post_rope": "k_rope"}


def check_budget(budget: Any) -> float:
    """``budget`` as a float when it lies in (0, 1]; otherwise one sentence (GradfreeError)."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(budget, bool) or not (0.0 < value <= 1.0):
        raise GradfreeError(f"The budget must be in (0, 1], not {budget}.")
    return value


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise GradfreeError(f"The {what} must be one of {', '.join(choices)}, not {value!r}.")


@dataclass
class HeadBasis:
    """The kept directions of one (layer, KV head, k|v): ``basis`` (head_dim, r) orthonormal
    columns, ``mean`` (head_dim,) (zeros in pairs mode), ``eigenvalues`` (head_dim,) of the whole
    spectrum in the order the directions are ranked (descending; per dim, pair by pair, in pairs
    mode)."""

    basis: torch.Tensor
    mean: torch.Tensor
    eigenvalues: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


@dataclass
class KVBases:
    """The bases of every layer and KV head (``keys[layer][head]``, ``values[layer][head]``) and
    what they were fitted for: key mode, budget, allocation and the model (``model_type``,
    ``num_layers``, ``num_kv_heads``, ``head_dim``, ``fingerprint``: its config sha256 or None)."""

    key_mode: str
    head_dim: int
    keys: list[list[HeadBasis]]
    values: list[list[HeadBasis]]
    budget: float
    allocation: str
    model: dict[str, Any]

    def ranks(self) -> dict[str, list[list[int]]]:
        """``{"keys": [[r per head] per layer], "values": [[r per head] per layer]}``."""
        return {
            "keys": [[b.rank for b in layer] for layer in self.keys],
            "values": [[b.rank for b in layer] for layer in self.values],
        }

    def kept_share(self) -> float:
        """Σ ranks / Σ head_dim over every key and value head."""
        heads = [b for layer in self.keys + self.values for b in layer]
        return sum(b.rank for b in heads) / (len(heads) * self.head_dim)

    # files ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``bases.safetensors`` then ``bases.json`` into ``folder`` (created if needed),
        each file atomically (temp file + rename): ``bases.json`` exists only once both are
        complete, so a half-written folder never loads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._write(folder)
        return folder

    def _write(self, folder: Path) -> None:
        import torch

        from gradfree.base.io import write_json_atomic
        from gradfree.capture.store import save_shard

        tensors: dict[str, torch.Tensor] = {}
        for kind, table in (("k", self.keys), ("v", self.values)):
            for i, layer in enumerate(table):
                for h, b in enumerate(layer):
                    for name in ("basis", "mean", "eigenvalues"):
                        t = getattr(b, name).to(torch.float32).contiguous()
                        tensors[f"{kind}.{i}.{h}.{name}"] = t
        files = {"bases.safetensors": save_shard(folder / "bases.safetensors", tensors)}
        write_json_atomic(
            folder / "bases.json",
            {
                "format": FORMAT,
                "key_mode": self.key_mode,
                "head_dim": self.head_dim,
                "budget": self.budget,
                "allocation": self.allocation,
                "model": self.model,
                "kept_share": self.kept_share(),
                "ranks": self.ranks(),
                "files": files,
            },
        )

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> KVBases:
        """Read bases written by :meth:`save`; with ``model``, refuse (one sentence) bases fitted
        for a model of other type, depth, KV heads, head_dim or config fingerprint."""
        from gradfree.base.io import read_json
        from gradfree.capture.store import read_shard

        folder = Path(folder)
        meta = read_json(folder / "bases.json", "KV bases description")
        if meta.get("format") != FORMAT:
            raise GradfreeError(f"The folder {folder} does not hold gradfree KV bases.")
        path = folder / "bases.safetensors"
        if not path.is_file():
            raise GradfreeError(f"The KV bases file {path} does not exist.")
        tensors = read_shard(path)
        ranks = meta["ranks"]

        def table(kind: str, key: str) -> list[list[HeadBasis]]:
            return [
                [
                    HeadBasis(
                        *(tensors[f"{kind}.{i}.{h}.{n}"] for n in ("basis", "mean", "eigenvalues"))
                    )
                    for h in range(len(layer))
                ]
                for i, layer in enumerate(ranks[key])
            ]

        bases = cls(
            str(meta["key_mode"]),
            int(meta["head_dim"]),
            table("k", "keys"),
            table("v", "values"),
            float(meta["budget"]),
            str(meta["allocation"]),
            dict(meta["model"]),
        )
        if model is not None:
            bases.check_model(model)
        return bases

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


# rank allocation ------------------------------------------------------------------------------
def _units(spectrum: torch.Tensor, paired: bool) -> list[float]:
    """Trace-normalised energy per kept dimension of each successive unit (a dim, or a pair)."""
    import torch

    s = spectrum.detach().to(torch.float64).clamp_min(0.0)
    total = float(s.sum())
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
) -> list[int]:
    """One rank per component (one spectrum of head_dim eigenvalues each), Σ ranks =
    floor(budget · Σ head_dim) exactly, every component keeping ≥ 1 dim.

    ``waterfill`` keeps the largest trace-normalised eigenvalues across all components;
    ``uniform`` gives every component the same rank (remainder to the first ones). Components
    flagged in ``paired`` (pairs-mode keys) take whole pairs, so their ranks are even: their
    spectrum lists per-dim energies pair by pair and a pair competes with its mean energy.
    """
    budget = check_budget(budget)
    _check_choice(allocation, ALLOCATIONS, "allocation")
    flags = [False] * len(spectra) if paired is None else [bool(p) for p in paired]
    if len(flags) != len(spectra):
        raise ValueError("paired must have one flag per spectrum")
    if not spectra:
        raise GradfreeError("There are no components to allocate ranks to.")
    dims = [int(s.shape[0]) for s in spectra]
    if any(p and d % 2 for p, d in zip(flags, dims, strict=True)):
        raise GradfreeError("A paired component needs an even head dimension.")
    target = math.floor(budget * sum(dims) + 1e-9)
    cost = [2 if p else 1 for p in flags]
    if target < sum(cost):
        raise GradfreeError(
            f"The budget {budget:g} keeps {target} dimensions, fewer than the {sum(cost)} "
            "needed to keep one per head; raise the budget."
        )
    units = [_units(s, p) for s, p in zip(spectra, flags, strict=True)]
    ranks = list(cost)  # the first unit of every component
    left = target - sum(ranks)
    waterfill = allocation == "waterfill"

    def key(c: int) -> tuple[float, int]:
        # heapq pops the smallest: the largest energy first, or the smallest rank first.
        n = ranks[c] // cost[c]
        return (-units[c][n], c) if waterfill else (ranks[c], c)

    heap = [(key(c), c) for c in range(len(spectra)) if ranks[c] < dims[c]]
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
        singles = [c for c in range(len(spectra)) if cost[c] == 1 and ranks[c] > 1]
        if not skipped or not singles:
            raise GradfreeError(
                f"The budget {budget:g} cannot be met exactly with whole RoPE pairs."
            )
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


# fitting ----------------------------------------------------------------------------------
def _model_info(capture: Any, role: str) -> tuple[dict[str, Any], list[int]]:
    from gradfree.adapters import config_head_dim, spec_for

    entry = capture.manifest["roles"].get(role)
    if entry is None:
        raise GradfreeError(f"The capture has no role '{role}'.")
    config = dict(entry.get("config") or {})
    model_type = str(entry.get("model_type") or config.get("model_type"))
    spec_for(model_type)  # an unsupported architecture is one sentence
    c = SimpleNamespace(**config)
    n_heads = int(config["num_attention_heads"])
    info = {
        "model_type": model_type,
        "num_layers": int(entry["num_layers"]),
        "num_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "head_dim": config_head_dim(c),
    }
    return info, [int(i) for i in entry.get("layers", [])]


def _site_stats(capture: Any, role: str, layer: int, site: str) -> Any:
    key = f"blocks.{layer}.{site}"
    if key not in capture.keys(role):
        raise GradfreeError(
            f"The capture has no statistics for {key}; capture k_pre, k_rope and v of every layer."
        )
    st = capture.stats(role, key)
    if not st.full or st.count == 0:
        raise GradfreeError(f"The capture of {key} needs a full covariance over some tokens.")
    return st


def _pca_head(vals: torch.Tensor, vecs: torch.Tensor, mean: torch.Tensor, rank: int) -> HeadBasis:
    import torch

    return HeadBasis(
        vecs[:, :rank].to(torch.float32).contiguous(),
        mean.to(torch.float32).clone(),
        vals.to(torch.float32),
    )


def pca_head(cov: torch.Tensor, mean: torch.Tensor, rank: int) -> HeadBasis:
    """Centered PCA of one head: the top-``rank`` eigenvectors of its covariance (float64,
    signs fixed), kept as float32."""
    from gradfree.base.numerics import sym_eigh

    return _pca_head(*sym_eigh(cov), mean, rank)


def pair_order(energy: torch.Tensor) -> torch.Tensor:
    """Dims of every RoPE pair (j, j + h/2), pairs by descending energy (ties: lower j first)."""
    import torch

    h = int(energy.shape[0])
    e = energy.to(torch.float64)
    pair = e[: h // 2] + e[h // 2 :]
    # A stable sort on the negated energies keeps ties in index order: deterministic.
    order = torch.sort(-pair, stable=True).indices
    return torch.stack([order, order + h // 2], dim=1).reshape(-1)


def pairs_head(second_moment_diag: torch.Tensor, rank: int) -> HeadBasis:
    """The first ``rank // 2`` pairs by energy, as columns of the identity (no mean)."""
    import torch

    h = int(second_moment_diag.shape[0])
    dims = pair_order(second_moment_diag)
    eye = torch.eye(h, dtype=torch.float32)
    return HeadBasis(
        eye[:, dims[:rank]].contiguous(),
        torch.zeros(h, dtype=torch.float32),
        second_moment_diag[dims].to(torch.float32),
    )


def fit_bases(
    capture: Any,
    budget: float,
    *,
    key_mode: str = "pre_rope",
    allocation: str = "waterfill",
    role: str = "model",
    fingerprint: str | None = None,
) -> KVBases:
    """Per-head key and value bases of every layer from ``capture`` (sites k_pre or k_rope, and
    v, with full covariances), with ranks allocated under ``budget`` (module docstring).
    ``fingerprint`` (the model's config sha256) is recorded and checked when the bases load."""
    import torch

    from gradfree.base.numerics import sym_eigh

    budget = check_budget(budget)
    _check_choice(key_mode, KEY_MODES, "key mode")
    _check_choice(allocation, ALLOCATIONS, "allocation")
    info, layers = _model_info(capture, role)
    n_layers, n_kv, hd = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    if sorted(layers) != list(range(n_layers)):
        raise GradfreeError("The capture must hold every layer of the model.")
    if key_mode == "pairs" and hd % 2:
        raise GradfreeError("Pairs mode needs an even head dimension.")
    k_site = KEY_SITE[key_mode]
    # Per (kind, layer, head): the spectrum in ranking order and a maker of the rank-r basis.
    parts: list[tuple[str, int, torch.Tensor, Callable[[int], HeadBasis]]] = []
    for i in range(n_layers):
        for kind, site in (("k", k_site), ("v", "v")):
            st = _site_stats(capture, role, i, site)
            if st.dim != n_kv * hd:
                raise GradfreeError(f"The capture of blocks.{i}.{site} has another width.")
            if kind == "k" and key_mode == "pairs":
                # Un-centered: a dropped pair costs its whole energy, there is no mean to keep.
                energy = torch.diagonal(st.second_moment()).to(torch.float64)
                for h in range(n_kv):
                    e = energy[h * hd : (h + 1) * hd]
                    parts.append((kind, i, e[pair_order(e)], partial(pairs_head, e)))
                continue
            cov, mean = st.covariance(centered=True), st.mean()
            for h in range(n_kv):
                s = slice(h * hd, (h + 1) * hd)
                vals, vecs = sym_eigh(cov[s, s])
                parts.append((kind, i, vals, partial(_pca_head, vals, vecs, mean[s])))
    paired = [key_mode == "pairs" and p[0] == "k" for p in parts]
    ranks = allocate_ranks([p[2] for p in parts], budget, allocation, paired=paired)
    keys: list[list[HeadBasis]] = [[] for _ in range(n_layers)]
    values: list[list[HeadBasis]] = [[] for _ in range(n_layers)]
    for (kind, i, _, make), rank in zip(parts, ranks, strict=True):
        (keys if kind == "k" else values)[i].append(make(rank))
    return KVBases(
        key_mode, hd, keys, values, budget, allocation, {**info, "fingerprint": fingerprint}
    )


__all__ = [
    "ALLOCATIONS",
    "KEY_MODES",
    "HeadBasis",
    "KVBases",
    "allocate_ranks",
    "check_budget",
    "fit_bases",
    "pair_order",
    "pairs_head",
    "pca_head",
]
