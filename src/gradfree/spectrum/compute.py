"""Eigenvalue spectra of captured activations and singular-value spectra of weights.

Seed 002 claimed that activations live on a ~2-dimensional manifold (participation ratio
Df = (Σλ)²/Σλ² ≈ 1.8 for GPT-2) while weights use their full capacity (Df 500+). A Df near 1 is
what an *un-centered* second moment E[xxᵀ] shows when the mean, or a few massive-activation
dimensions and the first ("attention sink") token, dominate the energy: one direction then holds
almost all of tr E[xxᵀ] whatever the shape of the rest. So every site is measured in variants that
separate those effects: covariance centered / un-centered, over all tokens / without the first
token (``body``), optionally standardised per dimension (correlation matrix). The share of the
energy that is the mean, ‖μ‖² / E‖x‖², is reported alongside, since it explains the gap directly.

Weights: σ² of every weight matrix through the architecture adapter, taken as the eigenvalues of
the smaller Gram matrix (WᵀW or WWᵀ) accumulated in float64 over row/column chunks, so that even a
151936×896 embedding costs a d×d matrix rather than a full SVD.

The numbers per spectrum (``summarize``): Df, the components needed for 90/95/99% of Σλ, the share
of the top eigenvalue, and the share held by the top ``trunk_width`` components (seed 000's
"trunk": e.g. half of the student's hidden size). Reports are written by
:mod:`gradfree.spectrum.report`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradfree.capture.stats import MomentStats

FRACTIONS = (0.90, 0.95, 0.99)

# Variant name -> (matrix kind, token part of the capture).
BASE_VARIANTS: dict[str, tuple[str, str]] = {
    "uncentered/all": ("uncentered", "all"),
    "centered/all": ("centered", "all"),
    "uncentered/body": ("uncentered", "body"),
    "centered/body": ("centered", "body"),
}
STANDARDISED_VARIANTS: dict[str, tuple[str, str]] = {
    "correlation/all": ("correlation", "all"),
    "correlation/body": ("correlation", "body"),
}


class CaptureLike(Protocol):
    """What the analysis needs from a capture (``gradfree.capture.load_capture`` returns one)."""

    @property
    def roles(self) -> list[str]: ...

    @property
    def path(self) -> Any: ...

    def keys(self, role: str) -> list[str]: ...

    def stats(self, role: str, key: str, part: str = "all") -> MomentStats: ...


# ---------------------------------------------------------------------------------------------
# Pure maths on a spectrum (eigenvalues of a PSD matrix, or squared singular values).


def psd_eigenvalues(a: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix: float64, descending, clipped at 0.

    The same policy as :func:`gradfree.base.numerics.sym_eigh`, values only: no eigenvectors are
    needed here, and ``eigvalsh`` is several times faster than ``eigh`` on 2560- or 5120-wide sites.
    """
    import torch

    a = a.detach().to(device=device, dtype=torch.float64)
    a = 0.5 * (a + a.T)
    vals = torch.linalg.eigvalsh(a)
    return vals.flip(0).clamp_min(0.0).cpu()


def participation_ratio(eigs: torch.Tensor) -> float:
    """Df = (Σλ)² / Σλ²: 1 for a single direction, d for an isotropic spectrum; 0 if all λ = 0."""
    e = eigs.double()
    s2 = float((e * e).sum())
    return float(e.sum()) ** 2 / s2 if s2 > 0 else 0.0


def components_for(eigs: torch.Tensor, fraction: float) -> int:
    """Smallest k with Σ_{i<k} λ_i ≥ fraction · Σλ (eigenvalues sorted descending)."""
    import torch

    e = eigs.double()
    total = float(e.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    # A tiny tolerance so that a designed spectrum hitting the fraction exactly is not off by one.
    k = int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=torch.float64)))
    return min(k + 1, int(e.numel()))


def top_fraction(eigs: torch.Tensor, t: int) -> float:
    """Share of Σλ held by the top ``t`` components (1.0 when t ≥ the number of eigenvalues)."""
    e = eigs.double()
    total = float(e.sum())
    return float(e[: max(t, 0)].sum()) / total if total > 0 else 0.0


