"""The LM-head distillation chosen on validation KL: it keeps the student's head when nothing
beats it, and recovers a planted teacher head when the bodies agree."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from gradfree.capture import Subject, run_capture
from gradfree.compress.head import apply_head_, head_scores, select_ridge_head, validation_set
from gradfree.surgery import untie_
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

FIT = [
    f"Stop {i}: the harbour is {i * 7} steps from the old square, past the tower. " * 2
    for i in range(8)
]
VAL = [
    f"Walk {i}: from the tower take the lane {i * 3} metres to the market hall." for i in range(4)
]


def _capture(teacher: torch.nn.Module, student: torch.nn.Module, path: Path) -> object:
    tok = tiny_tokenizer()
    return run_capture(
        {"teacher": Subject(teacher, tok), "student": Subject(student, tok)},
        FIT,
        path,
        {"sites": ["final.normed"], "max_length": 64, "batch_size": 4},
        progress=False,
    )


def test_the_students_own_head_is_kept_when_nothing_beats_it(tmp_path: Path) -> None:
    student = tiny_model("qwen2", seed=0)
    teacher = copy.deepcopy(student)  # KL 0: no blend can be better than the student's head
    cap = _capture(teacher, student, tmp_path / "cap")
    val = validation_set(student, teacher, tiny_tokenizer(), VAL, max_length=64)
    choice = select_ridge_head(student, teacher, cap, val, lambdas=(1e-3, 1.0))
    assert choice.head is None and choice.blend == 0.0 and choice.lam is None
    assert choice.student["kl"] < 1e-9 and len(choice.candidates) == 8


def test_a_planted_teacher_head_is_recovered_and_applied(tmp_path: Path) -> None:
    student = tiny_model("qwen2", seed=0)
    teacher = copy.deepcopy(student)
    untie_(teacher)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        w = teacher.lm_head.weight
        w.add_(0.5 * torch.randn(w.shape, generator=g) * w.std())
    cap = _capture(teacher, student, tmp_path / "cap")
    val = validation_set(student, teacher, tiny_tokenizer(), VAL, max_length=64)
    choice = select_ridge_head(student, teacher, cap, val, lambdas=(1e-6, 1.0), blends=(0.5, 1.0))
    assert choice.head is not None and (choice.lam, choice.blend) == (1e-6, 1.0)
    assert choice.chosen["kl"] < 0.01 * choice.student["kl"]
    model = copy.deepcopy(student)
    apply_head_(model, choice.head)
    # the candidates were scored from blended logits: the same numbers up to float32 rounding
    assert head_scores(val, model.lm_head.weight)["kl"] == pytest.approx(
        choice.chosen["kl"], rel=1e-4, abs=1e-7
    )
    ids = torch.tensor([tiny_tokenizer()(VAL[0])["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, teacher(ids).logits, atol=1e-3)
        assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_distill_head_command_writes_a_plain_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from gradfree.cli import main
    from gradfree.testing.tiny import save_tiny

    teacher = save_tiny(tmp_path / "t", "qwen2", seed=1, hidden_size=48, num_attention_heads=4)
    student = save_tiny(tmp_path / "s", "qwen2", seed=2)
    out = tmp_path / "out"
    args = ["distill-head", "--teacher", str(teacher), "--student", str(student), "--out", str(out)]
    small = ["--fit", "4", "--val", "2", "--max-length", "32", "--lambdas", "1,10"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--fit", "100000"])
    assert e.value.code == 2 and "documents" in capsys.readouterr().err
    try:
        main([*args, *small])
    except SystemExit as e2:
        assert not e2.code
    record = json.loads((out / "head.json").read_text())
    assert record["validation_chosen"]["kl"] <= record["validation_student"]["kl"]
    assert (
        len(record["candidates"]) == 8 and "## Time and memory" in (out / "report.md").read_text()
    )
    back = AutoModelForCausalLM.from_pretrained(out)
    assert (
        back.config.hidden_size
        == AutoModelForCausalLM.from_pretrained(student).config.hidden_size
        != 48
    )
    with pytest.raises(SystemExit):
        main([*args, *small])  # an existing output is never overwritten silently


def test_compare_heads_scores_both_heads_on_the_same_windows() -> None:
    from gradfree.compress.head import compare_heads, score_head

    student = tiny_model("qwen2", seed=0)
    teacher = tiny_model("qwen2", seed=1)
    own = student.lm_head.weight.detach()
    same = compare_heads(student, teacher, tiny_tokenizer(), VAL, own, max_length=64)
    assert same["student"] == same["distilled"] and same["kl_difference_95ci"] == [0.0, 0.0]
    val = validation_set(student, teacher, tiny_tokenizer(), VAL, max_length=64)
    full = score_head(val, own)
    assert same["documents"] == len(val) == len(full["doc_kl"]) == 4
    assert full["kl"] == head_scores(val, own)["kl"] == same["student"]["kl"]
    assert sum(full["doc_tokens"]) == full["tokens"] and 0.0 <= full["top1"] <= 1.0


def test_every_candidate_scores_as_its_blended_head_does(tmp_path: Path) -> None:
    """The one-pass grid (blends of the heads' logits) gives each candidate the scores of the
    head β·H(λ) + (1 − β)·H_S computed on its own; the shared-product ridge path gives the
    heads one solve per λ gives."""
    from gradfree.compress.head import ridge_head, ridge_heads

    student = tiny_model("qwen2", seed=0)
    teacher = tiny_model("qwen2", seed=1)
    cap = _capture(teacher, student, tmp_path / "cap")
    val = validation_set(student, teacher, tiny_tokenizer(), VAL, max_length=64)
    lambdas, blends = (0.01, 1.0), (0.25, 1.0)
    choice = select_ridge_head(student, teacher, cap, val, lambdas=lambdas, blends=blends)
    heads = ridge_heads(student, teacher, cap, lambdas, chunk=37)
    h_s = student.lm_head.weight.detach()
    rows = iter(choice.candidates)
    for lam, h_r in zip(lambdas, heads, strict=True):
        alone = ridge_head(student, teacher, cap, lam)
        assert float((h_r - alone).norm() / alone.norm()) < 1e-6  # float32 storage
        for beta in blends:
            row, want = next(rows), head_scores(val, beta * h_r + (1 - beta) * h_s)
            assert (row["lambda"], row["blend"]) == (lam, beta)
            assert row["kl"] == pytest.approx(want["kl"], rel=1e-4)
            assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert choice.student["kl"] == pytest.approx(head_scores(val, h_s)["kl"], rel=1e-6)


def test_scoring_several_heads_in_one_body_pass_matches_the_full_model(tmp_path: Path) -> None:
    from gradfree.compress.head import score_heads
    from gradfree.evaluation.reference import score, teacher_reference

    student = tiny_model("qwen2", seed=0)
    teacher = tiny_model("qwen2", seed=1)
    ref = teacher_reference(teacher, tiny_tokenizer(), VAL + FIT[:2], tmp_path / "ref", 16)
    other = teacher.lm_head.weight.detach().clone()
    got = score_heads(student, ref, {"own": None, "other": other})
    model = copy.deepcopy(student)
    apply_head_(model, other)
    for name, m in (("own", student), ("other", model)):
        want = score(m, ref)
        for k in ("kl", "ppl", "top1"):
            assert got[name][k] == pytest.approx(want[k], rel=1e-5), (name, k)
        assert got[name]["doc_tokens"] == want["doc_tokens"]
