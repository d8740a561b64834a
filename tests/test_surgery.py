"""Proof that the surgery transforms preserve the function, on every supported family.

Logits are compared as ``max |Δ| / max |logit|``. Budgets: float32 1e-5; float64 1e-10 with
RMSNorm computed in float64 (:func:`exact_rmsnorm`), 1e-6 with the stock norm, which computes in
float32 even for float64 models (so ~1e-7 is the floor there, not a surgery error).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.surgery import (
    exact_rmsnorm,
    fuse_norms_,
    invert_permutation,
    per_layer_rotation_error,
    permute_heads_,
    permute_kv_groups_,
    permute_neurons_,
    random_orthogonal,
    random_permutation,
    rotate_head_values_,
    rotate_qk_pairs_,
    rotate_residual_,
    untie_,
)
from gradfree.testing.scramble import (
    CASES,
    IDS,
    logits,
    make,
    rel_err,
    scramble,
    within_group_perm,
)
from gradfree.testing.tiny import tiny_model

BUDGET = {"float32": 1e-5, "float64-exact": 1e-10, "float64-stock": 1e-6}


@pytest.mark.parametrize("case", CASES)
def test_all_transforms_preserve_logits_float32(case: str) -> None:
    model = make(case)
    ref = logits(model)
    scramble(model)
    assert not get_adapter(model).tied
    assert rel_err(logits(model), ref) < BUDGET["float32"]


@pytest.mark.parametrize("case", CASES)
def test_all_transforms_preserve_logits_float64(case: str) -> None:
    model = make(case, torch.float64)
    ref_exact, ref_stock = logits(model, exact=True), logits(model)
    scramble(model, seed=1)
    assert rel_err(logits(model, exact=True), ref_exact) < BUDGET["float64-exact"]
    assert rel_err(logits(model), ref_stock) < BUDGET["float64-stock"]


def test_a_broken_transform_is_caught() -> None:
    """Negative control: half a transform (values rotated, o not) changes the logits."""
    model = make("qwen2", torch.float64)
    ref = logits(model, exact=True)
    v = get_adapter(model).layer(0).v_proj
    with torch.no_grad():
        v.weight[:16] = random_orthogonal(16, 0) @ v.weight[:16].double()
    assert rel_err(logits(model, exact=True), ref) > 1e-3


@pytest.mark.parametrize("case", ["qwen3", "llama-tied"])
def test_fuse_norms_unties_folds_and_keeps_qk_norms(case: str) -> None:
    model = make(case, torch.float64)
    a = get_adapter(model)
    qn = [layer.q_norm.weight.clone() for layer in a.layers if layer.q_norm is not None]
    bias = [layer.q_proj.bias for layer in a.layers]
    ref = logits(model, exact=True)
    info = fuse_norms_(model)
    assert info["untied"] and not a.tied and not model.config.tie_word_embeddings
    assert len(info["folded"]) == 2 * a.num_layers + 1 and info["max_weight_deviation"] > 0.1
    for layer in a.layers:
        assert bool((layer.attn_norm.weight == 1).all() and (layer.mlp_norm.weight == 1).all())
    assert bool((a.final_norm.weight == 1).all())
    assert all(torch.equal(w, layer.q_norm.weight) for w, layer in zip(qn, a.layers, strict=False))
    assert all(b is layer.q_proj.bias for b, layer in zip(bias, a.layers, strict=True))
    assert rel_err(logits(model, exact=True), ref) < BUDGET["float64-exact"]


def test_untie_and_save_reload_keeps_the_head(tmp_path: object) -> None:
    model = make("qwen3")
    a = get_adapter(model)
    assert a.tied
    assert untie_(model) == {"op": "untie", "untied": True}
    assert untie_(model)["untied"] is False  # idempotent
    with torch.no_grad():
        a.lm_head.weight.mul_(2.0)  # prove the head is separate from the embeddings
    model.tie_weights()  # transformers must not re-tie it
    assert not a.tied and model.all_tied_weights_keys == {}
    ref = logits(model)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not get_adapter(back).tied and not back.config.tie_word_embeddings
    assert torch.equal(logits(back), ref)


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "llama-tied"])
def test_transformed_model_reloads_in_plain_transformers(case: str, tmp_path: object) -> None:
    model = make(case)
    scramble(model, seed=2)
    ref = logits(model)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(logits(back), ref)


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_transform_then_inverse_restores_weights(case: str) -> None:
    model = make(case, torch.float64)
    fuse_norms_(model)
    a = get_adapter(model)
    g = a.geometry
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = random_orthogonal(a.hidden_size, 7)
    r = random_orthogonal(g.head_dim, 8)
    hp, gp = within_group_perm(model, 9), random_permutation(g.num_kv_heads, 10)
    np_ = random_permutation(a.intermediate_size, 11)
    inv = invert_permutation
    steps: list[tuple[Callable[..., object], tuple[object, ...], tuple[object, ...]]] = [
        (rotate_residual_, (q,), (q.T,)),
        (permute_heads_, (1, hp), (1, inv(hp))),
        (permute_kv_groups_, (0, gp), (0, inv(gp))),
        (permute_neurons_, (1, np_), (1, inv(np_))),
        (rotate_head_values_, (0, 1, r), (0, 1, r.T)),
    ]
    if not a.has_qk_norm:
        ang = torch.rand(g.num_kv_heads, g.head_dim // 2, dtype=torch.float64)
        steps.append((rotate_qk_pairs_, (1, ang), (1, -ang)))
    for transform, args, inverse_args in steps:
        transform(model, *args)
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
        transform(model, *inverse_args)
        for k, v in model.state_dict().items():
            assert torch.allclose(v, before[k], rtol=0, atol=1e-12), k


def test_rotate_residual_refuses_non_unit_norms_and_non_rotations() -> None:
    model = make("llama", torch.float64)
    d = get_adapter(model).hidden_size
    with pytest.raises(GradfreeError, match="run fuse_norms_ first"):
        rotate_residual_(model, random_orthogonal(d, 0))
    fuse_norms_(model)
    with pytest.raises(GradfreeError, match="not orthogonal"):
        rotate_residual_(model, 1.1 * random_orthogonal(d, 0))
    with pytest.raises(GradfreeError, match=f"must be a {d}x{d} matrix"):
        rotate_residual_(model, random_orthogonal(d - 1, 0))
    info = rotate_residual_(model, random_orthogonal(d, 0))
    assert info["rotations"][0]["orthogonality_error"] < 1e-12


def test_tied_model_with_unit_norms_rotates_once() -> None:
    """E Q serves as both embedding and head, so a tied model stays tied and exact."""
    model = make("qwen3", torch.float64, norm_noise=0.0)
    ref = logits(model, exact=True)
    info = rotate_residual_(model, random_orthogonal(get_adapter(model).hidden_size, 3))
    assert info["tied"] and get_adapter(model).tied
    assert rel_err(logits(model, exact=True), ref) < BUDGET["float64-exact"]


def test_pair_rotations_refuse_qk_norms_unless_pairs_are_equal() -> None:
    model = make("qwen3", torch.float64)
    a = get_adapter(model)
    g = a.geometry
    p = g.head_dim // 2
    ang = torch.rand(g.num_kv_heads, p, dtype=torch.float64)
    with pytest.raises(GradfreeError, match="not exact with Qwen3-style q_norm"):
        rotate_qk_pairs_(model, 0, ang)
    with pytest.raises(GradfreeError, match="must have shape"):
        rotate_qk_pairs_(model, 0, ang[:, :-1])
    # The special case: norm weights equal on both dims of every pair commute with the turn.
    with torch.no_grad():
        for norm in (a.layer(0).q_norm, a.layer(0).k_norm):
            norm.weight[p:] = norm.weight[:p]
    ref = logits(model, exact=True)
    rotate_qk_pairs_(model, 0, ang)
    assert rel_err(logits(model, exact=True), ref) < BUDGET["float64-exact"]


def test_head_permutation_must_stay_in_kv_groups() -> None:
    model = make("llama")
    with pytest.raises(GradfreeError, match="within KV groups"):
        permute_heads_(model, 0, [2, 1, 0, 3])
    with pytest.raises(GradfreeError, match="KV group 5 does not exist"):
        rotate_head_values_(model, 0, 5, torch.eye(16))
    with pytest.raises(GradfreeError, match="Layer 7 does not exist"):
        permute_neurons_(model, 7, list(range(96)))


def test_per_layer_rotation_error() -> None:
    model = make("qwen2", torch.float64)
    d = get_adapter(model).hidden_size
    q = random_orthogonal(d, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with exact_rmsnorm(model), torch.no_grad():
        same = per_layer_rotation_error(model, [q, q], IDS)
        diff = per_layer_rotation_error(model, [q, random_orthogonal(d, 1)], IDS)
    assert same["kind"] == diff["kind"] == "approximation"
    assert same["transition_cost"] == pytest.approx([0.0], abs=1e-12)
    assert same["relative_logits_error"] < 1e-10
    assert diff["transition_cost"][0] > 0.5 and diff["relative_logits_error"] > 1e-3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(GradfreeError, match="one basis per layer"):
        per_layer_rotation_error(model, [q], IDS)


@settings(max_examples=10, deadline=None)
@given(
    family=st.sampled_from(["llama", "qwen2", "qwen3"]),
    kv=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8]),
    width=st.integers(2, 6),
    layers=st.integers(1, 3),
    inter=st.integers(4, 40),
    tied=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_invariance_over_random_shapes(
    family: str,
    kv: int,
    group: int,
    head_dim: int,
    width: int,
    layers: int,
    inter: int,
    tied: bool,
    seed: int,
) -> None:
    heads = kv * group
    model = tiny_model(
        family,
        seed=seed,
        dtype=torch.float64,
        hidden_size=heads * width,  # Llama's config insists on a multiple of the head count
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_hidden_layers=layers,
        intermediate_size=inter,
        tie_word_embeddings=tied,
    )
    ref = logits(model, exact=True)
    scramble(model, seed=seed)
    assert rel_err(logits(model, exact=True), ref) < BUDGET["float64-exact"]


def test_large_matrices_are_rotated_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-place, block-by-block path (used for 150k-row embeddings) is exact too."""
    from gradfree.surgery import edit

    monkeypatch.setattr(edit, "_CHUNK_ROWS", 5)
    model = make("qwen2", torch.float64)
    ref = logits(model, exact=True)
    scramble(model, seed=4)
    assert rel_err(logits(model, exact=True), ref) < BUDGET["float64-exact"]
