"""The KV-cache scoring protocol (gradfree.kv.evaluate) on tiny models: dense against itself is
exact and agrees with gradfree's reference perplexity, chunking changes nothing for the dense
cache, a lossy cache costs KL, and the byte count is what each cache holds (DynamicCache,
QuantizedCache's fp8, quanto and HQQ backends, the low-rank cache), computed here from shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache, QuantizedCache

from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject, run_capture
from gradfree.evaluation.reference import teacher_reference
from gradfree.kv.evaluate import cache_bytes, chunked_logits, score_caches
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Doc:
    id: str
    text: str


DOCS = [
    Doc(f"d{i}", f"Window {i} of the cache test: `k = q @ v.T / {i + 1}`, ünïcode. " * (2 + i % 3))
    for i in range(4)
]


def _ids(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(seed))


def _fill(model: Any, cache: Any, tokens: int, chunk: int) -> Any:
    chunked_logits(model, _ids(tokens), cache, chunk)
    return cache


class _RoundedLayerCache(DynamicCache):
    """A deliberately lossy cache: keys and values rounded to multiples of 0.5 before storing."""

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kw: Any):  # type: ignore[no-untyped-def]
        def r(x: torch.Tensor) -> torch.Tensor:
            return torch.round(x * 2) / 2

        return super().update(r(key_states), r(value_states), layer_idx, *args, **kw)


# the protocol ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_chunked_dense_equals_one_pass(family: str) -> None:
    model = tiny_model(family)
    ids = _ids(45)
    with torch.no_grad():
        whole = model(input_ids=ids[None]).logits[0].float()
    for chunk in (1, 7, 16, 45):
        got = chunked_logits(model, ids, DynamicCache(config=model.config), chunk)
        assert got.shape == whole.shape
        assert float((got - whole).abs().max()) <= 1e-5


def test_dense_against_dense_is_exact_and_matches_reference_perplexity() -> None:
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    got = score_caches(
        model,
        tok,
        DOCS,
        {"dense again": lambda: DynamicCache(config=model.config)},
        max_length=64,
        chunk=16,
    )
    assert list(got) == ["dense", "dense again"]
    ref = teacher_reference(model, tok, DOCS, None, 64)  # one unchunked pass per window
    for r in got.values():
        assert abs(r["kl"]) < 1e-9
        assert r["top1"] == 1.0
        assert r["tokens"] == ref.teacher["tokens"]
        assert r["ppl"] == pytest.approx(ref.teacher["ppl"], rel=1e-5)
        assert r["windows"] == len(ref.ids)
    assert got["dense"]["bytes"] == got["dense again"]["bytes"] > 0
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    assert got["dense"]["bytes"] == per_token * got["dense"]["bytes_tokens"]
    assert got["dense"]["bytes_per_token"] == per_token


def test_lossy_cache_costs_kl() -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = score_caches(
        model, tok, DOCS, {"rounded": lambda: _RoundedLayerCache()}, max_length=48, chunk=8
    )
    assert got["rounded"]["kl"] > 1e-6
    assert got["rounded"]["ppl"] != got["dense"]["ppl"]
    assert got["rounded"]["bytes"] == got["dense"]["bytes"]  # same storage, other values
    assert sum(got["rounded"]["doc_kl"]) == pytest.approx(
        got["rounded"]["kl"] * got["rounded"]["tokens"], rel=1e-9
    )


def test_bad_arguments_are_one_sentence() -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(GradfreeError, match="reference"):
        score_caches(model, tok, DOCS, {"dense": DynamicCache}, max_length=32, chunk=8)
    with pytest.raises(GradfreeError, match="chunk"):
        score_caches(model, tok, DOCS, {}, max_length=32, chunk=0)
    reused = DynamicCache(config=model.config)
    _fill(model, reused, 5, 5)
    with pytest.raises(GradfreeError, match="new one"):
        score_caches(model, tok, DOCS, {"same": lambda: reused}, max_length=32, chunk=8)


# bytes held -----------------------------------------------------------------------------------
def _geometry(model: Any) -> tuple[int, int, int]:
    c = model.config
    return c.num_hidden_layers, c.num_key_value_heads, c.head_dim


@pytest.mark.parametrize("chunk", [40, 9])
def test_dynamic_cache_bytes(chunk: int) -> None:
    model = tiny_model("qwen2")
    layers, kv, hd = _geometry(model)
    cache = _fill(model, DynamicCache(config=model.config), 40, chunk)
    assert cache_bytes(cache) == 2 * layers * kv * hd * 40 * 4
    assert cache_bytes(DynamicCache(config=model.config)) == 0


def test_fp8_quantized_cache_bytes() -> None:
    model = tiny_model("llama")
    layers, kv, hd = _geometry(model)
    cache = _fill(model, QuantizedCache("fp8", model.config), 30, 10)
    # one byte per element and one float32 scale, for keys and for values of every layer
    assert cache_bytes(cache) == 2 * layers * (kv * hd * 30 + 4)


def _residual(layer: Any) -> int:
    return layer.keys.shape[-2] if layer.keys.dim() == 4 else 0


@pytest.mark.parametrize("nbits", [4, 2])
def test_quanto_cache_bytes_count_codes_scales_shifts_and_residual(nbits: int) -> None:
    pytest.importorskip("optimum.quanto")
    model = tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    layers, kv, hd = _geometry(model)
    cache = _fill(model, QuantizedCache("quanto", model.config, nbits=nbits), 100, 20)
    expected = 0
    for layer in cache.layers:
        r = _residual(layer)
        n = kv * (100 - r) * hd  # quantized elements, in groups of 64 (= head_dim) along the head
        # packed codes (8 / nbits per byte) + a float32 scale and shift per group, K and V,
        # + the full-precision residual tokens
        expected += 2 * (n * nbits // 8 + 2 * 4 * (n // 64) + kv * r * hd * 4)
    got = cache_bytes(cache)
    assert got == expected
    assert got < 2 * layers * kv * hd * 100 * 4  # below the dense float32 store


@pytest.mark.parametrize("nbits", [4, 2])
def test_hqq_cache_bytes_count_codes_scales_zeros_and_residual(nbits: int) -> None:
    pytest.importorskip("hqq")
    model = tiny_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    _, kv, hd = _geometry(model)
    cache = _fill(model, QuantizedCache("hqq", model.config, nbits=nbits), 100, 20)
    expected = 0
    for layer in cache.layers:
        r = _residual(layer)
        n = kv * (100 - r) * hd
        scale = layer._quantized_keys[1]["scale"]
        expected += 2 * (n * nbits // 8 + 2 * scale.element_size() * (n // 64) + kv * r * hd * 4)
    assert cache_bytes(cache) == expected


# the low-rank cache ---------------------------------------------------------------------------
KV_SITES = ["k_pre", "k_rope", "v", "q_pre", "q_rope"]


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    pytest.importorskip("gradfree.kv.cache")
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    cap = run_capture(
        Subject(model, tok, name="tiny"),
        DOCS,
        Path(tmp_path_factory.mktemp("kv")) / "cap",
        {"sites": KV_SITES, "full": KV_SITES, "max_length": 32},
        progress=False,
    )
    return model, cap


def _fit(model: Any, cap: Any, budget: float, mode: str, metric: str) -> Any:
    from gradfree.kv import fit_bases
    from gradfree.kv.fit import output_metrics, rope_lags

    extra: dict[str, Any] = {}
    if metric == "attention":
        extra = {"value_metrics": output_metrics(model), "rope_lags": rope_lags(model, 32)}
    return fit_bases(cap, budget, key_mode=mode, metric=metric, **extra)


@pytest.mark.parametrize(
    ("mode", "metric"),
    [("post_rope", "none"), ("pre_rope", "attention"), ("complex", "attention"), ("pairs", "none")],
)
def test_low_rank_cache_full_and_half_rank(lowrank: Any, mode: str, metric: str) -> None:
    """Full rank scores as dense on both attention paths; half rank holds half the bytes, costs
    KL, and scores alike on the latent and the reconstruct path."""
    from gradfree.kv import LowRankCache

    model, cap = lowrank
    tok = tiny_tokenizer()
    full, half = _fit(model, cap, 1.0, mode, metric), _fit(model, cap, 0.5, mode, metric)
    got = score_caches(
        model,
        tok,
        DOCS,
        {
            "full": lambda: LowRankCache(full, model),
            "full rec": lambda: LowRankCache(full, model, attention="reconstruct"),
            "half": lambda: LowRankCache(half, model),
            "half rec": lambda: LowRankCache(half, model, attention="reconstruct"),
        },
        max_length=48,
        chunk=12,
    )
    model.set_attn_implementation("sdpa")
    dense, t = got["dense"]["bytes"], got["dense"]["bytes_tokens"]
    positions = 8 * t if mode == "pre_rope" else 0  # int64 positions, once per cache
    dims = dense // (4 * t)  # Σ head_dim over every layer's key and value heads
    for name in ("full", "full rec"):
        assert abs(got[name]["kl"]) < 1e-6 and got[name]["top1"] == 1.0
        assert got[name]["bytes"] == dense + positions
    for name in ("half", "half rec"):
        assert got[name]["kl"] > 1e-4
        assert got[name]["bytes"] == math.floor(0.5 * dims) * 4 * t + positions
        assert got[name]["bases_bytes"] == LowRankCache(half, model).bases_nbytes() > 0
    assert got["half"]["ppl"] == pytest.approx(got["half rec"]["ppl"], rel=1e-6)
    assert got["half"]["kl"] == pytest.approx(got["half rec"]["kl"], rel=1e-4, abs=1e-9)
    assert got["dense"]["bases_bytes"] == 0
    model.set_attn_implementation("sdpa")


def test_int8_low_rank_cache_bytes_and_cost(lowrank: Any) -> None:
    """int8 latents: R + 2 bytes per token and head block (per token for complex keys), a small
    but non-zero KL at full rank."""
    from gradfree.kv import LowRankCache

    model, cap = lowrank
    bases = _fit(model, cap, 1.0, "complex", "none")
    got = score_caches(
        model,
        tiny_tokenizer(),
        DOCS,
        {"int8": lambda: LowRankCache(bases, model, latent_bits=8)},
        max_length=48,
        chunk=12,
    )
    model.set_attn_implementation("sdpa")
    t = got["int8"]["bytes_tokens"]
    n_kv, layers = bases.num_kv_heads, bases.model["num_layers"]
    rows = sum(bases.ranks()["keys"]) + 2 * layers  # complex keys: one scale per token
    rows += sum(bases.ranks()["values"]) + 2 * n_kv * layers  # per-head values: one per head
    assert got["int8"]["bytes"] == rows * t
    assert 0 < got["int8"]["kl"] < 1e-2
