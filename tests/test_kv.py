"""Low-rank KV caches (gradfree.kv) on tiny models, for both attention paths (``latent``:
gradfree_lowrank attention on the latents; ``reconstruct``: the model's attention on decoded
states) and both metrics: full rank reproduces the model, lower ranks return exactly what the
coders say, latent attention equals reconstruction, the coders commute with RoPE where the key
mode says so, the byte count is what is held, the cache follows crop / reorder / select, and
the files refuse what they should.

References are computed here from the captured statistics, the coder matrices and the model's
own rotary embedding (through the adapter), independently of the cache's code path.
"""

from __future__ import annotations

import gc
import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject, hook_count, run_capture
from gradfree.kv import (
    KEY_MODES,
    KVBases,
    LayerCoder,
    LowRankCache,
    allocate_ranks,
    check_budget,
    fit_bases,
)
from gradfree.kv.fit import output_metrics, rope_lags
from gradfree.models import config_fingerprint
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("qwen2", "qwen3", "llama")
ATTENTIONS = ("latent", "reconstruct")
METRICS = ("none", "attention")
SITES = ["k_pre", "k_rope", "v", "q_pre", "q_rope"]
PAD = 258
D64 = torch.float64


@dataclass
class Doc:
    id: str
    text: str


DOCS = [
    Doc(f"d{i}", f"Keys and values of document {i}: code `x = y + {i}`, ünïcode, {i * 37}. " * 2)
    for i in range(6)
]


@dataclass
class Captured:
    model: Any
    cap: Any
    value_metrics: list[list[torch.Tensor]]
    lags: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def fit(self, budget: float, mode: str, metric: str = "none", **kw: Any) -> KVBases:
        extra: dict[str, Any] = {}
        if metric == "attention":
            extra = {"value_metrics": self.value_metrics, "rope_lags": self.lags}
        return fit_bases(self.cap, budget, key_mode=mode, metric=metric, **extra, **kw)


def _capture(model: Any, out: Path, sites: list[str], **cfg: Any) -> Any:
    config = {"sites": sites, "max_length": 32, **cfg}
    return run_capture(
        Subject(model, tiny_tokenizer(), name="tiny"), DOCS, out, config, progress=False
    )


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Captured]:
    out = {}
    for family in FAMILIES:
        model = tiny_model(family).eval()
        cap = _capture(model, tmp_path_factory.mktemp(family) / "cap", SITES, full=SITES)
        out[family] = Captured(model, cap, output_metrics(model), rope_lags(model, 32))
    return out


def _sdpa(model: Any) -> Any:
    """The model back on sdpa attention (a latent cache switches it to gradfree_lowrank)."""
    model.set_attn_implementation("sdpa")
    return model


def _ids(batch: int = 2, tokens: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, tokens), generator=g)


def _padded(tokens: int = 12, pad: int = 4, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two whose second row is left-padded by ``pad`` tokens, and its mask."""
    ids = _ids(2, tokens, seed)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = PAD, 0
    return ids, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CHUNKS = ((0, 7), (7, 11), (11, 12))
SIX = ((0, 4), (4, 6))


@torch.no_grad()
def _chunked(
    model: Any,
    ids: torch.Tensor,
    cache: Any,
    mask: torch.Tensor | None = None,
    chunks: tuple[tuple[int, int], ...] = CHUNKS,
) -> torch.Tensor:
    """Logits of ``ids`` fed chunk by chunk through ``cache`` (positions from the mask)."""
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)
    rows = []
    for a, b in chunks:
        kw: dict[str, Any] = {}
        if mask is not None and pos is not None:
            kw = {"attention_mask": mask[:, :b], "position_ids": pos[:, a:b]}
        rows.append(model(ids[:, a:b], past_key_values=cache, use_cache=True, **kw).logits)
    return torch.cat(rows, dim=1)


# full rank ------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("mode", KEY_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_reproduces_forward_logits(
    captured: dict[str, Captured], family: str, mode: str, attention: str, metric: str
) -> None:
    """Fed in three chunks through the cache, the logits equal one plain forward pass."""
    c = captured[family]
    bases = c.fit(1.0, mode, metric)
    d = bases.num_kv_heads * bases.head_dim
    assert bases.ranks() == {"keys": [d, d], "values": [d, d]}
    ids = _ids()
    with torch.no_grad():
        ref = _sdpa(c.model)(ids).logits
    cache = LowRankCache(bases, c.model, attention=attention)
    got = _chunked(c.model, ids, cache)
    assert cache.get_seq_length() == 12
    assert _rel(got, ref) <= 1e-5


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("mode", KEY_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_greedy_generate_equals_dynamic_cache(
    captured: dict[str, Captured], family: str, mode: str, attention: str
) -> None:
    """Greedy tokens of a left-padded batch are those of the model's own DynamicCache."""
    c = captured[family]
    bases = c.fit(1.0, mode)
    ids, mask = _padded(10, 3)
    kw: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        want = _sdpa(c.model).generate(
            ids, attention_mask=mask, past_key_values=DynamicCache(config=c.model.config), **kw
        )
        cache = LowRankCache(bases, c.model, attention=attention)
        got = c.model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    assert got.shape[1] > ids.shape[1]
    assert torch.equal(got, want)


# lower ranks: what the coders define -----------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(b, heads, t, hd) → (b, t, heads · hd)."""
    b, n, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, n * hd)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(b, t, heads · hd) → (b, heads, t, hd)."""
    b, t, d = x.shape
    return x.reshape(b, t, n, d // n).transpose(1, 2)


def _encode(x: torch.Tensor, c: LayerCoder) -> torch.Tensor:
    """z = (x − μ) Eᵀ in float64 for flat x (b, t, d)."""
    return (x.double() - c.mean.double()) @ c.encoder.double().T


def _decode(z: torch.Tensor, c: LayerCoder) -> torch.Tensor:
    return z @ c.decoder.double().T + c.mean.double()


def _cos_sin(model: Any, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own (cos, sin) (b, 1, t, hd) at ``pos`` in float64, through the adapter."""
    cos, sin = get_adapter(model).rotary(torch.empty(0), pos)
    return cos.double().unsqueeze(1), sin.double().unsqueeze(1)


