"""Issue 17 part 4: target final states, the refit of the last MLP writers toward them, the head
chosen from in-memory moments, and teacher-written continuations."""

from __future__ import annotations

import copy

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.compress.head import HeadMoments, final_states, ridge_heads
from gradfree.compress.refit import (
    prenorm_targets,
    refit_last_writers_,
    rms,
    state_map,
    teacher_states,
    writer_update,
)
from gradfree.surgery import untie_
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

TEXTS = [
    f"Stop {i}: the harbour is {i * 7} steps from the old square, past the tower." for i in range(6)
]


def _windows() -> list[torch.Tensor]:
    tok = tiny_tokenizer()
    return [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]


def test_the_state_map_recovers_a_planted_state_up_to_the_logits_shift() -> None:
    g = torch.Generator().manual_seed(0)
    v, d = 300, 12
    head = torch.randn(v, d, generator=g, dtype=torch.float64)
    # teacher logits H x0 + c·1: a shift softmax ignores, which the centred fit must ignore too
    teacher_head = torch.cat([head, torch.ones(v, 1, dtype=torch.float64)], 1)
    x0 = torch.randn(5, d, generator=g, dtype=torch.float64)
    x_t = torch.cat([x0, 7.0 * torch.ones(5, 1, dtype=torch.float64)], 1)
    x_s = torch.randn(5, d, generator=g, dtype=torch.float64)
    smap = state_map(head, teacher_head, rel_mu=1e-9)
    assert torch.allclose(smap(x_t, x_s), x0, atol=1e-6)
    # a strong prior keeps the student's own state
    assert torch.allclose(state_map(head, teacher_head, rel_mu=1e9)(x_t, x_s), x_s, atol=1e-6)
    with pytest.raises(GradfreeError, match="vocabulary"):
        state_map(head, teacher_head[:-1], 1.0)
    with pytest.raises(GradfreeError, match="> 0"):
        state_map(head, teacher_head, 0.0)


def test_prenorm_targets_point_the_norm_at_the_target_and_keep_the_scale() -> None:
    g = torch.Generator().manual_seed(1)
    d, eps = 16, 1e-6
    gain = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    h = 3.0 * torch.randn(4, d, generator=g, dtype=torch.float64)
    other = torch.randn(4, d, generator=g, dtype=torch.float64)
    x_star = gain * other / rms(other, eps)  # a state the norm can produce
    h_star = prenorm_targets(x_star, h, gain, eps)
    assert torch.allclose(gain * h_star / rms(h_star, eps), x_star, atol=1e-6)
    assert torch.allclose(rms(h_star), rms(h, eps), rtol=1e-12)
    # the current state is its own target
    assert torch.allclose(prenorm_targets(gain * h / rms(h, eps), h, gain, eps), h, atol=1e-9)


def test_the_writer_update_recovers_a_planted_change() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(400, 20, generator=g, dtype=torch.float64)
    true = torch.randn(8, 20, generator=g, dtype=torch.float64)
    delta = a @ true.T
    got = writer_update(a.T @ a, delta.T @ a, rel_lam=1e-12)
    assert torch.allclose(got, true, atol=1e-8)
    assert writer_update(a.T @ a, torch.zeros(8, 20, dtype=torch.float64), 1e-2).abs().max() == 0


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    student = tiny_model("qwen2", seed=0)
    untie_(student)
    teacher = tiny_model("qwen2", seed=3)
    return student, teacher


def test_refitting_toward_the_student_itself_changes_nothing() -> None:
    student, _ = _pair()
    teacher = copy.deepcopy(student)
    wins = _windows()
    rec = refit_last_writers_(
        student, teacher.lm_head.weight, wins, teacher_states(teacher, wins), blocks=2
    )
    # the targets are the states themselves up to float32 rounding, so the fit moves nothing
    # but rounding noise: the function is the same
    assert rec["target_error_before"] < 1e-8
    with torch.no_grad():
        for w in wins:
            assert torch.allclose(student(w[None]).logits, teacher(w[None]).logits, atol=1e-4)


def test_the_refit_moves_the_final_states_toward_their_targets_and_alpha_zero_is_identity() -> None:
    student, teacher = _pair()
    wins = _windows()
    xt = teacher_states(teacher, wins)
    head_t = teacher.lm_head.weight.detach()
    keep = copy.deepcopy(student)
    rec = refit_last_writers_(student, head_t, wins, xt, blocks=1, rel_lam=1e-6)
    assert rec["target_error_after"] < 0.9 * rec["target_error_before"]
    assert rec["blocks"][0]["alpha"] == 1.0
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, keep.state_dict()[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    # a choice of α = 0 leaves the model as it was, bit for bit
    again = copy.deepcopy(keep)
    seen: list[float] = []

    def choose(_m: torch.nn.Module, apply: object) -> float:
        seen.append(1.0)
        return 0.0

    rec0 = refit_last_writers_(again, head_t, wins, xt, blocks=2, choose=choose)
    assert len(seen) == 2 and [r["alpha"] for r in rec0["blocks"]] == [0.0, 0.0]
    for n, p in again.named_parameters():
        assert torch.equal(p, keep.state_dict()[n]), n
    with pytest.raises(GradfreeError, match="blocks"):
        refit_last_writers_(again, head_t, wins, xt, blocks=3)
    with pytest.raises(GradfreeError, match="teacher"):
        refit_last_writers_(again, head_t, wins, xt[:-1])


def test_head_moments_from_states_equal_the_captured_ones(tmp_path: object) -> None:
    from pathlib import Path

    from gradfree.capture import Subject, run_capture

    student, teacher = _pair()
    tok = tiny_tokenizer()
    cap = run_capture(
        {"teacher": Subject(teacher, tok), "student": Subject(student, tok)},
        TEXTS,
        Path(str(tmp_path)) / "cap",
        {"sites": ["final.normed"], "max_length": 128, "batch_size": 2},
        progress=False,
    )
    wins = _windows()
    mine = HeadMoments.from_states(
        [final_states(student, w) for w in wins], teacher_states(teacher, wins)
    )
    theirs = HeadMoments.of(cap)
    assert torch.allclose(mine.xtx, theirs.xtx, rtol=1e-5, atol=1e-7)
    assert torch.allclose(mine.c_st, theirs.c_st, rtol=1e-5, atol=1e-7)
    a = ridge_heads(student, teacher, mine, [1.0])[0]
    b = ridge_heads(student, teacher, cap, [1.0])[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_continuations_are_greedy_fixed_length_and_batch_independent() -> None:
    from gradfree.texts.continuations import continuations
    from gradfree.texts.corpora import Document

    model = tiny_model("llama", seed=0)
    tok = tiny_tokenizer()
    docs = [Document(f"d{i}", t, "en", "calibration", "test") for i, t in enumerate(TEXTS[:3])]
    docs.append(Document("short", "Hi", "en", "calibration", "test"))  # a shorter prompt: padding
    one = continuations(model, tok, docs, prompt_tokens=10, new_tokens=6, batch_size=1)
    many = continuations(model, tok, docs, prompt_tokens=10, new_tokens=6, batch_size=4)
    assert [d.text for d in one] == [d.text for d in many]
    assert [d.id for d in one] == ["d0+cont", "d1+cont", "d2+cont", "short+cont"]
    assert all(d.meta["new_tokens"] == 6 for d in one)
    assert one[0].text.startswith(TEXTS[0][:9]) and one[3].text.startswith("Hi")
    with pytest.raises(GradfreeError, match=">= 1"):
        continuations(model, tok, docs, new_tokens=0)
