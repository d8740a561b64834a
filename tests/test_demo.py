"""The main job end to end on tiny saved models (the real pair runs in `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradfree.align.config import AblateConfig, AlignConfig
from gradfree.base.errors import GradfreeError
from gradfree.experiment.demo import DemoConfig, run_demo
from gradfree.testing.tiny import save_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    teacher = save_tiny(d / "t", "qwen2", seed=1, hidden_size=96, num_attention_heads=6)
    student = save_tiny(d / "s", "qwen2", seed=2)
    return teacher, student


def _cfg(pair: tuple[Path, Path]) -> DemoConfig:
    return DemoConfig(
        teacher=str(pair[0]),
        student=str(pair[1]),
        calibration_limit=4,
        heldout_limit=3,
        public_corpus="tourguide",
        public_limit=2,
        max_length=48,
        ablation=AblateConfig(
            align=AlignConfig(
                limit=3,
                max_length=32,
                dump_max=64,
                pattern_docs=1,
                pattern_max_length=16,
                ridge_head=True,
                style_places=2,
                style_tokens=4,
            ),
            variants=["base", "perm", "perm+rot", "style"],
            heldout_limit=2,
            questions=2,
            max_new_tokens=3,
            prompt_places=2,
            prompt_tokens=4,
        ),
        experiment={
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
        },
    )


def test_demo_writes_one_complete_folder(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = run_demo(_cfg(pair), tmp_path / "demo", say=lambda _: None)
    report = (out / "report.md").read_text()
    for section in (
        "## Capture",
        "## Spectra",
        "## Evaluation",
        "## Alignment ablation",
        "## Compression (issue 4)",
        "`joint/optimal`",
    ):
        assert section in report
    assert "## Time and memory" in report
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["teacher"] == str(pair[0])
    assert {r["stage"] for r in run["stages"]} >= {"paired capture (teacher + student)"}
    assert (out / "capture" / "manifest.json").is_file()
    assert (out / "spectrum" / "student" / "spectrum.md").is_file()
    ev = json.loads((out / "eval" / "student-tourguide-heldout" / "eval.json").read_text())
    # The student and teacher are different random models: KL must be positive and finite.
    assert ev["teacher"]["kl_mean"] > 0 and ev["teacher"]["teacher_ppl"] > 1
    assert not list(tmp_path.glob(".*partial*"))
    ablation = json.loads((out / "ablation" / "ablation.json").read_text())
    assert list(ablation["variants"]) == ["base", "perm", "perm+rot", "style"]
    # Permutations and the global rotation change nothing the model computes: identical KL.
    assert ablation["checks"]["perm"]["identical"] and ablation["checks"]["perm+rot"]["identical"]
    assert run["ablation_run_id"] == ablation["run_id"]
    rows = json.loads((out / "experiment" / "results.json").read_text())["rows"]
    assert rows["joint/optimal"]["task"]["kl"] > 0 and len(rows["joint/optimal"]["attention_kl"])


def test_demo_refuses_an_existing_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    with pytest.raises(GradfreeError, match="already exists"):
        run_demo(_cfg(pair), tmp_path / "demo", say=lambda _: None)


def test_demo_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        DemoConfig(teacher="a", unknown_field=1)  # type: ignore[call-arg]
