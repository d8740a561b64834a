"""gradfree.compress: planted teachers are recovered exactly, teacher = student is a fixed point,
the Qwen3 32B→4B and Qwen2.5 1.5B→0.5B geometries give checkpoints that plain transformers
reloads, the RoPE pairs and the closed-form α are right, ridge with recapture fits the inputs that
the fitted blocks produce, recipes fail in one sentence."""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject
from gradfree.compress import compress, load_recipe, make_recipe
from gradfree.compress.attention import rope_pairs
from gradfree.compress.interpolate import alpha_terms
from gradfree.solvers import optimal_alpha
from gradfree.testing.planted import embed_student
from gradfree.testing.tiny import HARBOUR_DOCS, tiny_model, tiny_tokenizer

DOCS = HARBOUR_DOCS
FAST = {"max_length": 48, "batch_size": 4, "dump_rate": 1.0}
HELD_OUT = [
    f"Route {i}: turn left at the {i * 3}rd bridge, then the market is north of the tower. " * 2
    for i in range(6)
]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    from gradfree.compress import capture_pair, fold_pair_, interpolate, project
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
    uni = interpolate(proj, teacher, student, cap, make_recipe(recipe, merge="uniform", alpha=0.5))
    assert not torch.allclose(_logits(uni.model), ref, atol=1e-3)
    opt = interpolate(proj, teacher, student, cap, make_recipe(recipe, merge="optimal"))
    head = interpolate(
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
    assert 0.0 <= opt.alphas.head <= 1.0 if opt.alphas else False


@pytest.mark.parametrize("every", [1, 2])
def test_ridge_with_recapture_recovers_a_planted_teacher(every: int, tmp_path: Path) -> None:
    # compress() hands its calibration documents to interpolate(); the planted teacher's targets are
    # the student's own outputs, so every recaptured fit (and the recaptured head) is the student.
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher, _ = embed_student(student, 48, seed=3, permute=True)
    ref = _logits(student)
    tok = tiny_tokenizer()
    recipe = make_recipe(
        merge="ridge",
        ridge_lambda=1e-6,
        ridge_head=True,
        ridge_recapture=True,
        recapture_every=every,
        **FAST,
    )
    sol, _ = compress(
        Subject(teacher, tok), Subject(copy.deepcopy(student), tok), DOCS, tmp_path / "o", recipe
    )
    assert torch.allclose(_logits(sol.model), ref, atol=1e-4)
    # 2 blocks: attention then MLP passes per chunk of `every` blocks, then one for the head.
    chunks = [[0], [1]] if every == 1 else [[0, 1]]
    expected = [(s, b) for b in chunks for s in ("attn_in", "mlp_in")] + [("final.normed", [])]
    assert [(r["site"], r["blocks"]) for r in sol.recaptures] == expected


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two unrelated tiny Qwen2 models (4 blocks; teacher wider), folded, captured, projected."""
    from gradfree.compress import capture_pair, fold_pair_, project

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=4, seed=0)
    teacher = tiny_model("qwen2", hidden_size=48, intermediate_size=64, num_hidden_layers=4, seed=5)
    tok = tiny_tokenizer()
    fold_pair_(teacher, student)
    recipe = make_recipe(merge="ridge", ridge_lambda=1e-3, **FAST)
    cap = capture_pair(
        Subject(teacher, tok),
        Subject(student, tok),
        DOCS,
        tmp_path_factory.mktemp("pair") / "cap",
        recipe,
        [0, 1, 2, 3],
    )
    proj = project(teacher, student, cap, recipe)
    torch.set_num_threads(n)
    return {"teacher": teacher, "student": student, "tok": tok, "cap": cap, "proj": proj}


def _kl(teacher: torch.nn.Module, model: torch.nn.Module, docs: list[str]) -> float:
    """Mean per-token KL(teacher ‖ model) over the first 48 tokens of each document."""
    tok, total, n = tiny_tokenizer(), 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([tok(d)["input_ids"][:48]])
            lt = teacher(ids).logits.double().log_softmax(-1)
            lm = model(ids).logits.double().log_softmax(-1)
            total += float((lt.exp() * (lt - lm)).sum())
            n += ids.numel()
    return total / n


def test_recapture_beats_one_pass_ridge_on_held_out_documents(
    tiny_pair: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Measured with seeds 0-3 of this pair (λ = 1e-3): on held-out windows recapture's reader
    # loss is 10-100x lower in every block and the output KL to the teacher 2-8x lower. One-pass
    # ridge fits even block 0 from inputs the merged model no longer has (its embedding is
    # α-merged); recapture fits each block to the inputs that the fitted blocks produce.
    from gradfree.capture import run_capture
    from gradfree.compress import interpolate
    from gradfree.compress.distill import reader_errors

    t, s, cap, proj = (
        tiny_pair["teacher"],
        tiny_pair["student"],
        tiny_pair["cap"],
        tiny_pair["proj"],
    )
    tok = tiny_pair["tok"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    one = interpolate(proj, t, s, cap, proj.recipe.model_copy(update={"merge": "ridge"}))
    rc = interpolate(
        proj,
        t,
        s,
        cap,
        make_recipe(proj.recipe, merge="ridge", ridge_recapture=True),
        documents=DOCS,
        tokenizer=tok,
        progress=True,
    )
    assert one.recaptures == [] and len(rc.recaptures) == 8  # attention + MLP pass per block
    assert "recapture 8/8: mlp_in of blocks 3-3" in capsys.readouterr().err
    assert list(scratch.iterdir()) == []  # the recaptures' temporary folder is gone
    cfg = {
        "sites": ["attn_in", "mlp_in"],
        "layer_map": proj.layer_map,
        "max_length": 48,
        "batch_size": 4,
    }
    errors = {}
    for name, sol in (("one", one), ("rc", rc)):
        held = run_capture(
            {"teacher": Subject(t, tok), "student": Subject(sol.model, tok)},
            HELD_OUT,
            tmp_path / name,
            {**cfg, "cross_sites": cfg["sites"]},
            progress=False,
        )
        errors[name] = reader_errors(
            held, sol.model, proj.projected, proj.bases, proj.layer_map, proj.attention, 1.5**0.5
        )
    for j in range(4):
        for part in ("attn", "mlp"):
            assert 0 <= errors["rc"][j][part] < 0.5 * errors["one"][j][part], (j, part, errors)
    assert _kl(t, rc.model, HELD_OUT) < 0.75 * _kl(t, one.model, HELD_OUT)


@torch.no_grad()
def test_reader_errors_match_the_loss_on_the_tokens(
    tiny_pair: dict[str, Any], tmp_path: Path
) -> None:
    # reader_errors works from moments; here the same loss from the activations themselves.
    from gradfree.adapters import get_adapter
    from gradfree.capture import run_capture
    from gradfree.capture.hooks import site_hooks
    from gradfree.compress.distill import reader_errors
    from gradfree.compress.interpolate import _aug, attn_group_rows

    t, s, proj, tok = (
        tiny_pair["teacher"],
        tiny_pair["student"],
        tiny_pair["proj"],
        tiny_pair["tok"],
    )
    sites = ["attn_in", "mlp_in"]
    cfg = {"sites": sites, "cross_sites": sites, "max_length": 48, "batch_size": 4}
    pair = {"teacher": Subject(t, tok), "student": Subject(s, tok)}
    held = run_capture(pair, HELD_OUT, tmp_path / "h", cfg, progress=False)
    c = 1.5**0.5
    got = reader_errors(held, s, proj.projected, proj.bases, [0, 1, 2, 3], proj.attention, c)

    def acts(model: torch.nn.Module, key: str, ids: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor] = []
        with site_hooks(get_adapter(model), [key], lambda _k, x: out.append(x[0])) as h:
            h.forward(ids, torch.ones_like(ids))
        one = torch.ones(ids.shape[1], 1, dtype=torch.float64)
        return torch.cat([out[0].double(), one], 1)

    sa, pa = get_adapter(s), get_adapter(proj.projected)
    docs = [tok(d)["input_ids"] for d in HELD_OUT]
    windows = [ids[k : k + 48] for ids in docs for k in range(0, len(ids), 48)]
    for j, (site, names) in itertools.product(
        (0, 3), (("attn_in", ("q_proj", "k_proj", "v_proj")), ("mlp_in", ("gate_proj", "up_proj")))
    ):
        err = ref = 0.0
        for w in windows:
            ids = torch.tensor([w])
            xs, xt = acts(s, f"blocks.{j}.{site}", ids), acts(t, f"blocks.{j}.{site}", ids)
            v = torch.block_diag(proj.bases.read(j).double() / c, torch.ones(1, 1))
            for name in names:
                q = torch.cat([attn_group_rows(sa, proj.attention[j], g)[0] for g in (0, 1)])
                rows = q if name == "q_proj" else None
                ws, wp = (
                    _aug(getattr(sa.layer(j), name), rows),
                    _aug(getattr(pa.layer(j), name), rows),
                )
                y = xt @ v @ wp.T
                err += float(((xs @ ws.T - y) ** 2).sum())
                ref += float((y**2).sum())
        assert abs(got[j][site.removesuffix("_in")] - err / ref) < 1e-9 * (1 + err / ref)


def test_recapture_without_documents_fails_in_one_sentence(tiny_pair: dict[str, Any]) -> None:
    from gradfree.compress import interpolate, solve

    t, s, cap, proj = (
        tiny_pair["teacher"],
        tiny_pair["student"],
        tiny_pair["cap"],
        tiny_pair["proj"],
    )
    recipe = make_recipe(proj.recipe, merge="ridge", ridge_recapture=True)
    msg = (
        r"^ridge_recapture needs the calibration documents and their tokenizer: pass "
        r"documents= and tokenizer= to interpolate\(\) or solve\(\)\.$"
    )
    with pytest.raises(GradfreeError, match=msg):
        interpolate(proj, t, s, cap, recipe)
    with pytest.raises(GradfreeError, match=msg):
        solve(t, s, cap, recipe, documents=DOCS)  # documents without their tokenizer


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
    for bad, msg in (
        ({"merge": "optimal", "ridge_recapture": True}, "ridge_recapture needs merge 'ridge'"),
        (
            {"merge": "ridge", "ridge_recapture": True, "recapture_every": 0},
            "recapture_every must be at least 1",
        ),
        ({"merge": "ridge", "recapture_every": 2}, "recapture_every applies only with"),
    ):
        with pytest.raises(GradfreeError, match=rf"^Invalid recipe: {msg}.*\.$"):
            make_recipe(bad)
    r = make_recipe(merge="ridge", ridge_recapture=True, recapture_every=3)
    assert (r.ridge_recapture, r.recapture_every) == (True, 3)
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


def test_calibration_captures_once_per_capture_fields_and_reloads_from_disk(
    tmp_path: Path,
) -> None:
    from gradfree.compress import fold_pair_, solve
    from gradfree.compress.calibration import Calibration

    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher = tiny_model("qwen2", hidden_size=48, intermediate_size=64, num_hidden_layers=3, seed=5)
    fold_pair_(teacher, student)
    tok = tiny_tokenizer()
    t, s = Subject(teacher, tok), Subject(student, tok)
    said: list[str] = []
    cal = Calibration(t, s, DOCS[:3], source={"texts": "a"}, root=tmp_path, say=said.append)
    recipe = make_recipe(FAST)
    cap = cal.capture(recipe)
    # recipes that differ only in how they solve share the capture; capture fields do not
    assert cal.capture(make_recipe(recipe, merge="uniform", alpha=0.5)) is cap
    assert cal.key(make_recipe(recipe, max_length=32)) != cal.key(recipe)
    assert len(said) == 1 and cap.path == tmp_path / cal.key(recipe)
    again = Calibration(t, s, DOCS[:3], source={"texts": "a"}, root=tmp_path, say=said.append)
    reloaded = again.capture(recipe)  # the finished folder is loaded, not captured again
    assert len(said) == 1 and reloaded.manifest["run_id"] == cap.manifest["run_id"]
    # the calibration's solve is the steps' solve on its capture
    sol = again.solve(make_recipe(recipe, merge="optimal"))
    ref = solve(teacher, student, cap, make_recipe(recipe, merge="optimal")).model.state_dict()
    for k, v in sol.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert sol.attention_kl is not None and len(sol.attention_kl) == 2


def test_cli_compresses_and_the_library_records_its_inputs(tmp_path: Path, run_cli: Any) -> None:
    import json

    from gradfree.testing.tiny import save_tiny

    teacher = save_tiny(tmp_path / "t", "qwen2", seed=5, hidden_size=48, num_hidden_layers=3)
    student = save_tiny(tmp_path / "s", "qwen2", seed=1, hidden_size=32, intermediate_size=48)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": d}) + "\n" for i, d in enumerate(DOCS[:3]))
    )
    out = tmp_path / "c"
    argv = ["compress", "--teacher", str(teacher), "--student", str(student)]
    argv += ["--corpus", str(corpus), "--out", str(out), "--max-length", "32", "--no-progress"]
    res = run_cli(argv)
    assert res.code == 0, res.err
    report = json.loads((out / "report.json").read_text())
    inputs = report["inputs"]
    assert inputs["teacher"]["spec"] == str(teacher) and inputs["teacher"]["fingerprint"]
    assert inputs["student"]["fingerprint"] and inputs["dtype"] == "float32"
    assert inputs["corpus"]["n_docs"] == 3 and len(inputs["corpus"]["docs"]) == 3
    assert report["versions"]["torch"] and not (out / "capture").exists()
