"""The SliceGPT baseline: exact when nothing is sliced, exact on a model that lives in k dims,
its shortcut matrices needed and counted, and its per-block bases tracking a drifting stream."""

from __future__ import annotations

import copy

import pytest
import torch

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import sym_eigh
from gradfree.baselines import param_count, slicegpt_, slicegpt_param_formula, slicegpt_width
from gradfree.baselines.slicegpt import ATTN_SHORTCUT, MLP_SHORTCUT
from gradfree.surgery import exact_rmsnorm, fuse_norms_, random_orthogonal, rotate_residual_
from gradfree.testing.tiny import tiny_model

IDS = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(1))
CASES = ["llama", "qwen2", "qwen3", "qwen2.5-0.5b-like"]


def windows(n: int = 6, length: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 259, (1, length), generator=g) for _ in range(n)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    with exact_rmsnorm(model):
        return model(IDS).logits


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fraction_zero_reproduces_the_dense_logits(
    case: str, dtype: torch.dtype, tol: float
) -> None:
    model = tiny_model(case, dtype=dtype)
    ref = logits(model)
    res = slicegpt_(model, windows(), 0.0)
    d = get_adapter(model).hidden_size
    assert all(w == (d, d, d) for w in res.widths) and res.head_width == d
    # the bases are not the identity: the model really was rotated block by block
    s = getattr(get_adapter(model).layer(0).module, ATTN_SHORTCUT)
    assert float((s.double() - torch.eye(d, dtype=torch.float64)).abs().max()) > 0.1
    assert rel_err(logits(model), ref) < tol


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_random_rotations_are_exact_with_the_shortcuts_and_wrong_without(case: str) -> None:
    model = tiny_model(case, dtype=torch.float64)
    ref = logits(model)
    d = get_adapter(model).hidden_size
    seeds = iter(range(100, 1000))
    slicegpt_(model, windows(), 0.0, basis_fn=lambda g: random_orthogonal(d, next(seeds)))
    assert rel_err(logits(model), ref) < 1e-10
    for layer in get_adapter(model).layers:  # a missing shortcut is treated as the identity
        delattr(layer.module, ATTN_SHORTCUT)
        delattr(layer.module, MLP_SHORTCUT)
    assert rel_err(logits(model), ref) > 1e-2


def lives_in_k_dims(case: str, fraction: float) -> tuple[torch.nn.Module, int]:
    """A fused tiny model whose residual stream lies in a random k-dim subspace (k: SliceGPT's
    width at ``fraction``): embeddings, o and down write only into the first k coordinates,
    then everything is rotated."""
    model = tiny_model(case, dtype=torch.float64)
    a = get_adapter(model)
    k = slicegpt_width(a.hidden_size, fraction)
    fuse_norms_(model)
    with torch.no_grad():
        a.embed_tokens.weight[:, k:] = 0
        for layer in a.layers:
            layer.o_proj.weight[k:] = 0
            layer.down_proj.weight[k:] = 0
    rotate_residual_(model, random_orthogonal(a.hidden_size, 5))
    return model, k


@pytest.mark.parametrize("case", CASES)
def test_a_model_that_lives_in_k_dims_is_sliced_exactly(case: str) -> None:
    model, k = lives_in_k_dims(case, 0.25)
    ref = logits(model)
    res = slicegpt_(model, windows(), 0.25, slice_head=True)
    assert res.widths[0] == (k, k, k) and res.head_width == k < res.hidden_size
    assert rel_err(logits(model), ref) < 1e-8


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("slice_head", [False, True])
def test_parameter_count_formula_matches_the_stored_tensors(case: str, slice_head: bool) -> None:
    dense = tiny_model(case)
    model = copy.deepcopy(dense)
    res = slicegpt_(model, windows(), 0.3, slice_head=slice_head)
    d = get_adapter(dense).hidden_size
    k = slicegpt_width(d, 0.3)
    assert res.widths[-1] == (k, k, k if slice_head else d)
    stored = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=True)}
    assert res.params == param_count(model) == sum(stored.values())
    assert res.params == slicegpt_param_formula(dense, res.widths)
    shortcuts = sum(
        getattr(la.module, n).numel()
        for la in get_adapter(model).layers
        for n in (ATTN_SHORTCUT, MLP_SHORTCUT)
    )
    assert shortcuts == sum(ki * km + km * ko for ki, km, ko in res.widths) > 0


def drifting_stream(k: int = 32) -> torch.nn.Module:
    """The embeddings live in subspace A (first k coordinates); block 0's attention writes
    nothing and its MLP writes a large component into B (the other coordinates), as do all later
    blocks. The stream's principal subspace moves from A to B after block 0: one basis for the
    whole stream must favour B and starve block 0; per-block bases can follow."""
    model = tiny_model("llama", dtype=torch.float64, num_hidden_layers=4)
    a = get_adapter(model)
    fuse_norms_(model)
    with torch.no_grad():
        a.embed_tokens.weight[:, k:] = 0
        a.layer(0).o_proj.weight.zero_()
        for layer in a.layers:
            layer.o_proj.weight[:k] = 0
            layer.down_proj.weight[:k] = 0
        a.layer(0).down_proj.weight.mul_(30.0)
    rotate_residual_(model, random_orthogonal(a.hidden_size, 3))
    return model


def test_per_block_bases_beat_one_global_basis_on_a_drifting_stream() -> None:
    dense = drifting_stream()
    ref = logits(dense)
    d = get_adapter(dense).hidden_size
    grams: list[torch.Tensor] = []

    def record(g: torch.Tensor) -> torch.Tensor:
        grams.append(g)
        return torch.eye(d, dtype=torch.float64)

    slicegpt_(copy.deepcopy(dense), windows(), 0.0, basis_fn=record)  # the dense signals
    q_global = sym_eigh(torch.stack(grams).sum(0), damping=0.01)[1]
    per_block = copy.deepcopy(dense)
    slicegpt_(per_block, windows(), 0.5, slice_head=True)
    one_basis = copy.deepcopy(dense)
    slicegpt_(one_basis, windows(), 0.5, slice_head=True, basis_fn=lambda g: q_global)
    err_block, err_global = rel_err(logits(per_block), ref), rel_err(logits(one_basis), ref)
    assert err_block < 0.5 * err_global, (err_block, err_global)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(GradfreeError, match=r"fraction must be in \[0, 1\)"):
        slicegpt_(tiny_model("llama"), windows(), fraction)


def test_no_calibration_windows_is_refused() -> None:
    with pytest.raises(GradfreeError, match="at least one calibration window"):
        slicegpt_(tiny_model("llama"), [], 0.2)
