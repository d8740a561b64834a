"""The main job end to end on tiny saved models (the real pair runs in `make demo`): capture,
the distilled head, a plain checkpoint that transformers reloads, the evaluation, the spectra.
The research studies it no longer runs are tested in tests/test_studies.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.experiment.demo import DemoConfig, run_demo
from gradfree.testing.tiny import save_tiny


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    teacher = save_tiny(d / "t", "qwen2", seed=1, hidden_size=96, num_attention_heads=6)
    student = save_tiny(d / "s", "qwen2", seed=2)
    return teacher, student


def _cfg(pair: tuple[Path, Path], **kw: object) -> DemoConfig:
    return DemoConfig(
        teacher=str(pair[0]),
        student=str(pair[1]),
        calibration_limit=4,
        validation_limit=3,
        heldout_limit=3,
        public_corpus="tourguide",
        public_limit=2,
        max_length=48,
        head_lambdas=[0.1, 1.0],
        head_blends=[0.5, 1.0],
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def demo(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_demo(_cfg(pair), tmp_path_factory.mktemp("out") / "demo", say=lambda _: None)


def test_demo_writes_one_complete_folder(demo: Path, pair: tuple[Path, Path]) -> None:
    report = (demo / "report.md").read_text()
    # The page opens with the one results table: teacher, native and distilled student.
    table = [ln for ln in report.splitlines() if ln.startswith("|")][:5]
    assert "ΔKL vs native student, 95% CI" in table[0]
    assert [r.split("|")[1].split()[0] for r in table[2:]] == ["teacher", "native", "distilled"]
    assert "![results](plots/results.png)" in report and (demo / "plots" / "results.png").is_file()
    for section in ("## Spectra", "## The head's choice", "## Models and capture", "## Time and"):
        assert section in report
    run = json.loads((demo / "run.json").read_text())
    assert run["config"]["teacher"] == str(pair[0])
    assert {r["stage"] for r in run["stages"]} >= {"paired capture (teacher + student)"}
    assert (demo / "capture" / "manifest.json").is_file()
    assert (demo / "spectrum" / "student" / "spectrum.md").is_file()
    assert not (demo / ".scratch").exists()  # the teacher references are not kept
    assert not list(demo.parent.glob(".*partial*"))
    # The student and teacher are different random models: KL must be positive and finite.
    native = run["scores"]["native"]["heldout"]
    assert 0 < native["kl"] < float("inf") and run["scores"]["teacher"]["heldout"]["ppl"] > 1
    # The fit and validation texts are disjoint slices of the calibration split.
    ids = {k: {d["id"] for d in v["docs"]} for k, v in run["texts"].items()}
    assert not ids["fit"] & ids["validation"] and len(ids["fit"]) == 4


def test_the_head_never_loses_on_validation_and_is_scored_honestly(demo: Path) -> None:
    run = json.loads((demo / "run.json").read_text())
    head, scores = run["head"], run["scores"]
    assert head["validation_chosen"]["kl"] <= head["validation_student"]["kl"]
    assert len(head["candidates"]) == 4
    lo, hi = scores["kl_difference_95ci"]
    delta = scores["distilled"]["heldout"]["kl"] - scores["native"]["heldout"]["kl"]
    assert lo <= hi and lo - 1e-9 <= delta <= hi + 1e-9  # the point estimate lies inside
    if head["kept_student_head"]:
        assert scores["distilled"]["heldout"]["kl"] == scores["native"]["heldout"]["kl"]


def test_the_checkpoint_loads_in_plain_transformers(demo: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = json.loads((demo / "run.json").read_text())
    assert run["reload"]["max_abs_logit_difference"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(demo / "student")
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    if not run["head"]["kept_student_head"]:  # the saved head is the distilled one
        from gradfree.models import load_model

        native = load_model(run["config"]["student"]).model
        assert not torch.equal(native.lm_head.weight, model.lm_head.weight)
        assert torch.equal(native.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_the_cli_prints_where_the_student_is_last(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradfree.experiment.demo as demo_mod

    seen: list[DemoConfig] = []

    def fake(cfg: DemoConfig, out: Path, overwrite: bool = False, say: object = None) -> Path:
        seen.append(cfg)
        return Path(out)

    monkeypatch.setattr(demo_mod, "run_demo", fake)
    res = run_cli(["demo", "--teacher", str(pair[0]), "--out", str(tmp_path / "d")])  # type: ignore[operator]
    assert res.code == 0 and seen[0].teacher == str(pair[0])
    last = res.out.strip().splitlines()[-1]
    assert last.startswith(f"student checkpoint: {tmp_path / 'd' / 'student'}")
    assert f"AutoModelForCausalLM.from_pretrained('{tmp_path / 'd' / 'student'}')" in last


def test_demo_refuses_an_existing_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    with pytest.raises(GradfreeError, match="already exists"):
        run_demo(_cfg(pair), tmp_path / "demo", say=lambda _: None)


def test_demo_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        DemoConfig(teacher="a", unknown_field=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"final\.normed"):
        DemoConfig(sites=["resid_pre"])
    for gone in ("ablation", "experiment", "questions"):  # the studies left the demo
        with pytest.raises(ValueError, match="extra"):
            DemoConfig(**{gone: None})  # type: ignore[arg-type]
