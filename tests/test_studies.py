"""The research studies that left the demo (`make experiments`): seed 001's alignment ablation
(`gradfree ablate`) and a compression matrix (`gradfree experiment`) run by their commands on
tiny saved models, with the assertions the demo's test made about them; and the Makefile runs
every study with a config that validates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradfree.testing.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]

ABLATION = {
    "align": {
        "limit": 3,
        "max_length": 32,
        "dump_max": 64,
        "pattern_docs": 1,
        "pattern_max_length": 16,
        "ridge_head": True,
        "style_places": 2,
        "style_tokens": 4,
    },
    "variants": ["base", "perm", "perm+rot", "style"],
    "heldout_limit": 2,
    "questions": 2,
    "max_new_tokens": 3,
    "prompt_places": 2,
    "prompt_tokens": 4,
}

COMPRESSION = {
    "calibration": {"corpus": "tourguide", "split": "calibration", "limit": 3},
    "validation": {"corpus": "tourguide", "split": "calibration", "skip": 3, "limit": 2},
    "task": {"corpus": "tourguide", "split": "heldout", "limit": 2},
    "out_of_task": [{"corpus": "tourguide", "split": "heldout", "skip": 2, "limit": 1}],
    "questions": 1,
    "max_length": 32,
    "recipe": {"dump_rate": 1.0, "attention_kl_windows": 1},
    "head_lambdas": [1.0],
    "head_blends": [0.5],
    "rows": [
        {"name": "student", "kind": "student"},
        {"name": "joint/optimal", "recipe": {"merge": "optimal"}},
    ],
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    teacher = save_tiny(d / "t", "qwen2", seed=1, hidden_size=96, num_attention_heads=6)
    student = save_tiny(d / "s", "qwen2", seed=2)
    return teacher, student


def _yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_the_ablation_study_on_tiny_models(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: Callable[[list[str]], Any]
) -> None:
    cfg = _yaml(tmp_path / "ablation.yaml", ABLATION)
    out = tmp_path / "ablation"
    argv = ["ablate", "--teacher", str(pair[0]), "--student", str(pair[1])]
    res = run_cli([*argv, "--config", str(cfg), "--out", str(out)])
    assert res.code == 0, res.err
    assert "# Alignment ablation" in (out / "ablation.md").read_text()
    ablation = json.loads((out / "ablation.json").read_text())
    assert list(ablation["variants"]) == ["base", "perm", "perm+rot", "style"]
    # Permutations and the global rotation change nothing the model computes: identical KL.
    assert ablation["checks"]["perm"]["identical"] and ablation["checks"]["perm+rot"]["identical"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_id"] == ablation["run_id"]


def test_the_compression_study_on_tiny_models(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: Callable[[list[str]], Any]
) -> None:
    cfg = _yaml(
        tmp_path / "exp.yaml", {"teacher": str(pair[0]), "student": str(pair[1]), **COMPRESSION}
    )
    out = tmp_path / "exp"
    res = run_cli(["experiment", "--config", str(cfg), "--out", str(out)])
    assert res.code == 0, res.err
    assert "`joint/optimal`" in (out / "results.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows["joint/optimal"]["task"]["kl"] > 0 and len(rows["joint/optimal"]["attention_kl"])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_experiments_runs_every_study_with_a_valid_config() -> None:
    from gradfree.align.config import AblateConfig, load_config
    from gradfree.base.configfile import read_yaml_mapping
    from gradfree.experiment import make_experiment

    dry = subprocess.run(
        ["make", "-n", "experiments"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [ln for ln in dry.splitlines() if "gradfree experiment" in ln]
    configs = [re.search(r"--config (\S+)", c).group(1) for c in commands]  # type: ignore[union-attr]
    assert set(configs) == {
        "experiments/seed000.yaml",
        "experiments/data_efficiency.yaml",
        "experiments/transfer.yaml",
        "experiments/composability.yaml",
        "experiments/student_pushed.yaml",
    }
    assert all("--resume" in c for c in commands)  # an interrupted matrix continues
    for path in configs:
        exp = make_experiment(read_yaml_mapping(ROOT / path, "experiment file"))
        assert exp.rows
    ablate = [ln for ln in dry.splitlines() if "gradfree ablate" in ln]
    assert len(ablate) == 1 and "--config experiments/ablation.yaml" in ablate[0]
    assert load_config(AblateConfig, ROOT / "experiments" / "ablation.yaml").variants
    assert dry.count("scripts/bench_slice.py") == 2
    assert dry.count("scripts/bench_teacher_curve.py") == 1
    assert "gradfree demo" not in dry  # the demo is not a study
