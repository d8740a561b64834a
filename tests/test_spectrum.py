"""Spectra: summary numbers on designed spectra, recovery of planted eigenvalues from moment
statistics, the seed-002 artifacts (a large mean, a massive first token), weight spectra against
numpy's SVD, the written report and the CLI's error paths.

Captures are faked (a tiny class with the ``load_capture`` interface filled with MomentStats we
build ourselves), so these tests do not depend on the capture runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import sym_eigh
from gradfree.capture.stats import MomentStats
from gradfree.spectrum import compute as spectrum
from gradfree.spectrum.report import SpectrumReport, build_report, render_markdown, write_report
from gradfree.testing.tiny import tiny_model


class FakeCapture:
    """The part of ``gradfree.capture.Capture`` that the spectrum analysis uses."""

    def __init__(self, stats: dict[tuple[str, str, str], MomentStats], path: str = "fake") -> None:
        self._stats = stats
        self.roles = sorted({r for r, _, _ in stats})
        self.path = path
        self.manifest = {"fake": True}

    def keys(self, role: str) -> list[str]:
        return sorted({k for r, k, p in self._stats if r == role and p == "all"})

    def stats(self, role: str, key: str, part: str = "all") -> MomentStats:
        return self._stats[(role, key, part)]


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _stats_with(cov: torch.Tensor, mean: torch.Tensor, n: int = 1000) -> MomentStats:
    """MomentStats whose covariance is exactly ``cov`` and mean exactly ``mean``."""
    s = MomentStats.empty(cov.shape[0])
    s.count = n
    s.sum = mean * n
    s.m2 = n * (cov + mean[:, None] * mean[None, :])
    s.m3 = torch.zeros_like(mean)
    s.m4 = torch.zeros_like(mean)
    return s


def _seqs(n_seq: int, t: int, d: int, first_spike: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_seq, t, d, generator=g, dtype=torch.float64)
    x[:, 0, 0] += first_spike  # a massive activation on the first token only
    return x


def _capture_from_seqs(x: torch.Tensor, role: str = "model", key: str = "blocks.0.resid_pre"):
    d = x.shape[-1]
    return {
        (role, key, "all"): MomentStats.empty(d).update(x.reshape(-1, d)),
        (role, key, "body"): MomentStats.empty(d).update(x[:, 1:].reshape(-1, d)),
        (role, key, "head"): MomentStats.empty(d).update(x[:, 0]),
    }


# --- pure maths ------------------------------------------------------------------------------


def test_summary_numbers_on_a_designed_spectrum() -> None:
    eigs = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    s = spectrum.summarize(eigs, trunk_width=2)
    assert s["df"] == pytest.approx(10.0**2 / 30.0)  # (Σλ)²/Σλ² by hand
    assert (s["k90"], s["k95"], s["k99"]) == (3, 4, 4)  # cumulative shares .4 .7 .9 1.0
    assert s["top1_share"] == pytest.approx(0.4)
    assert s["trunk_share"] == pytest.approx(0.7)
    assert s["df_over_dim"] == pytest.approx(10.0 / 3.0 / 6)
    assert spectrum.participation_ratio(torch.ones(17)) == pytest.approx(17.0)
    assert spectrum.participation_ratio(torch.zeros(5)) == 0.0
    assert spectrum.components_for(torch.zeros(5), 0.9) == 0
    assert spectrum.top_fraction(eigs, 100) == pytest.approx(1.0)


def test_k95_on_a_geometric_spectrum() -> None:
    eigs = 0.5 ** torch.arange(40, dtype=torch.float64)
    cum = np.cumsum(eigs.numpy()) / eigs.sum().item()
    assert spectrum.components_for(eigs, 0.95) == int(np.argmax(cum >= 0.95)) + 1 == 5


def test_planted_eigenvalues_are_recovered_from_moment_stats() -> None:
    d = 12
    lam = torch.linspace(10.0, 0.5, d, dtype=torch.float64)
    q = _orthogonal(d, 1)
    cov = q @ torch.diag(lam) @ q.T
    stats = _stats_with(cov, torch.randn(d, dtype=torch.float64))
    cap = FakeCapture({("model", "blocks.0.resid_pre", "all"): stats})
    entry = spectrum.site_spectrum(cap, "model", "blocks.0.resid_pre", {"c": ("centered", "all")})
    assert torch.allclose(entry.eigenvalues["c"], lam, rtol=1e-10, atol=1e-12)
    assert torch.allclose(entry.eigenvalues["c"], sym_eigh(cov)[0], rtol=1e-10, atol=1e-12)
    expected_df = float(lam.sum() ** 2 / (lam**2).sum())
    assert entry.summaries["c"]["df"] == pytest.approx(expected_df, rel=1e-10)


def test_a_large_mean_makes_uncentered_df_near_one_but_not_centered() -> None:
    """The seed-002 artifact: E[xxᵀ] of data with a big mean is dominated by one direction."""
    d, n = 32, 4000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ _orthogonal(d, 3).T
    x += 40.0 * torch.nn.functional.normalize(torch.ones(d, dtype=torch.float64), dim=0)
    cap = FakeCapture({("model", "blocks.0.resid_pre", "all"): MomentStats.empty(d).update(x)})
    variants = {"u": ("uncentered", "all"), "c": ("centered", "all")}
    entry = spectrum.site_spectrum(cap, "model", "blocks.0.resid_pre", variants)
    assert entry.summaries["u"]["df"] < 1.1
    assert entry.summaries["c"]["df"] > 0.8 * d  # isotropic noise: Df close to d
    assert entry.summaries["u"]["top1_share"] > 0.95
    assert entry.mean_share["all"] > 0.95  # and the report says why


def test_dropping_the_first_token_removes_a_massive_outlier() -> None:
    d = 16
    cap = FakeCapture(_capture_from_seqs(_seqs(64, 32, d, first_spike=500.0, seed=4)))
    [entry] = spectrum.activation_spectra(cap)
    assert set(entry.summaries) == set(spectrum.BASE_VARIANTS)
    for v in ("uncentered/all", "centered/all"):
        assert entry.summaries[v]["df"] < 1.1, v
    for v in ("uncentered/body", "centered/body"):
        assert entry.summaries[v]["df"] > 0.8 * d, v
    assert entry.notes == []


def test_standardised_variants_and_site_filter() -> None:
    stats = _capture_from_seqs(_seqs(8, 8, 6, 0.0, 5))
    stats.update(_capture_from_seqs(_seqs(8, 8, 6, 0.0, 6), key="blocks.0.mlp_hidden"))
    cap = FakeCapture(stats)
    entries = spectrum.activation_spectra(cap, sites=["mlp_hidden"], standardised=True)
    assert [e.key for e in entries] == ["blocks.0.mlp_hidden"]
    corr = entries[0].eigenvalues["correlation/body"]
    assert corr.sum().item() == pytest.approx(6.0)  # trace of a correlation matrix = d
    with pytest.raises(GradfreeError, match="no role 'teacher'"):
        spectrum.activation_spectra(cap, roles=["teacher"])
    with pytest.raises(GradfreeError, match="No captured site"):
        spectrum.activation_spectra(cap, sites=["attn_heads"])


def test_diagonal_only_and_missing_parts_become_notes() -> None:
    x = torch.randn(50, 8, dtype=torch.float64)
    cap = FakeCapture(
        {
            ("model", "blocks.1.mlp_hidden", "all"): MomentStats.empty(8, full=False).update(x),
            ("model", "final.normed", "all"): MomentStats.empty(8).update(x),  # no "body" part
        }
    )
    diag, final = spectrum.activation_spectra(cap)
    assert diag.summaries == {} and "variance" in diag.notes[0]
    assert "all" in diag.mean_share
    assert final.layer is None and set(final.summaries) == {"uncentered/all", "centered/all"}
    assert any("part 'body' is not available" in n for n in final.notes)
    md = render_markdown(SpectrumReport("fake", [diag, final]))
    assert "no eigenvalues (layers 1)" in md
    _assert_tables_are_rectangular(md)


def _assert_tables_are_rectangular(md: str) -> None:
    """Every row of every markdown table has as many cells as its header."""
    width = None
    for line in md.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = line.count("|")
        width = width or cells
        assert cells == width, line


# --- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_weight_spectra_equal_numpy_svd(family: str) -> None:
    model = tiny_model(family)
    ws = spectrum.weight_spectra(model, trunk_width=8)
    names = [w.name for w in ws]
    assert names[:7] == [f"blocks.0.{k}" for k in ("q", "k", "v", "o", "gate", "up", "down")]
    assert len([n for n in names if n.startswith("blocks.")]) == 7 * 2
    # tiny qwen3 ties its head to the embedding: it is listed once
    assert ("lm_head" in names) == (family == "llama") and "embed" in names
    a = get_adapter(model)
    for w in ws:
        if w.layer is not None:
            tensor = a.layer(w.layer).linears()[w.kind].weight
        else:
            tensor = a.embed_tokens.weight if w.kind == "embed" else a.lm_head.weight
        ref = np.linalg.svd(tensor.detach().double().numpy(), compute_uv=False) ** 2
        got = w.sq_singular_values.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-10 * ref[0])
        assert w.summary["df"] == pytest.approx(ref.sum() ** 2 / (ref**2).sum(), rel=1e-8)


def test_gram_chunks_give_the_same_values() -> None:
    w = torch.randn(300, 40)
    one = spectrum.squared_singular_values(w)
    chunked = spectrum.squared_singular_values(w, chunk=7)
    wide = spectrum.squared_singular_values(w.T, chunk=13)
    assert torch.allclose(one, chunked, rtol=1e-10) and torch.allclose(one, wide, rtol=1e-10)


# --- report and CLI --------------------------------------------------------------------------


def _two_layer_capture() -> FakeCapture:
    stats = {}
    for layer in range(2):
        for role in ("teacher", "student"):
            x = _seqs(16, 12, 8, first_spike=50.0, seed=10 + layer)
            stats.update(_capture_from_seqs(x, role=role, key=f"blocks.{layer}.resid_pre"))
    return FakeCapture(stats)


def test_report_is_written_with_tables_plots_and_eigenvalues(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cap = _two_layer_capture()
    acts = spectrum.activation_spectra(cap, trunk_width=4, standardised=True)
    weights = spectrum.weight_spectra(tiny_model("llama", hidden_size=8, head_dim=2), trunk_width=4)
    report = spectrum_report_for(acts, weights)
    out = write_report(report, tmp_path / "spec")
    doc = json.loads((out / "spectrum.json").read_text())
    assert len(doc["activations"]) == 4 and doc["weights"]["model"] == "tiny"
    assert "correlation/body" in doc["variants"]
    md = (out / "spectrum.md").read_text()
    assert "Seed 002 check" in md and "## Weights" in md and "![" in md
    for p in doc["plots"]:
        assert (out / p).stat().st_size > 1000
    assert "activations_vs_weights.png" in doc["plots"]
    tensors = load_file(str(out / "eigenvalues.safetensors"))
    assert "act/student/blocks.1.resid_pre/centered/body" in tensors
    with pytest.raises(GradfreeError, match="already exists"):
        write_report(report, out)
    write_report(report, out, overwrite=True)
    assert render_markdown(report).startswith("# Spectra")
    _assert_tables_are_rectangular(md)


def spectrum_report_for(acts, weights):
    return SpectrumReport("fake", acts, weights, "tiny", trunk_width=4, standardised=True)


def test_cli_errors(tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli(["spectrum", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(["spectrum", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "already exists" in err
    with pytest.raises(GradfreeError, match="does not exist"):
        build_report(tmp_path / "missing")


def test_cli_end_to_end_on_a_fake_capture(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spectrum, "open_capture", lambda path: _two_layer_capture())
    out = tmp_path / "spec"
    argv = ["spectrum", str(tmp_path), "--out", str(out), "--role", "student"]
    code, _, err = run_cli([*argv, "--sites", "resid_pre", "--trunk-width", "4"])
    assert code == 0, err
    doc = json.loads((out / "spectrum.json").read_text())
    assert {a["role"] for a in doc["activations"]} == {"student"}
    assert doc["weights"] is None and doc["trunk_width"] == 4


def test_sites_are_ordered_by_site_then_layer_number() -> None:
    x = torch.randn(20, 3, dtype=torch.float64)
    keys = ["final.normed", "blocks.10.resid_pre", "blocks.2.mlp_hidden", "blocks.9.resid_pre"]
    keys.append("blocks.2.resid_pre")
    cap = FakeCapture({("model", k, "all"): MomentStats.empty(3).update(x) for k in keys})
    order = [e.key for e in spectrum.activation_spectra(cap)]
    # FakeCapture lists keys in string order, so resid_pre is the first site seen
    assert order == [
        "blocks.2.resid_pre",
        "blocks.9.resid_pre",
        "blocks.10.resid_pre",
        "blocks.2.mlp_hidden",
        "final.normed",
    ]
