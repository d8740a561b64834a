"""mergekit recipes read as they are (issue 18 part 1): the translation, per-layer gradients and
filters with mergekit's rules, and end-to-end merges of tiny checkpoints written in mergekit's
own YAML (our recipes, in its syntax). Where mergekit itself is installed the outputs are compared
tensor by tensor; without it that comparison is skipped with a reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gradfree.base.errors import GradfreeError
from gradfree.merge import get_method, make_recipe, merge
from gradfree.merge.settings import depth, evaluate, num_layers
from gradfree.testing.mergekit import side_by_side_recipes
from gradfree.testing.tiny import save_tiny


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mergekit")
    for name, seed in (("a", 0), ("b", 1), ("base", 2)):
        save_tiny(root / name, "qwen2", seed=seed, num_hidden_layers=3)
    return root


def _w(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_settings_follow_mergekits_gradient_and_filter_rules() -> None:
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0.0, 0.5, 1.0, 0.0], "x", 0.5) == pytest.approx(0.75)  # between 0.5 and 1
    assert evaluate([True, False], "x", 0.4) is True and evaluate([True, False], "x", 1.0) is False
    cond = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}]
    assert evaluate(cond, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1
    assert evaluate(cond, "model.layers.1.mlp.up_proj.weight", 0.0) == 0.3
    assert evaluate(cond, "model.embed_tokens.weight", 0.0) is None  # no match: the default
    assert evaluate([*cond, {"value": 0.9}], "model.norm.weight", 0.0) == 0.9
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["lm_head.weight"]
    assert num_layers(names) == 5
    assert [depth(n, 5) for n in names] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]
    with pytest.raises(GradfreeError, match="mixes conditions"):
        evaluate([{"filter": "mlp", "value": 1}, 0.5], "x", 0.0)


def test_a_mergekit_ties_recipe_is_translated_with_mergekits_defaults() -> None:
    r = make_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "base"},
                {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": "b", "parameters": {"weight": 0.3, "density": [0.2, 0.8]}},
            ],
            "parameters": {"lambda": 0.9, "int8_mask": True},
            "dtype": "bfloat16",
            "tokenizer_source": "union",
        }
    )
    assert [m.model for m in r.models] == ["a", "b"] and r.base_model == "base"
    assert r.parameters == {"scaling": 0.9, "normalize": True} and r.dtype == "bfloat16"
    assert r.dialect == "mergekit" and any("int8_mask" in n for n in r.translation)
    m = get_method("dare_ties").configure(
        make_recipe({"merge_method": "dare_ties", "base_model": "c", "models": ["a", "b"]})
    )
    assert m.params.normalize is False  # mergekit's dare_ties default, unlike gradfree's
    out = make_recipe(
        {"merge_method": "linear", "models": ["a"], "dtype": "float16", "out_dtype": "float32"}
    )
    assert out.dtype == "float32"
    chat = make_recipe({"merge_method": "linear", "models": ["a"], "chat_template": "chatml"})
    assert chat.chat_template is not None and "<|im_start|>" in chat.chat_template


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"merge_method": "linear", "method": "linear", "models": ["a"]}, "mixes gradfree"),
        ({"merge_method": "linear", "models": ["a"], "colour": 1}, "Unknown mergekit"),
        ({"merge_method": "passthrough", "slices": []}, "slices"),
        ({"merge_method": "slerp", "models": ["a", "b"]}, "needs a base_model"),
        (
            {"merge_method": "linear", "models": ["a"], "tokenizer_source": "zzz"},
            "not a model of the recipe",
        ),
        ({"merge_method": "linear", "models": ["a"], "chat_template": "vicuna"}, "neither .auto."),
        (
            {"merge_method": "linear", "models": ["a"], "tokenizer": {"pad_to_multiple_of": 8}},
            "pad_to_multiple_of",
        ),
    ],
)
def test_mergekit_recipe_errors_are_one_sentence(recipe: dict[str, Any], message: str) -> None:
    with pytest.raises(GradfreeError, match=message) as e:
        make_recipe(recipe)
    assert "\n" not in str(e.value)


def test_gradients_need_a_tensorwise_method_and_valid_leaves() -> None:
    bad = {"method": "slerp", "models": ["a", "b"], "parameters": {"t": [0, 2]}}
    with pytest.raises(GradfreeError, match="Invalid parameter 't' of method 'slerp'"):
        get_method("slerp").configure(make_recipe(bad))
    fisher = {
        "method": "regmean",
        "models": [{"model": "a", "parameters": {"weight": [1, 2]}}, "b"],
        "calibration": {"corpus": "tourguide"},
    }
    with pytest.raises(GradfreeError, match="cannot vary by layer"):
        get_method("regmean").configure(make_recipe(fisher))


def test_mergekit_slerp_with_a_layer_gradient_and_filters(work: Path, tmp_path: Path) -> None:
    """t is measured from the base; a gradient [0, 1] over 3 blocks gives the base in block 0,
    the other model in block 2; filters pick attention vs MLP; outside the blocks t = 0."""
    a, base = str(work / "a"), str(work / "base")
    text = yaml.safe_dump(
        {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 1.0]},
                    {"filter": "mlp", "value": 1.0},
                    {"value": 0.0},
                ]
            },
            "dtype": "float32",
        }
    )
    (tmp_path / "r.yml").write_text(text)
    from gradfree.merge import load_recipe

    merge(load_recipe(tmp_path / "r.yml"), tmp_path / "out", say=lambda m: None)
    got, wa, wb = _w(tmp_path / "out"), _w(work / "a"), _w(work / "base")
    for name, t in got.items():
        if "self_attn" in name and ".layers.0." in name:
            assert torch.equal(t, wb[name]), name
        elif ("self_attn" in name and ".layers.2." in name) or ".mlp." in name:
            assert torch.equal(t, wa[name]), name
        elif ".layers." not in name:
            assert torch.equal(t, wb[name]), name
    mid = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(got[mid], wa[mid]) and not torch.equal(got[mid], wb[mid])
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert "mergekit" in json.dumps(record)


def test_mergekit_ties_keeps_max_one_int_density_entries(work: Path, tmp_path: Path) -> None:
    """Both dialects on one TIES merge: mergekit's count max(1, int(d·n)) against gradfree's
    round(d·n) is the only difference, checked on every tensor with an independent count."""
    a, b, base = (str(work / n) for n in ("a", "b", "base"))
    models = [{"model": a, "parameters": {"weight": 1.0, "density": 0.35}}]
    models.append({"model": b, "parameters": {"weight": 0.0, "density": 0.35}})
    merge(
        {"merge_method": "ties", "base_model": base, "models": models, "dtype": "float32"},
        tmp_path / "mk",
        say=lambda m: None,
    )
    merge({"method": "ties", "base_model": base, "models": models}, tmp_path / "gf", say=print)
    mk, gf, wa, wb = _w(tmp_path / "mk"), _w(tmp_path / "gf"), _w(work / "a"), _w(work / "base")
    for name, t in mk.items():
        n = t.numel()
        changed_mk = int((t != wb[name]).sum())
        changed_gf = int((gf[name] != wb[name]).sum())
        same = int((wa[name] == wb[name]).sum())  # entries where a's task vector is 0
        assert changed_mk <= max(1, int(0.35 * n)) and changed_mk >= max(1, int(0.35 * n)) - same
        assert changed_gf <= round(0.35 * n)


def test_tokenizer_source_and_chat_template_from_a_mergekit_recipe(
    work: Path, tmp_path: Path
) -> None:
    a, b = str(work / "a"), str(work / "b")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    merge(
        {
            "merge_method": "linear",
            "models": [a, b],
            "tokenizer_source": b,
            "chat_template": template,
        },
        tmp_path / "out",
        say=lambda m: None,
    )
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    saved = cfg.get("chat_template") or (tmp_path / "out" / "chat_template.jinja").read_text()
    assert saved == template


def test_outputs_match_mergekit_itself(work: Path, tmp_path: Path) -> None:
    """The same mergekit YAML through mergekit and through gradfree (float32 tiny models)."""
    mk = pytest.importorskip("mergekit", reason="mergekit is not installed (optional extra)")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    a, b, base = (str(work / n) for n in ("a", "b", "base"))

    recipes = side_by_side_recipes(a, b, base)
    del mk
    for name, r in recipes.items():
        r = {**r, "dtype": "float32"}
        run_merge(
            MergeConfiguration.model_validate(r),
            str(tmp_path / f"mk-{name}"),
            options=MergeOptions(copy_tokenizer=True),
        )
        merge(r, tmp_path / f"gf-{name}", say=lambda m: None)
        theirs, ours = _w(tmp_path / f"mk-{name}"), _w(tmp_path / f"gf-{name}")
        for k, t in ours.items():
            assert torch.allclose(t, theirs[k], rtol=1e-5, atol=1e-6), (name, k)


def _frankenmerge(work: Path) -> dict[str, Any]:
    a, b = str(work / "a"), str(work / "b")
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }


def test_a_passthrough_frankenmerge_stacks_the_layer_ranges(work: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    merge(_frankenmerge(work), tmp_path / "out", say=lambda m: None)
    got, wa, wb = _w(tmp_path / "out"), _w(work / "a"), _w(work / "b")
    picks = {0: (wa, 0), 1: (wa, 1), 2: (wb, 1), 3: (wb, 2)}
    for name, t in got.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            src, j = picks[i]
            assert torch.equal(t, src[name.replace(f".layers.{i}.", f".layers.{j}.")]), name
        else:
            assert torch.equal(t, (wa if "embed" in name else wb)[name]), name
    assert len({n.split(".layers.")[1].split(".")[0] for n in got if ".layers." in n}) == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_slerp_over_one_full_slice_equals_slerp_of_the_models(work: Path, tmp_path: Path) -> None:
    a, base = str(work / "a"), str(work / "base")
    sliced = {
        "merge_method": "slerp",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": a, "layer_range": [0, 3]},
                    {"model": base, "layer_range": [0, 3]},
                ]
            }
        ],
        "parameters": {"t": [0.2, 0.8]},
    }
    whole = {"merge_method": "slerp", "base_model": base, "models": [{"model": a}]}
    whole["parameters"] = {"t": [0.2, 0.8]}
    merge(sliced, tmp_path / "s", say=lambda m: None)
    merge(whole, tmp_path / "w", say=lambda m: None)
    s, w = _w(tmp_path / "s"), _w(tmp_path / "w")
    assert s.keys() == w.keys() and all(torch.equal(s[k], w[k]) for k in s)


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        (
            [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 2]},
                        {"model": "b", "layer_range": [0, 1]},
                    ]
                }
            ],
            "same number of blocks",
        ),
        ([{"sources": [{"model": "a", "layer_range": [2, 1]}]}], "start < end"),
        ([{"sources": [{"model": "a"}]}], "layer_range"),
    ],
)
def test_bad_slices_fail_in_one_sentence(slices: Any, message: str) -> None:
    with pytest.raises(GradfreeError, match=message):
        r = make_recipe({"merge_method": "linear", "slices": slices})
        from gradfree.merge.slices import layer_plan

        layer_plan(r.pieces())


def test_the_frankenmerge_matches_mergekit(work: Path, tmp_path: Path) -> None:
    pytest.importorskip("mergekit", reason="mergekit is not installed (optional extra)")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    r = _frankenmerge(work)
    merge(r, tmp_path / "gf", say=lambda m: None)
    cfg_gf = json.loads((tmp_path / "gf" / "config.json").read_text())
    assert cfg_gf["num_hidden_layers"] == len(cfg_gf["layer_types"]) == 4
    try:
        run_merge(MergeConfiguration.model_validate(r), str(tmp_path / "mk"), MergeOptions())
    except (
        Exception
    ) as e:  # mergekit 0.1.5 writes Qwen2's layer_types unsliced under transformers 5
        if "layer_types" not in str(e):
            raise
    theirs, ours = _w(tmp_path / "mk"), _w(tmp_path / "gf")
    assert theirs.keys() == ours.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_max_shard_size_in_transformers_form() -> None:
    r = make_recipe({"merge_method": "linear", "models": ["a"], "max_shard_size": "5GB"})
    assert r.max_shard_mb == 5 * 10**9 // 2**20
    assert (
        make_recipe({"method": "linear", "models": ["a"], "max_shard_size": "3MiB"}).max_shard_mb
        == 3
    )
    with pytest.raises(GradfreeError, match="not a size"):
        make_recipe({"method": "linear", "models": ["a"], "max_shard_size": "big"})
    assert (
        make_recipe({"method": "linear", "models": ["a"], "max_shard_size": 2**21}).max_shard_mb
        == 2
    )


def test_token_sources_keep_one_models_rows(work: Path, tmp_path: Path) -> None:
    from gradfree.testing.tiny import tiny_tokenizer

    a, b = str(work / "a"), str(work / "b")
    tok = tiny_tokenizer()
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": 1}},
            {"model": b, "parameters": {"weight": 1}},
        ],
        "tokenizer": {
            "source": a,
            "tokens": {"<eos>": {"source": b}, "<pad>": {"source": {"kind": "zero"}}},
        },
    }
    merge(recipe, tmp_path / "out", say=lambda m: None)
    got, wa, wb = _w(tmp_path / "out"), _w(work / "a"), _w(work / "b")
    eos, pad, x = tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<pad>"), 65
    for n in [k for k in got if "embed_tokens" in k or k.startswith("lm_head")]:
        assert torch.equal(got[n][eos], wb[n][eos]) and not got[n][pad].any()
        assert torch.allclose(got[n][x], (wa[n][x] + wb[n][x]) / 2)
    with pytest.raises(GradfreeError, match="not a model of the recipe"):
        make_recipe({**recipe, "tokenizer": {"tokens": {"<eos>": {"source": "zzz"}}}})
    with pytest.raises(GradfreeError, match="pad_to_multiple_of"):
        make_recipe({**recipe, "tokenizer": {"pad_to_multiple_of": 64}})
