"""Reconstruction after slicing: the identity at full width, exact on a model that lives in k
dims (from a wrong prior), measurably better than plain slicing on held-out tokens, a plain
checkpoint, and one-sentence errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import Subject, run_capture
from gradfree.surgery import basis as B
from gradfree.surgery import fuse_norms_, random_orthogonal, rotate_residual_, slice_, untie_
from gradfree.surgery.reconstruct import (
    PairMoments,
    _fit_site_,
    dense_reference,
    ls_fit,
    reconstruct_,
)
from gradfree.testing.checks import equal_windows, rel_err
from gradfree.testing.checks import logits64 as logits
from gradfree.testing.tiny import HARBOUR_DOCS, save_tiny, tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()
CALIB = HARBOUR_DOCS + [
    f"Tour {i}: the {w} gate opens at {i + 8} o'clock, by the {w} bridge. " * 2
    for i, w in enumerate(["north", "west", "river", "market", "castle", "garden"])
]
WORDS = ["north", "west", "river", "market", "castle", "garden", "harbour", "bridge", "tower"]


def stops(n: int, seed: int) -> list[str]:
    """``n`` documents of one made-up distribution (the planted case's calibration/held-out)."""
    g = torch.Generator().manual_seed(seed)

    def pick(m: int) -> int:
        return int(torch.randint(0, m, (1,), generator=g))

    return [
        " ".join(
            f"Stop {pick(100)}: the {WORDS[pick(9)]} {WORDS[pick(9)]} at {pick(12) + 1}."
            for _ in range(4)
        )
        for _ in range(n)
    ]


HELD_OUT = [
    "The lighthouse keeper walks 40 steps to the pier; the ferry leaves at 9.",
    "Visit 12: the museum of clocks, three streets from the harbour gate.",
]


def ids(texts: list[str]) -> torch.Tensor:
    return equal_windows(TOK, texts)


def fused(case: str, dtype: torch.dtype = torch.float64, **kw: object) -> torch.nn.Module:
    model = tiny_model(case, dtype=dtype, **kw)
    fuse_norms_(model)
    untie_(model)
    return model


def test_ls_fit_recovers_a_planted_affine_map_and_keeps_the_prior_when_exact() -> None:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(500, 6, generator=g, dtype=torch.float64) + 0.3
    xd = torch.cat([xs, torch.zeros(500, 2, dtype=torch.float64)], dim=1)
    t, tb = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, generator=g)
    m = PairMoments(xs.T @ xs, xd.T @ xs, xs.sum(0), xd.sum(0), 500)
    w, b = ls_fit(m, t, torch.zeros(5, 6), 0.0, tb, torch.zeros(5))
    assert b is not None
    assert torch.allclose(w, t[:, :6], atol=1e-10) and torch.allclose(b, tb.double(), atol=1e-10)
    # λ > 0 pulls toward the prior; a prior that already fits stays put
    w2, _ = ls_fit(m, t, t[:, :6], 0.5)
    assert torch.allclose(w2, t[:, :6], atol=1e-10)
    w3, _ = ls_fit(m, t, torch.zeros(5, 6), 0.5)
    assert float((w3 - t[:, :6]).abs().max()) > 1e-3  # the ridge term is really there


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_reconstruction_at_full_width_changes_nothing(case: str) -> None:
    model = fused(case)
    d = get_adapter(model).hidden_size
    q = random_orthogonal(d, 3)
    dense = dense_reference(model, q)
    sliced = copy.deepcopy(model)
    slice_(sliced, d, q)
    x = ids(HELD_OUT)
    ref = logits(sliced, x)
    before = {n: p.clone() for n, p in sliced.named_parameters()}
    info = reconstruct_(sliced, dense, TOK, CALIB, rel_lam=1e-2, max_length=64)
    assert len(info["fits"]) == 4 * get_adapter(model).num_layers + 1
    assert rel_err(logits(sliced, x), ref) < 1e-9
    for n, p in sliced.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-8, rtol=0), n


