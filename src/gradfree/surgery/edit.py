"""Weight-editing primitives shared by the surgery transforms.

Every edit reads the weight in float64, applies the matrix there and casts back to the weight's
own dtype once (rotations applied in fp16/bf16 drift). A linear ``y = W x + b`` is edited on its
input side (``W ← W M``: a change of basis of what it reads) or its output side (``W ← M W``,
``b ← M b``: a change of basis of what it writes).

RMSNorm modules are reached through the adapter; their epsilon lives in an attribute whose name
differs between implementations, so :func:`norm_eps` and :func:`set_norm_eps_` look it up here
and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from gradfree.adapters import LayerAdapter, ModelAdapter
from gradfree.base.errors import GradfreeError

_EPS_ATTRS = ("variance_epsilon", "eps")  # HF RMSNorm, torch.nn.RMSNorm
_CHUNK_ROWS = 8192  # rows per float64 block when rotating large matrices in place


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def param(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Parameter ``name`` of ``module``, typed as a tensor (``nn.Module`` attributes are not)."""
    p = getattr(module, name, None)
    if not isinstance(p, torch.Tensor):
        raise GradfreeError(f"{type(module).__name__} has no tensor named '{name}'.")
    return p


def maybe_param(module: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(module, name, None)
    return p if isinstance(p, torch.Tensor) else None


@torch.no_grad()
def assign_(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into parameter ``name`` of ``module``, cast to the parameter's dtype.

    Same shape: copied in place (the Parameter object is kept). New shape: a new Parameter
    replaces it and the module's size attributes (in/out_features, embedding_dim) follow.
    """
    old = param(module, name)
    if tuple(old.shape) == tuple(value.shape):
        old.copy_(value.to(device=old.device, dtype=old.dtype))
        return
    new = nn.Parameter(
        value.to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=old.requires_grad
    )
    setattr(module, name, new)
    if name == "weight" and value.ndim == 2:
        for attr, size in (
            ("out_features", value.shape[0]),
            ("in_features", value.shape[1]),
            ("num_embeddings", value.shape[0]),
            ("embedding_dim", value.shape[1]),
        ):
            if hasattr(module, attr):
                setattr(module, attr, int(size))


def transform_inputs_(lin: nn.Module, m: torch.Tensor, cols: torch.Tensor | None = None) -> None:
    """``W ← W M``: the layer now reads inputs in the basis ``Mᵀ x`` (embedding rows likewise);
    with ``cols``, only that block of columns is transformed.

    The bias is untouched: it is added after ``W`` acts, whatever basis the input is in. A square
    ``M`` is applied in place, a block of rows at a time, so a 150k-token embedding never needs
    a full float64 copy.
    """
    w = param(lin)
    mm = m.to(device=w.device, dtype=torch.float64)
    if cols is None and mm.shape[0] == mm.shape[1]:
        with torch.no_grad():
            for start in range(0, w.shape[0], _CHUNK_ROWS):
                rows = w[start : start + _CHUNK_ROWS]
                rows.copy_((f64(rows) @ mm).to(w.dtype))
    elif cols is None:
        assign_(lin, "weight", f64(w) @ mm)
    else:
        full = f64(w).clone()
        full[:, cols] = full[:, cols] @ mm
        assign_(lin, "weight", full)


def transform_outputs_(lin: nn.Module, m: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``W ← M W`` and ``b ← M b`` on all rows, or only on ``rows`` (a block such as one head)."""
    for name in ("weight", "bias"):
        p = maybe_param(lin, name)
        if p is None:
            continue
        mm = m.to(device=p.device, dtype=torch.float64)
        if rows is None:
            assign_(lin, name, mm @ f64(p))
        else:
            full = f64(p).clone()
            full[rows] = mm @ full[rows]
            assign_(lin, name, full)


def scale_inputs_(lin: nn.Module, s: torch.Tensor | float) -> None:
    """``W ← W diag(s)`` (columns scaled), without forming the diagonal matrix."""
    w = param(lin)
    s64 = torch.as_tensor(s, dtype=torch.float64, device=w.device)
    assign_(lin, "weight", f64(w) * s64)


def select_outputs_(lin: nn.Module, idx: torch.Tensor) -> None:
    """Keep/reorder output rows (and bias entries) ``idx``."""
    for name in ("weight", "bias"):
        p = maybe_param(lin, name)
        if p is not None:
            assign_(lin, name, f64(p)[idx.to(p.device)])


def select_inputs_(lin: nn.Module, idx: torch.Tensor, scale: float = 1.0) -> None:
    """Keep/reorder input columns ``idx``, times ``scale`` (the bias is added after: unaffected)."""
    w = param(lin)
    assign_(lin, "weight", f64(w)[:, idx.to(w.device)] * scale)


def scale_outputs_(lin: nn.Module, c: float) -> None:
    """``W ← c W`` and ``b ← c b``."""
    for name in ("weight", "bias"):
        p = maybe_param(lin, name)
        if p is not None:
            assign_(lin, name, f64(p) * c)


def block(a: ModelAdapter, layer: int) -> LayerAdapter:
    """Decoder block ``layer``, with a clear error for an index the model does not have."""
    if not 0 <= layer < a.num_layers:
        raise GradfreeError(f"Layer {layer} does not exist (the model has {a.num_layers}).")
    return a.layer(layer)


# --- RMSNorm bookkeeping ---------------------------------------------------------------------


def residual_norms(a: ModelAdapter) -> dict[str, nn.Module]:
    """Every RMSNorm that normalises the residual stream (not Qwen3's per-head q/k norms)."""
    out: dict[str, nn.Module] = {}
    for layer in a.layers:
        out[f"layers.{layer.index}.attn_norm"] = layer.attn_norm
        out[f"layers.{layer.index}.mlp_norm"] = layer.mlp_norm
    out["final_norm"] = a.final_norm
    return out


def all_norms(a: ModelAdapter) -> dict[str, nn.Module]:
    """Residual norms plus per-head q/k norms where the family has them."""
    out = residual_norms(a)
    for layer in a.layers:
        for name in ("q_norm", "k_norm"):
            norm = getattr(layer, name)
            if norm is not None:
                out[f"layers.{layer.index}.{name}"] = norm
    return out


def effective_scale(a: ModelAdapter, norm: nn.Module) -> torch.Tensor:
    """The per-dimension factor the norm applies: ``weight`` (or ``1 + weight``, Gemma style)."""
    return f64(param(norm)) + a.spec.norm_weight_offset


def non_unit_norms(a: ModelAdapter) -> list[str]:
    """Names of residual norms whose effective scale is not exactly 1."""
    return [n for n, m in residual_norms(a).items() if not bool((effective_scale(a, m) == 1).all())]


def require_unit_norms(a: ModelAdapter, what: str) -> None:
    bad = non_unit_norms(a)
    if bad:
        raise GradfreeError(
            f"{what} is exact only when every RMSNorm weight is 1, but {len(bad)} are not "
            f"(first: {bad[0]}); run fuse_norms_ first."
        )


def set_unit_(a: ModelAdapter, norm: nn.Module) -> None:
    assign_(norm, "weight", torch.full_like(f64(param(norm)), 1.0 - a.spec.norm_weight_offset))


def _eps_attr(norm: nn.Module) -> str:
    for attr in _EPS_ATTRS:
        if isinstance(getattr(norm, attr, None), float | int):
            return attr
    raise GradfreeError(f"Cannot find the epsilon of norm module {type(norm).__name__}.")


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, _eps_attr(norm)))


def set_norm_eps_(norm: nn.Module, eps: float) -> None:
    setattr(norm, _eps_attr(norm), float(eps))