class _Spy:
    """Wraps one cache layer's update: records what went in and what came out."""

    def __init__(self, layer: Any) -> None:
        self.update = layer.update
        self.seen: list[tuple[torch.Tensor, ...]] = []
        layer.update = self

    def __call__(self, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any) -> Any:
        kh, vh = self.update(k, v, *a, **kw)
        self.seen.append((k, v, kh, vh))
        return kh, vh


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_partial_rank_returns_what_the_coders_define(
    captured: dict[str, Captured], mode: str, metric: str
) -> None:
    """Below full rank every layer returns x̂ = D E (x − μ) + μ of all tokens seen so far (keys
    taken before RoPE and turned back in pre_rope mode); on the latent path it hands attention
    exactly the latents E (x − μ)."""
    from gradfree.kv.attention import MARK

    c = captured["qwen3"]
    bases = c.fit(0.4, mode, metric)
    d = bases.num_kv_heads * bases.head_dim
    assert any(r < d for r in bases.ranks()["keys"])
    ids = _ids(2, 9, seed=3)
    kc, vc = bases.keys[1], bases.values[1]
    for attention in ATTENTIONS:
        cache = LowRankCache(bases, c.model, attention=attention)
        spy = _Spy(cache.layers[1])
        _chunked(c.model, ids, cache, chunks=((0, 5), (5, 9)))
        keys = _flat(torch.cat([s[0] for s in spy.seen], dim=2).double())
        values = _flat(torch.cat([s[1] for s in spy.seen], dim=2).double())
        cos = sin = None
        if mode == "pre_rope":
            cos, sin = _cos_sin(c.model, torch.arange(9).expand(2, 9))
            rot = _heads(keys, bases.num_kv_heads)
            keys = _flat(rot * cos - _rotate_half(rot) * sin)  # the inverse rotation (scale 1)
        z_k, z_v = _encode(keys, kc), _encode(values, vc)
        want_k = _heads(_decode(z_k, kc), bases.num_kv_heads)
        if cos is not None and sin is not None:
            want_k = want_k * cos + _rotate_half(want_k) * sin
        want_v = _heads(_decode(z_v, vc), bases.num_kv_heads)
        k_out, v_out = spy.seen[-1][2], spy.seen[-1][3]
        if attention == "reconstruct":
            torch.testing.assert_close(k_out.double(), want_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v_out.double(), want_v, rtol=1e-5, atol=1e-5)
            assert (
                _rel(k_out, _heads(keys, bases.num_kv_heads)) > 1e-3
            )  # the low rank did drop something
        else:
            lat_k, lat_v, k_full = getattr(v_out, MARK)
            torch.testing.assert_close(lat_k.latents.double(), z_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lat_v.latents.double(), z_v, rtol=1e-5, atol=1e-5)
            if mode == "pre_rope":  # attention reads reconstructed, re-rotated keys
                torch.testing.assert_close(k_full.double(), want_k, rtol=1e-5, atol=1e-5)
            else:  # attention reads the key latents; nothing is reconstructed
                assert k_full is None and k_out.numel() == 0
    _sdpa(c.model)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_coders_commute_with_rope_where_the_mode_says(
    captured: dict[str, Captured], mode: str, metric: str
) -> None:
    """pairs and complex: encode(R_n k) is encode(k) with each latent pair turned by its
    frequency's angle, so decode(encode(R_n k)) = R_n decode(encode(k)); post_rope and
    pre_rope coders at partial rank do not commute (the check can fail)."""
    c = captured["llama"]
    bases = c.fit(0.4, mode, metric)
    n_kv, hd = bases.num_kv_heads, bases.head_dim
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(1, n_kv, 6, hd, generator=g, dtype=D64)
    pos = torch.tensor([[3, 17, 40, 101, 150, 255]])
    cos, sin = _cos_sin(c.model, pos)
    a = get_adapter(c.model)
    turned = a.apply_rope(keys, cos[:, 0], sin[:, 0])
    for coder in bases.keys:
        assert coder.rank < n_kv * hd
        z, z_rot = _encode(_flat(keys), coder), _encode(_flat(turned), coder)
        back = _heads(_decode(z, coder), n_kv)
        back_rot = _heads(_decode(z_rot, coder), n_kv)
        rot_back = a.apply_rope(back, cos[:, 0], sin[:, 0])
        if mode not in ("pairs", "complex"):
            assert _rel(back_rot, rot_back) > 1e-3
            continue
        assert torch.count_nonzero(coder.mean) == 0  # RoPE moves any mean: none is kept
        torch.testing.assert_close(back_rot, rot_back, atol=1e-5, rtol=1e-5)
        e = coder.encoder
        for k in range(coder.rank // 2):
            cols = torch.nonzero(e[2 * k : 2 * k + 2].abs().sum(0)).flatten() % hd
            freqs = set((cols % (hd // 2)).tolist())
            assert len(freqs) == 1, "a latent pair reads one RoPE frequency"
            j = freqs.pop()
            phase = torch.complex(cos[0, 0, :, j], sin[0, 0, :, j])
            want = torch.complex(z[0, :, 2 * k], z[0, :, 2 * k + 1]) * phase
            torch.testing.assert_close(z_rot[0, :, 2 * k], want.real, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(z_rot[0, :, 2 * k + 1], want.imag, atol=1e-5, rtol=1e-5)


CASES = [
    ("qwen3", "none"),
    ("qwen3", "attention"),
    ("qwen2", "attention"),
    ("llama", "none"),
]


@pytest.mark.parametrize(("family", "metric"), CASES)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_latent_attention_equals_reconstruction_at_partial_rank(
    captured: dict[str, Captured], mode: str, family: str, metric: str
) -> None:
    """Scores on the key latents and attention over the value latents give the logits of the
    model's own attention on the reconstructed states: plain and left-padded batches."""
    c = captured[family]
    bases = c.fit(0.5, mode, metric)
    for ids, mask in ((_ids(), None), _padded()):
        want = _chunked(
            _sdpa(c.model), ids, LowRankCache(bases, c.model, attention="reconstruct"), mask
        )
        got = _chunked(c.model, ids, LowRankCache(bases, c.model, attention="latent"), mask)
        assert c.model.config._attn_implementation == "gradfree_lowrank"
        with torch.no_grad():
            dense = _sdpa(c.model)(ids, attention_mask=mask).logits
        assert _rel(want, dense) > 1e-2  # the rank is low enough to matter
        # padded query positions attend to nothing; their logits are not compared
        keep = slice(None) if mask is None else mask.bool()
        assert _rel(got[keep], want[keep]) <= 1e-5


@pytest.mark.parametrize("mode", KEY_MODES)
def test_latent_greedy_generate_equals_reconstruction(
    captured: dict[str, Captured], mode: str
) -> None:
    c = captured["llama"]
    bases = c.fit(0.5, mode, "attention")
    ids, mask = _padded(10, 3)
    kw: dict[str, Any] = {
        "max_new_tokens": 8,
        "do_sample": False,
        "pad_token_id": PAD,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    out = {}
    for attention in ("reconstruct", "latent"):
        model = _sdpa(c.model)
        cache = LowRankCache(bases, model, attention=attention)
        with torch.no_grad():
            out[attention] = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    _sdpa(c.model)
    assert torch.equal(out["latent"].sequences, out["reconstruct"].sequences)
    got, want = torch.stack(out["latent"].scores), torch.stack(out["reconstruct"].scores)
    assert _rel(got, want) <= 1e-5


def test_a_switched_model_still_works_with_other_caches() -> None:
    """gradfree_lowrank is sdpa for any other cache: a DynamicCache gives the logits and greedy
    tokens of an sdpa model; reconstruct leaves the attention implementation as it was."""
    from gradfree.kv.attention import NAME

    plain: Any = tiny_model("qwen2")
    switched: Any = tiny_model("qwen2")
    ids, mask = _padded()
    bases = KVBases(
        "post_rope",
        "none",
        16,
        [_identity(32) for _ in range(2)],
        [_identity(32) for _ in range(2)],
        1.0,
        "waterfill",
        {"model_type": "qwen2", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16},
    )
    LowRankCache(bases, switched, attention="reconstruct")
    assert switched.config._attn_implementation == "sdpa"
    LowRankCache(bases, switched)
    assert switched.config._attn_implementation == NAME
    assert plain.config._attn_implementation == "sdpa"
    with torch.no_grad():
        for mk in (None, mask):
            want = _chunked(plain, ids, DynamicCache(config=plain.config), mk)
            got = _chunked(switched, ids, DynamicCache(config=switched.config), mk)
            assert torch.equal(got, want)
            assert torch.equal(
                switched(ids, attention_mask=mk).logits, plain(ids, attention_mask=mk).logits
            )
        kw: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
        assert torch.equal(
            switched.generate(ids, attention_mask=mask, **kw),
            plain.generate(ids, attention_mask=mask, **kw),
        )


def _identity(d: int) -> LayerCoder:
    """A full-rank per-head identity coder of two heads (hand-made bases, no capture)."""
    return LayerCoder(torch.eye(d), torch.eye(d), torch.zeros(d), [d // 2, d // 2], [])


# bytes, int8 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", KEY_MODES)
def test_half_budget_holds_half_the_bytes(captured: dict[str, Captured], mode: str) -> None:
    c = captured["qwen2"]
    bases = c.fit(0.5, mode)
    ids = _ids(2, 12)
    dense = DynamicCache(config=c.model.config)
    with torch.no_grad():
        _sdpa(c.model)(ids, past_key_values=dense, use_cache=True)
    held: list[Any] = [x for lay in dense.layers for x in (lay.keys, lay.values)]  # type: ignore[union-attr]
    dense_bytes = sum(x.numel() * x.element_size() for x in held)
    ranks = sum(r for kind in bases.ranks().values() for r in kind)
    n_kv, hd = bases.num_kv_heads, bases.head_dim
    total = 2 * bases.model["num_layers"] * n_kv * hd
    assert ranks == math.floor(0.5 * total) and bases.kept_share() == ranks / total
    positions = 2 * 12 * 8 if mode == "pre_rope" else 0  # int64 per cached token
    coders = bases.keys + bases.values
    for attention in ATTENTIONS:
        cache = LowRankCache(bases, c.model, attention=attention)
        with torch.no_grad():
            c.model(ids, past_key_values=cache, use_cache=True)
        assert cache.nbytes() == ranks * 2 * 12 * 4 + positions
        assert cache.nbytes() - positions <= 0.5 * dense_bytes
        per_layer = [co.encoder.numel() + co.decoder.numel() + co.mean.numel() for co in coders]
        assert cache.bases_nbytes() == 4 * sum(per_layer)
    _sdpa(c.model)


def test_int8_latents_are_close_and_counted(captured: dict[str, Captured]) -> None:
    """``latent_bits=8``: int8 latents with a float16 scale per token and head block (per token
    for mixing coders); logits stay close to the model's, both attention paths see the same
    latents, and the bytes are R + 2 · blocks per token (plus positions)."""
    c = captured["qwen2"]
    ids = _ids(2, 12)
    with torch.no_grad():
        ref = _sdpa(c.model)(ids).logits
    for mode in KEY_MODES:
        bases = c.fit(1.0, mode)
        got = {}
        for attention in ATTENTIONS:
            cache = LowRankCache(bases, c.model, latent_bits=8, attention=attention)
            got[attention] = _chunked(c.model, ids, cache)
            assert 0 < _rel(got[attention], ref) < 0.02
            blocks = [
                1 if co.head_ranks is None else len(co.head_ranks)
                for co in bases.keys + bases.values
            ]
            if mode == "complex":
                assert all(co.head_ranks is None for co in bases.keys)
            rows = sum(
                co.rank + 2 * n for co, n in zip(bases.keys + bases.values, blocks, strict=True)
            )
            positions = 2 * 12 * 8 if mode == "pre_rope" else 0
            assert cache.nbytes() == rows * 2 * 12 + positions
            layer: Any = cache.layers[0]
            store = layer.latent_keys
            assert store.data.dtype == torch.int8 and store.scales.dtype == torch.float16
        assert _rel(got["latent"], got["reconstruct"]) <= 1e-5
        _sdpa(c.model)
    with pytest.raises(GradfreeError, match="latent_bits"):
        LowRankCache(bases, c.model, latent_bits=3)


# the fitted coders ----------------------------------------------------------------------------
def _query_metric(cap: Any, layer: int, site: str, n_kv: int, hd: int) -> list[torch.Tensor]:
    """Σ over each KV group's query heads of E[q qᵀ] (hd, hd), from the capture."""
    q = cap.stats("model", f"blocks.{layer}.{site}").second_moment().double()
    rep = q.shape[0] // hd // n_kv
    return [
        sum(q[h * hd : (h + 1) * hd, h * hd : (h + 1) * hd] for h in range(g * rep, (g + 1) * rep))
        for g in range(n_kv)
    ]  # type: ignore[misc]


@pytest.mark.parametrize("metric", METRICS)
def test_pairs_keep_whole_rope_pairs(captured: dict[str, Captured], metric: str) -> None:
    c = captured["llama"]
    bases = c.fit(0.3, "pairs", metric)
    n_kv, hd = bases.num_kv_heads, bases.head_dim
    for i, coder in enumerate(bases.keys):
        energy = torch.diagonal(c.cap.stats("model", f"blocks.{i}.k_rope").second_moment())
        q_m = _query_metric(c.cap, i, "q_rope", n_kv, hd) if metric == "attention" else None
        assert coder.head_ranks is not None
        assert torch.equal(coder.decoder, coder.encoder.T)
        for h, cols in enumerate(coder.head_slices() or []):
            r = coder.head_ranks[h]
            assert r % 2 == 0 and r >= 2
            rows = coder.encoder[cols]
            dims = rows.argmax(dim=1)
            assert torch.equal(rows, torch.eye(n_kv * hd)[dims])  # plain dim selection
            assert bool(((dims >= h * hd) & (dims < (h + 1) * hd)).all())  # of head h only
            dims = dims - h * hd
            lo, hi = dims[0::2], dims[1::2]
            assert torch.equal(hi, lo + hd // 2)  # whole (j, j + h/2) pairs, consecutive
            e = energy[h * hd : (h + 1) * hd].double()
            if q_m is not None:  # weighted by the queries' pair-averaged energy
                w = torch.diagonal(q_m[h])
                e = e * torch.cat([(w[: hd // 2] + w[hd // 2 :]) / 2] * 2)
            pair = e[: hd // 2] + e[hd // 2 :]
            kept = set(lo.tolist())
            assert pair[lo].min() >= max(float(pair[j]) for j in range(hd // 2) if j not in kept)


def test_pca_coders_are_eigenvectors_of_the_captured_covariance(
    captured: dict[str, Captured],
) -> None:
    c = captured["qwen2"]
    bases = c.fit(0.5, "pre_rope", allocation="uniform")
    hd = bases.head_dim
    all_ranks = []
    for kind, site in (("keys", "k_pre"), ("values", "v")):
        for i, coder in enumerate(getattr(bases, kind)):
            st = c.cap.stats("model", f"blocks.{i}.{site}")
            torch.testing.assert_close(coder.mean.double(), st.mean(), atol=1e-6, rtol=0)
            assert torch.equal(coder.decoder, coder.encoder.T)
            assert coder.head_ranks is not None
            all_ranks += coder.head_ranks
            for h, cols in enumerate(coder.head_slices() or []):
                s = slice(h * hd, (h + 1) * hd)
                p = coder.decoder[:, cols].double()
                assert float(p[: h * hd].abs().sum() + p[(h + 1) * hd :].abs().sum()) == 0
                p = p[s]
                r = p.shape[1]
                torch.testing.assert_close(p.T @ p, torch.eye(r, dtype=D64), atol=1e-6, rtol=0)
                lam = torch.linalg.eigvalsh(st.covariance()[s, s]).flip(0)[:r]
                cov = st.covariance()[s, s]
                torch.testing.assert_close(cov @ p, p * lam, atol=1e-5 * float(lam[0]), rtol=0)
    assert max(all_ranks) - min(all_ranks) <= 1


def _m_error(cov: torch.Tensor, m: torch.Tensor, e: torch.Tensor, d: torch.Tensor) -> float:
    res = torch.eye(cov.shape[0], dtype=D64) - d @ e
    return float(torch.trace(m @ res @ cov @ res.T))


def test_attention_metric_coders_minimise_the_weighted_error(
    captured: dict[str, Captured],
) -> None:
    """post_rope keys in M = Σ_group E[q qᵀ] (post-RoPE queries), values in M = Σ_group W_oᵀ W_o
    (the model's o_proj): each head's coder loses exactly the dropped eigenvalues of M C, less
    than plain PCA of the same rank does in that metric."""
    c = captured["qwen3"]
    bases = c.fit(0.5, "post_rope", "attention")
    n_kv, hd = bases.num_kv_heads, bases.head_dim
    n_q = c.model.config.num_attention_heads
    beaten = 0
    for i in range(bases.model["num_layers"]):
        w_o = c.model.model.layers[i].self_attn.o_proj.weight.detach().double()
        rep = n_q // n_kv
        v_m = [
            sum(
                w_o[:, h * hd : (h + 1) * hd].T @ w_o[:, h * hd : (h + 1) * hd]
                for h in range(g * rep, (g + 1) * rep)
            )
            for g in range(n_kv)
        ]
        q_m = _query_metric(c.cap, i, "q_rope", n_kv, hd)
        for coder, site, metrics in ((bases.keys[i], "k_rope", q_m), (bases.values[i], "v", v_m)):
            cov = c.cap.stats("model", f"blocks.{i}.{site}").covariance().double()
            for h, cols in enumerate(coder.head_slices() or []):
                s = slice(h * hd, (h + 1) * hd)
                m, cv = metrics[h].double(), cov[s, s]  # type: ignore[union-attr]
                e, d = coder.encoder[cols, s].double(), coder.decoder[s, cols].double()
                r = e.shape[0]
                err = _m_error(cv, m, e, d)
                vals = torch.linalg.eigvals(m @ cv).real.sort(descending=True).values
                assert err == pytest.approx(float(vals[r:].sum()), rel=1e-3)
                u = torch.linalg.eigh(cv).eigenvectors.flip(1)[:, :r]
                plain = _m_error(cv, m, u.T, u)
                assert err <= plain * (1 + 1e-6)
                beaten += err < plain * (1 - 1e-3)
    assert beaten > 0


# cache operations -----------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_crop_then_continue_equals_the_kept_prefix(
    captured: dict[str, Captured], mode: str, attention: str
) -> None:
    c = captured["qwen3"]
    bases = c.fit(0.5, mode)
    ids = _ids(2, 13, seed=6)
    cropped = LowRankCache(bases, c.model, attention=attention)
    _chunked(c.model, ids[:, :9], cropped, chunks=((0, 5), (5, 9)))
    cropped.crop(-3)
    assert cropped.get_seq_length() == 6
    kept = LowRankCache(bases, c.model, attention=attention)
    _chunked(c.model, ids[:, :6], kept, chunks=((0, 6),))
    assert cropped.nbytes() == kept.nbytes()
    rest = ((0, 3), (3, 7))
    got = _chunked(c.model, ids[:, 6:], cropped, chunks=rest)
    want = _chunked(c.model, ids[:, 6:], kept, chunks=rest)
    assert _rel(got, want) <= 1e-5
    cropped.crop(-100)  # everything: an empty cache that fills again
    assert cropped.get_seq_length() == 0 and cropped.nbytes() == 0
    fresh = LowRankCache(bases, c.model, attention=attention)
    again = _chunked(c.model, ids[:, :5], cropped, chunks=((0, 5),))
    assert _rel(again, _chunked(c.model, ids[:, :5], fresh, chunks=((0, 5),))) <= 1e-5
    with pytest.raises(ValueError, match="negative"):
        cropped.crop(2)
    _sdpa(c.model)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_reorder_select_and_repeat_follow_the_batch(
    captured: dict[str, Captured], mode: str, attention: str
) -> None:
    """After reorder_cache / batch_select_indices / batch_repeat_interleave the cache continues
    as one built from the reordered batch; the left padding of one row makes the positions
    differ per row, so in pre_rope mode they must follow."""
    c = captured["qwen2"]
    bases = c.fit(0.5, mode)
    ids, mask = _padded(11, 3, seed=7)
    first, rest = ((0, 6),), ((6, 9), (9, 11))

    def run(order: list[int], op: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cache = LowRankCache(bases, c.model, attention=attention)
        _chunked(c.model, ids, cache, mask, first)
        op(cache)
        got = _chunked(c.model, ids[order], cache, mask[order], rest)[:, -5:]
        ref = LowRankCache(bases, c.model, attention=attention)
        want = _chunked(c.model, ids[order], ref, mask[order], first + rest)[:, -5:]
        assert cache.nbytes() == ref.nbytes()
        return got, want

    for order, op in (
        ([1, 0], lambda k: k.reorder_cache(torch.tensor([1, 0]))),
        ([1], lambda k: k.batch_select_indices(torch.tensor([1]))),
        ([0, 0, 1, 1], lambda k: k.batch_repeat_interleave(2)),
    ):
        got, want = run(order, op)
        assert _rel(got, want) <= 1e-5, order
    _sdpa(c.model)


# allocation -----------------------------------------------------------------------------------
def _spectrum(rng: random.Random, hd: int) -> torch.Tensor:
    decay = rng.uniform(0.05, 3.0)
    vals = [
        rng.uniform(0.5, 1.5) * math.exp(-decay * j) * rng.choice([1.0, 10.0]) for j in range(hd)
    ]
    return torch.tensor(sorted(vals, reverse=True), dtype=D64)


def test_allocate_ranks_meets_the_budget_exactly() -> None:
    rng = random.Random(0)
    for _ in range(300):
        hd = rng.choice([2, 4, 8, 16])
        n = rng.randint(1, 12)
        spectra = [_spectrum(rng, hd) for _ in range(n)]
        paired = [rng.random() < 0.5 for _ in range(n)] if rng.random() < 0.5 else None
        flags = paired or [False] * n
        need = sum(2 if p else 1 for p in flags)
        budget = rng.uniform(need / (n * hd), 1.0)
        target = math.floor(budget * n * hd)
        for allocation in ("waterfill", "uniform"):
            try:
                ranks = allocate_ranks(spectra, budget, allocation, paired=paired)
            except GradfreeError as e:
                # Only all-paired components with an odd target cannot be met.
                assert all(flags) and target % 2 == 1, str(e)
                continue
            assert sum(ranks) == target
            for r, p in zip(ranks, flags, strict=True):
                assert (2 if p else 1) <= r <= hd
                assert not p or r % 2 == 0
            if allocation == "uniform" and not any(flags):
                assert max(ranks) - min(ranks) <= 1


def test_waterfill_keeps_the_largest_normalised_eigenvalues() -> None:
    """Without pairs the greedy equals sorting: every component's first eigenvalue, then the
    largest of all the others, trace-normalised."""
    rng = random.Random(1)
    for _ in range(100):
        hd, n = rng.choice([4, 8, 16]), rng.randint(2, 10)
        spectra = [_spectrum(rng, hd) for _ in range(n)]
        budget = rng.uniform(1 / hd, 1.0)
        ranks = allocate_ranks(spectra, budget, "waterfill")
        norm = [s / s.sum() for s in spectra]
        rest = sorted((float(v) for s in norm for v in s[1:]), reverse=True)
        best = sum(float(s[0]) for s in norm) + sum(rest[: sum(ranks) - n])
        kept = sum(float(s[:r].sum()) for s, r in zip(norm, ranks, strict=True))
        assert kept == pytest.approx(best, rel=1e-12)
        uniform = allocate_ranks(spectra, budget, "uniform")
        assert kept >= sum(float(s[:r].sum()) for s, r in zip(norm, uniform, strict=True)) - 1e-12


def test_waterfill_follows_the_spectra() -> None:
    flat = torch.ones(8, dtype=D64)
    peaked = torch.tensor([100.0] + [1e-3] * 7, dtype=D64)
    assert allocate_ranks([flat, peaked], 0.5, "waterfill") == [7, 1]
    assert allocate_ranks([flat, peaked], 0.5, "uniform") == [4, 4]


def test_allocation_errors() -> None:
    s = [torch.ones(4, dtype=D64)] * 3
    with pytest.raises(GradfreeError, match="fewer than the 3 needed"):
        allocate_ranks(s, 0.2, "waterfill")
    with pytest.raises(GradfreeError, match="allocation must be one of"):
        allocate_ranks(s, 0.5, "greedy")


# errors, files --------------------------------------------------------------------------------
def _one_sentence(e: pytest.ExceptionInfo[GradfreeError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    return msg


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.0001, 2, float("nan"), "half", None, True])
def test_check_budget_refuses(bad: Any) -> None:
    with pytest.raises(GradfreeError) as e:
        check_budget(bad)
    assert _one_sentence(e) == f"The budget must be in (0, 1], not {bad}."


def test_check_budget_accepts() -> None:
    assert check_budget(1) == 1.0 and check_budget("0.25") == 0.25


def test_bad_inputs_are_one_sentence_and_write_nothing(
    captured: dict[str, Captured], tmp_path: Path
) -> None:
    c = captured["qwen2"]
    out = tmp_path / "kv"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"budget": 1.5}, "budget"),
        ({"budget": 0.5, "key_mode": "rotated"}, "key mode must be one of"),
        ({"budget": 0.5, "metric": "cosine"}, "metric must be one of"),
        ({"budget": 0.5, "allocation": "greedy"}, "allocation must be one of"),
        ({"budget": 0.5, "normalise": "global"}, "normalisation must be one of"),
        ({"budget": 0.5, "metric": "attention"}, "output metric of every layer"),
        ({"budget": 0.01}, "raise the budget"),
    ]
    for kwargs, message in bad:
        with pytest.raises(GradfreeError, match=message) as e:
            fit_bases(c.cap, **kwargs).save(out)
        _one_sentence(e)
    assert not out.exists()
    partial = _capture(c.model, tmp_path / "partial", ["k_pre", "v"], diagonal=["v"])
    missing: list[tuple[dict[str, Any], str]] = [
        ({"key_mode": "post_rope"}, r"no statistics for blocks\.0\.k_rope"),
        ({"key_mode": "pre_rope"}, r"blocks\.0\.v needs a full covariance"),
        (
            {"key_mode": "pre_rope", "metric": "attention", "value_metrics": c.value_metrics},
            r"no statistics for blocks\.0\.q_pre",
        ),
    ]
    for kwargs, message in missing:
        with pytest.raises(GradfreeError, match=message) as e:
            fit_bases(partial, 0.5, **kwargs)
        _one_sentence(e)
    entry = c.cap.manifest["roles"]["model"]
    old, entry["model_type"] = entry["model_type"], "gpt2"
    try:
        with pytest.raises(GradfreeError, match="not supported"):
            fit_bases(c.cap, 0.5)
    finally:
        entry["model_type"] = old
    bases = fit_bases(c.cap, 0.5)
    with pytest.raises(GradfreeError):
        LowRankCache(bases, torch.nn.Linear(2, 2))
    fresh = tiny_model("qwen2")
    with pytest.raises(GradfreeError, match="attention must be one of") as e:
        LowRankCache(bases, fresh, attention="fused")
    _one_sentence(e)
    with pytest.raises(GradfreeError, match="latent_bits must be") as e:
        LowRankCache(bases, fresh, latent_bits=3)
    _one_sentence(e)
    assert fresh.config._attn_implementation == "sdpa"  # refused before switching


@pytest.mark.parametrize(("mode", "metric"), [("pre_rope", "attention"), ("complex", "none")])
def test_save_load_round_trip_and_another_model(
    captured: dict[str, Captured], tmp_path: Path, mode: str, metric: str
) -> None:
    c = captured["qwen3"]
    model = c.model
    bases = c.fit(0.5, mode, metric, fingerprint=config_fingerprint(model.config))
    bases.save(tmp_path / "kv")
    back = KVBases.load(tmp_path / "kv", model)
    assert back.ranks() == bases.ranks() and back.model == bases.model
    assert back.head_ranks() == bases.head_ranks()
    assert (back.key_mode, back.metric, back.budget, back.allocation) == (
        mode,
        metric,
        0.5,
        "waterfill",
    )
    for a, b in zip(bases.keys + bases.values, back.keys + back.values, strict=True):
        for name in ("encoder", "decoder", "mean"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert len(a.spectra) == len(b.spectra)
        assert all(torch.equal(x, y) for x, y in zip(a.spectra, b.spectra, strict=True))
    ids = _ids(1, 6)
    for attention in ATTENTIONS:
        one = _chunked(model, ids, LowRankCache(bases, model, attention=attention), chunks=SIX)
        cache = LowRankCache.from_dir(tmp_path / "kv", model, attention=attention)
        assert torch.equal(one, _chunked(model, ids, cache, chunks=SIX))
    _sdpa(model)
    others = [
        tiny_model("qwen3", num_hidden_layers=3),
        tiny_model("qwen3", num_key_value_heads=1),
        tiny_model("llama"),
        tiny_model("qwen3", rope_theta=500.0),  # same shapes, another config fingerprint
    ]
    for other in others:
        with pytest.raises(GradfreeError, match="fitted for another model") as e:
            LowRankCache.from_dir(tmp_path / "kv", other)
        _one_sentence(e)
        assert other.config._attn_implementation == "sdpa"  # refused before switching
    with pytest.raises(GradfreeError, match="does not exist"):
        KVBases.load(tmp_path / "missing", model)


def test_damaged_bases_are_refused_in_one_sentence(
    captured: dict[str, Captured], tmp_path: Path
) -> None:
    c = captured["qwen2"]
    folder = c.fit(0.5, "pairs").save(tmp_path / "kv")
    meta_path, tensors = folder / "bases.json", folder / "bases.safetensors"
    meta, data = json.loads(meta_path.read_text()), tensors.read_bytes()
    # flipped bytes in the middle of the tensors
    mid = len(data) // 2
    tensors.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 8]) + data[mid + 8 :])
    with pytest.raises(GradfreeError, match="corrupted") as e:
        KVBases.load(folder, c.model)
    _one_sentence(e)
    tensors.write_bytes(data)
    assert KVBases.load(folder).ranks() == c.fit(0.5, "pairs").ranks()
    # bases.json of the old format (per-head bases, gradfree.kv-bases/1)
    old = {k: v for k, v in meta.items() if k not in ("head_ranks", "metric")}
    old["format"] = "gradfree.kv-bases/1"
    meta_path.write_text(json.dumps(old))
    with pytest.raises(GradfreeError, match=r"format gradfree\.kv-bases/2") as e:
        KVBases.load(folder)
    _one_sentence(e)
    # a description that lacks a field, or whose ranks do not fit the tensors' shapes
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "head_ranks"}))
    with pytest.raises(GradfreeError, match="incomplete") as e:
        KVBases.load(folder)
    _one_sentence(e)
    lying = json.loads(json.dumps(meta))
    lying["head_ranks"]["values"][0] = [r + 1 for r in lying["head_ranks"]["values"][0]]
    meta_path.write_text(json.dumps(lying))
    with pytest.raises(GradfreeError, match="inconsistent") as e:
        KVBases.load(folder)
    _one_sentence(e)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with pytest.raises(GradfreeError, match="does not record the hash") as e:
        KVBases.load(folder)
    _one_sentence(e)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_rotary_hook_goes_with_the_last_cache(
    captured: dict[str, Captured], attention: str
) -> None:
    c = captured["llama"]
    bases = c.fit(0.5, "pre_rope")
    gc.collect()  # caches of earlier tests
    before = hook_count(c.model)
    caches = [LowRankCache(bases, c.model, attention=attention) for _ in range(2)]
    assert hook_count(c.model) == before + 1  # one hook per model, shared
    _chunked(c.model, _ids(), caches[0])
    del caches
    gc.collect()
    assert hook_count(c.model) == before
    _sdpa(c.model)


def test_import_is_light() -> None:
    code = (
        "import sys, gradfree.kv; "
        "print(*[m in sys.modules for m in "
        "('gradfree.kv.cache', 'gradfree.kv.attention', 'torch', 'transformers')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * 4