def k_dim_pair(case: str, k: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, sliced) where the dense residual lives in its first k coordinates, and the sliced
    model's linears are then scrambled: only a real fit can give the dense function back."""
    dense = fused(case)
    a = get_adapter(dense)
    with torch.no_grad():
        a.embed_tokens.weight[:, k:] = 0
        for layer in a.layers:
            layer.o_proj.weight[k:] = 0
            layer.down_proj.weight[k:] = 0
            for lin in (layer.o_proj, layer.down_proj):
                if lin.bias is not None:
                    lin.bias[k:] = 0
    sliced = copy.deepcopy(dense)
    slice_(sliced, k)
    g = torch.Generator().manual_seed(7)
    s = get_adapter(sliced)
    with torch.no_grad():
        for layer in s.layers:
            for lin in layer.linears().values():
                lin.weight.add_(
                    0.3 * torch.randn(lin.weight.shape, generator=g, dtype=lin.weight.dtype)
                )
        s.lm_head.weight.mul_(0.5)
    return dense, sliced


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_reconstruction_is_exact_on_a_model_that_lives_in_k_dims(case: str) -> None:
    dense, sliced = k_dim_pair(case, 32)
    x = ids(HELD_OUT)
    ref = logits(dense, x)
    assert rel_err(logits(sliced, x), ref) > 0.05  # the scrambled prior is far off
    reconstruct_(sliced, dense, TOK, CALIB, rel_lam=0.0, max_length=64)
    assert rel_err(logits(sliced, x), ref) < 1e-6


def planted(case: str, k: int, rel_lam: float = 1e-2) -> tuple[float, float]:
    """(held-out relative logits error of plain slicing, of slicing + reconstruction) against
    the dense model, with the PCA basis of the calibration documents."""
    model = fused(case)
    calib, x = stops(24, 0), ids(stops(4, 1))
    ref = logits(model, x)
    moments, _ = B.calibration_moments(Subject(model, TOK), calib, max_length=64)
    q, _ = B.pca_rotation(B.global_moment(moments))
    dense = dense_reference(model, q)
    sliced = copy.deepcopy(model)
    slice_(sliced, k, q)
    plain = rel_err(logits(sliced, x), ref)
    reconstruct_(sliced, dense, TOK, calib, rel_lam=rel_lam, max_length=64)
    return plain, rel_err(logits(sliced, x), ref)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_reconstruction_lowers_the_held_out_error_of_slicing(case: str) -> None:
    plain, fitted = planted(case, 40)
    assert plain > 0.05  # slicing a quarter of a random stream really hurts
    assert fitted < 0.85 * plain  # measured: about 0.7 x on 40 documents


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_reconstructed_model_reloads_in_plain_transformers(case: str, tmp_path: Path) -> None:
    model = fused(case, dtype=torch.float32)
    q = random_orthogonal(get_adapter(model).hidden_size, 1)
    dense = dense_reference(model, q)
    sliced = copy.deepcopy(model)
    slice_(sliced, 48, q)
    reconstruct_(sliced, dense, TOK, CALIB[:4], max_length=64)
    x = ids(HELD_OUT)
    ref = sliced(x).logits
    sliced.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.config.hidden_size == 48
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref)


def test_bad_input_is_refused_in_one_sentence() -> None:
    model = fused("llama")
    q = random_orthogonal(64, 0)
    dense = dense_reference(model, q)
    sliced = copy.deepcopy(model)
    slice_(sliced, 48, q)
    with pytest.raises(GradfreeError, match="at least one calibration document"):
        reconstruct_(sliced, dense, TOK, [])
    with pytest.raises(GradfreeError, match="lambda must be a number >= 0"):
        reconstruct_(sliced, dense, TOK, CALIB, rel_lam=-1.0)
    with pytest.raises(GradfreeError, match="not in the sliced model's basis"):
        reconstruct_(sliced, model, TOK, CALIB)  # the dense model before rotation
    other = fused("llama", num_hidden_layers=3)
    rotate_residual_(other, q)
    with pytest.raises(GradfreeError, match="must be the same model"):
        reconstruct_(sliced, other, TOK, CALIB)


