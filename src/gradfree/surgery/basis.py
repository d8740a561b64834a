"""Residual-stream bases from activation statistics: the PCA rotation of SliceGPT, global or
per layer (Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns").

Which statistic. After :func:`~gradfree.surgery.fold.fuse_norms_` every linear that reads the
residual stream reads ``x̂ = x / rms(x)``: the RMSNorm output with unit weight. Slicing keeps the
leading ``k`` coordinates of ``x̂`` in the new basis, so the basis that loses least of what the
readers see is the PCA of the **un-centered** second moment ``E[x̂ x̂ᵀ]`` (un-centered because
slicing drops coordinates, it does not subtract a mean; centering is also not exact for RMSNorm).
We sum it over every reader site: the attention norm and the MLP norm of every block and the
final norm (capture sites ``attn_in``, ``mlp_in``, ``final.normed``), each site averaged over its
tokens so that every site weighs the same. Normalised inputs weigh every token equally; SliceGPT
uses the un-normalised block inputs, where a few massive-activation tokens dominate.

A capture made on the *original* model holds ``w ⊙ x̂`` at those sites (``w`` the norm weight);
it is mapped back to ``x̂`` exactly by ``diag(1/w) M diag(1/w)`` using the model's own weights
(read before fusion). A capture without the reader sites can fall back to ``resid_pre`` (+
``final.resid``): the raw residual stream, each site divided by its trace; that is recorded as
``statistic: "resid"`` and is a weaker choice.

Numerics follow :mod:`gradfree.base.numerics`: float64, damping ``λ = damping·mean(diag M)`` as
SliceGPT does (0.01), which shifts the eigenvalues and leaves the eigenvectors unchanged,
eigenvalues descending, signs fixed (largest entry of each eigenvector positive).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.adapters import ModelAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import sym_eigh
from gradfree.surgery.edit import effective_scale

READER_SITES = ("attn_in", "mlp_in", "final.normed")
DAMPING = 0.01  # SliceGPT's relative damping of the covariance


def reader_keys(num_layers: int) -> list[str]:
    """Capture keys of every reader site: blocks.i.attn_in, blocks.i.mlp_in, final.normed."""
    out = [f"blocks.{i}.{s}" for i in range(num_layers) for s in ("attn_in", "mlp_in")]
    return [*out, "final.normed"]


def reader_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The norm weight each reader site was multiplied by (1 after fusion), by capture key."""
    a = get_adapter(model)
    out = {}
    for layer in a.layers:
        out[f"blocks.{layer.index}.attn_in"] = effective_scale(a, layer.attn_norm)
        out[f"blocks.{layer.index}.mlp_in"] = effective_scale(a, layer.mlp_norm)
    out["final.normed"] = effective_scale(a, a.final_norm)
    return out


def capture_role(cap: Any, role: str | None = None) -> str:
    """The role to read: the one asked for, else ``model``, else the only one."""
    roles = list(cap.roles)
    if role is not None:
        if role not in roles:
            raise GradfreeError(f"The capture has no role '{role}'; it has: {', '.join(roles)}.")
        return role
    if "model" in roles:
        return "model"
    if len(roles) == 1:
        return roles[0]
    raise GradfreeError(f"The capture has several roles ({', '.join(roles)}); choose one.")


def _mean_moment(cap: Any, role: str, key: str) -> torch.Tensor:
    st = cap.stats(role, key)
    if not st.full:
        raise GradfreeError(f"The capture holds only the diagonal of {key}; capture it in full.")
    if st.count == 0:
        raise GradfreeError(f"The capture saw no tokens at {key}.")
    return st.second_moment().to(torch.float64)


def check_capture_model(
    cap: Any, role: str, a: ModelAdapter, fingerprint: Mapping[str, Any]
) -> None:
    """Refuse a capture of another model: different width, depth or weights."""
    entry = cap.manifest["roles"][role]
    widths = {k: int(v) for k, v in entry.get("widths", {}).items()}
    width = widths.get("final.normed", widths.get("blocks.0.resid_pre", a.hidden_size))
    if width != a.hidden_size:
        raise GradfreeError("The capture was made on a model of another hidden size.")
    theirs = (entry.get("fingerprint") or {}).get("weights_sha256")
    ours = fingerprint.get("weights_sha256")
    if theirs and ours and theirs != ours:
        raise GradfreeError("The capture was made on a model with other weights than this one.")


