"""``gradfree directions extract`` and ``steer`` end to end on a tiny model, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradfree.testing.tiny import save_tiny

pytest.importorskip("wordfreq", reason="wordfreq (the default word list) is not installed")


def test_extract_then_steer(tmp_path: Path, run_cli) -> None:
    model = save_tiny(tmp_path / "m", "qwen2")
    out = tmp_path / "dirs"
    r = run_cli(["directions", "extract", "--model", str(model), "--concepts", "24",
                 "--layers", "0,1", "--batch-size", "8", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert r.code == 0, r.err
    manifest = json.loads((out / "directions.json").read_text())
    assert manifest["layers"] == [0, 1] and len(manifest["concepts"]) == 24
    rate = manifest["source"]["timings"]["concepts_per_s"]
    assert f"24 concepts at layers [0, 1], {rate:.1f} concepts/s" in r.err
    concept = manifest["concepts"][3]
    r = run_cli(["directions", "steer", "--model", str(model), "--directions", str(out),
                 "--concept", concept, "--strength", "8", "--prompt", "The harbour",
                 "--max-new-tokens", "6"])  # fmt: skip
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert lines[0].startswith("without: ") and lines[1].startswith(f"with {concept} × 8")
    r = run_cli(["directions", "steer", "--model", str(model), "--directions", str(out),
                 "--concept", "not-a-concept", "--strength", "1", "--prompt", "x"])  # fmt: skip
    assert r.code == 2 and "is not in the directions" in r.err
    r = run_cli(["directions", "extract", "--model", str(model), "--concepts", "5",
                 "--layers", "9", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "bad").exists()
