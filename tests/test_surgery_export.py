"""`gradfree rotate` / `gradfree slice`: the saved folders reload in plain transformers with the
logits the proofs promise, the PCA basis is the right one, and every bad input is one sentence
that leaves no output. Logits of the *original* folder and the *output* folder are compared
here independently of what the command itself measured."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from gradfree.adapters import get_adapter
from gradfree.capture import run_capture
from gradfree.models import load_model
from gradfree.surgery import basis as B
from gradfree.surgery import fuse_norms_, random_orthogonal, rotate_residual_, rotation_hash
from gradfree.surgery.export import plan_widths
from gradfree.surgery.slicing import allowed_width, nearest_allowed_width
from gradfree.surgery.transitions import logits_with_transitions, transition_study
from gradfree.testing.tiny import save_tiny, tiny_config, tiny_model, tiny_tokenizer

# Every adapter family; all four have GQA (4 query heads in 2 KV groups), qwen2 has q/k/v biases,
# qwen3 ties its embeddings and has q_norm/k_norm.
CASES = ["llama", "mistral", "qwen2", "qwen3"]
IDS = torch.randint(0, 259, (2, 17), generator=torch.Generator().manual_seed(3))
TEXTS = [
    "The old harbour wall runs east from the fish market to the lighthouse.",
    "Every morning the market opens at dawn; the bakers arrive first, then the fishermen.",
    "From the castle hill you can see the river bend twice before it reaches the sea.",
    "The cathedral took two hundred years to build and its north tower was never finished.",
]
HELDOUT = [
    "Ferries leave the pier every hour in summer and twice a day in winter.",
    "The museum of clocks keeps a water clock that still runs, slowly, near the door.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    rows = [{"text": t, "split": "calibration"} for t in TEXTS]
    rows += [{"text": t, "split": "heldout"} for t in HELDOUT]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fast(corpus: Path) -> list[str]:
    return ["--check-corpus", str(corpus), "--check-windows", "1", "--check-tokens", "32"]


def slice_fast(corpus: Path) -> list[str]:
    return ["--corpus", str(corpus), "--split", "calibration", "--max-length", "64", *fast(corpus)]


@torch.no_grad()
def folder_logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()(IDS).logits


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {case: save_tiny(root / case, case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_rotate_output_reloads_with_identical_logits(
    case: str,
    folders: dict[str, Path],
    corpus: Path,
    tmp_path: Path,
    run_cli,
) -> None:
    out = tmp_path / "rot"
    code, _, err = run_cli(
        [
            "rotate",
            "--model",
            str(folders[case]),
            "--out",
            str(out),
            "--random-seed",
            "7",
            *fast(corpus),
        ]
    )
    assert code == 0, err
    assert rel(folder_logits(out), folder_logits(folders[case])) < 1e-5
    record = json.loads((out / "gradfree_surgery.json").read_text())
    assert record["result"]["check"]["reloaded_equals_in_memory"]
    assert record["ledger"][0]["sha256"] == rotation_hash(random_orthogonal(64, 7))
    back = AutoModelForCausalLM.from_pretrained(out)
    assert not get_adapter(back).tied  # the head was untied before the norms were folded
    assert all(bool((n.weight == 1).all()) for n in [get_adapter(back).final_norm])


@pytest.mark.parametrize("case", CASES)
def test_slicing_to_full_width_reproduces_the_model(
    case: str,
    folders: dict[str, Path],
    corpus: Path,
    tmp_path: Path,
    run_cli,
) -> None:
    out = tmp_path / "s0"
    code, _, err = run_cli(
        [
            "slice",
            "--model",
            str(folders[case]),
            "--out",
            str(out),
            "--fraction",
            "0",
            *slice_fast(corpus),
        ]
    )
    assert code == 0, err
    assert rel(folder_logits(out), folder_logits(folders[case])) < 1e-5
    record = json.loads((out / "gradfree_surgery.json").read_text())
    assert record["result"]["check"]["kind"] == "exact"


@pytest.mark.parametrize("case", ["qwen2", "qwen3"])
def test_sliced_output_equals_the_same_surgery_in_memory(
    case: str,
    folders: dict[str, Path],
    corpus: Path,
    tmp_path: Path,
    run_cli,
) -> None:
    out = tmp_path / "s25"
    code, _, err = run_cli(
        [
            "slice",
            "--model",
            str(folders[case]),
            "--out",
            str(out),
            "--fraction",
            "0.25",
            *slice_fast(corpus),
        ]
    )
    assert code == 0, err
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.hidden_size == 48 and get_adapter(back).hidden_size == 48
    # the same steps by hand, through the library
    from gradfree.surgery import slice_
    from gradfree.texts.corpora import load_corpus

    loaded = load_model(str(folders[case]))
    fuse_norms_(loaded.model)
    docs = load_corpus(str(corpus), split="calibration")
    moments, _ = B.calibration_moments(loaded, docs, max_length=64)
    q, _ = B.pca_rotation(B.global_moment(moments))
    slice_(loaded.model, 48, q)
    with torch.no_grad():
        assert rel(back(IDS).logits, loaded.model(IDS).logits) < 1e-6
    record = json.loads((out / "gradfree_surgery.json").read_text())
    res = record["result"]
    assert res["check"]["kind"] == "approximation" and res["params"]["hidden_after"] == 48
    assert res["sliced_perplexity"]["tokens"] == res["dense_perplexity"]["tokens"] > 0


def test_pca_finds_the_subspace_a_model_lives_in(corpus: Path, tmp_path: Path, run_cli) -> None:
    """Planted: a model whose residual stream spans a random 32-dim subspace of 64 is sliced to
    32 exactly, but only by the right basis (a random one loses a lot)."""
    model = tiny_model("llama")
    a = get_adapter(model)
    fuse_norms_(model)
    with torch.no_grad():
        a.embed_tokens.weight[:, 32:] = 0
        for layer in a.layers:
            layer.o_proj.weight[32:] = 0
            layer.down_proj.weight[32:] = 0
    rotate_residual_(model, random_orthogonal(64, 11))
    src = tmp_path / "planted"
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "sliced"
    code, _, err = run_cli(
        ["slice", "--model", str(src), "--out", str(out), "--fraction", "0.5", *slice_fast(corpus)]
    )
    assert code == 0, err
    assert get_adapter(AutoModelForCausalLM.from_pretrained(out)).hidden_size == 32
    assert rel(folder_logits(out), folder_logits(src)) < 1e-5
    q = random_orthogonal(64, 12)
    from gradfree.surgery import slice_

    slice_(model, 32, q)  # negative control: a basis that ignores the statistics
    with torch.no_grad():
        assert rel(model(IDS).logits, folder_logits(src)) > 1e-2


def test_capture_of_the_original_model_gives_the_fused_moments(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """A capture made before fusion (norm weights ≠ 1) is de-scaled exactly."""
    loaded = load_model(str(folders["qwen2"]))
    scales = B.reader_scales(loaded.model)
    docs = ["A walk along the harbour wall.", "The old market opens at dawn, every day."]
    config = {"sites": list(B.READER_SITES), "max_length": 32}
    cap = run_capture(loaded, docs, tmp_path / "cap", config, progress=False)
    from_capture, stat = B.capture_moments(cap, loaded.model, scales)
    fuse_norms_(loaded.model)
    fused, _ = B.calibration_moments(loaded, docs, max_length=32)
    assert stat == "reader" and set(from_capture) == set(fused)
    for key, m in fused.items():
        assert torch.allclose(from_capture[key], m, rtol=1e-4, atol=1e-6 * float(m.abs().max()))
    raw, _ = B.capture_moments(
        cap, loaded.model, {k: torch.ones_like(v) for k, v in scales.items()}
    )
    assert not torch.allclose(raw["final.normed"], fused["final.normed"], rtol=1e-3)


def test_rotate_with_pca_capture_and_given_matrix(
    folders: dict[str, Path], corpus: Path, tmp_path: Path, run_cli
) -> None:
    src = folders["qwen3"]
    cap = tmp_path / "cap"
    code, _, err = run_cli(
        [
            "capture",
            "--model",
            str(src),
            "--corpus",
            str(corpus),
            "--sites",
            "attn_in,mlp_in,final.normed",
            "--max-length",
            "64",
            "--no-progress",
            "--out",
            str(cap),
        ]
    )
    assert code == 0, err
    code, _, err = run_cli(
        [
            "rotate",
            "--model",
            str(src),
            "--out",
            str(tmp_path / "pca"),
            "--capture",
            str(cap),
            "--per-layer",
            *fast(corpus),
        ]
    )
    assert code == 0, err
    assert rel(folder_logits(tmp_path / "pca"), folder_logits(src)) < 1e-5
    res = json.loads((tmp_path / "pca" / "gradfree_surgery.json").read_text())["result"]
    assert res["basis"]["statistic"] == "reader" and res["basis"]["sites"] == 5
    assert res["per_layer"]["with_transitions"]["max_rel"] < 1e-5
    q = random_orthogonal(64, 5).float().contiguous()
    save_file({"rotation": q}, str(tmp_path / "q.safetensors"))
    code, _, err = run_cli(
        [
            "rotate",
            "--model",
            str(src),
            "--out",
            str(tmp_path / "mat"),
            "--matrix",
            str(tmp_path / "q.safetensors"),
            *fast(corpus),
        ]
    )
    assert code == 0, err
    assert rel(folder_logits(tmp_path / "mat"), folder_logits(src)) < 1e-5
    ledger = json.loads((tmp_path / "mat" / "rotation_ledger.json").read_text())
    assert ledger[0]["sha256"] == rotation_hash(q) and ledger[0]["orthogonality_error"] < 1e-6


def test_recompute_slices_in_stages(
    folders: dict[str, Path], corpus: Path, tmp_path: Path, run_cli
) -> None:
    out = tmp_path / "rc"
    code, _, err = run_cli(
        [
            "slice",
            "--model",
            str(folders["llama"]),
            "--out",
            str(out),
            "--fraction",
            "0.25",
            "--recompute",
            "--steps",
            "2",
            *slice_fast(corpus),
        ]
    )
    assert code == 0, err
    res = json.loads((out / "gradfree_surgery.json").read_text())["result"]["slice"]
    assert [s["to"] for s in res["stages"]] == [56, 48] and "approximation" in res["recompute"]
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48


def _bad_inputs(root: Path, folders: dict[str, Path], corpus: Path) -> list[tuple[list[str], str]]:
    model = str(folders["llama"])
    save_file({"q": torch.randn(64, 64).contiguous()}, str(root / "nonorth.safetensors"))
    save_file({"q": random_orthogonal(32, 0).float().contiguous()}, str(root / "shape.safetensors"))
    (root / "notcap").mkdir()
    (root / "exists").mkdir()
    other = tmp_capture(root, folders)
    rot = ["rotate", "--model", model]
    sl = ["slice", "--model", model, *slice_fast(corpus)[:4]]
    return [
        (["rotate", "--model", str(root / "nope"), "--random-seed", "1"], "is not a known model"),
        ([*rot, "--random-seed", "1", "--out-exists"], "exists"),
        ([*sl, "--fraction", "1.5"], "--fraction must be a number in [0, 1)"),
        ([*sl, "--fraction", "-0.1"], "--fraction must be a number in [0, 1)"),
        ([*rot, "--matrix", str(root / "nonorth.safetensors")], "is not orthogonal"),
        ([*rot, "--matrix", str(root / "shape.safetensors")], "must be a 64x64 matrix"),
        ([*rot, "--matrix", str(root / "missing.safetensors")], "does not exist"),
        ([*rot, "--capture", str(root / "notcap")], "is not a capture folder"),
        ([*rot, "--capture", str(other)], "another hidden size"),
        ([*rot, "--random-seed", "1", "--capture", str(other)], "exactly one of"),
        (
            [
                "slice",
                "--model",
                model,
                "--fraction",
                "0.2",
                "--capture",
                str(other),
                "--recompute",
            ],
            "needs --corpus",
        ),
    ]


def tmp_capture(root: Path, folders: dict[str, Path]) -> Path:
    """A capture of a model of another width (48)."""
    src = save_tiny(root / "narrow", "llama", hidden_size=48)
    loaded = load_model(str(src))
    cfg = {"sites": list(B.READER_SITES), "max_length": 16}
    run_capture(loaded, ["Short text to capture."], root / "cap48", cfg, progress=False)
    return root / "cap48"


def test_every_bad_input_is_one_sentence_and_leaves_no_output(
    folders: dict[str, Path],
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    run_cli,
) -> None:
    cases = _bad_inputs(tmp_path, folders, corpus)
    capsys.readouterr()  # drop the set-up's progress output
    for argv, expected in cases:
        out = tmp_path / "exists" if "--out-exists" in argv else tmp_path / "out"
        argv = [a for a in argv if a != "--out-exists"]
        before = sorted(p.name for p in tmp_path.iterdir())
        code, _, err = run_cli([*argv, "--out", str(out), *fast(corpus)])
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
        assert not (tmp_path / "out").exists()


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 12), mult=st.integers(1, 16), frac=st.floats(0, 0.95))
def test_nearest_allowed_width_is_allowed_and_nearest(heads: int, mult: int, frac: float) -> None:
    d = heads * mult
    config = tiny_config(
        "llama", hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads, head_dim=8
    )
    k = round((1 - frac) * d)
    got = nearest_allowed_width(config, k)
    assert allowed_width(config, got) and got % heads == 0 and 1 <= got <= d
    assert all(abs(c - k) >= abs(got - k) for c in range(heads, d + 1, heads))
    widths = plan_widths(config, d, frac, 3)
    assert widths[-1] == nearest_allowed_width(config, k)
    assert all(x > y for x, y in itertools.pairwise(widths))


@pytest.mark.parametrize("case", ["qwen2", "qwen3"])
def test_per_layer_bases_exact_with_transitions_approximate_without(case: str) -> None:
    model = tiny_model(case, dtype=torch.float64)
    with torch.no_grad():
        ref = model(IDS).logits
    fuse_norms_(model)
    n, d = get_adapter(model).num_layers, get_adapter(model).hidden_size
    qs = [random_orthogonal(d, 20 + i) for i in range(n)]
    assert rel(logits_with_transitions(model, qs, IDS), ref) < 1e-6
    g = torch.Generator().manual_seed(0)
    moments = [
        (lambda x: x @ x.T)(torch.randn(d, d, generator=g, dtype=torch.float64)) for _ in range(n)
    ]
    study = transition_study(model, moments, IDS, damping=0.01)
    assert study["with_transitions"]["max_rel"] < 1e-6
    assert study["without_transitions"]["max_rel"] > 1e-3  # dropped: an approximation
    assert study["extra_params"] == (n - 1) * d * d
    same = transition_study(model, [moments[0]] * n, IDS, damping=0.01)
    assert same["without_transitions"]["max_rel"] < 1e-6 and max(same["transition_cost"]) < 1e-12
