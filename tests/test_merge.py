"""`gradfree merge` end to end on tiny model folders: identities, references, reloads, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gradfree.base.errors import GradfreeError
from gradfree.merge import load_recipe, merge
from gradfree.testing.tiny import save_tiny, tiny_model, tiny_tokenizer

TEXTS = [
    "The old town square has a fountain from 1620.",
    "Boats leave the harbour for the island every hour in summer.",
    "The museum of glass is closed on Mondays; tickets cost nine euros.",
    "A cable car climbs to the castle above the river.",
    "Street food at the night market: grilled fish and rice cakes.",
    "The cathedral bells ring at noon, and the tower can be climbed.",
]


def _save(model: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    save_tiny(root / "a", "qwen2", seed=0)
    save_tiny(root / "b", "qwen2", seed=1)
    save_tiny(root / "base", "qwen2", seed=2)
    save_tiny(root / "wide", "qwen2", seed=3, intermediate_size=80)
    save_tiny(root / "tied2", "qwen2", seed=0, tie_word_embeddings=True)
    save_tiny(root / "ta", "qwen3", seed=0)  # tied embeddings
    save_tiny(root / "tb", "qwen3", seed=1)
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(TEXTS)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _calibration(work: Path) -> dict[str, Any]:
    return {"corpus": str(work / "docs.jsonl"), "split": None, "limit": None, "max_length": 128}


def _identity_recipes(work: Path) -> dict[str, tuple[dict[str, Any], str]]:
    a, b, base = str(work / "a"), str(work / "b"), str(work / "base")
    w10 = [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 0}}]
    cal = _calibration(work)
    return {
        "linear": ({"method": "linear", "models": w10}, "a"),
        "uniform": ({"method": "uniform", "models": [a, a]}, "a"),
        "slerp": ({"method": "slerp", "models": [a, b], "parameters": {"t": 0.0}}, "a"),
        "task_arithmetic": (
            {
                "method": "task_arithmetic",
                "models": [a, b],
                "base_model": base,
                "parameters": {"scaling": 0.0},
            },
            "base",
        ),
        "ties": ({"method": "ties", "models": w10, "base_model": base}, "a"),
        "dare_ties": ({"method": "dare_ties", "models": w10, "base_model": base}, "a"),
        "dare_linear": ({"method": "dare_linear", "models": w10, "base_model": base}, "a"),
        "fisher": ({"method": "fisher", "models": w10, "calibration": cal}, "a"),
        "regmean": ({"method": "regmean", "models": w10, "calibration": cal}, "a"),
        "breadcrumbs": ({"method": "breadcrumbs", "models": w10, "base_model": base}, "a"),
        "breadcrumbs_ties": (
            {"method": "breadcrumbs_ties", "models": w10, "base_model": base},
            "a",
        ),
        "della": ({"method": "della", "models": w10, "base_model": base}, "a"),
        "della_linear": ({"method": "della_linear", "models": w10, "base_model": base}, "a"),
        "model_stock": ({"method": "model_stock", "models": [a, a], "base_model": base}, "a"),
        "passthrough": ({"method": "passthrough", "models": [a]}, "a"),
    }


@pytest.mark.parametrize(
    "method",
    [
        "linear",
        "uniform",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "fisher",
        "regmean",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "passthrough",
    ],
)
def test_identity_merge_returns_the_first_or_base_model_exactly(
    work: Path, tmp_path: Path, method: str
) -> None:
    recipe, expected = _identity_recipes(work)[method]
    merge(recipe, tmp_path / "out", say=lambda m: None)
    got, ref = _weights(tmp_path / "out"), _weights(work / expected)
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ({"method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}, "b"]}, None),
        ({"method": "multislerp", "models": ["a", "a", "a"]}, "a"),
        ({"method": "karcher", "models": ["a", "a"]}, "a"),
        ({"method": "nuslerp", "models": ["a", "b"], "base_model": "base"}, None),
    ],
)
def test_spherical_merges_end_to_end(
    work: Path, tmp_path: Path, recipe: dict[str, Any], expected: str | None
) -> None:
    """Copies of one model stay that model; NuSLERP's equal weights give the independent
    SLERP midpoint of the two models (of their task vectors, with a base)."""
    from gradfree.merge.linear import slerp

    def path(spec: Any) -> Any:
        if isinstance(spec, dict):
            return {**spec, "model": str(work / spec["model"])}
        return str(work / spec)

    recipe = {**recipe, "models": [path(m) for m in recipe["models"]]}
    if "base_model" in recipe:
        recipe["base_model"] = str(work / recipe["base_model"])
    merge(recipe, tmp_path / "out", say=lambda m: None)
    got = _weights(tmp_path / "out")
    if expected is not None:
        ref = _weights(work / expected)
        for name, t in ref.items():
            assert torch.allclose(got[name], t, rtol=1e-6, atol=1e-7), name
        return
    a, b, base = _weights(work / "a"), _weights(work / "b"), _weights(work / "base")
    for name, t in got.items():
        x, y = a[name].double(), b[name].double()
        if "base_model" in recipe:
            z = base[name].double()
            want = z + slerp(0.5, x - z, y - z, dot_threshold=1.0 - 1e-15)[0]
        else:
            want = slerp(0.5, x, y, dot_threshold=1.0 - 1e-15)[0]
        assert torch.allclose(t.double(), want, rtol=1e-5, atol=1e-6), name


def test_linear_merge_reloads_in_transformers_and_records_its_inputs(
    work: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = str(work / "a"), str(work / "b")
    recipe = {
        "method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": 0.3}},
            {"model": b, "parameters": {"weight": 0.7}},
        ],
    }
    out = tmp_path / "soup"
    result = merge(recipe, out, say=lambda m: None)
    wa, wb = _weights(work / "a"), _weights(work / "b")
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name in wa:
        ref = (0.3 * wa[name].double() + 0.7 * wb[name].double()) / 1.0
        assert torch.allclose(state[name].double(), ref, atol=1e-6), name
    ids = AutoTokenizer.from_pretrained(out)(TEXTS[0], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    rec = json.loads((out / "merge.json").read_text())
    assert rec["method"]["reference_url"].startswith("https://arxiv.org/")
    assert [i["fingerprint"]["weights_sha256"] for i in rec["inputs"]] == [
        r["fingerprint"]["weights_sha256"] for r in result.record["inputs"]
    ]
    assert all(i["fingerprint"]["tokenizer_sha256"] for i in rec["inputs"])
    assert "torch" in rec["versions"] and rec["output"]["dtype"] == "float32"
    again = load_recipe(out / "merge_recipe.yaml")
    assert again.model_dump() == rec["recipe"] | {"models": again.model_dump()["models"]}
    assert [m.parameters for m in again.models] == [{"weight": 0.3}, {"weight": 0.7}]
    d = rec["relative_distance_to_inputs"]
    assert d[a] > 0 and d[b] > 0 and d[b] < d[a]  # closer to the heavier model
    assert "# Merge: linear" in (out / "report.md").read_text()


def test_tied_models_merge_into_a_tied_checkpoint(work: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = {"method": "slerp", "models": [str(work / "ta"), str(work / "tb")]}
    merge(recipe, tmp_path / "tied", dtype="bfloat16", say=lambda m: None)
    got = _weights(tmp_path / "tied")
    assert "lm_head.weight" not in got and got["model.embed_tokens.weight"].dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_slerp_midpoint_matches_an_independent_formula(work: Path, tmp_path: Path) -> None:
    merge(
        {"method": "slerp", "models": [str(work / "a"), str(work / "b")]},
        tmp_path / "s",
        dtype="float64",
        say=lambda m: None,
    )
    got = _weights(tmp_path / "s")
    wa, wb = _weights(work / "a"), _weights(work / "b")
    name = "model.layers.1.mlp.up_proj.weight"
    va, vb = wa[name].double().flatten(), wb[name].double().flatten()
    omega = torch.arccos(va @ vb / (va.norm() * vb.norm()))
    ref = (torch.sin(omega / 2) / torch.sin(omega)) * (va + vb)  # t = 0.5
    assert torch.allclose(got[name].flatten(), ref, atol=1e-12)


def test_dare_is_reproducible_for_a_seed(work: Path, tmp_path: Path) -> None:
    recipe = {
        "method": "dare_linear",
        "models": [str(work / "a"), str(work / "b")],
        "base_model": str(work / "base"),
        "parameters": {"density": 0.5},
    }
    for name, seed in (("x", 0), ("y", 0), ("z", 1)):
        merge({**recipe, "seed": seed}, tmp_path / name, say=lambda m: None)
    x, y, z = (_weights(tmp_path / n) for n in "xyz")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x[key], z[key])


def _linear_inputs(folder: Path, module: str) -> torch.Tensor:
    """Inputs of ``module`` at every token of every document (one window each), with hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = tiny_tokenizer()
    rows: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_pre_hook(
        lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).double())
    )
    with torch.no_grad():
        for text in TEXTS:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    handle.remove()
    return torch.cat(rows)


