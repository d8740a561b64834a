"""Low-rank KV caches (gradfree.kv) on tiny models: full rank reproduces the model, lower ranks
reconstruct exactly what the bases say, the byte count is what is held, and the budget is exact.

The references are computed here from the captured statistics and the model's own rotary
embedding (through the adapter), independently of the cache's code path.
"""

from __future__ import annotations

import gc
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
from gradfree.kv import KEY_MODES, KVBases, LowRankCache, allocate_ranks, check_budget, fit_bases
from gradfree.models import config_fingerprint
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("qwen2", "qwen3", "llama")
PAD = 258


@dataclass
class Doc:
    id: str
    text: str


DOCS = [
    Doc(f"d{i}", f"Keys and values of document {i}: code `x = y + {i}`, ünïcode, {i * 37}. " * 2)
    for i in range(6)
]


def _capture(model: Any, out: Path, sites: list[str] | None = None) -> Any:
    cfg = {"sites": sites or ["k_pre", "k_rope", "v"], "max_length": 32}
    return run_capture(
        Subject(model, tiny_tokenizer(), name="tiny"), DOCS, out, cfg, progress=False
    )


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    out = {}
    for family in FAMILIES:
        model = tiny_model(family).eval()
        out[family] = (model, _capture(model, tmp_path_factory.mktemp(family) / "cap"))
    return out


