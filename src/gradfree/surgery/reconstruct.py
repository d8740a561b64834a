"""Closed-form reconstruction after slicing: re-fit the sliced model's linears by ridge least
squares so that each one reproduces the dense model's output (issue 17, part 2).

:func:`~gradfree.surgery.slicing.slice_` keeps the leading ``k`` coordinates of one global basis
and loses whatever the readers saw outside them. Here the sliced model is repaired block by
block, in order, from moments of activations recaptured through the blocks already repaired
(sequential, as :mod:`gradfree.compress.recapture` does for teacher → student). The reference is
the *dense* model in the same rotated basis (fused, untied, rotated by the slicing basis ``Q``,
not sliced), so that its residual coordinates ``:k`` are the ones the sliced model keeps.

Per linear, with ``x_s`` what the sliced linear reads and ``x_d`` what the dense one reads on the
same tokens, target ``y = T x_d + t`` (``T``, ``t`` the dense weight and bias), prior ``W₀`` (the
sliced weight), the ridge fit toward the prior is::

    W = (T C_ds + t s_sᵀ + λ W₀)(C_ss + λ I)⁻¹,  C_ds = Σ x_d x_sᵀ, C_ss = Σ x_s x_sᵀ, s_s = Σ x_s

in float64 (:func:`gradfree.solvers.ridge.ridge_from_stats`), ``λ = rel_lam · tr(C_ss)/k``. A
linear with a bias (Qwen2's q/k/v) fits it jointly through a constant feature (the intercept
also corrects the mean shift that slicing causes); a linear without one keeps having none, so
the output stays a plain checkpoint of the same family.

* readers: q/k/v read ``attn_in``, gate/up read ``mlp_in`` (the norm outputs, width k vs d);
  ``T`` the dense reader. Qwen3's q/k norms run with ``eps·d/k`` in the sliced model, which
  ``slice_`` compensates by scaling q/k by ``c = sqrt(d/k)``; the target is scaled alike
  (``c² = eps_sliced / eps_dense`` of the per-head norm).
* writers: o reads ``attn_heads``, down reads ``mlp_hidden`` (same width in both models, unless
  pruned); ``T`` the kept rows ``:k`` of the dense writer. Only ``T C_ds = Σ (T x_d) x_sᵀ``
  enters the fit, so the block-wise path pairs the sliced input with the dense writer's own
  output rows ``:k`` (an out × n moment instead of n × n, and ``T`` = I): the same solve, far
  cheaper for the MLP's wide hidden layer.
* the head (``head=True``) reads ``final.normed``; ``T`` the dense head, solved in row chunks.

Block-wise, linear in the depth: both models' residual streams entering the current block are
kept for every calibration window (in the models' own dtype, on their device); only block ``j``
of each model is run on them. The dense block runs once (its sites are the targets); the sliced
block is run up to q/k/v's input, fitted, up to o's input, fitted, then gate/up, then down, so
every linear is fitted to exactly the inputs it will see on the calibration tokens; both caches
then advance through block ``j`` (the sliced one through its fitted weights). Windows are run
one at a time (no padding), with the attention mask and RoPE tables the dense model gave its
blocks. Memory: the two streams (tokens x (k + d)) plus the dense block's targets (tokens x 4d:
two reader inputs, two writer outputs) and the float64 moments of one site.

At full width (``k = d``) the sliced model is the dense one and the fit returns the prior (exact
up to rounding); on a model whose residual lives in ``k`` dimensions the fit is exact from any
prior.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradfree.adapters import LayerAdapter, ModelAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.solvers.obs import group_columns, obs_select_inverse
from gradfree.solvers.ridge import iter_ridge_chunks, resolve_lambda, ridge_from_stats
from gradfree.surgery.blocks import block_inputs
from gradfree.surgery.edit import assign_, f64, maybe_param, norm_eps, param
from gradfree.surgery.prune import (
    check_shape,
    finish_shape_,
    kv_pools,
    prune_heads_,
    prune_neurons_,
)
from gradfree.texts.windows import iter_windows

REL_LAMBDA = 1e-2  # ridge λ relative to tr(C_ss)/k, as the damping of SparseGPT/SliceGPT
HEAD_CHUNK = 8192  # head rows solved at a time (a 151,936-row head in float64 is ~1 GB)


# --- maths: pure functions on moment matrices --------------------------------------------------


@dataclass(frozen=True)
class PairMoments:
    """Moments of one site over the same tokens: sliced ``x_s`` (width k) and dense ``x_d``."""

    gram_s: torch.Tensor  # C_ss = Σ x_s x_sᵀ (k × k)
    cross_ds: torch.Tensor  # C_ds = Σ x_d x_sᵀ (d × k)
    sum_s: torch.Tensor  # Σ x_s (k,)
    sum_d: torch.Tensor  # Σ x_d (d,)
    count: int


def ridge_lambda(m: PairMoments, rel_lam: float) -> float:
    """The absolute λ: ``rel_lam`` times the mean of diag(C_ss) (= tr(C_ss)/k)."""
    return resolve_lambda(m.gram_s, rel_lam=rel_lam)


def _checked(
    m: PairMoments, target_w: torch.Tensor, prior_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C_ds, T) in float64 on the moments' device, after checking the shapes agree."""
    c_ds = f64(m.cross_ds)
    t = f64(target_w).to(c_ds.device)
    if t.shape[1] != c_ds.shape[0] or prior_w.shape != (t.shape[0], c_ds.shape[1]):
        raise GradfreeError(
            f"The target {tuple(t.shape)} and prior {tuple(prior_w.shape)} do not match the "
            f"moments ({c_ds.shape[0]} dense x {c_ds.shape[1]} sliced)."
        )
    return c_ds, t


