"""Structured pruning with least-squares compensation: the OBS selection against brute force,
exact removal of a duplicated neuron and of duplicated heads (each KV group), the refit beating
plain removal, a plain checkpoint that reloads in transformers, and one-sentence errors."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.solvers.obs import group_columns, obs_select
from gradfree.surgery.prune import check_shape, kv_pools, prune_neurons_
from gradfree.surgery.reconstruct import PrunePlan, reconstruct_
from gradfree.testing.checks import equal_windows, rel_err
from gradfree.testing.checks import logits64 as logits
from gradfree.testing.tiny import HARBOUR_DOCS, save_tiny, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
CALIB = HARBOUR_DOCS + [
    f"Tour {i}: the {w} gate opens at {i + 8} o'clock, by the {w} bridge. " * 2
    for i, w in enumerate(["north", "west", "river", "market", "castle", "garden"])
]
HELD_OUT = [
    "The lighthouse keeper walks 40 steps to the pier; the ferry leaves at 9.",
    "Visit 12: the museum of clocks, three streets from the harbour gate.",
]


def ids(texts: list[str]) -> torch.Tensor:
    return equal_windows(TOK, texts)


def ls_error(x: torch.Tensor, y: torch.Tensor, cols: list[int]) -> float:
    """Brute force: the least-squares error of fitting ``y`` from the columns ``cols`` of x."""
    sol = torch.linalg.lstsq(x[:, cols], y).solution
    return float(((x[:, cols] @ sol - y) ** 2).sum())


def test_obs_step_error_is_the_least_squares_loss_and_greedy_picks_the_best_column() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 7, generator=g, dtype=torch.float64) @ torch.randn(
        7, 7, generator=g, dtype=torch.float64
    )
    w_true = torch.randn(3, 7, generator=g, dtype=torch.float64)
    y = x @ w_true.T + 0.1 * torch.randn(400, 3, generator=g, dtype=torch.float64)
    h = x.T @ x
    w_ls = torch.linalg.solve(h, x.T @ y).T
    full = ls_error(x, y, list(range(7)))
    sel = obs_select(w_ls, h, 6)
    losses = {j: ls_error(x, y, [c for c in range(7) if c != j]) - full for j in range(7)}
    best = min(losses, key=lambda j: losses[j])
    assert sel.removed == [best]
    assert sel.predicted_error == pytest.approx(losses[best], rel=1e-8)
    # several removals one at a time: the predicted total is the refit's real loss
    sel3 = obs_select(w_ls, h, 4, steps=3)
    assert len(sel3.step_errors) == 3
    assert sel3.predicted_error == pytest.approx(ls_error(x, y, sel3.kept) - full, rel=1e-8)


def test_obs_removes_a_duplicated_column_at_no_cost_and_groups_respect_their_pools() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, 2:3]], dim=1)  # column 6 copies column 2
    w = torch.randn(4, 7, generator=g, dtype=torch.float64)
    h = x.T @ x + 1e-9 * torch.eye(7, dtype=torch.float64)
    sel = obs_select(w, h, 6)
    assert sel.removed[0] in (2, 6) and sel.predicted_error < 1e-6 * float((w**2).sum())
    # groups of 2 columns in 2 pools of 2 groups: one group per pool goes
    x8 = torch.randn(300, 8, generator=g, dtype=torch.float64)
    w8 = torch.randn(3, 8, generator=g, dtype=torch.float64)
    pools = kv_pools(4, 2)
    sel8 = obs_select(w8, x8.T @ x8, 1, group_size=2, pools=pools, steps=8)
    assert len(sel8.kept) == 2 and {
        p for p, grp in enumerate(pools) for k in sel8.kept if k in grp
    } == {0, 1}
    # brute force over the four choices: greedy found the best pair here
    choices = {
        (a, b): ls_error(x8, x8 @ w8.T, group_columns([a, b], 2).tolist())
        for a, b in itertools.product(pools[0], pools[1])
    }
    assert tuple(sel8.kept) == min(choices, key=lambda c: choices[c])


def test_obs_refuses_bad_input_in_one_sentence() -> None:
    w, h = torch.randn(2, 6, dtype=torch.float64), torch.eye(6, dtype=torch.float64)
    for kwargs, msg in [
        ({"keep": 0}, "Cannot keep"),
        ({"keep": 2, "group_size": 4}, "do not split"),
        ({"keep": 1, "pools": [[0, 1]]}, "partition"),
    ]:
        with pytest.raises(GradfreeError, match=msg):
            obs_select(w, h, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(GradfreeError, match="positive definite"):
        obs_select(w, torch.zeros(6, 6, dtype=torch.float64), 3)


def duplicate_neuron(model: torch.nn.Module) -> None:
    """In every block, neuron n-1 becomes a copy of neuron 0 (same gate and up rows), and the
    down columns are split at random between the two: removing either one with compensation
    is exact, removing it without compensation is not."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in get_adapter(model).layers:
            for lin in layer.mlp_inputs():
                lin.weight[-1] = lin.weight[0]
            down = layer.mlp_output().weight
            down[:, -1] = torch.randn(down.shape[0], generator=g, dtype=down.dtype)