def summarize(eigs: torch.Tensor, trunk_width: int | None = None) -> dict[str, Any]:
    """The summary numbers of one spectrum (see the module docstring)."""
    d = int(eigs.numel())
    df = participation_ratio(eigs)
    out: dict[str, Any] = {
        "dim": d,
        "total": float(eigs.double().sum()),
        "df": df,
        "df_over_dim": df / d if d else 0.0,
        "top1_share": top_fraction(eigs, 1),
    }
    for f in FRACTIONS:
        out[f"k{round(f * 100)}"] = components_for(eigs, f)
    if trunk_width is not None:
        out["trunk_width"] = int(trunk_width)
        out["trunk_share"] = top_fraction(eigs, int(trunk_width))
    return out


def mean_energy_share(stats: MomentStats) -> float:
    """‖μ‖² / E‖x‖²: the part of the un-centered energy that is just the mean vector."""
    energy = float(stats.variance(centered=False).sum())
    return float((stats.mean() ** 2).sum()) / energy if energy > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Activations: one entry per (role, site key).

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def parse_key(key: str) -> tuple[int | None, str]:
    """Split ``blocks.3.resid_pre`` into (3, "resid_pre"); a key outside blocks -> (None, key)."""
    m = _BLOCK_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)


@dataclass
class SiteSpectrum:
    """The spectra of one captured site in every variant (failed variants carry a note)."""

    role: str
    key: str
    layer: int | None
    site: str
    dim: int
    count: int
    full: bool
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict)
    mean_share: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "key": self.key,
            "layer": self.layer,
            "site": self.site,
            "dim": self.dim,
            "tokens": self.count,
            "full_covariance": self.full,
            "mean_energy_share": self.mean_share,
            "variants": self.summaries,
            "notes": self.notes,
        }


def _matrix(stats: MomentStats, kind: str) -> torch.Tensor:
    if kind == "correlation":
        return stats.correlation()
    return stats.covariance(centered=kind == "centered")


def site_spectrum(
    capture: CaptureLike,
    role: str,
    key: str,
    variants: dict[str, tuple[str, str]],
    trunk_width: int | None = None,
    device: str = "cpu",
) -> SiteSpectrum:
    """All requested variants of one site; a part or matrix that is unavailable becomes a note."""
    layer, site = parse_key(key)
    base = capture.stats(role, key, part="all")
    entry = SiteSpectrum(role, key, layer, site, base.dim, base.count, base.full)
    if not base.full:
        entry.notes.append(
            "only the per-dimension variance was captured at this site (too wide for a full "
            "covariance), so it has no eigenvalues"
        )
    parts: dict[str, MomentStats | None] = {}
    for name, (kind, part) in variants.items():
        if part not in parts:
            try:
                parts[part] = base if part == "all" else capture.stats(role, key, part=part)
                entry.mean_share[part] = mean_energy_share(parts[part])  # type: ignore[arg-type]
            except (KeyError, ValueError, GradfreeError) as e:
                parts[part] = None
                entry.notes.append(f"part '{part}' is not available: {e}")
        stats = parts[part]
        if stats is None or not stats.full:
            continue
        try:
            eigs = psd_eigenvalues(_matrix(stats, kind), device=device)
        except ValueError as e:  # e.g. no tokens in this part
            entry.notes.append(f"{name}: {e}")
            continue
        entry.eigenvalues[name] = eigs
        entry.summaries[name] = summarize(eigs, trunk_width)
    return entry


def _matches(key: str, site: str, wanted: Sequence[str] | None) -> bool:
    return wanted is None or site in wanted or key in wanted


def _site_order(keys: list[str]) -> list[str]:
    """Group keys by site (in order of first appearance), blocks by layer number, then the rest:
    "blocks.10" must come after "blocks.9", which a string sort does not give."""
    rank: dict[str, int] = {}
    for k in keys:
        rank.setdefault(parse_key(k)[1], len(rank))

    def order(k: str) -> tuple[int, int, int]:
        layer, site = parse_key(k)
        return (layer is None, rank[site], -1 if layer is None else layer)

    return sorted(keys, key=order)