def ls_fit(
    m: PairMoments,
    target_w: torch.Tensor,
    prior_w: torch.Tensor,
    rel_lam: float,
    target_b: torch.Tensor | None = None,
    prior_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) minimising ``Σ ‖W x_s + b − (T x_d + t)‖² + λ ‖[W b] − [W₀ b₀]‖²`` in float64.

    ``target_w`` is T (out × d), ``prior_w`` W₀ (out × k); ``target_b`` t (or None: no bias in the
    target). With ``prior_b`` None the fit has no intercept and b is None; otherwise the bias is
    fitted through a constant feature, toward ``prior_b``.
    """
    # the solve runs where the moments are (the model's device when accumulated on it)
    c_ds, t = _checked(m, target_w, prior_w)
    dev = c_ds.device
    lam = ridge_lambda(m, rel_lam)
    xty = c_ds.T @ t.T  # Σ x_s (T x_d)ᵀ: k × out
    if target_b is not None:
        xty = xty + f64(m.sum_s)[:, None] * f64(target_b).to(dev)[None, :]
    if prior_b is None:
        return ridge_from_stats(f64(m.gram_s), xty, lam=lam, prior=f64(prior_w).to(dev)), None
    k = m.gram_s.shape[0]
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=dev)
    gram[:k, :k] = f64(m.gram_s)
    gram[:k, k] = gram[k, :k] = f64(m.sum_s)
    gram[k, k] = float(m.count)
    last = f64(m.sum_d) @ t.T  # Σ 1·(T x_d)ᵀ
    if target_b is not None:
        last = last + float(m.count) * f64(target_b).to(dev)
    prior = torch.cat([f64(prior_w).to(dev), f64(prior_b).to(dev)[:, None]], dim=1)
    w = ridge_from_stats(gram, torch.cat([xty, last[None, :]]), lam=lam, prior=prior)
    return w[:, :k], w[:, k]


def ls_fit_rows(
    m: PairMoments,
    target_w: torch.Tensor,
    prior_w: torch.Tensor,
    rel_lam: float,
    chunk: int = HEAD_CHUNK,
) -> torch.Tensor:
    """:func:`ls_fit` without biases for a very wide output (an LM head), factorising once and
    solving ``chunk`` rows at a time; returns W (out × k) in ``prior_w``'s dtype."""
    c_ds = f64(m.cross_ds)
    out = torch.empty_like(prior_w)

    def xty(start: int, stop: int) -> torch.Tensor:
        return c_ds.T @ f64(target_w[start:stop]).to(c_ds.device).T

    def prior(start: int, stop: int) -> torch.Tensor:
        return f64(prior_w[start:stop]).to(c_ds.device)

    lam = ridge_lambda(m, rel_lam)
    for start, stop, w in iter_ridge_chunks(
        f64(m.gram_s), xty, prior_w.shape[0], lam=lam, prior=prior, chunk=chunk
    ):
        out[start:stop] = w.to(device=out.device, dtype=out.dtype)
    return out


