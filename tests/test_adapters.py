"""Adapter conformance: every registered architecture passes the same checks on a tiny model.

The strongest check re-implements the decoder forward pass from the adapter's parts alone
(norms, q/k/v/o, gate/up/down, RoPE, GQA grouping) and requires the HF model's logits: if an
adapter pointed at the wrong module, or the geometry were wrong, the logits would differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradfree.adapters import (
    ARCHITECTURES,
    ModelAdapter,
    config_for_width,
    config_head_dim,
    get_adapter,
    set_saved_dtype_,
    untie_config_,
)
from gradfree.base.errors import GradfreeError
from gradfree.testing.tiny import PRESETS, tiny_model

CASES = [*sorted(ARCHITECTURES), *sorted(PRESETS), "llama-tied", "qwen3-untied", "llama-mha"]


def _make(case: str) -> torch.nn.Module:
    if case == "llama-tied":
        return tiny_model("llama", tie_word_embeddings=True, dtype=torch.float64)
    if case == "qwen3-untied":
        return tiny_model("qwen3", tie_word_embeddings=False, dtype=torch.float64)
    if case == "llama-mha":
        return tiny_model("llama", num_key_value_heads=4, dtype=torch.float64)
    return tiny_model(case, dtype=torch.float64)


def _rms(norm: torch.nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_forward(a: ModelAdapter, ids: torch.Tensor) -> torch.Tensor:
    """The decoder forward pass written only in terms of the adapter's parts."""
    g, eps = a.geometry, a.norm_eps
    b, t = ids.shape
    x = a.embed_tokens.weight[ids]
    pos = torch.arange(t).unsqueeze(0).expand(b, t)
    cos, sin = a.rotary(x, pos)
    causal = torch.full((t, t), float("-inf"), dtype=x.dtype).triu(1)
    for layer in a.layers:
        h = _rms(layer.attn_norm, x, eps)
        q = layer.q_proj(h).view(b, t, g.num_heads, g.head_dim)
        k = layer.k_proj(h).view(b, t, g.num_kv_heads, g.head_dim)
        v = layer.v_proj(h).view(b, t, g.num_kv_heads, g.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = _rms(layer.q_norm, q, eps), _rms(layer.k_norm, k, eps)
        q = a.apply_rope(q.transpose(1, 2), cos, sin)
        k = a.apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        # Query head j reads KV head geometry.kv_group(j).
        kv_index = torch.tensor([g.kv_group(j) for j in range(g.num_heads)])
        k, v = k[:, kv_index], v[:, kv_index]
        att = (q @ k.transpose(-1, -2)) / g.head_dim**0.5 + causal
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, g.q_dim)
        x = x + layer.o_proj(o)
        h = _rms(layer.mlp_norm, x, eps)
        x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
    return a.lm_head(_rms(a.final_norm, x, eps))


@pytest.mark.parametrize("case", CASES)
def test_reference_forward_matches_hf(case: str) -> None:
    model = _make(case)
    a = get_adapter(model)
    ids = torch.randint(0, 259, (2, 11))
    with torch.no_grad():
        ref = reference_forward(a, ids)
        out = model(ids).logits
    # HF's RMSNorm and rotary tables compute in float32 even for float64 models, so agreement is
    # at float32 precision, not 1e-12 (a wrong module or layout gives errors of order 1).
    assert torch.allclose(ref, out, atol=1e-6, rtol=1e-6), (ref - out).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_parts_and_geometry(case: str) -> None:
    model = _make(case)
    a = get_adapter(model)
    g = a.geometry
    d, m = a.hidden_size, a.intermediate_size
    assert g.num_heads % g.num_kv_heads == 0
    for layer in a.layers:
        shapes = {name: tuple(lin.weight.shape) for name, lin in layer.linears().items()}
        assert shapes == {
            "q": (g.q_dim, d),
            "k": (g.kv_dim, d),
            "v": (g.kv_dim, d),
            "o": (d, g.q_dim),
            "gate": (m, d),
            "up": (m, d),
            "down": (d, m),
        }
        assert [lin is layer.q_proj for lin in layer.attn_inputs()] == [True, False, False]
        assert layer.mlp_output() is layer.down_proj and layer.attn_output() is layer.o_proj
        assert layer.attn_norm.weight.shape == (d,) and layer.mlp_norm.weight.shape == (d,)
        assert (layer.q_norm is not None) == a.has_qk_norm
    assert a.final_norm.weight.shape == (d,)
    assert a.lm_head.weight.shape == (a.vocab_size, d)
    assert a.num_layers == model.config.num_hidden_layers
    assert a.tied == bool(model.config.tie_word_embeddings)
    assert a.has_attn_bias == (model.config.model_type == "qwen2")
    assert a.rope.rotary_dim == g.head_dim
    assert set(a.describe()) >= {"hidden_size", "num_kv_heads", "tied_embeddings"}


