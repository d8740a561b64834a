"""Fitting the coders of a low-rank KV cache from captured statistics: pure maths, float64.

Every layer's keys and values are split into *components* (a KV head, or a RoPE frequency),
each with a spectrum; :func:`~gradfree.kv.bases.allocate_ranks` shares the budget among them and
each component then yields the rows of the encoder E and the columns of the decoder D for its
rank (:class:`~gradfree.kv.bases.LayerCoder`).

Key modes (:data:`~gradfree.kv.bases.KEY_MODES`):

* ``pre_rope``: per-head PCA of the keys before RoPE (site ``k_pre``, after k_norm). The cache
  un-rotates incoming keys, stores the latent and re-applies RoPE after reconstruction.
* ``pairs``: whole RoPE frequency pairs (dims j and j + head_dim/2, HF's rotate-half layout) of
  each head, ranked by energy. RoPE turns each pair within its plane, so keeping pairs commutes
  with it: no positions, no mean, and attention can run on the latents.
* ``complex``: per frequency j, the pairs of all KV heads of a layer seen as one complex vector
  c ∈ ℂ^{n_kv} (c_h = k_{h,j} + i k_{h,j+h/2}); RoPE multiplies every c_h by the same e^{iθ}, so
  the principal directions of E[c cᴴ] (complex-linear maps) commute with RoPE too, and a layer
  can keep 0 … n_kv complex dims per frequency (2 reals each).
* ``post_rope``: per-head PCA of the keys after RoPE (site ``k_rope``), stored directly.

Metrics. A key error e costs the attention logits qᵀe and a value error e costs the output
W_o e, so with ``metric="attention"`` each component minimises E[eᵀ M e] instead of E[eᵀe]:
keys with M = Σ_{query heads of the group} E[q qᵀ] (post-RoPE queries, site ``q_rope``); in the
RoPE-commuting and pre-RoPE modes the relative rotation between query and key averages M to its
per-pair isotropic part, (M_jj + M_{j+h/2,j+h/2}) / 2 on both dims of pair j; values with
M = Σ_{query heads of the group} W_o,hᵀ W_o,h (passed in, from the model's o_proj). The solution
is PCA in whitened coordinates: with L = M^{1/2}, the eigenvectors U of L C L give E = Uᵀ L and
D = L⁻¹ U (exact at full rank for any invertible M; M is damped by 1e-6 of its mean diagonal).

Eigenvectors have deterministic signs (:func:`gradfree.base.numerics.sym_eigh`) or, complex,
phases (the largest entry real and positive); stored as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError
from gradfree.kv.bases import (
    ALLOCATIONS,
    KEY_MODES,
    METRICS,
    KVBases,
    LayerCoder,
    allocate_ranks,
    check_budget,
    check_choice,
)

if TYPE_CHECKING:
    import torch

KEY_SITE = {"pre_rope": "k_pre", "pairs": "k_rope", "complex": "k_rope", "post_rope": "k_rope"}
QUERY_SITE = {"pre_rope": "q_pre", "pairs": "q_rope", "complex": "q_rope", "post_rope": "q_rope"}
NORMALISE = ("component", "kind")
DAMPING = 1e-6

# rank → (encoder rows (r, d), decoder columns (d, r)) in the layer's flat coordinates
Maker = Callable[[int], tuple["torch.Tensor", "torch.Tensor"]]


@dataclass
class Component:
    """One share of a layer's keys or values that competes for rank: its spectrum (in ranking
    order; per dim, pair by pair when ``paired``), its floor in units, its normalisation group,
    the KV head it belongs to (None when it spans heads) and the maker of its rows of E and D."""

    kind: str
    layer: int
    head: int | None
    spectrum: torch.Tensor
    paired: bool
    floor: int
    make: Maker
    share: float = 1.0  # normalised energies are multiplied by this (complex: n_kv)


def pair_isotropic(diag: torch.Tensor) -> torch.Tensor:
    """Per-dim weights averaged over each RoPE pair (j, j + h/2): what relative rotation leaves
    of a diagonal metric."""
    import torch

    h = int(diag.shape[0]) // 2
    w = (diag[:h] + diag[h:]) / 2
    return torch.cat([w, w])


def rotation_averaged(
    m: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """E_L[R(−L)ᵀ M R(−L)]: the metric M of pre-RoPE queries seen by a pre-RoPE key error at
    lag L (logit = qᵀ R(n − m) k for a query at m and a key at n), for lags with (cos, sin)
    rows (N, hd) of the model's rotary at positions L and probabilities ``weights`` (N,).

    With R = C + S J (C, S diagonal, J the rotate-half matrix), RᵀMR = CMC + CMSJ + JᵀSMC +
    JᵀSMSJ, so the average needs only E[c_a c_b], E[c_a s_b] and E[s_a s_b]."""
    import torch

    from gradfree.base.numerics import f64

    m, c, w = f64(m), f64(cos), f64(weights) / f64(weights).sum()
    s = -f64(sin)  # R(−L) turns the other way
    h = int(m.shape[0]) // 2
    eye = torch.eye(h, dtype=torch.float64)
    zero = torch.zeros(h, h, dtype=torch.float64)
    j = torch.cat([torch.cat([zero, -eye], 1), torch.cat([eye, zero], 1)], 0)
    cw, sw = c * w[:, None], s * w[:, None]
    ecc, ecs, ess = cw.T @ c, cw.T @ s, sw.T @ s
    return ecc * m + (ecs * m) @ j + j.T @ (ecs.T * m) + j.T @ (ess * m) @ j


def metric_sqrt(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{-1/2}) of a symmetric PSD metric, damped so that it is invertible."""
    from gradfree.base.numerics import sym_eigh

    vals, vecs = sym_eigh(m, damping=DAMPING)
    root = vals.clamp_min(vals.max() * 1e-12).sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def weighted_pca(
    cov: torch.Tensor, metric: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, E (d, d) with rows in rank order, D (d, d) with columns in rank
    order) minimising E[eᵀ M e] for data of covariance ``cov`` (M = I when ``metric`` is None)."""
    from gradfree.base.numerics import f64, sym_eigh

    cov = f64(cov)
    if metric is None:
        vals, vecs = sym_eigh(cov)
        return vals, vecs.T.contiguous(), vecs
    root, inv = metric_sqrt(f64(metric))
    vals, vecs = sym_eigh(root @ cov @ root)
    return vals, vecs.T @ root, inv @ vecs


def _embed(rows: torch.Tensor, cols: torch.Tensor, head: int, hd: int, d: int) -> Maker:
    """A maker placing one head's (d_h-wide) E rows and D columns into the layer's coordinates."""
    import torch

    def make(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.zeros(r, d, dtype=torch.float64)
        dd = torch.zeros(d, r, dtype=torch.float64)
        e[:, head * hd : (head + 1) * hd] = rows[:r]
        dd[head * hd : (head + 1) * hd] = cols[:, :r]
        return e, dd

    return make


def pair_order(energy: torch.Tensor) -> torch.Tensor:
    """Dims of every RoPE pair (j, j + h/2), pairs by descending energy (ties: lower j first)."""
    import torch

    h = int(energy.shape[0])
    e = energy.to(torch.float64)
    pair = e[: h // 2] + e[h // 2 :]
    # A stable sort on the negated energies keeps ties in index order: deterministic.
    order = torch.sort(-pair, stable=True).indices
    return torch.stack([order, order + h // 2], dim=1).reshape(-1)


def complex_components(
    second: torch.Tensor, weights: torch.Tensor | None, n_kv: int, hd: int, layer: int
) -> list[Component]:
    """One component per RoPE frequency of a layer's keys (``complex`` mode, module docstring):
    ``second`` the (d, d) second moment of the flat keys, ``weights`` (n_kv, hd) per-dim metric
    weights (pair-isotropic) or None."""
    import torch

    from gradfree.base.numerics import f64

    s = f64(second)
    half, d = hd // 2, n_kv * hd
    out = []
    for j in range(half):
        re = torch.tensor([g * hd + j for g in range(n_kv)])
        im = re + half
        # E[c cᴴ] = E[a aᵀ + b bᵀ] + i E[b aᵀ − a bᵀ] for c = a + i b
        cc = torch.complex(s[re][:, re] + s[im][:, im], s[im][:, re] - s[re][:, im])
        scale = (
            torch.ones(n_kv, dtype=torch.float64)
            if weights is None
            else f64(weights[:, j]).clamp_min(1e-300).sqrt()
        )
        cc = scale[:, None] * cc * scale[None, :]
        vals, vecs = torch.linalg.eigh(0.5 * (cc + cc.mH))
        order = torch.argsort(vals, descending=True)
        vals, vecs = vals[order].clamp_min(0.0), vecs[:, order]
        # deterministic phase: each vector's largest entry real and positive
        top = vecs.abs().argmax(dim=0)
        phase = vecs[top, torch.arange(n_kv)]
        vecs = vecs * (phase.abs() / phase).conj()[None, :]
        spectrum = torch.repeat_interleave(vals, 2)

        def make(
            r: int,
            vecs: torch.Tensor = vecs,
            re: torch.Tensor = re,
            im: torch.Tensor = im,
            scale: torch.Tensor = scale,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            e = torch.zeros(r, d, dtype=torch.float64)
            dd = torch.zeros(d, r, dtype=torch.float64)
            for k in range(r // 2):
                p, q = vecs[:, k].real, vecs[:, k].imag
                # z = uᴴ S c: Re z = Σ s(p a + q b), Im z = Σ s(p b − q a)
                e[2 * k, re], e[2 * k, im] = p * scale, q * scale
                e[2 * k + 1, re], e[2 * k + 1, im] = -q * scale, p * scale
                # c ≈ S⁻¹ u z: a = (p Re z − q Im z)/s, b = (q Re z + p Im z)/s
                dd[re, 2 * k], dd[re, 2 * k + 1] = p / scale, -q / scale
                dd[im, 2 * k], dd[im, 2 * k + 1] = q / scale, p / scale
            return e, dd

        # normalised by the whole layer's keys, a frequency competes as n_kv heads' pairs would
        out.append(Component("k", layer, None, spectrum, True, 0, make, float(n_kv)))
    return out


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
        "num_heads": n_heads,
        "num_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "head_dim": config_head_dim(c),
    }
    return info, [int(i) for i in entry.get("layers", [])]


def _site_stats(capture: Any, role: str, layer: int, site: str, width: int) -> Any:
    key = f"blocks.{layer}.{site}"
    if key not in capture.keys(role):
        raise GradfreeError(
            f"The capture has no statistics for {key}; capture k_pre, k_rope, v (and q_pre and "
            "q_rope for the attention metric) of every layer with full covariances."
        )
    st = capture.stats(role, key)
    if not st.full or st.count == 0:
        raise GradfreeError(f"The capture of {key} needs a full covariance over some tokens.")
    if st.dim != width:
        raise GradfreeError(f"The capture of {key} has width {st.dim}, not {width}.")
    return st


def query_metrics(second: torch.Tensor, n_kv: int, hd: int) -> list[torch.Tensor]:
    """Per KV head, Σ over its query heads of the (hd, hd) blocks of the queries' second
    moment ``second`` (n_q · hd square)."""
    n_q = int(second.shape[0]) // hd
    rep = n_q // n_kv
    out = []
    for g in range(n_kv):
        m = sum(
            second[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd]
            for h in range(g * rep, (g + 1) * rep)
        )
        out.append(m)
    return out  # type: ignore[return-value]


def fit_bases(
    capture: Any,
    budget: float,
    *,
    key_mode: str = "pre_rope",
    metric: str = "none",
    value_metrics: Sequence[Sequence[torch.Tensor]] | None = None,
    rope_lags: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    allocation: str = "waterfill",
    normalise: str = "component",
    role: str = "model",
    fingerprint: str | None = None,
) -> KVBases:
    """The key and value coders of every layer from ``capture`` (sites k_pre or k_rope, v, and
    with the attention metric q_pre (pre_rope mode) or q_rope (the other modes); full
    covariances), ranks allocated under ``budget``.

    ``value_metrics[layer][kv_head]``: the (hd, hd) output metric of the values
    (:func:`gradfree.kv.fit.output_metrics`), required with ``metric="attention"``.
    ``rope_lags``: (cos, sin, weights) of the lags between a query and the keys it reads
    (:func:`gradfree.kv.fit.rope_lags`); with them the pre_rope key metric is the exact
    rotation average (:func:`rotation_averaged`), without them its pair-isotropic limit.
    ``normalise``: each spectrum is divided by its component's total (``component``: every head
    counts alike) or by the total of all keys, resp. all values (``kind``). ``fingerprint``
    (the model's config sha256) is recorded and checked when the bases load."""
    import torch

    from gradfree.base.numerics import f64

    budget = check_budget(budget)
    check_choice(key_mode, KEY_MODES, "key mode")
    check_choice(metric, METRICS, "metric")
    check_choice(allocation, ALLOCATIONS, "allocation")
    check_choice(normalise, NORMALISE, "normalisation")
    info, layers = _model_info(capture, role)
    n_layers, n_kv, hd = info["num_layers"], info["num_kv_heads"], info["head_dim"]
    n_q, d = info["num_heads"], n_kv * hd
    if sorted(layers) != list(range(n_layers)):
        raise GradfreeError("The capture must hold every layer of the model.")
    if key_mode in ("pairs", "complex") and hd % 2:
        raise GradfreeError(f"The {key_mode} key mode needs an even head dimension.")
    weighted = metric == "attention"
    if weighted and (value_metrics is None or len(value_metrics) != n_layers):
        raise GradfreeError("The attention metric needs the output metric of every layer.")
    comps: list[Component] = []
    means: dict[tuple[str, int], torch.Tensor] = {}
    for i in range(n_layers):
        k_st = _site_stats(capture, role, i, KEY_SITE[key_mode], d)
        q_m: list[torch.Tensor] | None = None
        if weighted:
            q_st = _site_stats(capture, role, i, QUERY_SITE[key_mode], n_q * hd)
            q_m = query_metrics(f64(q_st.second_moment()), n_kv, hd)
        # keys
        if key_mode == "complex":
            w = (
                None
                if q_m is None
                else torch.stack([pair_isotropic(torch.diagonal(m)) for m in q_m])
            )
            comps += complex_components(k_st.second_moment(), w, n_kv, hd, i)
            means[("k", i)] = torch.zeros(d, dtype=torch.float64)
        elif key_mode == "pairs":
            energy = torch.diagonal(f64(k_st.second_moment()))
            eye = torch.eye(hd, dtype=torch.float64)
            for g in range(n_kv):
                e = energy[g * hd : (g + 1) * hd]
                if q_m is not None:
                    e = e * pair_isotropic(torch.diagonal(q_m[g]))
                dims = pair_order(e)
                sel = eye[:, dims]
                comps.append(Component("k", i, g, e[dims], True, 1, _embed(sel.T, sel, g, hd, d)))
            means[("k", i)] = torch.zeros(d, dtype=torch.float64)
        else:
            cov, mean = f64(k_st.covariance(centered=True)), f64(k_st.mean())
            for g in range(n_kv):
                s = slice(g * hd, (g + 1) * hd)
                m = None
                if q_m is not None and key_mode == "post_rope":
                    m = q_m[g]
                elif q_m is not None and rope_lags is not None:
                    m = rotation_averaged(q_m[g], *rope_lags)
                elif q_m is not None:
                    m = torch.diag(pair_isotropic(torch.diagonal(q_m[g])))
                vals, rows, cols = weighted_pca(cov[s, s], m)
                comps.append(Component("k", i, g, vals, False, 1, _embed(rows, cols, g, hd, d)))
            means[("k", i)] = mean
        # values
        v_st = _site_stats(capture, role, i, "v", d)
        cov, mean = f64(v_st.covariance(centered=True)), f64(v_st.mean())
        for g in range(n_kv):
            s = slice(g * hd, (g + 1) * hd)
            m = None if value_metrics is None or not weighted else f64(value_metrics[i][g])
            vals, rows, cols = weighted_pca(cov[s, s], m)
            comps.append(Component("v", i, g, vals, False, 1, _embed(rows, cols, g, hd, d)))
        means[("v", i)] = mean
    groups: list[Hashable] = [
        c.kind if normalise == "kind" else (c.kind, c.layer, c.head) for c in comps
    ]
    ranks = allocate_ranks(
        [c.spectrum for c in comps],
        budget,
        allocation,
        paired=[c.paired for c in comps],
        floors=[c.floor for c in comps],
        groups=groups,
        shares=[c.share for c in comps],
    )
    coders: dict[str, list[LayerCoder]] = {"k": [], "v": []}
    for i in range(n_layers):
        for kind in ("k", "v"):
            mine = [
                (c, r) for c, r in zip(comps, ranks, strict=True) if c.kind == kind and c.layer == i
            ]
            parts = [c.make(r) for c, r in mine]
            enc = torch.cat([p[0] for p in parts], dim=0)
            dec = torch.cat([p[1] for p in parts], dim=1)
            per_head = all(c.head is not None for c, _ in mine)
            coders[kind].append(
                LayerCoder(
                    enc.to(torch.float32),
                    dec.to(torch.float32),
                    means[(kind, i)].to(torch.float32),
                    [r for _, r in mine] if per_head else None,
                    [c.spectrum.to(torch.float32) for c, _ in mine],
                )
            )
    model = {k: info[k] for k in ("model_type", "num_layers", "num_kv_heads", "head_dim")}
    return KVBases(
        key_mode,
        metric,
        hd,
        coders["k"],
        coders["v"],
        budget,
        allocation,
        {**model, "fingerprint": fingerprint},
    )


__all__ = [
    "KEY_SITE",
    "NORMALISE",
    "QUERY_SITE",
    "Component",
    "complex_components",
    "fit_bases",
    "metric_sqrt",
    "pair_isotropic",
    "pair_order",
    "query_metrics",
    "weighted_pca",
]