def duplicate_heads(model: torch.nn.Module) -> None:
    """In every block, the second query head of each KV group copies the first (q rows and
    bias): both heads attend alike and return the same output."""
    a = get_adapter(model)
    geo = a.geometry
    hd = geo.head_dim
    with torch.no_grad():
        for layer in a.layers:
            for grp in range(geo.num_kv_heads):
                h0, h1 = list(geo.heads_in_group(grp))[:2]
                for name in ("weight", "bias"):
                    p = getattr(layer.q_proj, name, None)
                    if p is not None:
                        p[h1 * hd : (h1 + 1) * hd] = p[h0 * hd : (h0 + 1) * hd]


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_pruning_a_duplicated_neuron_and_duplicated_heads_with_compensation_is_exact(
    case: str,
) -> None:
    model = tiny_model(case, dtype=torch.float64)
    duplicate_neuron(model)
    duplicate_heads(model)
    x = ids(HELD_OUT)
    ref = logits(model, x)
    dense = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    inter = get_adapter(model).intermediate_size
    info = reconstruct_(
        pruned,
        dense,
        TOK,
        CALIB,
        rel_lam=1e-10,
        head=False,
        max_length=64,
        prune=PrunePlan(mlp_keep=inter - 1, heads_keep=1),
    )
    assert info["prune"]["intermediate_size"] == inter - 1
    assert info["prune"]["num_attention_heads"] == get_adapter(model).geometry.num_kv_heads
    assert pruned.config.intermediate_size == inter - 1
    assert rel_err(logits(pruned, x), ref) < 1e-6
    # the same neuron removed without the refit is far off
    plain = copy.deepcopy(model)
    keep = torch.arange(inter - 1)
    for layer in get_adapter(plain).layers:
        prune_neurons_(layer, keep)
    assert rel_err(logits(plain, x), ref) > 1e-3


def test_pruned_model_is_a_plain_checkpoint_and_beats_plain_removal(tmp_path: Path) -> None:
    model = tiny_model("qwen2", dtype=torch.float32)
    dense = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    a = get_adapter(model)
    x = ids(HELD_OUT)
    ref = logits(model, x)
    keep = a.intermediate_size * 3 // 4
    info = reconstruct_(
        pruned, dense, TOK, CALIB, head=False, max_length=64, prune=PrunePlan(mlp_keep=keep)
    )
    rows = [r for r in info["fits"] if "pruned" in r]
    assert len(rows) == a.num_layers and all(r["pruned"]["kept"] == keep for r in rows)
    pruned.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert back.config.intermediate_size == keep
    assert torch.equal(logits(back, x), logits(pruned, x))
    # the naive cut: the neurons of least E[h²]·‖down column‖², no refit
    naive = copy.deepcopy(model)
    for layer in get_adapter(naive).layers:
        score = layer.mlp_output().weight.double().pow(2).sum(0)
        prune_neurons_(layer, torch.sort(torch.argsort(score, descending=True)[:keep]).values)
    assert rel_err(logits(pruned, x), ref) < rel_err(logits(naive, x), ref)


def test_pruning_refuses_widths_transformers_would_not_take_and_a_tied_head_fit() -> None:
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(GradfreeError, match="query heads"):
        check_shape(model, None, 3)
    with pytest.raises(GradfreeError, match="neurons"):
        check_shape(model, 0, None)
    tied = tiny_model("qwen3", dtype=torch.float32)
    with pytest.raises(GradfreeError, match="tied"):
        reconstruct_(copy.deepcopy(tied), tied, TOK, CALIB, max_length=64)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_param_formulas_match_the_pruned_and_the_sliced_models(case: str) -> None:
    from gradfree.baselines import (
        calibration_windows,
        param_count,
        slicegpt_,
        slicegpt_fraction_for_params,
    )
    from gradfree.surgery.prune import mlp_keep_for_params, pruned_param_count

    model = tiny_model(case, dtype=torch.float64)
    dense = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    plan = PrunePlan(mlp_keep=70, heads_keep=1)
    reconstruct_(pruned, dense, TOK, CALIB[:3], head=False, max_length=64, prune=plan)
    assert param_count(pruned) == pruned_param_count(model, 70, 1)
    target = int(0.8 * param_count(model))
    keep = mlp_keep_for_params(model, target)
    assert (
        pruned_param_count(model, keep, None) <= target < pruned_param_count(model, keep + 1, None)
    )
    f = slicegpt_fraction_for_params(model, target)
    sliced = copy.deepcopy(model)
    r = slicegpt_(sliced, calibration_windows(TOK, CALIB[:3], 64), f)
    assert param_count(sliced) <= target
    with pytest.raises(GradfreeError, match="cannot reach"):
        slicegpt_fraction_for_params(model, 10)
    r.remove_hooks()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "tours.jsonl"
    rows = [{"text": t, "split": "calibration"} for t in CALIB]
    rows += [{"text": t, "split": "heldout"} for t in HELD_OUT]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli_common(src: Path, corpus: Path) -> list[str]:
    return [
        "--model",
        str(src),
        "--corpus",
        str(corpus),
        "--split",
        "calibration",
        "--max-length",
        "64",
        "--check-corpus",
        str(corpus),
        "--check-windows",
        "2",
        "--check-tokens",
        "32",
    ]