def test_regmean_equals_least_squares_on_the_data_behind_the_grams(
    work: Path, tmp_path: Path
) -> None:
    a, b = work / "a", work / "b"
    recipe = {
        "method": "regmean",
        "models": [str(a), str(b)],
        "calibration": _calibration(work),
        "parameters": {"alpha": 1.0, "ridge": 0.0},
    }
    result = merge(recipe, tmp_path / "rm", dtype="float64", say=lambda m: None)
    assert result.record["method_summary"]["linears"] == 14
    got = _weights(tmp_path / "rm")
    wa, wb = _weights(a), _weights(b)
    for module, bias in (
        ("model.layers.1.self_attn.q_proj", True),
        ("model.layers.0.mlp.down_proj", False),
    ):
        xs = [_linear_inputs(f, module) for f in (a, b)]
        ws = [w[f"{module}.weight"].double() for w in (wa, wb)]
        if bias:
            xs = [torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in xs]
            ws = [
                torch.cat([w, v[f"{module}.bias"].double()[:, None]], 1)
                for w, v in zip(ws, (wa, wb), strict=True)
            ]
        x = torch.cat(xs)
        y = torch.cat([xi @ wi.T for xi, wi in zip(xs, ws, strict=True)])
        ref = torch.linalg.lstsq(x, y).solution.T
        merged = got[f"{module}.weight"]
        if bias:
            merged = torch.cat([merged, got[f"{module}.bias"][:, None]], 1)
        assert torch.allclose(merged, ref, atol=1e-6 * float(ref.abs().max())), module
        # ... and is not just the average.
        assert not torch.allclose(merged, (ws[0] + ws[1]) / 2, atol=1e-3)
    # Embeddings and norms are averaged.
    name = "model.norm.weight"
    assert torch.allclose(got[name], (wa[name].double() + wb[name].double()) / 2)


