"""gradfree.compress KV options (seed 000's GQA strategies): ``kv="reuse"`` keeps the student's
keys and values and turns the teacher's queries by a per-RoPE-pair rotation, ``head_rotation=
"dense"`` compresses all value dims at once. Planted teachers are recovered exactly, merges keep
the student's k/v bit for bit, the pair Procrustes commutes with RoPE, the Qwen-like geometries
give checkpoints that reload, bad values fail in one sentence."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject
from gradfree.compress import capture_pair, compress, fold_pair_, interpolate, make_recipe, project
from gradfree.solvers import pair_rotation, rope_pair_procrustes
from gradfree.testing.planted import embed_student
from gradfree.testing.tiny import HARBOUR_DOCS, tiny_model, tiny_tokenizer

DOCS = HARBOUR_DOCS
FAST = {"max_length": 48, "batch_size": 4, "dump_rate": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([tiny_tokenizer()("Where is the harbour? Two streets north.")["input_ids"]])
    with torch.no_grad():
        return model(ids).logits.double()


def _rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face's own RoPE (rotate-half) on x (positions × h) at per-position pair angles."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    emb = torch.cat([angles, angles], dim=-1)
    out, _ = apply_rotary_pos_emb(x[None, None], x[None, None], emb.cos()[None], emb.sin()[None])
    return out[0, 0]


def test_pair_procrustes_recovers_a_planted_rotation_and_commutes_with_rope() -> None:
    g = torch.Generator().manual_seed(0)
    h = 8
    theta = (torch.rand(h // 2, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi
    r0 = pair_rotation(theta)
    a = torch.randn(400, h, generator=g, dtype=torch.float64)
    # Exact data: the planted rotation itself; noisy data: close to it.
    assert torch.allclose(rope_pair_procrustes(a.T @ (a @ r0)), r0, atol=1e-12)
    b = a @ r0 + 0.05 * torch.randn(400, h, generator=g, dtype=torch.float64)
    c = a.T @ b
    r = rope_pair_procrustes(c)
    assert torch.allclose(r, r0, atol=2e-2)
    assert torch.allclose(r.T @ r, torch.eye(h, dtype=torch.float64), atol=1e-12)
    # It is the maximiser of tr(RᵀC) over the set, not just a member of it.
    best = float((r * c).sum())
    for _ in range(20):
        other = pair_rotation(torch.rand(h // 2, generator=g, dtype=torch.float64) * 2 * math.pi)
        assert float((other * c).sum()) <= best + 1e-9
    # Commutes with RoPE: q and k turned by the same R give the same scores at every position.
    q, k = torch.randn(6, h, generator=g), torch.randn(6, h, generator=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, h, 2, dtype=torch.float32) / h))
    pos = torch.outer(torch.arange(6, dtype=torch.float32), inv_freq)
    scores = _rope(q, pos) @ _rope(k, pos).T
    rf = r.float()
    turned = _rope(q @ rf, pos) @ _rope(k @ rf, pos).T
    assert torch.allclose(turned, scores, atol=1e-5)
    # A general orthogonal map of the head (pairs mixed) does not: the test can fail.
    dense = torch.linalg.qr(torch.randn(h, h, generator=g))[0]
    mixed = _rope(q @ dense, pos) @ _rope(k @ dense, pos).T
    assert not torch.allclose(mixed, scores, atol=1e-2)
    with pytest.raises(ValueError, match="even"):
        rope_pair_procrustes(torch.eye(3))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kv_reuse_recovers_the_planted_student(family: str, tmp_path: Path) -> None:
    student = tiny_model(family, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher, _ = embed_student(student, 48, seed=3, permute=True)
    ref = _logits(student)
    tok = tiny_tokenizer()
    sol, _ = compress(
        Subject(teacher, tok),
        Subject(copy.deepcopy(student), tok),
        DOCS,
        tmp_path / "out",
        make_recipe(kv="reuse", merge="none", **FAST),
    )
    assert torch.allclose(_logits(sol.projected), ref, atol=1e-4)
    for plan in sol.attention:
        eye = torch.eye(plan.values[0].shape[1], dtype=torch.float64)
        # The teacher's keys are the student's: the recovered rotation is the identity...
        assert all(torch.allclose(r, eye, atol=1e-5) for r in plan.key_rotations)
        assert all(abs(c - 1) < 1e-5 for c in plan.key_alignment)
        # ... and the student's values predict the teacher's exactly (M_g = I up to damping).
        assert all(torch.allclose(m, eye, atol=1e-4) for m in plan.values)
        assert all(abs(c - 1) < 1e-5 for c in plan.value_alignment)
        described = plan.describe()
        assert described["kv"] == "reuse" and len(described["key_alignment"]) == 2


@torch.no_grad()
def _turn_keys_(model: torch.nn.Module, seed: int) -> list[list[torch.Tensor]]:
    """Turn every KV group's keys and its queries by one random per-pair rotation R_g: the scores,
    hence the function, are unchanged (R_g commutes with RoPE), but k_T = R_g k_S."""
    from gradfree.adapters import get_adapter

    a = get_adapter(model)
    geo, g = a.geometry, torch.Generator().manual_seed(seed)
    hd, out = geo.head_dim, []
    for i in range(a.num_layers):
        layer, rots = a.layer(i), []
        for grp in range(geo.num_kv_heads):
            r = pair_rotation(torch.rand(hd // 2, generator=g, dtype=torch.float64) * 6.28).float()
            rots.append(r.double())
            for lin, heads in ((layer.k_proj, [grp]), (layer.q_proj, geo.heads_in_group(grp))):
                for h in heads:
                    blk = slice(h * hd, (h + 1) * hd)
                    lin.weight[blk] = r @ lin.weight[blk]
                    if lin.bias is not None:
                        lin.bias[blk] = r @ lin.bias[blk]
        out.append(rots)
    return out


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kv_reuse_finds_a_planted_key_rotation(family: str, tmp_path: Path) -> None:
    # Same residual stream, keys turned per group: reuse must undo exactly that turn (R_gᵀ), so
    # the queries come back to the student's and the logits are the student's.
    student = tiny_model(family, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    hd = student.config.head_dim
    for layer in student.model.layers if family == "qwen3" else []:
        # q/k_norm weights equal on both dims of each pair commute with R_g: the turn stays exact.
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            with torch.no_grad():
                norm.weight.copy_((0.5 + torch.rand(hd // 2)).repeat(2))
    ref = _logits(student)
    teacher = copy.deepcopy(student)
    planted = _turn_keys_(teacher, seed=11)
    assert torch.allclose(_logits(teacher), ref, atol=1e-4)  # function-preserving
    tok = tiny_tokenizer()
    sol, _ = compress(
        Subject(teacher, tok),
        Subject(copy.deepcopy(student), tok),
        DOCS,
        tmp_path / "out",
        make_recipe(kv="reuse", basis="identity", merge="none", **FAST),
    )
    for plan, rots in zip(sol.attention, planted, strict=True):
        for found, r in zip(plan.key_rotations, rots, strict=True):
            assert torch.allclose(found, r.T, atol=1e-4)
        assert all(abs(c - 1) < 1e-5 for c in plan.key_alignment)
    assert torch.allclose(_logits(sol.projected), ref, atol=1e-4)


def test_kv_reuse_merges_keep_the_students_keys_and_values_bit_for_bit(tmp_path: Path) -> None:
    student = tiny_model("qwen3", hidden_size=32, intermediate_size=48, seed=0)
    teacher = tiny_model("qwen3", hidden_size=48, intermediate_size=64, seed=5)
    tok = tiny_tokenizer()
    fold_pair_(teacher, student)
    recipe = make_recipe(kv="reuse", **FAST)
    cap = capture_pair(
        Subject(teacher, tok), Subject(student, tok), DOCS, tmp_path / "cap", recipe, [0, 1]
    )
    proj = project(teacher, student, cap, recipe)
    assert all(len(p.key_alignment) == student.config.num_key_value_heads for p in proj.attention)
    for mode in ("uniform", "optimal", "ridge"):
        sol = interpolate(proj, teacher, student, cap, make_recipe(recipe, merge=mode, alpha=0.5))
        for lm, ls in zip(sol.model.model.layers, student.model.layers, strict=True):
            for name in ("k_proj", "v_proj", "k_norm"):
                for pm, ps in zip(
                    getattr(lm.self_attn, name).parameters(),
                    getattr(ls.self_attn, name).parameters(),
                    strict=True,
                ):
                    assert torch.equal(pm, ps), (mode, name)
        if mode == "uniform":  # the queries did take the teacher's half
            q_m = sol.model.model.layers[0].self_attn.q_proj.weight
            assert not torch.allclose(q_m, student.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(GradfreeError, match=r"^The recipe's kv differs from the projection's"):
        interpolate(proj, teacher, student, cap, make_recipe(recipe, kv="rotate", merge="uniform"))


def test_dense_head_rotation_is_exact_on_the_planted_pair(tmp_path: Path) -> None:
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher, _ = embed_student(student, 48, seed=5, permute=True)
    ref = _logits(student)
    tok = tiny_tokenizer()
    sol, _ = compress(
        Subject(teacher, tok),
        Subject(copy.deepcopy(student), tok),
        DOCS,
        tmp_path / "out",
        make_recipe(head_rotation="dense", merge="none", **FAST),
    )
    assert torch.allclose(_logits(sol.projected), ref, atol=1e-4)
    kv_dim = student.config.num_key_value_heads * student.config.head_dim
    for plan in sol.attention:
        assert plan.dense_values is not None
        assert torch.allclose(plan.dense_values, torch.eye(kv_dim, dtype=torch.float64), atol=1e-5)
        var = plan.value_variance  # equal head dims: both compressions keep everything
        assert abs(var["dense"] - 1) < 1e-9 and abs(var["block_diagonal"] - 1) < 1e-9
        assert abs(var["dense_in_group"] - 1) < 1e-5


@pytest.mark.parametrize(
    ("teacher", "student"),
    [("qwen3-32b-like", "qwen3-4b-like"), ("qwen2.5-1.5b-like", "qwen2.5-0.5b-like")],
)
@pytest.mark.parametrize("option", [{"kv": "reuse"}, {"head_rotation": "dense"}])
def test_kv_options_on_the_presets_give_checkpoints_that_reload(
    teacher: str, student: str, option: dict[str, str], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tm, sm = tiny_model(teacher, seed=1), tiny_model(student, seed=2)
    tok = tiny_tokenizer()
    recipe = make_recipe(merge="optimal", **option, **FAST)
    sol, out = compress(Subject(tm, tok), Subject(sm, tok), DOCS[:3], tmp_path / "c", recipe)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    out_logits = _logits(loaded)
    assert torch.isfinite(out_logits).all()
    assert torch.allclose(out_logits, _logits(sol.model), atol=1e-4)
    n_groups = sm.config.num_key_value_heads
    for plan in sol.attention:
        var = plan.value_variance  # the dense PCA is the best kv_dim_S-dim subspace: never worse
        assert var["dense"] >= var["block_diagonal"] - 1e-9
        assert "value_variance" in plan.describe()
        if option.get("kv") == "reuse":
            assert len(plan.describe()["key_alignment"]) == n_groups
        else:
            assert 0.0 < var["dense_in_group"] <= 1.0 + 1e-9
    if option.get("kv") == "reuse":  # sm was folded in place by compress: the reference k/v
        for lm, ls in zip(sol.model.model.layers, sm.model.layers, strict=True):
            assert torch.equal(lm.self_attn.k_proj.weight, ls.self_attn.k_proj.weight)
            assert torch.equal(lm.self_attn.v_proj.weight, ls.self_attn.v_proj.weight)


def test_bad_kv_values_fail_in_one_sentence() -> None:
    with pytest.raises(
        GradfreeError, match=r"^Invalid recipe: kv: Input should be 'rotate' or 'reuse'\.$"
    ):
        make_recipe(kv="freeze")
    with pytest.raises(GradfreeError, match=r"^Invalid recipe: head_rotation: .*'dense'\.$"):
        make_recipe(head_rotation="full")
    with pytest.raises(
        GradfreeError,
        match=r"^Invalid recipe: head_rotation 'dense' compresses the teacher's values, which kv "
        r"'reuse' replaces by the student's\.$",
    ):
        make_recipe(kv="reuse", head_rotation="dense")
    r = make_recipe()
    assert (r.kv, r.head_rotation) == ("rotate", "block_diagonal")
