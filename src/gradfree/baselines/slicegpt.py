"""SliceGPT as a baseline: per-block PCA bases and shortcut matrices, evaluated in process.

Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns"
(arXiv:2401.15024). After norm fusion (:func:`~gradfree.surgery.fuse_norms_`, head untied) the
residual stream may be written in any orthogonal basis. SliceGPT gives every block its own:
walking the blocks in order, on the signals of the *already sliced* model,

* ``Q_0``: PCA of the embedding output (the input of block 0); embeddings ``E ← E Q_0[:, :k]``;
* ``Q_mid``: PCA of block i's MLP-norm input, computed with its attention already reading the
  sliced stream; ``o ← Q_midᵀ o`` (rows kept), gate/up read ``Q_mid[:, :k]``;
* ``Q_out``: PCA of block i's output, computed with its MLP reading the sliced mid stream;
  ``down ← Q_outᵀ down``; ``Q_out`` is the next block's input basis (and the head's, last).

The residual stream then changes basis inside every block, which takes two matrices on the skip
connections: ``attn_shortcut = Q_inᵀ Q_mid`` and ``mlp_shortcut = Q_midᵀ Q_out`` (each cut to
``k_in x k_out``). Vanilla transformers has no place for them (SliceGPT's known limitation: its
output is not a plain checkpoint), so they are kept as parameters on the decoder-layer modules
and applied by forward hooks, installed once and kept (see :class:`_Shortcuts`): the model still
runs through transformers' own forward, so :func:`gradfree.evaluation.run.evaluate` measures it.

Numerics as SliceGPT: un-centered Gram ``Σ xᵀx`` of the raw (un-normalised) residual in float64,
damped by ``0.01·mean(diag)``, eigenvalues descending (signs fixed as everywhere in gradfree).
Width as SliceGPT: ``k = int((1 - fraction)·d)`` rounded down to a multiple of 8; by default the
head is not sliced (SliceGPT's default), so the last block writes the full width.

RMSNorm over a sliced stream: SliceGPT's RMSN divides ``Σ x²`` by the *original* width ``d``.
A transformers RMSNorm of width ``k`` does the same after ``eps ← eps·d/k`` with its readers
scaled by ``sqrt(d/k)`` (the identity in :mod:`gradfree.surgery.slicing`); the epsilon is set per
norm module, so Qwen3's per-head q/k norms are untouched and stay exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradfree.adapters import LayerAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import sym_eigh
from gradfree.surgery.blocks import block_inputs
from gradfree.surgery.edit import (
    assign_,
    f64,
    norm_eps,
    param,
    set_norm_eps_,
    transform_inputs_,
    transform_outputs_,
)
from gradfree.surgery.fold import fuse_norms_, untie_
from gradfree.surgery.maths import check_orthogonal
from gradfree.texts.windows import iter_windows

DAMPING = 0.01  # SliceGPT's relative damping of the Gram matrix
ROUND_TO = 8  # SliceGPT's default --round-interval for the sliced width
ATTN_SHORTCUT = "slicegpt_attn_shortcut"
MLP_SHORTCUT = "slicegpt_mlp_shortcut"

BasisFn = Callable[[torch.Tensor], torch.Tensor]


def slicegpt_width(d: int, fraction: float, round_to: int = ROUND_TO) -> int:
    """SliceGPT's sliced width: ``int((1 - fraction)·d)`` rounded down to a multiple of
    ``round_to`` (the full width ``d`` at fraction 0)."""
    if not (isinstance(fraction, int | float) and 0.0 <= float(fraction) < 1.0):
        raise GradfreeError(f"The slicing fraction must be in [0, 1), not {fraction}.")
    k = int((1.0 - float(fraction)) * d)
    if k < d:
        k -= k % max(int(round_to), 1)
    if k < 1:
        raise GradfreeError(f"Slicing {fraction} of width {d} leaves no dimension.")
    return k


def calibration_windows(
    tokenizer: Any, docs: Sequence[Any], max_length: int = 512
) -> list[torch.Tensor]:
    """The calibration windows (1 x T token ids) a gradfree capture of ``docs`` would see."""
    return [
        torch.tensor([ids], dtype=torch.long)
        for _, ids in iter_windows(tokenizer, docs, max_length)
        if len(ids) > 0
    ]


def param_count(model: nn.Module) -> int:
    """Parameters stored by ``model``, each tensor once (a tied head counts once), shortcut
    matrices included: what the model costs to keep."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class SliceGPTResult:
    """What :func:`slicegpt_` did: widths per block, parameters, timings, the hook handles."""

    fraction: float
    hidden_size: int
    widths: list[tuple[int, int, int]]  # per block: (k_in, k_mid, k_out)
    head_width: int
    params: int
    tokens: int
    seconds: float
    handles: list[Any] = field(default_factory=list, repr=False)

    def remove_hooks(self) -> None:
        """Detach the shortcut hooks (the model is then no longer the sliced function)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def summary(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "hidden_size": self.hidden_size,
            "width": self.widths[0][0] if self.widths else self.hidden_size,
            "head_width": self.head_width,
            "params": self.params,
            "calib_tokens": self.tokens,
            "seconds": self.seconds,
        }


class _StopAtMid(Exception):
    """Raised by the MLP-norm hook when only the mid signal of a block is wanted."""

    def __init__(self, mid: torch.Tensor) -> None:
        self.mid = mid


class _Shortcuts:
    """Forward hooks that put the shortcut matrices on the skip connections of one block.

    A pre-norm block computes ``h = x + attn(n1 x)`` then ``y = h + mlp(n2 h)``; SliceGPT needs
    ``h = x S_a + attn(n1 x)`` and ``y = h S_m + mlp(n2 h)``. The block is fed ``x S_a`` (so its
    own skip carries it) while the attention norm is handed back ``x``; the block's output is
    rebuilt as ``h S_m + mlp(n2 h)`` from the MLP norm's input and the MLP's output. No term is
    added and subtracted, so the hooks cost no precision. A missing matrix is the identity.
    """

    def __init__(self, layer: LayerAdapter) -> None:
        self.module = layer.module
        self.stash: dict[str, torch.Tensor] = {}
        self.stop_at_mid = False
        self.handles = [
            layer.module.register_forward_pre_hook(self._block_in, with_kwargs=True),
            layer.attn_norm.register_forward_pre_hook(self._attn_norm_in),
            layer.mlp_norm.register_forward_pre_hook(self._mlp_norm_in),
            layer.mlp.register_forward_hook(self._mlp_out),
            layer.module.register_forward_hook(self._block_out, with_kwargs=True),
        ]

    def _matrix(self, name: str) -> torch.Tensor | None:
        return getattr(self.module, name, None)

    def _block_in(self, _m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        s = self._matrix(ATTN_SHORTCUT)
        if s is None:
            return None
        if args:
            x = args[0]
            self.stash["x"] = x
            return (x @ s.to(x.dtype), *args[1:]), kwargs
        x = kwargs["hidden_states"]
        self.stash["x"] = x
        return args, {**kwargs, "hidden_states": x @ s.to(x.dtype)}

    def _attn_norm_in(self, _m: nn.Module, args: tuple) -> tuple | None:
        if "x" not in self.stash:
            return None
        return (self.stash.pop("x"), *args[1:])

    def _mlp_norm_in(self, _m: nn.Module, args: tuple) -> None:
        if self.stop_at_mid:
            raise _StopAtMid(args[0])
        self.stash["mid"] = args[0]

    def _mlp_out(self, _m: nn.Module, _args: tuple, output: Any) -> Any:
        if self._matrix(MLP_SHORTCUT) is None or "mid" not in self.stash:
            return None
        self.stash["mlp"] = output[0] if isinstance(output, tuple) else output
        # the block adds this to its own skip (``h``), whose width may differ from the MLP's
        # output; that sum is discarded by ``_block_out``, so hand it a broadcast zero
        zero = self.stash["mid"].new_zeros(()).expand_as(self.stash["mid"])
        return (zero, *output[1:]) if isinstance(output, tuple) else zero

    def _block_out(self, _m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        s = self._matrix(MLP_SHORTCUT)
        mid, mlp = self.stash.pop("mid", None), self.stash.pop("mlp", None)
        if s is None or mid is None or mlp is None:
            return None
        y = mid @ s.to(mid.dtype) + mlp
        return (y, *output[1:]) if isinstance(output, tuple) else y


def _set_shortcut_(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Store a shortcut as a (frozen) parameter of the block, in the weights' dtype and device,
    so that ``model.to(...)`` moves it and :func:`param_count` counts it."""
    module.register_parameter(
        name,
        nn.Parameter(value.to(device=like.device, dtype=like.dtype), requires_grad=False),
    )


