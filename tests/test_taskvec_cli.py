"""``gradfree taskvec`` end to end on a tiny model with synthetic adapters: mask → compress →
merge → unmerge, the files each writes, and one-sentence refusals that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradfree.testing.lora import make_lora
from gradfree.testing.tiny import save_tiny

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("taskvec_cli")
    base = save_tiny(root / "base", "qwen2", seed=0)
    for i in range(3):
        make_lora(base, root / f"a{i}", seed=20 + i)
    return root


def test_mask_compress_merge_unmerge(inputs: Path, tmp_path: Path, run_cli) -> None:
    base = str(inputs / "base")
    ads = [str(inputs / f"a{i}") for i in range(3)]
    r = run_cli(["taskvec", "mask", *ads, "--base", base, "--k", "600", "--modules", "linears",
                 "--out", str(tmp_path / "mask"), "--no-progress"])  # fmt: skip
    assert r.code == 0, r.err
    assert "KB of indices" in r.err and "seed 003's: 822 MB" in r.err
    manifest = json.loads((tmp_path / "mask" / "mask.json").read_text())
    assert manifest["entries"] == 600 - 600 % 14 and manifest["aggregate"] == "max"

    r = run_cli(["taskvec", "compress", "--base", base, "--mask", str(tmp_path / "mask"),
                 "--vector", ads[0], "--out", str(tmp_path / "a0.safetensors")])  # fmt: skip
    assert r.code == 0, r.err
    assert (tmp_path / "a0.safetensors").is_file()

    r = run_cli(["taskvec", "merge", ads[0], ads[2], "--base", base, "--weights", "0.7,0.2",
                 "--dtype", "float64", "--out", str(tmp_path / "merged")])  # fmt: skip
    assert r.code == 0, r.err
    assert (tmp_path / "merged" / "taskvec_merge.json").is_file()

    # the syntax: --dictionary A1 … An; one entry a compressed file
    r = run_cli(["taskvec", "unmerge", "--base", base, "--merged", str(tmp_path / "merged"),
                 "--dictionary", str(tmp_path / "a0.safetensors"), ads[1], ads[2],
                 "--mask", str(tmp_path / "mask"), "--out", str(tmp_path / "un")])  # fmt: skip
    assert r.code == 0, r.err
    rec = json.loads((tmp_path / "un" / "unmerge.json").read_text())
    assert [d["label"] for d in rec["dictionary"]] == ["a0.safetensors", "a1", "a2"]
    nnls = rec["solvers"]["nnls"]
    # the compressed file is not matched to the record by path, so only a2 is scored present
    assert nnls["weights"]["a0.safetensors"] == pytest.approx(0.7, abs=1e-6)
    assert nnls["weights"]["a2"] == pytest.approx(0.2, abs=1e-6)
    assert nnls["weights"]["a1"] < 1e-6
    assert "sign-aware solve needs full task vectors" in rec["notes"][0]


def test_refusals_are_one_sentence_and_write_nothing(inputs: Path, tmp_path: Path, run_cli) -> None:
    base = str(inputs / "base")
    cases = [
        (["taskvec", "mask", str(inputs / "a0"), "--base", base, "--k", "0"], "at least 1"),
        (["taskvec", "mask", str(tmp_path / "none"), "--base", base], "is not a known model name"),
        (
            ["taskvec", "merge", str(inputs / "a0"), "--base", base, "--weights", "x"],
            "comma-separated",
        ),
        (
            [
                "taskvec",
                "merge",
                str(inputs / "a0"),
                "--base",
                base,
                "--method",
                "ties",
                "--densities",
                "2",
            ],
            "density",
        ),
        (
            [
                "taskvec",
                "compress",
                "--base",
                base,
                "--mask",
                str(tmp_path),
                "--vector",
                str(inputs / "a0"),
            ],
            "is not a task-vector mask",
        ),
    ]
    for i, (argv, match) in enumerate(cases):
        out = tmp_path / f"out{i}"
        suffix = ".safetensors" if "compress" in argv else ""
        r = run_cli([*argv, "--out", f"{out}{suffix}"])
        assert r.code == 2, (argv, r.err)
        assert r.err.startswith("error: ") and match in r.err, r.err
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert not Path(f"{out}{suffix}").exists()
