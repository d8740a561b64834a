"""Seed 001's alignment toolkit on tiny teacher/student models: the stored rotations are
orthogonal, function-preserving toggles leave KL unchanged, folded transforms unfold to the
original weights, and the ridge head reproduces a planted teacher's logits."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gradfree.adapters import get_adapter
from gradfree.align import AlignConfig, apply_plan_, check_ledger, fit_alignment, fit_ridge_head
from gradfree.align.evaluate import build_reference, evaluate_variant
from gradfree.align.ledger import write_ledger
from gradfree.capture import Subject, make_config, run_capture
from gradfree.surgery import (
    fuse_norms_,
    invert_permutation,
    permute_heads_,
    permute_kv_groups_,
    permute_neurons_,
    random_orthogonal,
    rotate_residual_,
)
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

TEXTS = [
    "The old bridge crosses the river near the market square.",
    "Visitors climb the tower at dawn to see the mountains.",
    "The museum keeps maps, coins and letters from the harbour.",
    "A quiet garden lies behind the cathedral walls.",
]


@dataclass
class Doc:
    id: str
    text: str
    lang: str = "en"


def docs() -> list[Doc]:
    return [Doc(f"d{i}", t, "en" if i % 2 else "fr") for i, t in enumerate(TEXTS)]


CFG = AlignConfig(
    max_length=32,
    batch_size=2,
    dump_max=64,
    pattern_docs=2,
    pattern_max_length=24,
    stage_size=2,
    ridge_head=True,
    style_prompts=False,
)


@pytest.fixture(scope="module")
def pair() -> tuple[Subject, Subject]:
    tok = tiny_tokenizer()
    teacher = Subject(tiny_model("qwen2.5-1.5b-like", seed=1), tok, "teacher")
    student = Subject(tiny_model("qwen2.5-0.5b-like", seed=2), tok, "student")
    return teacher, student


@pytest.fixture(scope="module")
def plan(pair: tuple[Subject, Subject], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    teacher, student = pair
    return fit_alignment(teacher, student, docs(), CFG, tmp_path_factory.mktemp("fit"))


def test_every_stored_rotation_is_orthogonal_and_the_ledger_checks(plan, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for q in [plan.q, *plan.q_layer, *plan.q_stage, *plan.q_refined]:
        eye = torch.eye(q.shape[0], dtype=torch.float64)
        assert torch.allclose(q @ q.T, eye, atol=1e-5) and torch.allclose(q.T @ q, eye, atol=1e-5)
        x = torch.randn(5, q.shape[0], dtype=torch.float64)
        assert torch.allclose((x @ q) @ q.T, x, atol=1e-10)
    folder = write_ledger(tmp_path, "run", plan, plan.q_refined)
    n = len(plan.q_layer)
    assert sorted(p.name for p in folder.glob("layer_*.json")) == sorted(
        f"layer_{i}.json" for i in range(n + 1)
    )
    result = check_ledger(folder)
    assert result["ok"] and len(result["layers"]) == n + 1
    # a corrupted matrix is caught by the recomputation, not by the JSON
    from gradfree.capture.store import read_shard, save_shard

    path = folder / "layer_1.safetensors"
    mats = read_shard(path)
    mats["applied"] = mats["applied"] * 1.01
    save_shard(path, mats)
    bad = check_ledger(folder)
    assert not bad["ok"]
    assert not bad["layers"][1]["applied"]["orthogonal"]


def test_fit_diagnostics_say_the_rotation_aligns(plan) -> None:  # type: ignore[no-untyped-def]
    for d in plan.layers[:-1]:
        assert d["cosine_layer"] >= d["cosine_global"] - 1e-9  # own solution is optimal
        assert d["cosine_global"] > d["cosine_identity"]
    for r in plan.refine:
        assert r["reflections"] <= CFG.max_reflections
        assert r["cosine_history"] == sorted(r["cosine_history"])


def test_function_preserving_toggles_give_identical_kl(pair, plan) -> None:  # type: ignore[no-untyped-def]
    teacher, student = pair
    held = docs()[:2]
    ref = build_reference(teacher.model, student.tokenizer, held, plan, max_length=32)
    results = {}
    for name, toggles in {
        "base": {},
        "perm": {"permute": True},
        "perm+rot": {"permute": True, "rotate": True},
        "style": {"style": True},
        "perm+rot+per-stage": {"permute": True, "rotate": True, "per_stage": True},
    }.items():
        model = copy.deepcopy(student.model)
        apply_plan_(model, plan, **toggles)
        results[name] = evaluate_variant(model, student.tokenizer, ref, plan.k)
    base = results["base"]["kl"]
    for name in ("perm", "perm+rot"):
        assert results[name]["kl"] == pytest.approx(base, rel=1e-5, abs=1e-9)
    # negative controls: steps that change the function change KL
    assert abs(results["style"]["kl"] - base) > 1e-4 * base
    assert abs(results["perm+rot+per-stage"]["kl"] - base) > 1e-6 * base
    # the rotation is what moves the coordinates toward the teacher's
    assert results["perm+rot"]["layers"][0]["cosine"] > results["perm"]["layers"][0]["cosine"]
    assert set(results["base"]["by_lang"]) == {"en", "fr"}


def test_folded_permutations_and_rotation_unfold_to_the_original(pair, plan) -> None:  # type: ignore[no-untyped-def]
    _, student = pair
    reference = copy.deepcopy(student.model)
    fuse_norms_(reference)  # norm folding is the one step that is not undone
    model = copy.deepcopy(student.model)
    apply_plan_(model, plan, permute=True, rotate=True)
    changed = any(
        not torch.allclose(p, r)
        for p, r in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert changed
    rotate_residual_(model, plan.q.T)
    for j in sorted(plan.neuron_perms, reverse=True):
        permute_neurons_(model, j, invert_permutation(plan.neuron_perms[j]))
    for j in sorted(plan.head_perms, reverse=True):
        gperm, hperm = plan.head_perms[j]
        permute_heads_(model, j, invert_permutation(hperm))
        permute_kv_groups_(model, j, invert_permutation(gperm))
    for (name, p), r in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, r, atol=1e-5), name


@torch.no_grad()
def test_ridge_head_with_inverse_transport_reproduces_teacher_logits(tmp_path: Path) -> None:
    """Planted: the student is the teacher seen through a transport (norms fused, residual
    rotated by a random Q), with a useless head. The ridge head fitted from capture statistics
    in the student's coordinates reproduces the teacher's logits; undoing the transport (Qᵀ)
    keeps them."""
    tok = tiny_tokenizer()
    teacher = tiny_model("qwen2", seed=3, dtype=torch.float64)
    student = copy.deepcopy(teacher)
    fuse_norms_(student)
    q = random_orthogonal(get_adapter(student).hidden_size, 4)
    rotate_residual_(student, q)
    head = get_adapter(student).lm_head
    head.weight.normal_(0.0, 0.02)
    cap = run_capture(
        {"teacher": Subject(teacher, tok), "student": Subject(student, tok)},
        TEXTS,
        tmp_path / "cap",
        make_config(sites=["final.normed"], max_length=64),
        progress=False,
    )
    w, info = fit_ridge_head(
        cap.stats("student", "final.normed", "all"),
        cap.cross("final.normed", "final.normed", "all"),
        get_adapter(teacher).lm_head.weight,
        head.weight,
        rel_lambda=1e-12,
        blend=1.0,
        chunk=50,  # several vocabulary chunks
    )
    assert info["vocab"] == 262
    head.weight.copy_(w)
    ids = torch.tensor([list(tok(TEXTS[1])["input_ids"])])
    ref = teacher(ids).logits
    err = float((student(ids).logits - ref).abs().max() / ref.abs().max())
    assert err < 1e-4
    rotate_residual_(student, q.T)  # the inverse transport
    err_back = float((student(ids).logits - ref).abs().max() / ref.abs().max())
    assert err_back < 1e-4
    # chunking does not change the solution; blending 0 returns the original head
    w_one, _ = fit_ridge_head(
        cap.stats("student", "final.normed", "all"),
        cap.cross("final.normed", "final.normed", "all"),
        get_adapter(teacher).lm_head.weight,
        w,
        rel_lambda=1e-3,
        blend=0.0,
    )
    assert torch.equal(w_one, w)


# --- the real pair (slow) ---------------------------------------------------------------------
REAL = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")


@pytest.mark.slow
def test_real_pair_rotation_is_function_preserving(tmp_path: Path) -> None:
    from gradfree.models import is_fetched, load_model

    if not all(is_fetched(n) for n in REAL):
        pytest.skip("the Qwen2.5-Coder 1.5B/0.5B pair is not fetched (gradfree models fetch)")
    teacher, student = (load_model(n) for n in REAL)
    cfg = AlignConfig(max_length=64, permute_neurons=False, pattern_docs=1, pattern_max_length=32)
    plan = fit_alignment(teacher, student, docs()[:2], cfg, tmp_path)
    assert plan.k == 896
    ids = torch.tensor([list(student.tokenizer(TEXTS[0])["input_ids"])])
    with torch.no_grad():
        ref = student.model(ids).logits
        model = copy.deepcopy(student.model)
        apply_plan_(model, plan, permute=True, rotate=True)
        out = model(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert all(d["cosine_global"] > d["cosine_identity"] for d in plan.layers[:-1])