def test_prune_cli_writes_a_smaller_plain_checkpoint_that_keeps_its_tie(
    corpus: Path, tmp_path: Path, run_cli
) -> None:
    src = save_tiny(tmp_path / "src", "qwen3")  # tied embeddings, q/k norms
    out = tmp_path / "pruned"
    argv = ["prune", *_cli_common(src, corpus), "--out", str(out)]
    code, _, err = run_cli([*argv, "--mlp-fraction", "0.25", "--heads-keep", "1"])
    assert code == 0, err
    record = json.loads((out / "gradfree_surgery.json").read_text())
    res = record["result"]
    dense = AutoModelForCausalLM.from_pretrained(src)
    back = AutoModelForCausalLM.from_pretrained(out)
    inter = dense.config.intermediate_size
    assert (
        back.config.intermediate_size
        == round(0.75 * inter)
        == res["prune"]["after"]["intermediate_size"]
    )
    assert back.config.num_attention_heads == dense.config.num_key_value_heads
    assert get_adapter(back).tied and back.config.tie_word_embeddings
    assert res["params"]["after"] < res["params"]["before"]
    assert res["pruned_perplexity"]["tokens"] == res["dense_perplexity"]["tokens"] > 0
    assert res["check"]["kind"] == "approximation" and res["check"]["reloaded_equals_in_memory"]
    report = (out / "report.md").read_text()
    assert "## Pruning" in report and "## Least-squares reconstruction" in report
    # a parameter target: the output is at or under it
    out2 = tmp_path / "by-params"
    code, _, err = run_cli(
        ["prune", *_cli_common(src, corpus), "--out", str(out2), "--params-fraction", "0.2"]
    )
    assert code == 0, err
    p = json.loads((out2 / "gradfree_surgery.json").read_text())["result"]["params"]
    assert p["after"] <= 0.8 * p["before"]


def test_slice_cli_combines_slicing_with_pruning(corpus: Path, tmp_path: Path, run_cli) -> None:
    src = save_tiny(tmp_path / "src", "llama")
    out = tmp_path / "both"
    argv = ["slice", *_cli_common(src, corpus), "--out", str(out), "--fraction", "0.25"]
    code, _, err = run_cli([*argv, "--reconstruct", "--mlp-fraction", "0.5"])
    assert code == 0, err
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.hidden_size == 48 and back.config.intermediate_size == 48
    rec = json.loads((out / "gradfree_surgery.json").read_text())["result"]["slice"]
    assert rec["reconstruction"]["pruned_sites"] == get_adapter(back).num_layers


def test_prune_cli_refuses_bad_options_in_one_sentence(
    corpus: Path, tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_tiny(tmp_path / "src", "llama")
    capsys.readouterr()
    out = tmp_path / "out"
    base = ["prune", *_cli_common(src, corpus), "--out", str(out)]
    cases = [
        ([], "needs --mlp-fraction, --params-fraction or --heads-keep"),
        (["--mlp-fraction", "0.2", "--params-fraction", "0.2"], "not both"),
        (["--mlp-fraction", "1.5"], "in (0, 1)"),
        (["--heads-keep", "5"], "between 1 and 2 query heads"),
    ]
    for extra, expected in cases:
        code, _, err = run_cli([*base, *extra])
        assert code == 2, (extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert not out.exists()
    code, _, err = run_cli(
        [
            "slice",
            *_cli_common(src, corpus),
            "--out",
            str(out),
            "--fraction",
            "0.25",
            "--mlp-fraction",
            "0.5",
        ]
    )
    assert code == 2 and "need --reconstruct" in err, err