def capture_moments(
    cap: Any, model: nn.Module, scales: Mapping[str, torch.Tensor], role: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Per-site un-centered second moments of the readers' normalised inputs ``x̂``.

    ``scales`` are the original norm weights (:func:`reader_scales` before fusion). Returns
    ``({key: d x d}, statistic)`` with statistic ``"reader"``, or ``"resid"`` for the fallback
    (``resid_pre`` of every block, ``final.resid`` if present, each divided by its trace).
    """
    a = get_adapter(model)
    role = capture_role(cap, role)
    have = set(cap.keys(role))
    wanted = reader_keys(a.num_layers)
    if all(k in have for k in wanted):
        out = {}
        for key in wanted:
            m = _mean_moment(cap, role, key)
            if m.shape[0] != a.hidden_size:
                raise GradfreeError("The capture was made on a model of another hidden size.")
            inv = 1.0 / scales[key].to(torch.float64)
            if not bool(torch.isfinite(inv).all()):
                raise GradfreeError(
                    f"A norm weight at {key} is zero; its input cannot be recovered."
                )
            out[key] = inv[:, None] * m * inv[None, :]
        return out, "reader"
    resid = [f"blocks.{i}.resid_pre" for i in range(a.num_layers)]
    if all(k in have for k in resid):
        keys = resid + (["final.resid"] if "final.resid" in have else [])
        out = {}
        for key in keys:
            m = _mean_moment(cap, role, key)
            if m.shape[0] != a.hidden_size:
                raise GradfreeError("The capture was made on a model of another hidden size.")
            out[key] = m / torch.trace(m).clamp_min(torch.finfo(torch.float64).tiny)
        return out, "resid"
    raise GradfreeError(
        "The capture lacks the residual statistics a basis needs: capture all blocks with "
        "--sites attn_in,mlp_in,final.normed (or resid_pre)."
    )


def calibration_moments(
    loaded: Any, docs: Sequence[Any], max_length: int = 512, batch_size: int = 4
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run ``loaded`` (a LoadedModel/Subject) over ``docs`` and return the reader moments.

    The capture goes through :func:`gradfree.capture.run_capture` into a temporary folder that is
    removed afterwards; returns the moments (de-scaled by the model's current norm weights) and
    the token count.
    """
    from gradfree.capture import run_capture

    scales = reader_scales(loaded.model)
    config = {
        "sites": list(READER_SITES),
        "max_length": max_length,
        "batch_size": batch_size,
        "checkpoint_every": 10**6,  # a throwaway capture: no checkpoints
    }
    with tempfile.TemporaryDirectory(prefix="gradfree-calib-") as tmp:
        cap = run_capture(loaded, docs, Path(tmp) / "cap", config, progress=False)
        moments, _ = capture_moments(cap, loaded.model, scales, role="model")
        tokens = cap.tokens("model")
    return moments, {"statistic": "reader", "tokens": tokens, "max_length": max_length}


def pca_rotation(
    moment: torch.Tensor, damping: float = DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, full orthogonal eigenbasis as columns) of the damped moment."""
    vals, vecs = sym_eigh(moment, damping=damping)
    return vecs, vals


def global_moment(moments: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the per-site moments: one statistic for one basis of the whole stream."""
    if not moments:
        raise GradfreeError("No statistics to build a basis from.")
    return torch.stack(list(moments.values())).mean(dim=0)


def layer_moments(moments: Mapping[str, torch.Tensor], num_layers: int) -> list[torch.Tensor]:
    """Per block: the mean of what its attention and MLP read (``attn_in`` + ``mlp_in``)."""
    out = []
    for i in range(num_layers):
        parts = [moments[k] for k in (f"blocks.{i}.attn_in", f"blocks.{i}.mlp_in") if k in moments]
        if not parts:
            raise GradfreeError(f"Per-layer bases need the reader statistics of block {i}.")
        out.append(torch.stack(parts).mean(dim=0))
    return out


def kept_energy(moment: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """Share of ``tr M`` that the leading ``k`` columns of ``q`` keep (1 at full width)."""
    m = moment.to(torch.float64)
    qk = q[:, :k].to(torch.float64)
    return float(((m @ qk) * qk).sum() / torch.trace(m))
