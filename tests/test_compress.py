"""gradfree.compress: planted teachers are recovered exactly, teacher = student is a fixed point,
the Qwen3 32B→4B and Qwen2.5 1.5B→0.5B geometries give checkpoints that plain transformers
reloads, the RoPE pairs and the closed-form α are right, recipes fail in one sentence."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gradfree.capture import Subject
from gradfree.compress import compress, load_recipe, make_recipe
from gradfree.compress.attention import rope_pairs
from gradfree.compress.merge import alpha_terms
from gradfree.compress.planted import embed_student
from gradfree.errors import GradfreeError
from gradfree.solvers import optimal_alpha
from gradfree.testing import tiny_model, tiny_tokenizer

DOCS = [
    f"Stop {i}: the old harbour, {i * 7} steps from the square; " * 3
    + "abcdefghijklmnopqrstuvwxyz"[i % 26 :]
    for i in range(8)
]
FAST = {"max_length": 48, "batch_size": 4, "dump_rate": 1.0}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls on a shared machine: intra-op threads only contend (10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids() -> torch.Tensor:
    return torch.tensor([tiny_tokenizer()("Where is the harbour? Two streets north.")["input_ids"]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits.double()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_planted_rotation_is_recovered_exactly(family: str, tmp_path: Path) -> None:
    student = tiny_model(family, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher, q = embed_student(student, 48, seed=3, permute=True)
    ref = _logits(student)
    assert torch.allclose(_logits(teacher), ref, atol=1e-4)  # the planted teacher is exact
    tok = tiny_tokenizer()
    sol, _ = compress(
        Subject(teacher, tok),
        Subject(copy.deepcopy(student), tok),
        DOCS,
        tmp_path / "out",
        make_recipe(merge="none", **FAST),
    )
    assert torch.allclose(_logits(sol.projected), ref, atol=1e-4)
    # Procrustes finds the planted rotation itself, not just its span.
    assert torch.allclose(sol.bases.read(0), q[:, :32], atol=1e-4)
    # Hungarian undoes the planted head and neuron permutations: every match is perfect.
    assert all(abs(s - 1) < 1e-4 for a in sol.attention for s in a.similarity)
    assert all(abs(m.matched_correlation - 1) < 1e-4 for m in sol.mlp)


@pytest.mark.parametrize(
    ("basis", "per_layer", "layer_map"),
    [("svd", False, "proportional"), ("two_tier", True, "proportional"), ("joint", True, "cka")],
)
def test_every_aligned_basis_recovers_the_planted_rotation(
    basis: str, per_layer: bool, layer_map: str, tmp_path: Path
) -> None:
    student = tiny_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher, q = embed_student(student, 40, seed=4, permute=False)
    tok = tiny_tokenizer()
    recipe = make_recipe(
        basis=basis, per_layer=per_layer, layer_map=layer_map, merge="none", **FAST
    )
    sol, _ = compress(
        Subject(teacher, tok), Subject(copy.deepcopy(student), tok), DOCS, tmp_path / "o", recipe
    )
    assert sol.layer_map == [0, 1]
    for v in sol.bases.bases:
        assert torch.allclose(v, q[:, :32], atol=1e-4)
    assert all(d["transition_cost"] < 1e-4 for d in sol.bases.diagnostics)
    assert torch.allclose(_logits(sol.projected), _logits(student), atol=1e-4)


def test_identity_teacher_is_a_fixed_point(tmp_path: Path) -> None:
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48)
    ref = _logits(student)
    tok = tiny_tokenizer()
    for alpha, merge in ((1.0, "uniform"), (0.5, "uniform"), (0.5, "optimal")):
        sol, _ = compress(
            Subject(copy.deepcopy(student), tok),
            Subject(copy.deepcopy(student), tok),
            DOCS,
            tmp_path / f"out-{merge}-{alpha}",
            make_recipe(basis="identity", merge=merge, alpha=alpha, **FAST),
        )
        assert torch.allclose(sol.bases.read(0), torch.eye(32, dtype=torch.float64))
        assert torch.allclose(_logits(sol.model), ref, atol=1e-4)


def test_merges_with_another_teacher_change_the_student_and_ridge_head_fits_better(
    tmp_path: Path,
) -> None:
    # A merge with a real teacher must change the model (so the fixed-point test cannot pass by
    # returning the student unconditionally), and the ridge head must reach a lower logit loss
    # against the teacher than the student's head and the α-merged head (it is their minimiser).
    from gradfree.compress import capture_pair, fold_pair_, merge, project
    from gradfree.solvers import linear_loss_from_stats

    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, seed=0)
    teacher = tiny_model("qwen2", hidden_size=48, intermediate_size=64, seed=5)
    ref = _logits(student)
    tok = tiny_tokenizer()
    fold_pair_(teacher, student)
    recipe = make_recipe(**FAST)
    cap = capture_pair(
        Subject(teacher, tok), Subject(student, tok), DOCS, tmp_path / "cap", recipe, [0, 1]
    )
    proj = project(teacher, student, cap, recipe)
    uni = merge(proj, teacher, student, cap, make_recipe(recipe, merge="uniform", alpha=0.5))
    assert not torch.allclose(_logits(uni.model), ref, atol=1e-3)
    opt = merge(proj, teacher, student, cap, make_recipe(recipe, merge="optimal"))
    head = merge(
        proj,
        teacher,
        student,
        cap,
        make_recipe(recipe, merge="optimal", ridge_head=True, ridge_lambda=1e-6),
    )
    xtx = cap.stats("student", "final.normed").second_moment()
    cr = cap.cross("final.normed", "final.normed")
    h_t = teacher.lm_head.weight.detach().double()
    xty = (cr.m_ab / cr.count).T @ h_t.T
    yty = float(torch.trace(h_t @ cap.stats("teacher", "final.normed").second_moment() @ h_t.T))

    def loss(m: torch.nn.Module) -> float:
        return linear_loss_from_stats(xtx, xty, yty, m.lm_head.weight.detach().double())

    assert loss(head.model) < loss(opt.model) <= loss(student) + 1e-9
    assert 0.0 <= opt.merge.head <= 1.0 if opt.merge else False


@pytest.mark.parametrize(
    ("teacher", "student", "merge"),
    [
        ("qwen3-32b-like", "qwen3-4b-like", "optimal"),
        ("qwen2.5-1.5b-like", "qwen2.5-0.5b-like", "ridge"),
        ("qwen2.5-1.5b-like", "qwen2.5-0.5b-like", "alignment"),
    ],
)
def test_presets_give_checkpoints_that_reload(
    teacher: str, student: str, merge: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    tm, sm = tiny_model(teacher, seed=1), tiny_model(student, seed=2)
    config_before = sm.config.to_dict()
    tok = tiny_tokenizer()
    recipe = make_recipe(basis="two_tier", merge=merge, **FAST)
    sol, out = compress(Subject(tm, tok), Subject(sm, tok), DOCS[:3], tmp_path / "c", recipe)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    after = loaded.config.to_dict()
    changed = {k for k in config_before if config_before.get(k) != after.get(k)}
    allowed = {"tie_word_embeddings"} if config_before.get("tie_word_embeddings") else set()
    ignore = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}
    assert changed - ignore <= allowed
    out_logits = _logits(loaded)
    assert torch.isfinite(out_logits).all()
    assert torch.allclose(out_logits, _logits(sol.model), atol=1e-4)
    for name in ("recipe.json", "report.json", "report.md", "tokenizer.json"):
        assert (out / name).is_file()
    assert not (out / "capture").exists()
    # KV groups are kept and student heads without a teacher head have zero projected output.
    g_t, g_s = tm.config.num_attention_heads, sm.config.num_attention_heads
    for plan in sol.attention:
        assert sum(h >= 0 for h in plan.head_map) == min(g_t, g_s)


def test_rope_pairs_are_the_teachers_even_pairs() -> None:
    from gradfree.adapters import get_adapter

    t = get_adapter(tiny_model("qwen2.5-1.5b-like"))  # head_dim 16
    s = get_adapter(tiny_model("qwen2.5-0.5b-like"))  # head_dim 8
    dims, gap = rope_pairs(t, s)
    assert dims.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert gap < 1e-12
    assert torch.allclose(t.rope.inv_freq()[dims[:4]], s.rope.inv_freq())


def test_alpha_terms_match_optimal_alpha() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    u = x + 0.3 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    w_s = torch.randn(5, 6, generator=g, dtype=torch.float64)
    w_p = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a, m = x.T @ x, x.T @ u
    num, den = alpha_terms(a, m, w_s, w_p)
    ref = optimal_alpha(a, x.T @ (u @ w_p.T), w_s, w_p, clip=False)
    assert abs(num / den - ref) < 1e-10


def test_recipe_errors_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(GradfreeError, match=r"^Unknown recipe option 'bogus'\.$"):
        make_recipe({"bogus": 1})
    with pytest.raises(GradfreeError, match=r"^Invalid recipe: alpha must be between 0 and 1\.$"):
        make_recipe(alpha=2.0)
    with pytest.raises(GradfreeError, match="basis"):
        make_recipe(basis="pca")
    path = tmp_path / "r.yaml"
    path.write_text("basis: two_tier\ntrunk_fraction: 0.25\nmerge: alignment\n")
    r = load_recipe(path, alpha=0.3)
    assert (r.basis, r.trunk_fraction, r.merge, r.alpha) == ("two_tier", 0.25, "alignment", 0.3)
    path.write_text("- a list\n")
    with pytest.raises(GradfreeError, match="mapping"):
        load_recipe(path)


def test_cli_refuses_existing_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradfree.cli import main

    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(SystemExit) as e:
        main(
            [
                "compress",
                "--teacher",
                "x",
                "--student",
                "y",
                "--corpus",
                "tourguide",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err