def _gram(signals: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ xᵀx`` over every token of every window, in float64."""
    g: torch.Tensor | None = None
    for s in signals:
        x = f64(s.reshape(-1, s.shape[-1]))
        g = x.T @ x if g is None else g + x.T @ x
    if g is None:
        raise GradfreeError("SliceGPT needs at least one calibration window.")
    return g


def _basis(signals: Sequence[torch.Tensor], damping: float, basis_fn: BasisFn | None) -> Any:
    g = _gram(signals)
    if basis_fn is not None:
        return check_orthogonal(basis_fn(g), g.shape[0], "basis")
    return sym_eigh(g, damping=damping)[1]


def _read_sliced_(
    readers: Sequence[nn.Module], norm: nn.Module, q: torch.Tensor, k: int, d: int, eps: float
) -> None:
    """``readers`` and their (unit) ``norm`` read the leading ``k`` coordinates of basis ``q``,
    with the norm averaging over ``d`` as SliceGPT's RMSN does (see the module docstring)."""
    c = math.sqrt(d / k)
    for lin in readers:
        transform_inputs_(lin, q[:, :k] * c)
    assign_(norm, "weight", f64(param(norm))[:k])
    set_norm_eps_(norm, eps * d / k)


def _project(signals: list[torch.Tensor], q: torch.Tensor, k: int) -> list[torch.Tensor]:
    return [(f64(s) @ q[:, :k].to(s.device)).to(s.dtype) for s in signals]


def _run_block(
    layer: LayerAdapter,
    hooks: _Shortcuts,
    xs: Sequence[torch.Tensor],
    kws: Sequence[dict],
    mid: bool,
) -> list[torch.Tensor]:
    """Block outputs (or, with ``mid``, its MLP-norm inputs) for every window."""
    out = []
    hooks.stop_at_mid = mid
    try:
        for x, kw in zip(xs, kws, strict=True):
            try:
                y = layer.module(x, **kw)
            except _StopAtMid as stop:
                hooks.stash.clear()
                out.append(stop.mid.detach())
                continue
            out.append((y[0] if isinstance(y, tuple) else y).detach())
    finally:
        hooks.stop_at_mid = False
    return out


@torch.no_grad()
def slicegpt_(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    fraction: float,
    *,
    slice_head: bool = False,
    damping: float = DAMPING,
    round_to: int = ROUND_TO,
    basis_fn: BasisFn | None = None,
) -> SliceGPTResult:
    """Slice ``model`` in place the SliceGPT way, calibrated on ``windows`` (1 x T token ids).

    Norms are fused and the head untied first; every block then gets its PCA bases on the signals
    of the already sliced model, and the shortcut hooks are installed on the model (returned in
    the result; do not ``deepcopy`` the model afterwards, hooks do not follow a copy).
    ``basis_fn`` (float64 Gram -> d x d orthogonal) replaces the PCA, e.g. by a random rotation
    (the tests) or one global basis. Fraction 0 keeps the full width: the model is only rotated,
    and its function is unchanged.
    """
    t0 = time.perf_counter()
    a = get_adapter(model)
    d = a.hidden_size
    k = slicegpt_width(d, fraction, round_to)
    if not windows:
        raise GradfreeError("SliceGPT needs at least one calibration window.")
    eps = a.norm_eps
    fuse_norms_(model)
    untie_(model)
    for norm in (*(n for la in a.layers for n in (la.attn_norm, la.mlp_norm)), a.final_norm):
        if not math.isclose(norm_eps(norm), eps, rel_tol=1e-6):
            raise GradfreeError("SliceGPT needs every RMSNorm to use the config's rms_norm_eps.")
    x0, kwargs = block_inputs(model, windows)
    tokens = sum(int(w.numel()) for w in windows)
    hooks = [_Shortcuts(layer) for layer in a.layers]
    handles = [h for hk in hooks for h in hk.handles]
    like = param(a.layer(0).o_proj)

    q_in = _basis(x0, damping, basis_fn)
    transform_inputs_(a.embed_tokens, q_in[:, :k])
    xs = _project(x0, q_in, k)
    widths: list[tuple[int, int, int]] = []
    for layer, hk in zip(a.layers, hooks, strict=True):
        k_out = d if (layer.index == a.num_layers - 1 and not slice_head) else k
        # attention reads the sliced stream; its skip maps it back to the original basis
        _read_sliced_(layer.attn_inputs(), layer.attn_norm, q_in, k, d, eps)
        _set_shortcut_(layer.module, ATTN_SHORTCUT, q_in[:, :k].T, like)
        q_mid = _basis(_run_block(layer, hk, xs, kwargs[layer.index], mid=True), damping, basis_fn)
        _set_shortcut_(layer.module, ATTN_SHORTCUT, q_in[:, :k].T @ q_mid[:, :k], like)
        transform_outputs_(layer.attn_output(), q_mid[:, :k].T)
        # the MLP reads the sliced mid stream; its skip maps it back, for the output's PCA
        _read_sliced_(layer.mlp_inputs(), layer.mlp_norm, q_mid, k, d, eps)
        _set_shortcut_(layer.module, MLP_SHORTCUT, q_mid[:, :k].T, like)
        ys = _run_block(layer, hk, xs, kwargs[layer.index], mid=False)
        q_out = _basis(ys, damping, basis_fn)
        _set_shortcut_(layer.module, MLP_SHORTCUT, q_mid[:, :k].T @ q_out[:, :k_out], like)
        transform_outputs_(layer.mlp_output(), q_out[:, :k_out].T)
        xs = _project(ys, q_out, k_out)  # = the sliced block's output, exactly
        widths.append((k, k, k_out))
        q_in = q_out
    k_head = widths[-1][2]
    _read_sliced_([a.lm_head], a.final_norm, q_in, k_head, d, eps)
    return SliceGPTResult(
        fraction=float(fraction),
        hidden_size=d,
        widths=widths,
        head_width=k_head,
        params=param_count(model),
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        handles=handles,
    )


def _numel(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel()


def slicegpt_param_formula(model: nn.Module, widths: Sequence[tuple[int, int, int]]) -> int:
    """Parameters of ``model`` (dense, untouched) once sliced to per-block ``widths``, by formula:
    embeddings and head at the first/last width, each block's readers and writers at its
    widths, the norms, and the two shortcut matrices ``k_in x k_mid`` and ``k_mid x k_out``."""
    a = get_adapter(model)
    g = a.geometry
    inter = a.intermediate_size
    first = a.layer(0)
    qkv = g.q_dim + 2 * g.kv_dim
    attn_bias = sum(_numel(lin.bias) for lin in first.attn_inputs())
    o_bias = first.o_proj.bias is not None
    mlp_in_bias = sum(_numel(lin.bias) for lin in first.mlp_inputs())
    down_bias = first.down_proj.bias is not None
    qk_norms = sum(_numel(param(n)) for n in (first.q_norm, first.k_norm) if n is not None)
    total = a.vocab_size * widths[0][0] + a.vocab_size * widths[-1][2] + widths[-1][2]
    total += _numel(a.lm_head.bias)
    for k_in, k_mid, k_out in widths:
        total += qkv * k_in + attn_bias + g.q_dim * k_mid + (k_mid if o_bias else 0)
        total += 2 * inter * k_mid + mlp_in_bias + inter * k_out + (k_out if down_bias else 0)
        total += k_in + k_mid + qk_norms  # the two residual norms (unit weights, still stored)
        total += k_in * k_mid + k_mid * k_out  # the shortcut matrices
    return total


def slicegpt_fraction_for_params(
    model: nn.Module, target: int, *, slice_head: bool = False, round_to: int = ROUND_TO
) -> float:
    """The slicing fraction at which SliceGPT keeps the most parameters without exceeding
    ``target`` (by :func:`slicegpt_param_formula`, shortcuts included): the equal-parameter
    comparison point. Refused when even the narrowest width is above ``target``."""
    a = get_adapter(model)
    d, n = a.hidden_size, a.num_layers
    below = range((d - 1) - (d - 1) % round_to, 0, -round_to)  # the multiples under d
    for k in [d, *below]:
        f = 0.0 if k == d else 1.0 - (k + 0.5) / d  # int((1 - f)·d) = k
        k_last = k if slice_head else d
        widths = [(k, k, k)] * (n - 1) + [(k, k, k_last)]
        if slicegpt_width(d, f, round_to) == k and slicegpt_param_formula(model, widths) <= target:
            return f
    raise GradfreeError(f"SliceGPT cannot reach {target} parameters on this model at any width.")
