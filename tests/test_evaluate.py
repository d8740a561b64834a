"""Evaluation: metrics against direct references, perplexity against a token-by-token hand
computation (windowing included), teacher comparisons, questions, the writer and the CLI.

Everything runs on tiny models built in code and the byte-level tiny tokenizer (offline, fast).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.evaluation import metrics
from gradfree.evaluation.perplexity import _Runner
from gradfree.evaluation.questions import answer_questions, build_prompt
from gradfree.evaluation.run import evaluate, write_eval
from gradfree.testing.tiny import save_tiny, tiny_model, tiny_tokenizer
from gradfree.texts.windows import make_windows

DOCS = [
    "hi",  # 2 tokens: one scored
    "The cat sat.",  # shorter than a window
    "A longer document that needs five windows!",  # 43 tokens > max_length 16
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64)


# --- windows and perplexity ------------------------------------------------------------------


def test_windows_follow_the_sliding_scheme() -> None:
    assert make_windows(40, 16, 8) == [(0, 16, 1), (8, 24, 16), (16, 32, 24), (24, 40, 32)]
    assert make_windows(10, 16, 8) == [(0, 10, 1)]
    assert make_windows(1, 16, 8) == [] and make_windows(0, 16, 8) == []
    # stride = max_length: the next window starts one early so its first target has a predictor
    assert make_windows(20, 8, 8) == [(0, 8, 1), (7, 15, 8), (14, 20, 15)]
    for n, ml, st in [(57, 16, 5), (33, 8, 8), (100, 30, 29), (2, 2, 1)]:
        scored = [t for b, e, f in make_windows(n, ml, st) for t in range(f, e)]
        assert scored == list(range(1, n))  # each token after the first exactly once
        assert all(e - b <= ml and f > b for b, e, f in make_windows(n, ml, st))
    with pytest.raises(GradfreeError, match="stride"):
        make_windows(10, 8, 9)


def _context_start(t: int) -> int:
    """By hand, for max_length 16 / stride 8: targets 1..15 see the document from token 0;
    targets in [8k+8, 8k+16) see it from token 8k."""
    return 0 if t < 16 else 8 * ((t - 8) // 8)


def test_one_windowing_for_capture_and_every_reference(tmp_path: Path, tok) -> None:
    from gradfree.evaluation.reference import score, teacher_reference
    from gradfree.texts.windows import encode, iter_windows

    docs = [SimpleNamespace(id=f"d{i}", text=t) for i, t in enumerate(DOCS)]
    every = list(iter_windows(tok, docs, 16))
    ids = [encode(tok, d.text) for d in docs]
    assert every == [(i, x[s : s + 16]) for i, x in enumerate(ids) for s in range(0, len(x), 16)]
    assert list(iter_windows(tok, docs, 16, first_only=True)) == [
        (i, x[:16]) for i, x in enumerate(ids)
    ]
    with pytest.raises(GradfreeError, match="appears twice"):
        list(iter_windows(tok, [docs[0], docs[0]], 16))
    teacher, model = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    disk = teacher_reference(teacher, tok, docs, tmp_path / "ref", 16)
    held = teacher_reference(teacher, tok, docs, None, 16)
    assert disk.teacher == held.teacher and (tmp_path / "ref" / "ref.json").exists()
    assert len(disk.ids) == len(every) and disk.docs == [i for i, _ in every]
    for k in range(len(disk.ids)):
        assert torch.equal(disk.teacher_logp(k), held.teacher_logp(k).half().float())
    again = teacher_reference(teacher, tok, docs, tmp_path / "ref", 16)  # reused from disk
    assert score(model, again) == score(model, disk)
    first = teacher_reference(teacher, tok, docs, None, 16, first_only=True, logits=True)
    assert [len(w) for w in first.ids] == [min(len(x), 16) for x in ids]
    with pytest.raises(ValueError, match="logits"):
        first.teacher_logp(0)


def test_perplexity_equals_a_token_by_token_computation(model64, tok) -> None:
    res = evaluate(model64, tok, DOCS, max_length=16, stride=8, batch_size=3)
    nll, n = 0.0, 0
    for text in DOCS:
        ids = tok(text)["input_ids"]
        for t in range(1, len(ids)):
            ctx = torch.tensor([ids[_context_start(t) : t]])
            with torch.no_grad():
                logits = model64(ctx).logits[0, -1]
            nll -= float(torch.log_softmax(logits, -1)[ids[t]])
            n += 1
    ppl = res["perplexity"]
    assert ppl["tokens"] == n == sum(len(d.encode()) - 1 for d in DOCS)
    assert ppl["windows"] == 1 + 1 + 5
    assert ppl["nll_sum"] == pytest.approx(nll, rel=1e-10)
    assert ppl["ppl"] == pytest.approx(np.exp(nll / n), rel=1e-10)
    again = evaluate(model64, tok, DOCS, max_length=16, stride=8, batch_size=1)
    assert again["perplexity"]["nll_sum"] == pytest.approx(nll, rel=1e-10)  # batching-invariant


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_logits_equal_the_model_logits(family: str) -> None:
    model = tiny_model(family, dtype=torch.float64)
    ids = torch.randint(0, 256, (2, 9))
    h, _ = _Runner(model)(ids, torch.ones_like(ids), hidden=False)
    assert torch.allclose(_Runner(model).logits(h), model(ids).logits, atol=1e-10)


# --- teacher comparisons ---------------------------------------------------------------------


def test_a_model_agrees_perfectly_with_itself(model64, tok) -> None:
    res = evaluate(model64, tok, DOCS, teacher=model64, max_length=16, stride=8)
    t = res["teacher"]
    assert t["kl_mean"] == pytest.approx(0.0, abs=1e-12) and t["top1_agreement"] == 1.0
    assert t["tokens"] == res["perplexity"]["tokens"]
    # The teacher's perplexity, computed from its own logits in the same pass, equals ours.
    assert t["teacher_ppl"] == pytest.approx(res["perplexity"]["ppl"], rel=1e-10)
    assert [r["student_layer"] for r in t["layers"]] == [0, 1, "final"]
    for row in t["layers"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert row["cka"] == pytest.approx(1.0, abs=1e-9)


def test_kl_and_agreement_match_a_direct_computation(tok) -> None:
    student = tiny_model("llama", seed=1, dtype=torch.float64)
    teacher = tiny_model("llama", seed=2, dtype=torch.float64)
    docs = DOCS[:2]  # shorter than a window: one full forward per document is the reference
    res = evaluate(student, tok, docs, teacher=teacher, max_length=64, stride=32, batch_size=2)
    kls, agree = [], []
    for text in docs:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            p = torch.softmax(teacher(ids).logits[0, :-1], -1).numpy()
            q = torch.softmax(student(ids).logits[0, :-1], -1).numpy()
        kls += list((p * (np.log(p) - np.log(q))).sum(-1))
        agree += list(p.argmax(-1) == q.argmax(-1))
    assert res["teacher"]["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-9)
    assert res["teacher"]["top1_agreement"] == pytest.approx(np.mean(agree))


def test_teacher_of_another_shape_gets_cka_but_no_cosine(tok) -> None:
    student = tiny_model("llama", seed=1)
    teacher = tiny_model("llama", seed=2, num_hidden_layers=4, hidden_size=96)
    res = evaluate(student, tok, DOCS, teacher=teacher, max_length=16, stride=8)
    t = res["teacher"]
    assert t["layer_map"] == [0, 2]
    assert [(r["student_layer"], r["teacher_layer"]) for r in t["layers"]] == [
        (0, 0),
        (1, 2),
        ("final", "final"),
    ]
    for row in t["layers"]:
        assert row["cosine"] is None and 0.0 <= row["cka"] <= 1.0
    some = evaluate(
        student, tok, DOCS, teacher=teacher, compare_layers=[1], max_length=16, stride=8
    )
    assert [r["student_layer"] for r in some["teacher"]["layers"]] == [1, "final"]
    with pytest.raises(GradfreeError, match="Compared layers"):
        evaluate(student, tok, DOCS, teacher=teacher, compare_layers=[2])
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(GradfreeError, match="share a tokenizer"):
        evaluate(student, tok, DOCS, teacher=teacher, teacher_tokenizer=other)


# --- metrics ---------------------------------------------------------------------------------


def _cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s Gram-matrix form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / np.sqrt((k * k).sum() * (l_ * l_).sum()))


def test_streaming_cka_equals_the_gram_form_and_has_its_invariances() -> None:
    from gradfree.capture.similarity import linear_cka_from_stats
    from gradfree.capture.stats import CrossStats, MomentStats

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) + 3.0
    y = np.tanh(x @ rng.standard_normal((12, 7))) + 0.3 * rng.standard_normal((200, 7))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ref = _cka_reference(x, y)
    assert metrics.linear_cka(xt, yt) == pytest.approx(ref, rel=1e-10)
    # streamed in uneven batches
    sx, sy, sxy = MomentStats.empty(12), MomentStats.empty(7), CrossStats.empty(12, 7)
    for a, b in [(0, 13), (13, 120), (120, 200)]:
        sx.update(xt[a:b]), sy.update(yt[a:b]), sxy.update(xt[a:b], yt[a:b])
    assert linear_cka_from_stats(sx, sy, sxy) == pytest.approx(ref, rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    rotated = torch.from_numpy(5.0 * y @ q)
    assert metrics.linear_cka(xt, rotated) == pytest.approx(ref, rel=1e-10)
    assert metrics.linear_cka(xt, xt) == pytest.approx(1.0, rel=1e-12)


def test_token_metrics_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p, q = torch.softmax(a.double(), -1).numpy(), torch.softmax(b.double(), -1).numpy()
    expected = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(metrics.kl_per_token(a, b).numpy(), expected, rtol=1e-5)
    assert torch.all(metrics.kl_per_token(a, a) == 0)
    assert torch.equal(metrics.top1_agreement(a, b), a.argmax(-1) == b.argmax(-1))
    tgt = torch.tensor([0, 3, 10, 2, 2])
    np.testing.assert_allclose(
        metrics.nll_per_token(a.double(), tgt).numpy(), -np.log(p[np.arange(5), tgt.numpy()])
    )
    assert metrics.perplexity(np.log(7.0) * 4, 4) == pytest.approx(7.0)
    assert torch.allclose(metrics.cosine_per_row(a, 3 * a), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize(
    ("generated", "answers", "expected"),
    [
        ("The capital is Paris.", ["Paris"], True),
        ("PARIS!", ["paris"], True),
        ("Sao Paulo, in Brazil", ["São Paulo"], True),  # accents
        ("It is São Paulo", ["Sao Paulo"], True),
        ("The USA", ["United States", "USA", "U.S.A."], True),  # alias
        ("It's the U.S.A.", ["U.S.A."], True),
        ("Parisian food", ["Paris"], False),  # whole words only
        ("1945", ["1944"], False),
        ("anything", ["", "  "], False),
        ("Curaçao", ["curacao"], True),
    ],
)
def test_answer_match(generated: str, answers: list[str], expected: bool) -> None:
    assert metrics.answer_match(generated, answers) is expected


# --- questions, writer -----------------------------------------------------------------------

QUESTIONS = [
    SimpleNamespace(id="q1", question="Capital of France?", answers=["Paris"], lang="en"),
    SimpleNamespace(id="q2", question="Capitale de l'Italie ?", answers=["Rome"], lang="fr"),
]


def test_questions_run_with_the_plain_prompt(tok) -> None:
    model = tiny_model("qwen3")
    qa = answer_questions(model, tok, QUESTIONS, "Answer briefly.", max_new_tokens=6)
    assert qa["prompt_format"] == "plain" and qa["n"] == 2
    assert 0.0 <= qa["score"] <= 1.0 and set(qa["by_lang"]) == {"en", "fr"}
    assert [it["id"] for it in qa["items"]] == ["q1", "q2"]
    assert all(isinstance(it["generated"], str) for it in qa["items"])
    again = answer_questions(model, tok, QUESTIONS, "Answer briefly.", max_new_tokens=6)
    assert again["items"] == qa["items"]  # greedy: deterministic


def test_batched_answers_equal_one_at_a_time(tok) -> None:
    import torch

    model = tiny_model("qwen2").to(torch.float64)  # float64: padding must change no argmax
    qs = [
        *QUESTIONS,
        SimpleNamespace(
            id="q3",
            question="Which river runs through Cairo, the big city?",
            answers=["Nile"],
            lang="en",
        ),
    ]
    one = answer_questions(model, tok, qs, "Answer briefly.", max_new_tokens=5, batch_size=1)
    batched = answer_questions(model, tok, qs, "Answer briefly.", max_new_tokens=5, batch_size=3)
    assert [it["generated"] for it in batched["items"]] == [it["generated"] for it in one["items"]]
    # The shared system-prompt prefix, run once and its cache reused, changes no answer either.
    full = answer_questions(
        model, tok, qs, "Answer briefly.", max_new_tokens=5, batch_size=3, share_prefix=False
    )
    assert [it["generated"] for it in full["items"]] == [it["generated"] for it in one["items"]]
    assert tok.padding_side == "right"  # restored after generation


def test_chat_template_is_used_when_present() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    text, fmt = build_prompt(tok, "Why?", "Be brief.")
    assert fmt == "chat_template" and text == "<system>Be brief.\n<user>Why?\n<assistant>"
    text, fmt = build_prompt(tiny_tokenizer(), "Why?", "Be brief.")
    assert fmt == "plain" and text.endswith("Question: Why?\nAnswer:")


def test_written_report(tmp_path: Path, model64, tok) -> None:
    res = evaluate(
        model64, tok, DOCS, teacher=model64, questions=QUESTIONS[:1], system_prompt="Be brief."
    )
    out = write_eval(res, tmp_path / "ev")
    doc = json.loads((out / "eval.json").read_text())
    assert doc["perplexity"]["ppl"] == pytest.approx(res["perplexity"]["ppl"])
    md = (out / "eval.md").read_text()
    assert "perplexity" in md and "linear CKA" in md and "Questions" in md
    with pytest.raises(GradfreeError, match="already exists"):
        write_eval(res, out)


# --- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def fake_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own documents and questions in place of gradfree.texts.corpora's, so that these tests
    do not depend on its texts."""
    from gradfree.texts import corpora

    docs = [SimpleNamespace(id=f"d{i}", text=t) for i, t in enumerate(DOCS)]
    monkeypatch.setattr(corpora, "load_corpus", lambda name, split=None, limit=None: docs[:limit])
    monkeypatch.setattr(corpora, "load_questions", lambda: QUESTIONS)
    monkeypatch.setattr(corpora, "system_prompt", lambda: "Answer briefly.")
    monkeypatch.setattr(corpora, "corpus_manifest", lambda d, name: {"name": name, "n": len(d)})