def test_diagonal_fisher_of_the_head_matches_its_analytic_gradient() -> None:
    from gradfree.merge.fisher import diagonal_fisher

    model = tiny_model("llama", seed=4).requires_grad_(False)
    tok = tiny_tokenizer()
    windows = [tok(t)["input_ids"] for t in TEXTS[:3]]
    fisher, tokens = diagonal_fisher(model, windows, "cpu")
    assert tokens == sum(len(w) - 1 for w in windows)
    assert not any(p.requires_grad for p in model.parameters())  # restored
    ref = torch.zeros_like(fisher["lm_head.weight"])
    w = model.lm_head.weight.detach().double()
    for ids in windows:
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        h = h[0, :-1].double()  # final normed states of the predicting positions
        p = torch.softmax(h @ w.T, -1)
        p[torch.arange(len(ids) - 1), torch.tensor(ids[1:])] -= 1.0
        grad = p.T @ h / (len(ids) - 1)  # ∂ mean NLL / ∂W
        ref += grad**2
    ref /= len(windows)
    assert torch.allclose(fisher["lm_head.weight"], ref, rtol=1e-3, atol=1e-12)


def _perturbed(work: Path, name: str, sign: float, scale: float, seed: int = 9) -> Path:
    model = tiny_model("qwen2", seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(sign * scale * torch.randn(p.shape, generator=g))
    return _save(model, work / name)


def test_greedy_soup_keeps_helpful_ingredients_and_rejects_harmful_ones(
    work: Path, tmp_path: Path
) -> None:
    # Planted: the teacher is the centre c; c+δ and c−δ average back to c (KL ≈ 0);
    # a heavily perturbed ingredient only hurts.
    plus, minus = _perturbed(work, "plus", 1.0, 0.02), _perturbed(work, "minus", -1.0, 0.02)
    bad = _perturbed(work, "bad", 1.0, 1.0, seed=5)
    sel = {
        "metric": "kl",
        "teacher": str(work / "a"),
        "corpus": str(work / "docs.jsonl"),
        "split": None,
        "limit": 4,
        "max_length": 128,
        "batch_size": 4,
    }
    recipe = {
        "method": "greedy_soup",
        "models": [str(bad), str(plus), str(minus)],
        "selection": sel,
    }
    result = merge(recipe, tmp_path / "g", say=lambda m: None)
    s = result.record["method_summary"]
    assert s["selected"] == [1, 2] and s["order"][-1] == 0
    assert s["soup_score"] < min(s["individual"])
    got, centre = _weights(tmp_path / "g"), _weights(work / "a")
    assert all(torch.allclose(got[k], centre[k], atol=1e-6) for k in centre)
    only = merge({**recipe, "models": [str(plus), str(bad)]}, tmp_path / "g1", say=lambda m: None)
    assert only.record["method_summary"]["selected"] == [0]
    ref = _weights(plus)
    assert all(torch.equal(_weights(tmp_path / "g1")[k], ref[k]) for k in ref)


def test_shard_writer_output_loads_in_transformers(work: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradfree.merge.tensors import ShardWriter

    ref = _weights(work / "a")
    writer = ShardWriter(tmp_path, max_bytes=60_000)
    for k, v in ref.items():
        writer.add(k, v)
    files = writer.close()
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    AutoConfig.from_pretrained(work / "a").save_pretrained(tmp_path)
    state = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())


def test_cli_merges_a_recipe(work: Path, tmp_path: Path, run_cli) -> None:
    recipe = tmp_path / "r.yaml"
    body = {
        "method": "ties",
        "base_model": str(work / "base"),
        "models": [str(work / "a"), str(work / "b")],
        "parameters": {"density": 0.5},
        "evaluate": {
            "corpus": str(work / "docs.jsonl"),
            "split": None,
            "max_length": 64,
            "limit": 2,
            "batch_size": 4,
        },
    }
    recipe.write_text(yaml.safe_dump(body))
    code, out, err = run_cli(["merge", str(recipe), "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert out.strip() == str(tmp_path / "o") and "merged perplexity" in err
    rec = json.loads((tmp_path / "o" / "merge.json").read_text())
    assert 0.45 < rec["method_summary"]["kept_fraction"] < 0.55
    assert set(rec["evaluation"]) == {
        "merged",
        str(work / "a"),
        str(work / "b"),
        str(work / "base"),
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"method": "median", "models": ["a"]}, "Unknown merge method 'median'"),
        ({"method": "linear", "models": ["a"], "wieghts": [1]}, "Unknown recipe field 'wieghts'."),
        ({"method": "linear", "models": ["a", "missing"]}, "'{root}/missing' is not a known model"),
        (
            {"method": "linear", "models": ["a", "wide"]},
            "{root}/a and {root}/wide are one family with one tokenizer but different sizes "
            "(intermediate_size 96 vs 80), which weight merging cannot combine; move the larger "
            "one's knowledge into the smaller with `gradfree distill-head --teacher {root}/a",
        ),
        (
            {"method": "linear", "models": ["a", "tied2"]},
            "Tensor 'lm_head.weight' of model {root}/a is missing in model {root}/tied2;",
        ),
        ({"method": "linear", "models": ["a", "ta"]}, "The tokenizer of model {root}/ta differs"),
    ],
)
def test_cli_recipe_errors_are_one_sentence_and_leave_no_output(
    work: Path,
    tmp_path: Path,
    run_cli,
    body: dict[str, Any],
    message: str,
) -> None:
    body = {**body, "models": [str(work / m) for m in body["models"]]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(body))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", str(recipe), "--out", str(out)])
    assert code == 2
    line = err.strip()
    assert line.startswith("error: ") and "\n" not in line and line.endswith(".")
    assert message.format(root=work) in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_cli_refuses_an_existing_output(work: Path, tmp_path: Path, run_cli) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "uniform", "models": [str(work / "a")] * 2}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    code, _, err = run_cli(["merge", str(recipe), "--out", str(tmp_path / "out"), "--overwrite"])
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_ties_end_to_end_matches_an_elementwise_reference(work: Path, tmp_path: Path) -> None:
    a, b, base = (str(work / n) for n in ("a", "b", "base"))
    recipe = {
        "method": "ties",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": b, "parameters": {"weight": 2.0, "density": 0.6}},
        ],
        "parameters": {"scaling": 0.8},
    }
    merge(recipe, tmp_path / "t", dtype="float64", say=lambda m: None)
    name = "model.layers.0.mlp.gate_proj.weight"
    w0 = _weights(work / "base")[name].double().flatten()
    taus = []
    for folder, density in ((a, 0.3), (b, 0.6)):
        tau = _weights(Path(folder))[name].double().flatten() - w0
        keep = torch.topk(tau.abs(), round(density * tau.numel())).indices
        trimmed = torch.zeros_like(tau)
        trimmed[keep] = tau[keep]
        taus.append(trimmed.tolist())
    ref = []
    for j in range(len(taus[0])):  # elect the sign of Σ wᵢ τᵢ, average the agreeing entries
        vals = [(1.0 * taus[0][j], 1.0), (2.0 * taus[1][j], 2.0)]
        total = vals[0][0] + vals[1][0]
        agree = [(v, w) for v, w in vals if v != 0 and (v > 0) == (total > 0)]
        ref.append(sum(v for v, _ in agree) / sum(w for _, w in agree) if agree and total else 0.0)
    expected = w0 + 0.8 * torch.tensor(ref, dtype=torch.float64)
    assert torch.allclose(_weights(tmp_path / "t")[name].flatten(), expected, atol=1e-12)