def multi_pass_reference_(
    sliced: torch.nn.Module, dense: torch.nn.Module, docs: list[str], tmp: Path
) -> None:
    """The first implementation, kept as the reference: one paired full-model capture per site
    (4·L + 1 passes through both models, cost ~L²), fitting each site on what it returns."""
    s, d = get_adapter(sliced), get_adapter(dense)
    subjects = {
        "teacher": Subject(dense, TOK, name="dense", fingerprint={"role": "dense"}),
        "student": Subject(sliced, TOK, name="sliced", fingerprint={"role": "sliced"}),
    }
    steps: list[tuple[str, int | None]] = [
        (site, j)
        for j in range(s.num_layers)
        for site in ("attn_in", "attn_heads", "mlp_in", "mlp_hidden")
    ] + [("final.normed", None)]
    for i, (site, j) in enumerate(steps):
        cfg = {
            "sites": [site],
            "cross_sites": [site],
            "full": [site],
            "layers": None if j is None else [j],
            "layer_map": list(range(s.num_layers)),
            "max_length": 64,
            "batch_size": 1,  # one window at a time, as the block-wise path runs them
            "checkpoint_every": 10**6,
        }
        cap = run_capture(subjects, docs, tmp / f"pass-{i}", cfg, progress=False, resume=False)
        key = site if j is None else f"blocks.{j}.{site}"
        st, dt = cap.stats("student", key), cap.stats("teacher", key)
        m = PairMoments(st.m2, cap.cross(key, key).m_ab, st.sum, dt.sum, int(st.count))
        _fit_site_(s, d, site, j, m, 1e-2)


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_block_wise_fit_equals_the_multi_pass_reference(case: str, tmp_path: Path) -> None:
    model = fused(case)
    calib = stops(6, 2)
    q = random_orthogonal(get_adapter(model).hidden_size, 5)
    dense = dense_reference(model, q)
    sliced = copy.deepcopy(model)
    slice_(sliced, 40, q)
    ref, prior = copy.deepcopy(sliced), copy.deepcopy(sliced)
    info = reconstruct_(sliced, dense, TOK, calib, rel_lam=1e-2, max_length=64)
    multi_pass_reference_(ref, dense, calib, tmp_path)
    assert info["tokens"] > 0 and len(info["fits"]) == 4 * get_adapter(model).num_layers + 1
    for (n, p), p_ref in zip(sliced.named_parameters(), ref.parameters(), strict=True):
        tol = 1e-9 * max(float(p_ref.detach().abs().max()), 1.0)
        assert float((p - p_ref).abs().max()) <= tol, n
    # the reference really re-fitted something (not two untouched copies)
    moved = max(
        float((p - p0).abs().max())
        for p, p0 in zip(ref.parameters(), prior.parameters(), strict=True)
    )
    assert moved > 1e-3


@pytest.fixture(scope="module")
def stops_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted case as a corpus file: calibration and held-out documents of one made-up
    distribution."""
    path = tmp_path_factory.mktemp("texts") / "stops.jsonl"
    rows = [{"text": t, "split": "calibration"} for t in stops(24, 0)]
    rows += [{"text": t, "split": "heldout"} for t in stops(4, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_slice_cli_reconstruct_writes_a_better_plain_checkpoint(
    stops_corpus: Path, tmp_path: Path, run_cli
) -> None:
    src = save_tiny(tmp_path / "src", "llama")
    common = ["--model", str(src), "--fraction", "0.375", "--corpus", str(stops_corpus)]
    common += ["--split", "calibration", "--max-length", "64", "--check-corpus"]
    common += [str(stops_corpus), "--check-windows", "2", "--check-tokens", "32"]
    runs = {}
    for name, extra in (("plain", []), ("ls", ["--reconstruct"])):
        code, _, err = run_cli(["slice", *common, "--out", str(tmp_path / name), *extra])
        assert code == 0, err
        runs[name] = json.loads((tmp_path / name / "gradfree_surgery.json").read_text())["result"]
    rec = runs["ls"]["slice"]["reconstruction"]
    n_layers = get_adapter(AutoModelForCausalLM.from_pretrained(src)).num_layers
    assert runs["plain"]["slice"]["reconstruction"] is None
    assert rec["fitted_sites"] == 4 * n_layers + 1 and rec["tokens"] > 0
    assert rec["rel_lambda"] == pytest.approx(1e-2)
    # held-out logits against the dense folder, measured here on the reloaded folders
    x = ids(stops(4, 1))
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(x).logits.double()
        err_of = {}
        for name in runs:
            back = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
            assert back.config.hidden_size == 40
            err_of[name] = rel_err(back(x).logits.double(), dense)
    assert err_of["plain"] > 0.05 and err_of["ls"] < 0.85 * err_of["plain"], err_of


def test_slice_cli_refuses_bad_reconstruct_combinations_in_one_sentence(
    stops_corpus: Path, tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_tiny(tmp_path / "src", "llama")
    capsys.readouterr()  # the save's progress bar is not the command's output
    base = ["slice", "--model", str(src), "--fraction", "0.25", "--out", str(tmp_path / "out")]
    corpus = ["--corpus", str(stops_corpus), "--split", "calibration"]
    cases = [
        ([*corpus, "--reconstruct", "--recompute"], "no --recompute"),
        ([*corpus, "--reconstruct-lambda", "0.1"], "only applies with --reconstruct"),
        ([*corpus, "--reconstruct", "--reconstruct-lambda", "-1"], "cannot be negative"),
    ]
    for extra, expected in cases:
        code, _, err = run_cli([*base, *extra])
        assert code == 2, (extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
        assert not (tmp_path / "out").exists()