def restrict(m: PairMoments, cols: torch.Tensor) -> PairMoments:
    """The moments of the sliced inputs ``cols`` only (the others removed)."""
    c = cols.to(m.gram_s.device)
    return PairMoments(m.gram_s[c][:, c], m.cross_ds[:, c], m.sum_s[c], m.sum_d, m.count)


def select_columns(
    m: PairMoments,
    target_w: torch.Tensor,
    prior_w: torch.Tensor,
    rel_lam: float,
    keep: int,
    *,
    group_size: int = 1,
    pools: Sequence[Sequence[int]] | None = None,
    steps: int = 64,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Which input columns of a bias-free writer to keep (``keep`` groups per pool) so that its
    least-squares refit toward ``target_w`` loses least: structured OBS
    (:func:`gradfree.solvers.obs.obs_select`) on the ridge optimum and its damped Hessian.
    Returns the kept column indices and what the selection predicted."""
    # one Cholesky factor of the damped Hessian gives both the ridge optimum (ls_fit's solve)
    # and the inverse the selection downdates: an n × n factorisation saved (n = 8,960 on 1.5B)
    c_ds, t = _checked(m, target_w, prior_w)
    dev = c_ds.device
    lam = ridge_lambda(m, rel_lam)
    g = f64(m.gram_s)
    h = 0.5 * (g + g.T)
    h.diagonal().add_(lam)
    chol, bad = torch.linalg.cholesky_ex(h)
    del h
    if int(bad):
        raise GradfreeError("The writer's input moments are not positive definite: raise λ.")
    rhs = c_ds.T @ t.T + lam * f64(prior_w).to(dev).T  # k × out
    w_full = torch.cholesky_solve(rhs, chol).T
    sel = obs_select_inverse(
        w_full, torch.cholesky_inverse(chol), keep, group_size=group_size, pools=pools, steps=steps
    )
    info = {
        "kept": len(sel.kept),
        "removed": len(sel.removed),
        "predicted_error": sel.predicted_error,
        "rounds": len(sel.step_errors),
    }
    return group_columns(sel.kept, group_size), info


@dataclass(frozen=True)
class PrunePlan:
    """Structured pruning done during the reconstruction: MLP neurons kept per block and query
    heads kept per KV group (None: all), and OBS rounds per selection."""

    mlp_keep: int | None = None
    heads_keep: int | None = None
    steps: int = 64

    @property
    def active(self) -> bool:
        return self.mlp_keep is not None or self.heads_keep is not None


# --- plumbing: block-wise paired recapture and in-place fits ------------------------------------

Log = Callable[[str], None]
SITES = ("attn_in", "attn_heads", "mlp_in", "mlp_hidden")  # in the order they are fitted
# what the dense block gives each site: the readers' input, the writers' output (projected)
DENSE_SITE = {"attn_in": "attn_in", "attn_heads": "attn_out", "mlp_in": "mlp_in"}
DENSE_SITE["mlp_hidden"] = "mlp_out"
WRITERS = ("attn_heads", "mlp_hidden")


def _quiet(_msg: str) -> None:
    return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_pair(sliced: ModelAdapter, dense: ModelAdapter) -> None:
    """Refuse a dense reference that is not the sliced model's own, in the same basis."""
    gs, gd = sliced.geometry, dense.geometry
    same = (
        sliced.num_layers == dense.num_layers
        and (gs.q_dim, gs.kv_dim, gs.head_dim) == (gd.q_dim, gd.kv_dim, gd.head_dim)
        and sliced.intermediate_size == dense.intermediate_size
        and sliced.vocab_size == dense.vocab_size
        and sliced.hidden_size <= dense.hidden_size
    )
    if not same:
        raise GradfreeError(
            "The dense reference must be the same model as the sliced one (layers, heads, MLP "
            "width, vocabulary) at a width at least as large."
        )
    # slice_ keeps the embedding's leading columns untouched: a cheap proof of the same basis
    k = sliced.hidden_size
    es, ed = param(sliced.embed_tokens), param(dense.embed_tokens)[:, :k]
    tol = 1e-3 if es.dtype in (torch.float16, torch.bfloat16) else 1e-5
    err = float(
        (f64(es) - f64(ed).to(es.device)).abs().max() / f64(ed).abs().max().clamp_min(1e-30)
    )
    if err > tol:
        raise GradfreeError(
            "The dense reference is not in the sliced model's basis: rotate it by the slicing "
            "basis (without slicing) before reconstructing."
        )


class _Moments:
    """Running :class:`PairMoments` of one site, accumulated window by window in float64 on the
    activations' device."""

    def __init__(self) -> None:
        self.gram_s: torch.Tensor | None = None
        self.cross_ds: torch.Tensor | None = None
        self.sum_s: torch.Tensor | None = None
        self.sum_d: torch.Tensor | None = None
        self.count = 0

    def add(self, xs: torch.Tensor, xd: torch.Tensor) -> None:
        s = f64(xs.reshape(-1, xs.shape[-1]))
        d = f64(xd.reshape(-1, xd.shape[-1])).to(s.device)
        if s.shape[0] != d.shape[0]:
            raise GradfreeError("The sliced and dense models saw different numbers of tokens.")
        parts = (s.T @ s, d.T @ s, s.sum(0), d.sum(0))
        if self.gram_s is None:
            self.gram_s, self.cross_ds, self.sum_s, self.sum_d = parts
        else:
            assert self.cross_ds is not None and self.sum_s is not None
            assert self.sum_d is not None
            self.gram_s += parts[0]
            self.cross_ds += parts[1]
            self.sum_s += parts[2]
            self.sum_d += parts[3]
        self.count += int(s.shape[0])

    def result(self, key: str) -> PairMoments:
        if self.count == 0 or self.gram_s is None:
            raise GradfreeError(f"The calibration documents gave no tokens at {key}.")
        assert self.cross_ds is not None and self.sum_s is not None and self.sum_d is not None
        return PairMoments(self.gram_s, self.cross_ds, self.sum_s, self.sum_d, self.count)


def _q_scale(sliced_norm: nn.Module | None, dense_norm: nn.Module | None) -> float:
    """The factor slice_ put on q/k ahead of a per-head norm (1 without one)."""
    if sliced_norm is None or dense_norm is None:
        return 1.0
    return float((norm_eps(sliced_norm) / norm_eps(dense_norm)) ** 0.5)


def _fit_(
    lin: nn.Linear,
    ref: nn.Linear,
    m: PairMoments,
    rel_lam: float,
    rows: int | None = None,
    scale: float = 1.0,
) -> None:
    """Re-fit ``lin`` (sliced) to ``scale`` × the dense ``ref`` (its first ``rows`` outputs)."""
    t = f64(param(ref))[:rows] * scale
    tb = maybe_param(ref, "bias")
    tb = None if tb is None else f64(tb)[:rows] * scale
    b0 = maybe_param(lin, "bias")
    w, b = ls_fit(m, t, param(lin), rel_lam, tb, None if b0 is None else f64(b0))
    assign_(lin, "weight", w)
    if b is not None:
        assign_(lin, "bias", b)


def _fit_output_(lin: nn.Linear, m: PairMoments, rel_lam: float) -> None:
    """Re-fit the writer ``lin`` from moments whose dense side is already its target output
    (the dense writer's output rows ``:k``, bias included)."""
    eye = torch.eye(m.sum_d.shape[0], dtype=torch.float64)
    b0 = maybe_param(lin, "bias")
    w, b = ls_fit(m, eye, param(lin), rel_lam, None, None if b0 is None else f64(b0))
    assign_(lin, "weight", w)
    if b is not None:
        assign_(lin, "bias", b)


def _fit_site_(
    s: ModelAdapter,
    d: ModelAdapter,
    site: str,
    j: int | None,
    m: PairMoments,
    rel_lam: float,
    projected: bool = False,
) -> list[str]:
    """Fit the linears that read ``site`` of block ``j`` (the head with ``j`` None); return
    their names. With ``projected``, a writer's moments pair its sliced input with the dense
    writer's output (``Σ y x_sᵀ``, out × n) instead of the dense input (``Σ x_d x_sᵀ``, n × n):
    the same fit, since only ``T C_ds`` enters it, for a fraction of the work when the
    writer's input is wide (the MLP's hidden layer)."""
    k = s.hidden_size
    if j is None:
        if maybe_param(s.lm_head, "bias") is not None:  # no supported family has one
            raise GradfreeError("Reconstructing a head with a bias is not supported.")
        assign_(s.lm_head, "weight", ls_fit_rows(m, param(d.lm_head), param(s.lm_head), rel_lam))
        return ["lm_head"]
    ls, ld = s.layer(j), d.layer(j)
    if site == "attn_in":
        scales = (_q_scale(ls.q_norm, ld.q_norm), _q_scale(ls.k_norm, ld.k_norm), 1.0)
        pairs = zip(ls.attn_inputs(), ld.attn_inputs(), scales, strict=True)
        for lin, ref, c in pairs:
            _fit_(lin, ref, m, rel_lam, scale=c)
        return [f"layers.{j}.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    if site == "mlp_in":
        for lin, ref in zip(ls.mlp_inputs(), ld.mlp_inputs(), strict=True):
            _fit_(lin, ref, m, rel_lam)
        return [f"layers.{j}.{n}" for n in ("gate_proj", "up_proj")]
    lin, ref = (
        (ls.attn_output(), ld.attn_output())
        if site == "attn_heads"
        else (ls.mlp_output(), ld.mlp_output())
    )
    if projected:
        _fit_output_(lin, m, rel_lam)
    else:
        _fit_(lin, ref, m, rel_lam, rows=k)
    return [f"layers.{j}.{'o_proj' if site == 'attn_heads' else 'down_proj'}"]


def _prune_site_(
    s: ModelAdapter,
    site: str,
    j: int,
    m: PairMoments,
    rel_lam: float,
    plan: PrunePlan,
) -> tuple[PairMoments, dict[str, Any]] | None:
    """Before the writer of ``site`` is fitted: remove the heads (attn_heads) or neurons
    (mlp_hidden) of block ``j`` that ``plan`` asks for, chosen by structured OBS on the writer's
    refit; return the moments of what is kept and what was done (None: nothing to prune).
    ``m`` pairs the writer's sliced input with the dense writer's output (``projected``)."""
    layer = s.layer(j)
    k = s.hidden_size
    eye = torch.eye(k, dtype=torch.float64)  # the moments pair inputs with target outputs
    if site == "attn_heads" and plan.heads_keep is not None:
        g = s.geometry
        lin, target = layer.attn_output(), eye
        if plan.heads_keep == g.group_size:
            return None
        cols, info = select_columns(
            m,
            target,
            param(lin),
            rel_lam,
            plan.heads_keep,
            group_size=g.head_dim,
            pools=kv_pools(g.num_heads, g.num_kv_heads),
            steps=plan.steps,
        )
        kept_heads = sorted({int(c) // g.head_dim for c in cols})
        prune_heads_(layer, kept_heads, g.head_dim, g.num_kv_heads)
        return restrict(m, cols), {**info, "unit": "query heads", "kept_ids": kept_heads}
    if site == "mlp_hidden" and plan.mlp_keep is not None:
        lin, target = layer.mlp_output(), eye
        if plan.mlp_keep == int(param(lin).shape[1]):
            return None
        cols, info = select_columns(m, target, param(lin), rel_lam, plan.mlp_keep, steps=plan.steps)
        prune_neurons_(layer, cols)
        return restrict(m, cols), {**info, "unit": "MLP neurons"}
    return None


class _Stop(Exception):
    """Raised by a site hook once the one activation wanted from a block is in hand."""


def _site_hooks(
    layer: LayerAdapter, sites: Sequence[str], got: dict[str, torch.Tensor], stop: bool
) -> list[Any]:
    """Hooks that put ``sites`` of ``layer`` into ``got`` (the same modules as the capture's
    hooks, :mod:`gradfree.capture.hooks`); with ``stop``, the block is cut short after them."""

    def out_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
            got[name] = (output[0] if isinstance(output, tuple) else output).detach()
            if stop:
                raise _Stop

        return hook

    def in_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            got[name] = args[0].detach()
            if stop:
                raise _Stop

        return hook

    modules = {
        "attn_in": (layer.attn_norm, False),
        "attn_heads": (layer.attn_output(), True),
        "attn_out": (layer.attn_output(), False),
        "mlp_in": (layer.mlp_norm, False),
        "mlp_hidden": (layer.mlp_output(), True),
        "mlp_out": (layer.mlp_output(), False),
    }
    handles = []
    for name in sites:
        module, reads_input = modules[name]
        if reads_input:
            handles.append(module.register_forward_pre_hook(in_hook(name)))
        else:
            handles.append(module.register_forward_hook(out_hook(name)))
    return handles


def _run_block(
    layer: LayerAdapter, x: torch.Tensor, kw: dict[str, Any], sites: Sequence[str], stop: bool
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Block ``layer`` on one window's input ``x``: (its output, or None when cut short at
    the site with ``stop``; the ``sites`` activations)."""
    got: dict[str, torch.Tensor] = {}
    handles = _site_hooks(layer, sites, got, stop)
    try:
        y = layer.module(x, **kw)
    except _Stop:
        return None, got
    finally:
        for h in handles:
            h.remove()
    return (y[0] if isinstance(y, tuple) else y).detach(), got


def _block_inputs(
    dense: nn.Module, sliced: nn.Module, s: ModelAdapter, windows: Sequence[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Per window: block 0's input in the dense and the sliced model, and the keyword arguments
    every dense block receives (the sliced blocks get the same ones)."""
    xd, kwargs = block_inputs(dense, windows)
    xs: list[torch.Tensor] = []

    def first(_m: nn.Module, args: tuple, kw: dict) -> None:
        xs.append((args[0] if args else kw["hidden_states"]).detach())
        raise _Stop  # the sliced model's embedding output is all that is wanted

    handle = s.layer(0).module.register_forward_pre_hook(first, with_kwargs=True)
    dev_s = s.embed_tokens.weight.device
    try:
        for ids in windows:
            with contextlib.suppress(_Stop):
                sliced(input_ids=ids.to(dev_s), use_cache=False)
    finally:
        handle.remove()
    return xd, xs, kwargs


def _fit_block_(
    s: ModelAdapter,
    d: ModelAdapter,
    j: int,
    xs: list[torch.Tensor],
    xd: list[torch.Tensor],
    kws: Sequence[dict[str, Any]],
    rel_lam: float,
    plan: PrunePlan,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[str, Any]]]:
    """Re-fit block ``j`` of the sliced model site by site; return both models' outputs of the
    block (the next block's inputs) and one ledger row per fit."""
    ls, ld = s.layer(j), d.layer(j)
    k = s.hidden_size
    # the dense model is only read: one full run of its block gives every target (the readers'
    # inputs, the writers' outputs) and the block's output, kept for this block only
    dense_sites: list[dict[str, torch.Tensor]] = []
    yd: list[torch.Tensor] = []
    for x, kw in zip(xd, kws, strict=True):
        y, got = _run_block(ld, x, kw, tuple(DENSE_SITE.values()), stop=False)
        assert y is not None
        dense_sites.append(got)
        yd.append(y)
    rows = []
    for site in SITES:
        t0 = time.perf_counter()
        acc = _Moments()
        for x, kw, dense_got in zip(xs, kws, dense_sites, strict=True):
            # the sliced block runs up to this site, through the fits already made
            _, got = _run_block(ls, x, kw, (site,), stop=True)
            target = dense_got.pop(DENSE_SITE[site])
            acc.add(got[site], target[..., :k] if site in WRITERS else target)
        m = acc.result(f"blocks.{j}.{site}")
        pruned = _prune_site_(s, site, j, m, rel_lam, plan)
        if pruned is not None:
            m = pruned[0]
        fitted = _fit_site_(s, d, site, j, m, rel_lam, projected=True)
        row = {
            "site": f"blocks.{j}.{site}",
            "fitted": fitted,
            "tokens": m.count,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if pruned is not None:
            row["pruned"] = pruned[1]
        rows.append(row)
    ys = []
    for x, kw in zip(xs, kws, strict=True):
        y, _ = _run_block(ls, x, kw, (), stop=False)
        assert y is not None
        ys.append(y)
    return ys, yd, rows


@torch.no_grad()
def reconstruct_(
    sliced: nn.Module,
    dense: nn.Module,
    tokenizer: Any,
    documents: Sequence[Any],
    *,
    rel_lam: float = REL_LAMBDA,
    head: bool = True,
    max_length: int = 512,
    progress: bool | Log = False,
    prune: PrunePlan | None = None,
) -> dict[str, Any]:
    """Re-fit every linear of ``sliced`` in place so that it reproduces ``dense`` (see the module
    docstring); returns a ledger with one row per fitted site.

    With ``prune`` the blocks also lose MLP neurons and query heads (the same numbers in every
    block, the same per KV group), each chosen just before its writer is fitted, from the
    moments of that writer's recaptured inputs (:func:`select_columns`); the config records the
    new widths at the end.

    ``dense`` is the unsliced model in the slicing basis (``fuse_norms_``, ``untie_``,
    ``rotate_residual_(dense, Q)``); it is only read. ``documents`` are the calibration texts
    (strings or objects with ``.id``/``.text``), cut into windows of ``max_length`` tokens as a
    capture cuts them, each run on its own (no padding). The embeddings are left as sliced; the
    head is re-fitted with ``head``.
    """
    if not documents:
        raise GradfreeError("Reconstruction needs at least one calibration document.")
    if not rel_lam >= 0:
        raise GradfreeError(f"The ridge lambda must be a number >= 0, not {rel_lam}.")
    s, d = get_adapter(sliced), get_adapter(dense)
    _check_pair(s, d)
    plan = prune or PrunePlan()
    if plan.active:
        check_shape(sliced, plan.mlp_keep, plan.heads_keep)
    if head and s.tied:
        raise GradfreeError(
            "The head is tied to the embeddings: untie it before re-fitting it, or keep it "
            "(head=False)."
        )
    log: Log = _stderr if progress is True else (progress or _quiet)  # type: ignore[assignment]
    t_all = time.perf_counter()
    windows = [
        torch.tensor([ids], dtype=torch.long)
        for _, ids in iter_windows(tokenizer, documents, max_length)
        if ids
    ]
    if not windows:
        raise GradfreeError("The calibration documents gave no tokens.")
    xd, xs, kwargs = _block_inputs(dense, sliced, s, windows)
    rows: list[dict[str, Any]] = []
    for j in range(s.num_layers):
        t0 = time.perf_counter()
        xs, xd, block_rows = _fit_block_(s, d, j, xs, xd, kwargs[j], rel_lam, plan)
        rows += block_rows
        log(
            f"reconstruct block {j + 1}/{s.num_layers} "
            f"({block_rows[0]['tokens']} tokens, {time.perf_counter() - t0:.1f} s)"
        )
    if head:
        t0 = time.perf_counter()
        acc = _Moments()
        for x_s, x_d in zip(xs, xd, strict=True):
            acc.add(s.final_norm(x_s), d.final_norm(x_d))
        m = acc.result("final.normed")
        fitted = _fit_site_(s, d, "final.normed", None, m, rel_lam)
        rows.append(
            {
                "site": "final.normed",
                "fitted": fitted,
                "tokens": m.count,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        log(f"reconstruct head ({m.count} tokens, {rows[-1]['seconds']:.1f} s)")
    shape = finish_shape_(sliced) if plan.active else None
    return {
        "op": "reconstruct",
        "rel_lambda": float(rel_lam),
        "prune": None if shape is None else {**shape, "steps": plan.steps},
        "head": bool(head),
        "width": s.hidden_size,
        "dense_width": d.hidden_size,
        "fits": rows,
        "windows": len(windows),
        "tokens": rows[0]["tokens"] if rows else 0,
        "seconds": round(time.perf_counter() - t_all, 2),
    }


def dense_reference(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """A copy of the fused, untied ``model`` rotated by the slicing basis ``q``, not sliced: the
    reference :func:`reconstruct_` fits to."""
    import copy

    from gradfree.surgery.rotate import rotate_residual_

    ref = copy.deepcopy(model)
    rotate_residual_(ref, q)
    return ref