def test_outputs_copy_tokenizer_files_byte_for_byte_and_carry_a_model_card(
    work: Path, tmp_path: Path
) -> None:
    a, b = str(work / "a"), str(work / "b")
    merge({"method": "linear", "models": [a, b]}, tmp_path / "out", say=lambda m: None)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (work / "a" / f).exists():
            assert (tmp_path / "out" / f).read_bytes() == (work / "a" / f).read_bytes(), f
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "# Merged with gradfree: linear" in card
    assert "method: linear" in card and a in card


def test_an_input_without_tokenizer_files(work: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(work / "b", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    a = str(work / "a")
    merge({"method": "linear", "models": [a, str(bare)]}, tmp_path / "ok", say=lambda m: None)
    assert (tmp_path / "ok" / "tokenizer.json").exists()  # from the first model
    with pytest.raises(GradfreeError, match="has no tokenizer files") as e:
        merge({"method": "linear", "models": [str(bare), a]}, tmp_path / "no", say=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "no").exists()


def test_a_teacher_and_student_recipe_runs_the_head_distillation(
    work: Path, tmp_path: Path
) -> None:
    """The merge mergekit users ask for (different sizes) runs what gradfree has for it."""
    student = str(work / "a")
    teacher = str(save_tiny(tmp_path / "teacher", "qwen2", seed=7, hidden_size=96))
    recipe = {"method": "distill_head", "teacher": teacher, "student": student}
    res = merge(recipe, tmp_path / "out", say=lambda m: None)
    assert (tmp_path / "out" / "head.json").exists() and "validation_chosen" in res.record
    assert (tmp_path / "out" / "merge_recipe.yaml").exists()
    with pytest.raises(GradfreeError, match="method: distill_head' with a teacher and a student"):
        merge({"method": "distill_head", "teacher": teacher}, tmp_path / "x", say=print)