def test_cli_errors(tmp_path: Path, run_cli, fake_corpora) -> None:
    out = tmp_path / "ev"
    base = ["eval", "--corpus", "c", "--out", str(out)]
    code, _, err = run_cli([*base, "--model", str(tmp_path / "no_such_model")])
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "no_such_model" in err and not out.exists()
    out.mkdir()
    code, _, err = run_cli([*base, "--model", str(tmp_path / "no_such_model")])
    assert code == 2 and "already exists" in err
    code, _, err = run_cli([*base, "--model", "x", "--overwrite", "--stride", "600"])
    assert code == 2 and "--stride" in err


def test_cli_end_to_end(tmp_path: Path, run_cli, fake_corpora) -> None:
    student = save_tiny(tmp_path / "student", "llama", seed=1)
    teacher = save_tiny(tmp_path / "teacher", "llama", seed=2, num_hidden_layers=3)
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(student), "--teacher", str(teacher), "--corpus", "c"]
    argv += ["--out", str(out), "--max-length", "16", "--stride", "8", "--limit", "2"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    doc = json.loads((out / "eval.json").read_text())
    assert doc["perplexity"]["documents"] == 2 and doc["teacher"]["layer_map"] == [0, 2]
    assert doc["qa"]["n"] == 2 and doc["model"]["name"] == "student"
    assert doc["corpus"] == {"name": "c", "n": 2}


def test_window_sums_match_a_float64_computation_on_a_large_vocabulary() -> None:
    """Sums' KL (Σ p·log p minus one dot product) against a float64 computation on a
    151,936-token vocabulary with peaked distributions, float16 teacher log-probs (-inf
    included) as the disk references store them."""
    from gradfree.evaluation.reference import Sums

    g = torch.Generator().manual_seed(0)
    t, v = 256, 151_936  # one full window: a float32 dot product over it was off by 0.2 %
    zt = 3 * torch.randn(t, v, generator=g)
    zt[:, :50] += 12  # peaked, as a language model's next-token distributions are
    zm = zt + 1.5 * torch.randn(t, v, generator=g)
    lt = torch.log_softmax(zt, -1).half().float()
    lt[:, 100 : v // 3] = -torch.inf  # vanishing probabilities, as a float16 reference holds
    logp = torch.log_softmax(zm, -1)
    targets = torch.randint(0, v, (t,), generator=g)
    sums = Sums(1)
    sums.add(logp, lt, targets, 0)
    got = sums.result()
    lt64, lp64 = lt.double(), logp.double()
    p = lt64.exp()
    want = float(torch.where(p > 0, p * (lt64 - lp64), torch.zeros_like(p)).sum()) / t
    assert got["kl"] == pytest.approx(want, rel=1e-6)
    assert got["doc_kl"][0] / t == pytest.approx(want, rel=1e-6)
    nll = -float(lp64.gather(1, targets[:, None]).sum()) / t
    assert math.log(got["ppl"]) == pytest.approx(nll, rel=1e-6)
    assert got["top1"] == float((logp.argmax(-1) == lt.argmax(-1)).double().mean())