def activation_spectra(
    capture: CaptureLike,
    *,
    roles: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    trunk_width: int | None = None,
    standardised: bool = False,
    device: str = "cpu",
) -> list[SiteSpectrum]:
    """Spectra of every (role, site) of a capture; ``sites`` filters by site name ("resid_pre")
    or full key ("final.normed")."""
    roles = list(roles) if roles else list(capture.roles)
    unknown = [r for r in roles if r not in capture.roles]
    if unknown:
        raise GradfreeError(
            f"The capture has no role '{unknown[0]}'; its roles are: {', '.join(capture.roles)}."
        )
    variants = dict(BASE_VARIANTS, **(STANDARDISED_VARIANTS if standardised else {}))
    out: list[SiteSpectrum] = []
    for role in roles:
        keys = [k for k in capture.keys(role) if _matches(k, parse_key(k)[1], sites)]
        for key in _site_order(keys):
            out.append(site_spectrum(capture, role, key, variants, trunk_width, device))
    if not out:
        raise GradfreeError("No captured site matches the requested roles and sites.")
    return out


def open_capture(path: str | Path) -> CaptureLike:
    """Load a capture folder (through ``gradfree.capture.load_capture``), with a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise GradfreeError(f"The capture folder {path} does not exist.")
    from gradfree.capture import load_capture

    return load_capture(path)


# ---------------------------------------------------------------------------------------------
# Weights.


@dataclass
class WeightSpectrum:
    """σ² of one weight matrix (descending) and its summary."""

    name: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    summary: dict[str, Any]
    sq_singular_values: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "shape": list(self.shape),
            **self.summary,
        }


def squared_singular_values(
    w: torch.Tensor, chunk: int = 8192, device: str = "cpu"
) -> torch.Tensor:
    """σ² of ``w`` (descending, float64) as the eigenvalues of its smaller Gram matrix.

    The Gram matrix is accumulated over chunks of the long side so that a float64 copy of the whole
    matrix is never made. Accuracy: σ² is recovered to float64 precision relative to σ_max², which
    is ample for Df and variance shares (it would not be for a condition number).
    """
    import torch

    from gradfree.capture.stats import gram_add_

    w = w.detach()
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(w.shape)}")
    tall = w.shape[0] >= w.shape[1]
    small = w.shape[1] if tall else w.shape[0]
    gram = torch.zeros(small, small, dtype=torch.float64, device=device)
    long_side = w.shape[0] if tall else w.shape[1]
    for s in range(0, long_side, chunk):
        block = w[s : s + chunk] if tall else w[:, s : s + chunk].T
        gram_add_(gram, block.to(device=device, dtype=torch.float64))  # upper blocks only
    return psd_eigenvalues(gram, device=device)


def _named_weights(
    model: nn.Module, embeddings: bool
) -> Iterable[tuple[str, int | None, str, Any]]:
    from gradfree.adapters import get_adapter

    adapter = get_adapter(model)
    for layer in adapter.layers:
        for kind, linear in layer.linears().items():
            yield f"blocks.{layer.index}.{kind}", layer.index, kind, linear.weight
    if embeddings:
        yield "embed", None, "embed", adapter.embed_tokens.weight
        if not adapter.tied:
            yield "lm_head", None, "lm_head", adapter.lm_head.weight


def weight_spectra(
    model: nn.Module,
    *,
    embeddings: bool = True,
    trunk_width: int | None = None,
    device: str = "cpu",
) -> list[WeightSpectrum]:
    """σ² spectra of every linear of every block (q, k, v, o, gate, up, down), plus the embedding
    and an untied LM head when ``embeddings``. A tied head is the embedding and is listed once."""
    out = []
    for name, layer, kind, w in _named_weights(model, embeddings):
        s2 = squared_singular_values(w, device=device)
        shape = (int(w.shape[0]), int(w.shape[1]))
        out.append(WeightSpectrum(name, layer, kind, shape, summarize(s2, trunk_width), s2))
    return out
