"""Slicing the residual stream: exact at full width and on a model that lives in k dimensions."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.surgery import exact_rmsnorm, fuse_norms_, random_orthogonal, rotate_residual_, slice_
from gradfree.surgery.edit import all_norms, set_norm_eps_
from gradfree.testing.tiny import tiny_model

IDS = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(1))
CASES = ["llama", "mistral", "qwen2", "qwen3", "qwen3-4b-like", "qwen2.5-0.5b-like"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def logits(model: torch.nn.Module, exact: bool = False) -> torch.Tensor:
    with exact_rmsnorm(model) if exact else contextlib.nullcontext():
        return model(IDS).logits


def k_dim_model(case: str, k: int, dtype: torch.dtype = torch.float64) -> tuple:
    """A fused tiny model whose residual stream lives in a random k-dim subspace: embeddings,
    o and down write only into the first k coordinates, then everything is rotated by Q."""
    model = tiny_model(case, dtype=dtype)
    a = get_adapter(model)
    fuse_norms_(model)
    with torch.no_grad():
        a.embed_tokens.weight[:, k:] = 0
        for layer in a.layers:
            layer.o_proj.weight[k:] = 0
            layer.down_proj.weight[k:] = 0
    q = random_orthogonal(a.hidden_size, 5)
    rotate_residual_(model, q)
    return model, q


@pytest.mark.parametrize("case", CASES)
def test_slicing_to_full_width_reproduces_the_model(case: str) -> None:
    model = tiny_model(case, dtype=torch.float64)
    ref = logits(model, exact=True)
    fuse_norms_(model)
    d = get_adapter(model).hidden_size
    info = slice_(model, d, random_orthogonal(d, 0))
    assert info["reader_scale"] == 1.0 and model.config.hidden_size == d
    assert rel_err(logits(model, exact=True), ref) < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_slicing_a_model_that_lives_in_k_dims_is_exact(case: str) -> None:
    model, q = k_dim_model(case, k=24)
    ref_exact, ref_stock = logits(model, exact=True), logits(model)
    hd = get_adapter(model).geometry.head_dim
    info = slice_(model, 24, q.T)  # rotate back so the subspace is the leading coordinates
    a = get_adapter(model)
    assert a.hidden_size == 24 and model.config.hidden_size == 24
    assert model.config.head_dim == hd == a.geometry.head_dim
    assert model.config.rms_norm_eps == pytest.approx(1e-6 * info["from"] / 24)
    assert all(lin.weight.shape[1] == 24 for lin in a.layer(0).attn_inputs())
    assert rel_err(logits(model, exact=True), ref_exact) < 1e-10
    assert rel_err(logits(model), ref_stock) < 1e-6


def test_epsilon_rescaling_is_needed() -> None:
    """Negative control: keeping the old epsilon after slicing is visibly wrong."""
    model, q = k_dim_model("qwen3", k=24)
    ref = logits(model, exact=True)
    slice_(model, 24, q.T)
    for norm in all_norms(get_adapter(model)).values():
        set_norm_eps_(norm, 1e-6)
    assert rel_err(logits(model, exact=True), ref) > 1e-6


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_sliced_model_reloads_in_plain_transformers(case: str, tmp_path: Path) -> None:
    model, q = k_dim_model(case, k=32, dtype=torch.float32)
    slice_(model, 32, q.T)
    ref = logits(model)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.config.hidden_size == 32 and get_adapter(back).hidden_size == 32
    assert torch.equal(logits(back), ref)


def test_slice_refuses_bad_input() -> None:
    model = tiny_model("llama", dtype=torch.float64)
    with pytest.raises(GradfreeError, match="run fuse_norms_ first"):
        slice_(model, 32)
    fuse_norms_(model)
    with pytest.raises(GradfreeError, match="between 1 and 64"):
        slice_(model, 65)
    embed = get_adapter(model).embed_tokens
    before = embed.weight.clone()
    with pytest.raises(GradfreeError, match="transformers refuses hidden_size 30"):
        slice_(model, 30, random_orthogonal(64, 0))  # 30 is not a multiple of Llama's 4 heads
    assert torch.equal(embed.weight, before)  # refused before any edit