def _ids(batch: int = 2, tokens: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, tokens), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# full rank ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_full_rank_reproduces_forward_logits(captured: Any, family: str, mode: str) -> None:
    """Fed in three chunks through the cache, the logits equal one plain forward pass."""
    model, cap = captured[family]
    bases = fit_bases(cap, 1.0, key_mode=mode)
    hd = bases.head_dim
    assert all(r == hd for kind in bases.ranks().values() for layer in kind for r in layer)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        cache = LowRankCache(bases, model)
        got = torch.cat(
            [
                model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                for a, b in ((0, 7), (7, 11), (11, 12))
            ],
            dim=1,
        )
    assert cache.get_seq_length() == 12
    assert _rel(got, ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", KEY_MODES)
def test_full_rank_greedy_generate_equals_dynamic_cache(
    captured: Any, family: str, mode: str
) -> None:
    """Greedy tokens of a left-padded batch are those of the model's own DynamicCache."""
    model, cap = captured[family]
    bases = fit_bases(cap, 1.0, key_mode=mode)
    ids = _ids(2, 10, seed=2)
    ids[1, :3] = PAD
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        want = model.generate(
            ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **kw
        )
        cache = LowRankCache(bases, model)
        got = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
    assert got.shape[1] > ids.shape[1]
    assert torch.equal(got, want)


# lower ranks ----------------------------------------------------------------------------------
def _project(x: torch.Tensor, heads: list[Any]) -> torch.Tensor:
    """μ + P Pᵀ (x − μ) per head of x (b, heads, t, hd), in float64."""
    out = []
    for h, hb in enumerate(heads):
        p, mu = hb.basis.double(), hb.mean.double()
        out.append((x[:, h].double() - mu) @ p @ p.T + mu)
    return torch.stack(out, dim=1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("mode", KEY_MODES)
def test_partial_rank_returns_the_projection(captured: Any, mode: str) -> None:
    """Below full rank every layer returns μ + PPᵀ(x − μ) of all tokens seen so far, keys taken
    before RoPE and turned back in pre_rope mode."""
    model, cap = captured["qwen3"]
    bases = fit_bases(cap, 0.4, key_mode=mode)
    assert any(r < bases.head_dim for layer in bases.ranks()["keys"] for r in layer)
    cache = LowRankCache(bases, model)
    seen: list[tuple[torch.Tensor, ...]] = []
    layer: Any = cache.layers[1]
    update = layer.update

    def spy(k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any) -> Any:
        kh, vh = update(k, v, *a, **kw)
        seen.append((k, v, kh, vh))
        return kh, vh

    layer.update = spy
    ids = _ids(2, 9, seed=3)
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache, use_cache=True)
        model(ids[:, 5:], past_key_values=cache, use_cache=True)
    keys = torch.cat([s[0] for s in seen], dim=2).double()
    values = torch.cat([s[1] for s in seen], dim=2)
    k_hat, v_hat = seen[-1][2], seen[-1][3]
    if mode == "pre_rope":
        a = get_adapter(model)
        pos = torch.arange(9).unsqueeze(0).expand(2, 9)
        cos, sin = (t.double().unsqueeze(1) for t in a.rotary(keys.float(), pos))
        pre = keys * cos - _rotate_half(keys) * sin  # the inverse rotation (no scaling here)
        want_k = _project(pre, bases.keys[1])
        want_k = want_k * cos + _rotate_half(want_k) * sin
    else:
        want_k = _project(keys, bases.keys[1])
    torch.testing.assert_close(k_hat.double(), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        v_hat.double(), _project(values, bases.values[1]), rtol=1e-5, atol=1e-5
    )
    assert _rel(k_hat.double(), keys) > 1e-3  # the low rank did drop something


@pytest.mark.parametrize("mode", KEY_MODES)
def test_half_budget_holds_half_the_bytes(captured: Any, mode: str) -> None:
    model, cap = captured["qwen2"]
    bases = fit_bases(cap, 0.5, key_mode=mode)
    ids = _ids(2, 12)
    dense, cache = DynamicCache(config=model.config), LowRankCache(bases, model)
    with torch.no_grad():
        model(ids, past_key_values=dense, use_cache=True)
        model(ids, past_key_values=cache, use_cache=True)
    held: list[Any] = [x for lay in dense.layers for x in (lay.keys, lay.values)]  # type: ignore[union-attr]
    dense_bytes = sum(x.numel() * x.element_size() for x in held)
    ranks = sum(r for kind in bases.ranks().values() for layer in kind for r in layer)
    positions = 2 * 12 * 8 if mode == "pre_rope" else 0  # int64 per cached token
    assert cache.nbytes() == ranks * 2 * 12 * 4 + positions
    assert cache.nbytes() - positions <= 0.5 * dense_bytes
    heads = 2 * bases.model["num_layers"] * bases.model["num_kv_heads"]
    assert bases.kept_share() == math.floor(0.5 * heads * bases.head_dim) / (heads * bases.head_dim)
    per_head = [
        hb.basis.numel() + hb.mean.numel()
        for t in (bases.keys, bases.values)
        for lay in t
        for hb in lay
    ]
    assert cache.bases_nbytes() == 4 * sum(per_head)


def test_int8_latents_are_close_and_counted(captured: Any) -> None:
    """``latent_bits=8``: int8 latents with a float16 scale per token and head; logits stay
    close to the model's and the bytes are r + 2 per token and head (plus positions)."""
    model, cap = captured["qwen2"]
    ids = _ids(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
    for mode in KEY_MODES:
        bases = fit_bases(cap, 1.0, key_mode=mode)
        cache = LowRankCache(bases, model, latent_bits=8)
        with torch.no_grad():
            got = model(ids, past_key_values=cache, use_cache=True).logits
        assert 0 < _rel(got, ref) < 0.02
        heads = [r for kind in bases.ranks().values() for layer in kind for r in layer]
        positions = 2 * 12 * 8 if mode == "pre_rope" else 0
        assert cache.nbytes() == sum(r + 2 for r in heads) * 2 * 12 + positions
    with pytest.raises(GradfreeError, match="latent_bits"):
        LowRankCache(bases, model, latent_bits=4)


def test_pairs_keep_whole_rope_pairs(captured: Any) -> None:
    _, cap = captured["llama"]
    bases = fit_bases(cap, 0.3, key_mode="pairs")
    hd = bases.head_dim
    for i, layer in enumerate(bases.keys):
        energy = torch.diagonal(cap.stats("model", f"blocks.{i}.k_rope").second_moment())
        for h, hb in enumerate(layer):
            assert hb.rank % 2 == 0 and hb.rank >= 2
            dims = hb.basis.argmax(dim=0)
            assert torch.equal(hb.basis, torch.eye(hd)[:, dims])
            lo, hi = dims[0::2], dims[1::2]
            assert torch.equal(hi, lo + hd // 2)  # whole (j, j + h/2) pairs
            e = energy[h * hd : (h + 1) * hd]
            pair = e[: hd // 2] + e[hd // 2 :]
            kept = pair[lo].min()
            dropped = [float(pair[j]) for j in range(hd // 2) if j not in set(lo.tolist())]
            assert all(kept >= d for d in dropped)  # the strongest pairs are kept


def test_pca_bases_are_eigenvectors_of_the_captured_covariance(captured: Any) -> None:
    _, cap = captured["qwen2"]
    bases = fit_bases(cap, 0.5, key_mode="pre_rope", allocation="uniform")
    hd = bases.head_dim
    for kind, site in (("keys", "k_pre"), ("values", "v")):
        for i, layer in enumerate(getattr(bases, kind)):
            st = cap.stats("model", f"blocks.{i}.{site}")
            for h, hb in enumerate(layer):
                s = slice(h * hd, (h + 1) * hd)
                cov, p = st.covariance()[s, s], hb.basis.double()
                torch.testing.assert_close(
                    p.T @ p, torch.eye(hb.rank, dtype=torch.float64), atol=1e-6, rtol=0
                )
                lam = hb.eigenvalues[: hb.rank].double()
                torch.testing.assert_close(cov @ p, p * lam, atol=1e-5 * float(lam[0]), rtol=0)
                torch.testing.assert_close(hb.mean.double(), st.mean()[s], atol=1e-6, rtol=0)
    ranks = [r for kind in bases.ranks().values() for layer in kind for r in layer]
    assert max(ranks) - min(ranks) <= 1


# allocation -----------------------------------------------------------------------------------
def _spectrum(rng: random.Random, hd: int) -> torch.Tensor:
    decay = rng.uniform(0.05, 3.0)
    vals = [
        rng.uniform(0.5, 1.5) * math.exp(-decay * j) * rng.choice([1.0, 10.0]) for j in range(hd)
    ]
    return torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)


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
        assert (
            kept
            >= sum(
                float(s[:r].sum())
                for s, r in zip(norm, allocate_ranks(spectra, budget, "uniform"), strict=True)
            )
            - 1e-12
        )


def test_waterfill_follows_the_spectra() -> None:
    flat = torch.ones(8, dtype=torch.float64)
    peaked = torch.tensor([100.0] + [1e-3] * 7, dtype=torch.float64)
    assert allocate_ranks([flat, peaked], 0.5, "waterfill") == [7, 1]
    assert allocate_ranks([flat, peaked], 0.5, "uniform") == [4, 4]


def test_allocation_errors() -> None:
    s = [torch.ones(4, dtype=torch.float64)] * 3
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


def test_bad_inputs_are_one_sentence_and_write_nothing(captured: Any, tmp_path: Path) -> None:
    model, cap = captured["qwen2"]
    out = tmp_path / "kv"
    for kwargs in ({"budget": 1.5}, {"budget": 0.5, "key_mode": "complex"}):
        with pytest.raises(GradfreeError) as e:
            fit_bases(cap, **kwargs).save(out)  # type: ignore[arg-type]
        _one_sentence(e)
    assert not out.exists()
    no_v = _capture(model, tmp_path / "kpre", ["k_pre"])
    with pytest.raises(GradfreeError, match=r"blocks\.0\.v") as e:
        fit_bases(no_v, 0.5)
    _one_sentence(e)
    entry = cap.manifest["roles"]["model"]
    old, entry["model_type"] = entry["model_type"], "gpt2"
    try:
        with pytest.raises(GradfreeError, match="not supported"):
            fit_bases(cap, 0.5)
    finally:
        entry["model_type"] = old
    with pytest.raises(GradfreeError):
        LowRankCache(fit_bases(cap, 0.5), torch.nn.Linear(2, 2))


def test_save_load_round_trip_and_another_model(captured: Any, tmp_path: Path) -> None:
    model, cap = captured["qwen3"]
    bases = fit_bases(cap, 0.5, key_mode="pre_rope", fingerprint=config_fingerprint(model.config))
    bases.save(tmp_path / "kv")
    back = KVBases.load(tmp_path / "kv", model)
    assert back.ranks() == bases.ranks() and back.model == bases.model
    assert (back.key_mode, back.budget, back.allocation) == ("pre_rope", 0.5, "waterfill")
    for a, b in zip(bases.keys + bases.values, back.keys + back.values, strict=True):
        for ha, hb in zip(a, b, strict=True):
            for name in ("basis", "mean", "eigenvalues"):
                assert torch.equal(getattr(ha, name), getattr(hb, name))
    ids = _ids(1, 6)
    with torch.no_grad():
        one = model(ids, past_key_values=LowRankCache(bases, model), use_cache=True).logits
        two = model(
            ids, past_key_values=LowRankCache.from_dir(tmp_path / "kv", model), use_cache=True
        ).logits
    assert torch.equal(one, two)
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
    with pytest.raises(GradfreeError, match="does not exist"):
        KVBases.load(tmp_path / "missing", model)


def test_rotary_hook_goes_with_the_last_cache(captured: Any) -> None:
    model, cap = captured["llama"]
    bases = fit_bases(cap, 0.5, key_mode="pre_rope")
    before = hook_count(model)
    caches = [LowRankCache(bases, model), LowRankCache(bases, model)]
    assert hook_count(model) == before + 1  # one hook per model, shared
    del caches
    gc.collect()
    assert hook_count(model) == before


def test_import_is_light() -> None:
    code = (
        "import sys, gradfree.kv; print('gradfree.kv.cache' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
