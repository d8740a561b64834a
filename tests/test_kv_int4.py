"""Packed int4 latents of the low-rank KV cache: the codes round-trip, the bytes held are the
packed codes and the scales, and the cache stays close to the model at full rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject, run_capture
from gradfree.kv import LowRankCache, fit_bases
from gradfree.kv.cache import _pack4, _quantize, _unpack4
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Doc:
    id: str
    text: str


DOCS = [Doc(f"d{i}", f"Packed latents {i}: `z = q * s + {i}`, ü, {i * 13}. " * 2) for i in range(5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    model = tiny_model("qwen2").eval()
    sites = ["k_pre", "k_rope", "v"]
    cap = run_capture(
        Subject(model, tiny_tokenizer(), name="tiny"),
        DOCS,
        Path(tmp_path_factory.mktemp("int4")) / "cap",
        {"sites": sites, "full": sites, "max_length": 32},
        progress=False,
    )
    return model, cap


@pytest.mark.parametrize("width", [1, 6, 7])
def test_pack4_round_trips_every_code(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    q = torch.randint(-7, 8, (3, 4, width), generator=g, dtype=torch.int8)
    packed = _pack4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (width + 1) // 2
    assert torch.equal(_unpack4(packed, width), q)


def test_int4_quantisation_error_is_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 9, generator=g)
    blocks = [slice(0, 4), slice(4, 9)]
    packed, scale = _quantize(z, blocks, 4)
    codes = _unpack4(packed, 9).float()
    per_dim = torch.cat(
        [scale[..., :1].float().expand(2, 5, 4), scale[..., 1:].float().expand(2, 5, 5)], -1
    )
    # float16 scales: a step of absmax / 7, rounded; codes never leave [-7, 7]
    assert codes.abs().max() <= 7
    assert float((codes * per_dim - z).abs().max()) <= float(per_dim.max()) * 0.5 + 1e-3


@torch.no_grad()
def test_int4_latents_are_counted_and_close_at_full_rank(tiny: tuple[Any, Any]) -> None:
    model, cap = tiny
    bases = fit_bases(cap, 1.0, key_mode="pre_rope")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("sdpa")
    ref = model(ids).logits
    out = {}
    for bits in (None, 8, 4):
        cache = LowRankCache(bases, model, latent_bits=bits)
        logits = torch.cat(
            [
                model(ids[:, s : s + 4], past_key_values=cache, use_cache=True).logits
                for s in (0, 4, 8, 12)
            ],
            dim=1,
        )
        out[bits] = (float((logits - ref).norm() / ref.norm()), cache)
        model.set_attn_implementation("sdpa")
    assert out[None][0] < 1e-5
    assert out[8][0] < out[4][0] < 0.5  # coarser codes, larger error, still the same model
    expected = 0
    for coder in bases.keys + bases.values:
        assert coder.head_ranks is not None
        groups = sum(-(-r // 16) for r in coder.head_ranks)  # a float16 scale per 16 dims
        expected += 16 * ((coder.rank + 1) // 2 + 2 * groups)  # packed codes + scales
    positions = 16 * 8  # int64 positions in pre_rope mode
    assert out[4][1].nbytes() == expected + positions


def test_other_bit_widths_are_one_sentence(tiny: tuple[Any, Any]) -> None:
    model, cap = tiny
    with pytest.raises(GradfreeError, match="latent_bits must be 8, 4 or None"):
        LowRankCache(fit_bases(cap, 0.5), model, latent_bits=2)
