"""gradfree experiment: the research matrix end to end on tiny models saved as HF folders.

A planted teacher (the student embedded in a wider, rotated residual stream) makes every row
exact, so the engine's plumbing (references, captures, projections, blends, heads, studies) is
checked against KL ≈ 0; an unrelated teacher checks the measured choices, the α sweep's α = 0
fixed point, resume and the one-sentence errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import load_capture
from gradfree.experiment import expand_rows, make_experiment, run_experiment
from gradfree.experiment.config import Texts
from gradfree.experiment.run import longest_prefix
from gradfree.testing.planted import embed_student
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _config(teacher: str, student: str, **kw: Any) -> dict[str, Any]:
    heldout = {"corpus": "tourguide", "split": "heldout"}
    cfg: dict[str, Any] = {
        "teacher": teacher,
        "student": student,
        "calibration": {"corpus": "tourguide", "split": "calibration", "limit": 4},
        "validation": {"corpus": "tourguide", "split": "calibration", "skip": 4, "limit": 2},
        "task": {**heldout, "limit": 3},
        "out_of_task": [{**heldout, "skip": 3, "limit": 2}],
        "questions": 2,
        "max_length": 40,
        "recipe": {"dump_rate": 1.0},
        "head_lambdas": [1.0],
        "head_blends": [0.5, 1.0],
        "rows": [
            {"name": "student", "kind": "student"},
            {"name": "joint/none", "recipe": {"merge": "none"}},
            {"name": "svd/optimal", "recipe": {"basis": "svd", "merge": "optimal"}},
            {"name": "joint/measured", "recipe": {"merge": "measured", "alpha_grid": [0.5, 1]}},
            {"name": "student+head", "kind": "student", "head": True},
            {"name": "joint/none+head", "recipe": {"merge": "none"}, "head": True},
        ],
    }
    cfg.update(kw)
    return cfg


def test_planted_teacher_every_row_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradfree.experiment import run

    loads: list[Texts] = []
    original = run.load_texts

    def counted(t: Texts) -> list[Any]:
        loads.append(t)
        return original(t)

    monkeypatch.setattr(run, "load_texts", counted)
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher, _ = embed_student(student, 48, seed=3, permute=True)
    cfg = _config(
        _save(teacher, tmp_path / "t"),
        _save(student, tmp_path / "s"),
        questions=0,
        studies={
            "alpha_sweep": {"layers": [1], "alphas": [0.0, 1.0]},
            "data_efficiency": {"sizes": [2], "rows": ["joint/none"]},
            "transfer": [
                {
                    "name": "heldout",
                    "calibration": {"corpus": "tourguide", "split": "heldout", "skip": 5},
                    "validation": {"corpus": "tourguide", "split": "calibration", "limit": 2},
                    "rows": ["joint/none", "student+head"],
                }
            ],
            "composability": {
                "calibration": {"corpus": "tourguide", "split": "heldout", "skip": 5},
                "weights": [0.5],
                "rows": ["joint/none"],
            },
        },
    )
    out = run_experiment(make_experiment(cfg), tmp_path / "exp", say=lambda _m: None)
    assert loads and len(loads) == len(set(loads))  # every set of texts is read once
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert res["complete"] and set(rows) == {r.name for r in expand_rows(make_experiment(cfg))}
    for name, r in rows.items():
        assert r["task"]["kl"] < 1e-5, name  # the planted teacher is the student: all exact
    assert rows["joint/none"]["task"]["tokens"] == rows["student"]["task"]["tokens"] > 0
    assert rows["joint/none+blend0.5"]["study"] == "composability"
    assert rows["joint/none@2"]["calibration"].endswith("[0:2]")
    # the transfer's head is chosen on texts of its own calibration domain
    assert rows["student+head@heldout"]["validation"] == "tourguide/calibration[0:2]"
    assert "validation" not in rows["student+head"]
    md = (out / "results.md").read_text()
    assert "(validation KL on tourguide/calibration[0:2]" in md
    assert "`joint/none@heldout`" in md and "Time and peak memory" in md
    assert (out / "plots" / "alpha_sweep.png").exists()
    assert not (out / "work").exists()  # captures and references removed at the end


def test_unrelated_teacher_measured_choices_and_resume(tmp_path: Path) -> None:
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher = tiny_model("qwen2", hidden_size=48, intermediate_size=64, num_hidden_layers=3, seed=5)
    cfg = _config(
        _save(teacher, tmp_path / "t"),
        _save(student, tmp_path / "s"),
        studies={
            "alpha_sweep": {"layers": [0], "alphas": [0.0, 1.0]},
            "data_efficiency": {"sizes": [2, 3], "rows": ["student+head"]},
        },
    )
    exp = make_experiment(cfg)
    out = run_experiment(exp, tmp_path / "exp", say=lambda _m: None, keep_work=True)
    rows = json.loads((out / "results.json").read_text())["rows"]
    base = rows["student"]["task"]
    assert base["kl"] > 1e-3
    # α = 0 on the one swept block (the others, the embedding and the head: student) is the student
    assert abs(rows["sweep/L0/α=0"]["task"]["kl"] - base["kl"]) < 1e-6
    assert abs(rows["sweep/L0/α=1"]["task"]["kl"] - base["kl"]) > 1e-6
    m = rows["joint/measured"]["measured_alpha"]
    kls = {c["alpha"]: c["validation_kl"] for c in m["candidates"]}
    assert set(kls) == {0.0, 0.5, 1.0} and kls[m["chosen_alpha"]] == min(kls.values())
    for name in ("student+head", "student+head@2", "student+head@3"):
        h = rows[name]["head"]  # the full capture's final states, or captures of their own
        assert h["validation_chosen"]["kl"] <= h["validation_student"]["kl"]
    # the 3-document capture extended the 2-document one by one document, then merged
    finals = [load_capture(p) for p in sorted((out / "work" / "final-states").glob("*/"))]
    assert sorted(c.manifest["documents"]["count"] for c in finals) == [2, 3]
    merged = next(c for c in finals if c.manifest["documents"]["count"] == 3)
    assert len(merged.manifest["merged_from"]) == 2
    # resume: nothing is recomputed, the numbers stay
    mtime = (out / "results.json").stat().st_mtime_ns
    said: list[str] = []
    run_experiment(exp, out, resume=True, say=said.append)
    assert not said
    again = json.loads((out / "results.json").read_text())["rows"]
    assert again["student"]["task"] == base
    assert (out / "results.json").stat().st_mtime_ns >= mtime
    with pytest.raises(GradfreeError, match="already exists"):
        run_experiment(exp, out, say=lambda _m: None)
    (out / "results.json").write_text("{not json")  # a corrupted record: one sentence
    with pytest.raises(GradfreeError, match="not valid JSON"):
        run_experiment(exp, out, resume=True, say=lambda _m: None)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"rows": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"rows": [{"name": "s", "kind": "student", "recipe": {"merge": "none"}}]}, "no recipe"),
        (
            {
                "rows": [{"name": "a"}],
                "studies": {"data_efficiency": {"sizes": [2], "rows": ["b"]}},
            },
            "not in rows",
        ),
        ({"rows": [], "bogus": 1}, "Unknown experiment config option 'bogus'"),
        (  # the default validation texts are calibration[32:44]
            {
                "rows": [{"name": "a"}],
                "studies": {"data_efficiency": {"sizes": [40], "rows": ["a"]}},
            },
            r"calibration\[0:40\] of row 'a@40' overlap the validation",
        ),
        (
            {"rows": [{"name": "a"}], "task": {"corpus": "tourguide", "split": "calibration"}},
            "overlap the task texts",
        ),
        (
            {
                "rows": [{"name": "a"}],
                "studies": {
                    "transfer": [
                        {
                            "name": "n",
                            "calibration": {"corpus": "news", "split": "calibration", "limit": 9},
                            "validation": {"corpus": "news", "split": "calibration", "skip": 8},
                            "rows": ["a"],
                        }
                    ]
                },
            },
            r"news/calibration\[0:9\] of row 'a@n' overlap the validation texts",
        ),
        (
            {"rows": [{"name": "a"}], "validation": {"corpus": "tourguide", "split": "heldout"}},
            r"validation texts tourguide/heldout\[0:\] of the config overlap the task",
        ),
    ],
)
def test_bad_configs_fail_in_one_sentence(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(GradfreeError, match=message):
        make_experiment({"teacher": "t", "student": "s", **patch})


def test_longest_prefix_is_the_largest_strict_prefix_of_the_same_texts() -> None:
    def t(limit: int | None, skip: int = 0, corpus: str = "tourguide") -> Texts:
        return Texts(corpus=corpus, split="calibration", skip=skip, limit=limit)

    have = [t(10), t(25), t(50), t(25, skip=1), t(40, corpus="news"), t(None)]
    assert longest_prefix(t(50), have) == t(25)
    assert longest_prefix(t(100), have) == t(50)
    assert longest_prefix(t(10), have) is None
    assert longest_prefix(t(None), have) is None
    assert t(10).overlaps(t(5, skip=9)) and not t(10).overlaps(t(5, skip=10))
    assert not t(10).overlaps(t(10, corpus="news"))


def test_study_series_are_sorted_by_x_whatever_the_row_order() -> None:
    from gradfree.experiment.report import _series

    def row(kl: float) -> dict[str, Any]:
        return {"study": "data_efficiency", "task": {"kl": kl}}

    results = {"h@100": row(1.0), "h@10": row(3.0), "h@50": row(2.0), "s": {"study": "matrix"}}
    series = _series(results, "data_efficiency", lambda n, _r: ("h", float(n.split("@")[1])))
    assert series == {"h": ([10.0, 50.0, 100.0], [3.0, 2.0, 1.0])}


def test_continuation_and_refit_rows_choose_on_validation(tmp_path: Path) -> None:
    """Issue 17 part 4's rows: teacher-written calibration text beside the documents, and the
    last MLP writers refitted after the head, each block's α the validation minimum (0 included)."""
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher = tiny_model("qwen2", hidden_size=48, intermediate_size=64, num_hidden_layers=3, seed=5)
    rows = [
        {"name": "student", "kind": "student"},
        {"name": "student+head", "kind": "student", "head": True},
        {
            "name": "+cont",
            "kind": "student",
            "head": True,
            "continuations": {"prompt_tokens": 8, "new_tokens": 8, "batch_size": 3},
        },
        {
            "name": "+refit",
            "kind": "student",
            "head": True,
            "refit": {"blocks": 2, "alphas": [0.5, 1.0], "lam": 0.1},
        },
    ]
    cfg = _config(_save(teacher, tmp_path / "t"), _save(student, tmp_path / "s"), rows=rows)
    out = run_experiment(
        make_experiment(cfg), tmp_path / "exp", say=lambda _m: None, keep_work=True
    )
    got = json.loads((out / "results.json").read_text())["rows"]
    assert got["+cont"]["continuations"] == {"documents": 4}
    (cont,) = (out / "work" / "continuations").glob("*.jsonl")
    texts = [json.loads(line) for line in cont.read_text().splitlines()]
    assert [t["split"] for t in texts] == ["continuation"] * 4
    merged = [
        load_capture(p)
        for p in (out / "work" / "final-states").glob("*/")
        if len(load_capture(p).manifest.get("merged_from", [])) == 2
    ]
    assert [c.manifest["documents"]["count"] for c in merged] == [8]
    refit = got["+refit"]["refit"]
    assert [b["block"] for b in refit["blocks"]] == [1, 0]
    for cands, block in zip(refit["candidates"], refit["blocks"], strict=True):
        kls = {c["alpha"]: c["validation_kl"] for c in cands}
        assert set(kls) == {0.0, 0.5, 1.0} and kls[block["alpha"]] == min(kls.values())
    # the refit starts from the head row's model: its first candidate α = 0 is that model
    first = {c["alpha"]: c["validation_kl"] for c in refit["candidates"][0]}
    assert first[0.0] == pytest.approx(
        got["student+head"]["head"]["validation_chosen"]["kl"], rel=1e-4
    )
    with pytest.raises(GradfreeError, match="student row with a head"):
        make_experiment({**cfg, "rows": [{"name": "x", "kind": "student", "refit": {}}]})