def test_kv_groups_partition_heads() -> None:
    g = get_adapter(tiny_model("qwen3-32b-like")).geometry
    assert (g.num_heads, g.num_kv_heads, g.group_size) == (64, 8, 8)
    heads = [h for grp in range(g.num_kv_heads) for h in g.heads_in_group(grp)]
    assert heads == list(range(g.num_heads))
    assert all(g.kv_group(h) == grp for grp in range(8) for h in g.heads_in_group(grp))


def test_rope_inv_freq_matches_model() -> None:
    a = get_adapter(tiny_model("qwen2", dtype=torch.float64))
    ours = a.rope.inv_freq()
    theirs = a.rotary_emb.inv_freq.to(torch.float64)
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_unsupported_architecture_is_one_clear_error() -> None:
    model = tiny_model("llama")
    model.config.model_type = "gpt2"
    with pytest.raises(GradfreeError, match=r"not supported; gradfree supports: llama, mistral"):
        get_adapter(model)


def test_not_a_model_is_an_error() -> None:
    with pytest.raises(GradfreeError, match="not a Hugging Face model"):
        get_adapter(torch.nn.Linear(2, 2))


# Config edits: the adapter is the only writer of HF config keys -----------------------------------
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_config_edits_that_change_nothing_keep_the_logits(case: str, tmp_path: Path) -> None:
    """Re-recording the current width and epsilon, and marking a separate head as untied, leave
    the function unchanged, also after a save and a plain-transformers reload."""
    from transformers import AutoModelForCausalLM

    model = _make(case)
    a = get_adapter(model)
    ids = torch.randint(0, a.vocab_size, (2, 9))
    ref = _logits(model, ids)
    d, eps, g = a.hidden_size, a.norm_eps, a.geometry
    copy_cfg = config_for_width(model.config, d, eps)
    assert copy_cfg is not model.config and copy_cfg.head_dim == g.head_dim
    assert get_adapter(AutoModelForCausalLM.from_config(copy_cfg)).geometry == g
    if a.tied:  # give the head its own weight, as surgery's untie_ does, then record it
        a.lm_head.weight = torch.nn.Parameter(a.embed_tokens.weight.detach().clone())
    a.set_width_(d, eps)
    a.mark_untied_()
    assert not a.tied_in_config and not a.tied and (a.hidden_size, a.norm_eps) == (d, eps)
    assert torch.equal(_logits(model, ids), ref)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not get_adapter(back).tied and get_adapter(back).geometry == g
    assert torch.allclose(_logits(back, ids), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_config_for_width_keeps_the_heads_and_leaves_the_original_alone(model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type, tie_word_embeddings=True)
    a = get_adapter(model)
    before = model.config.to_dict()
    cfg = untie_config_(config_for_width(model.config, 16, 3 * a.norm_eps))
    assert model.config.to_dict() == before  # a copy was edited
    wide = get_adapter(AutoModelForCausalLM.from_config(cfg))
    assert (wide.hidden_size, wide.geometry, wide.norm_eps) == (16, a.geometry, 3 * a.norm_eps)
    assert not wide.tied and not wide.tied_in_config and a.tied_in_config
    assert config_head_dim(cfg) == config_head_dim(model.config) == a.geometry.head_dim
    set_saved_dtype_(cfg, torch.bfloat16)
    assert cfg.to_dict()["dtype"] == "bfloat16"
