"""Closed-form LM-head distillation, its strength chosen by measured validation KL.

The ridge head ``H(λ) = argmin ‖X_S Hᵀ − X_T H_Tᵀ‖² + λ‖H − H_S‖²`` (student final normed states
X_S regressed onto the teacher's exact logits, shrunk toward the student's head H_S) comes from two
captured statistics, E[x_S x_Sᵀ] and the cross-moment E[x_S x_Tᵀ] (:func:`ridge_head`).
Least squares on 151,936 logits is a poor proxy for KL: on Qwen2.5-Coder 1.5B → 0.5B every full
ridge head raised the validation KL. So the head that is used is a blend
``H = β·H(λ) + (1 − β)·H_S`` with (λ, β) chosen on validation documents that the fit did not see,
by the measured KL(teacher ‖ student) (:func:`select_ridge_head`). β = 0 (the student's own head)
is always a candidate: on the validation documents the result is never worse than the student.

The validation windows are a teacher reference (:mod:`gradfree.evaluation.reference`, first
window of each document, float32 log-probs in memory) beside the student's final states, so a
candidate head is scored by one matrix product per window, with the reference's arithmetic.
:func:`compare_heads` reports a chosen head against the student's on text the choice never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.numerics import f64
from gradfree.base.progress import ProgressFn, reporting, silent
from gradfree.capture import Capture
from gradfree.evaluation.reference import Sums, TeacherReference, TeacherRows, teacher_reference
from gradfree.surgery.edit import assign_, param


@dataclass
class ValidationDoc:
    """One validation window: token ids, the student's final normed states, and the teacher's
    log-probs (window ``index`` of a teacher reference: in memory, or on disk when it has a
    folder)."""

    ids: torch.Tensor  # (t,)
    states: torch.Tensor  # (t, d_S)
    ref: TeacherReference
    index: int

    @property
    def teacher_logp(self) -> torch.Tensor:
        """(t, vocab), float32."""
        return self.ref.teacher_logp(self.index)


@dataclass
class HeadChoice:
    """The chosen head (None: the student's own head was best) and every candidate's score."""

    head: torch.Tensor | None
    lam: float | None
    blend: float
    student: dict[str, float]
    chosen: dict[str, float]
    candidates: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "blend": self.blend,
            "kept_student_head": self.head is None,
            "validation_student": self.student,
            "validation_chosen": self.chosen,
            "candidates": self.candidates,
        }


@torch.no_grad()
def final_states(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final normed states (t, d) of one window, without computing the logits."""
    from gradfree.capture.hooks import site_hooks

    adapter = get_adapter(model)
    got: list[torch.Tensor] = []
    device = next(model.parameters()).device
    ids = ids.to(device)
    with site_hooks(adapter, ["final.normed"], lambda _k, x: got.append(x[0])) as hooks:
        hooks.forward(ids[None], torch.ones_like(ids)[None])
    return got[0]


def validation_docs(student: nn.Module, ref: TeacherReference) -> list[ValidationDoc]:
    """The windows of a teacher reference of log-probs, with the student's final normed states."""
    return [ValidationDoc(w, final_states(student, w).cpu(), ref, k) for k, w in enumerate(ref.ids)]


def validation_set(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    docs: Sequence[Any],
    max_length: int = 256,
    folder: Path | None = None,
) -> list[ValidationDoc]:
    """The first ``max_length`` tokens of each document (of at least 2): the teacher's
    log-probs (:func:`~gradfree.evaluation.reference.teacher_reference`: float32 in memory, or
    float16 in ``folder``) and the student's final states."""
    ref = teacher_reference(teacher, tokenizer, docs, folder, max_length, first_only=True)
    return validation_docs(student, ref)


@torch.no_grad()
def score_head(val: Sequence[ValidationDoc], head: torch.Tensor) -> dict[str, Any]:
    """KL(teacher ‖ student), perplexity and top-1 agreement of ``head`` on next-token positions
    (:class:`~gradfree.evaluation.reference.Sums`), each window counted as its own document for
    :func:`~gradfree.evaluation.reference.bootstrap_delta`."""
    sums = Sums(len(val))
    w = head.to(torch.float32)
    for k, v in enumerate(val):
        logp = torch.log_softmax(v.states.to(torch.float32) @ w.T, -1)[:-1]
        sums.add(logp, v.teacher_logp[:-1], v.ids[1:], k)
    return sums.result()


def head_scores(val: Sequence[ValidationDoc], head: torch.Tensor) -> dict[str, float]:
    """Token-weighted KL(teacher ‖ student) and perplexity of ``head`` on next-token positions."""
    return _scores(score_head(val, head))


def _scores(sc: dict[str, Any]) -> dict[str, float]:
    return {"kl": sc["kl"], "ppl": sc["ppl"], "tokens": float(sc["tokens"])}


@dataclass(frozen=True)
class HeadMoments:
    """What a ridge head is solved from: E[x_S x_Sᵀ] (d_S × d_S) and E[x_S x_Tᵀ] (d_S × d_T) of
    the final normed states over the same tokens (float64)."""

    xtx: torch.Tensor
    c_st: torch.Tensor

    @classmethod
    def of(cls, cap: Capture | HeadMoments) -> HeadMoments:
        """The moments of a paired capture's ``final.normed`` (or ``cap`` itself)."""
        if isinstance(cap, HeadMoments):
            return cap
        cr = cap.cross("final.normed", "final.normed")
        return cls(cap.stats("student", "final.normed").second_moment(), (cr.m_ab / cr.count).T)

    @classmethod
    def from_states(cls, x_s: Sequence[torch.Tensor], x_t: Sequence[torch.Tensor]) -> HeadMoments:
        """The moments of per-window states (t × d_S and t × d_T, the same tokens)."""
        n = sum(int(x.shape[0]) for x in x_s)
        if n == 0 or len(x_s) != len(x_t):
            raise ValueError("the head's moments need the same windows of both models")
        xtx = sum(f64(a).T @ f64(a) for a in x_s)
        c_st = sum(f64(a).T @ f64(b).to(a.device) for a, b in zip(x_s, x_t, strict=True))
        assert isinstance(xtx, torch.Tensor) and isinstance(c_st, torch.Tensor)
        return cls(xtx / n, c_st / n)


def _head_stats(
    student: nn.Module, teacher: nn.Module | torch.Tensor, cap: Capture | HeadMoments
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """E[x_S x_Sᵀ], the function of the XᵀY columns a:b, and the student's head weight."""
    h_t = teacher if isinstance(teacher, torch.Tensor) else param(get_adapter(teacher).lm_head)
    m = HeadMoments.of(cap)
    c_st = m.c_st

    def xty(a: int, b: int) -> torch.Tensor:
        return c_st @ f64(h_t[a:b]).T

    return m.xtx, xty, param(get_adapter(student).lm_head)


@torch.no_grad()
def ridge_head(
    student: nn.Module,
    teacher: nn.Module | torch.Tensor,
    cap: Capture | HeadMoments,
    rel_lam: float,
    chunk: int = 8192,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """H(λ) from the capture's student final-state moment and teacher×student cross-moment,
    solved in float64 in row chunks over the vocabulary, stored in ``dtype``. ``teacher`` is the
    teacher model or just its LM head weight (V × d_T): the solve needs nothing else of it, so a
    caller may free the teacher's body first."""
    return ridge_heads(student, teacher, cap, [rel_lam], chunk, dtype)[0]


@torch.no_grad()
def ridge_heads(
    student: nn.Module,
    teacher: nn.Module | torch.Tensor,
    cap: Capture | HeadMoments,
    rel_lams: Sequence[float],
    chunk: int = 8192,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """:func:`ridge_head` for several λ, each chunk's cross-moment product computed once."""
    from gradfree.solvers import ridge_path_chunked

    xtx, xty, h_s = _head_stats(student, teacher, cap)
    return ridge_path_chunked(
        xtx,
        xty,
        h_s.shape[0],
        rel_lams,
        prior=lambda a, b: f64(h_s[a:b]),
        chunk=chunk,
        dtype=dtype,
    )


@torch.no_grad()
def _score_grid(
    val: Sequence[ValidationDoc],
    h_s: torch.Tensor,
    ridge: Sequence[torch.Tensor],
    blends: Sequence[float],
    progress: ProgressFn = silent,
) -> tuple[Sums, list[list[Sums]]]:
    """The student's head and every blend β·H(λ) + (1 − β)·H_S scored in one pass over the
    windows: the logits of a blend are the same blend of the two heads' logits, so a window
    costs one product per head, and its teacher side is prepared once."""
    base = Sums(len(val))
    grid = [[Sums(len(val)) for _ in blends] for _ in ridge]
    for k, v in enumerate(val):
        x, targets = v.states.to(torch.float32)[:-1], v.ids[1:]
        teacher = TeacherRows.of(v.teacher_logp[:-1])
        z_s = x @ h_s.T
        base.add_rows(torch.log_softmax(z_s, -1), teacher, targets, k)
        z = torch.empty_like(z_s)
        for i, h_r in enumerate(ridge):
            d = torch.sub(x @ h_r.T, z_s)
            for j, beta in enumerate(blends):
                torch.add(z_s, d, alpha=beta, out=z)
                z.sub_(torch.logsumexp(z, -1, keepdim=True))  # log-probs, in place
                grid[i][j].add_rows(z, teacher, targets, k)
            del d
        progress("ridge heads", k + 1, len(val), "validation windows")
    return base, grid


def select_ridge_head(
    student: nn.Module,
    teacher: nn.Module | torch.Tensor,
    cap: Capture | HeadMoments,
    val: Sequence[ValidationDoc],
    lambdas: Sequence[float] = (0.1, 1.0, 10.0),
    blends: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    progress: ProgressFn = silent,
) -> HeadChoice:
    """The (λ, β) with the lowest validation KL, the student's own head (β = 0) included;
    ``teacher``: the model or its LM head weight (see :func:`ridge_head`); ``progress`` hears
    of each validation window scored."""
    h_s = param(get_adapter(student).lm_head).detach().to(torch.float32)
    ridge = ridge_heads(student, teacher, cap, lambdas)
    base_sums, grid = _score_grid(val, h_s, ridge, blends, progress)
    base = _scores(base_sums.result())
    best, at, rows = base, (-1, -1), []
    for i, lam in enumerate(lambdas):
        for j, beta in enumerate(blends):
            sc = _scores(grid[i][j].result())
            rows.append({"lambda": lam, "blend": beta, **sc})
            if sc["kl"] < best["kl"]:
                best, at = sc, (i, j)
    if at[0] < 0:
        return HeadChoice(None, None, 0.0, base, best, rows)
    lam, beta = lambdas[at[0]], blends[at[1]]
    return HeadChoice(beta * ridge[at[0]] + (1.0 - beta) * h_s, lam, beta, base, best, rows)


@torch.no_grad()
def score_heads(
    student: nn.Module, ref: TeacherReference, heads: dict[str, torch.Tensor | None]
) -> dict[str, dict[str, Any]]:
    """:func:`~gradfree.evaluation.reference.score` of the student with each of ``heads``
    (None: its own head) against one teacher reference. The heads differ only after the final
    norm, so the body runs once per window and each head costs one product."""
    own = param(get_adapter(student).lm_head).detach()
    sums = {name: Sums(max(ref.docs) + 1 if ref.docs else 0) for name in heads}
    for k, w in enumerate(ref.ids):
        x = final_states(student, w)[:-1].to(torch.float32)
        teacher = TeacherRows.of(ref.teacher_logp(k)[:-1])
        for name, head in heads.items():
            weight = (own if head is None else head).to(x.device, torch.float32)
            logp = torch.log_softmax(x @ weight.T, -1).cpu()
            sums[name].add_rows(logp, teacher, w[1:], ref.docs[k])
    return {name: s.result() for name, s in sums.items()}


def compare_heads(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    docs: Sequence[Any],
    head: torch.Tensor,
    max_length: int = 256,
    samples: int = 2000,
) -> dict[str, Any]:
    """The student's own head against ``head`` on the first ``max_length`` tokens of ``docs``:
    KL, perplexity and top-1 of each, and the bootstrap interval of their KL difference."""
    from gradfree.evaluation.reference import bootstrap_delta

    val = validation_set(student, teacher, tokenizer, docs, max_length)
    own = score_head(val, param(get_adapter(student).lm_head).detach())
    new = score_head(val, head)

    def summary(sc: dict[str, Any]) -> dict[str, Any]:
        return {k: sc[k] for k in ("kl", "ppl", "top1", "tokens")}

    return {
        "student": summary(own),
        "distilled": summary(new),
        "kl_difference_95ci": list(bootstrap_delta(own, new, samples)),
        "documents": len(val),
    }


@torch.no_grad()
def apply_head_(model: nn.Module, head: torch.Tensor) -> None:
    """Give ``model`` the LM head ``head`` (untying it from the embedding first if tied)."""
    from gradfree.surgery import untie_

    untie_(model)
    assign_(get_adapter(model).lm_head, "weight", head)


def fit_head(
    teacher: Any,
    student: Any,
    fit_docs: Sequence[Any],
    val_docs: Sequence[Any],
    *,
    lambdas: Sequence[float] = (0.1, 1.0, 10.0),
    blends: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    max_length: int = 256,
    batch_size: int = 4,
    clock: Any = None,
    progress: bool | ProgressFn = False,
) -> HeadChoice:
    """Capture ``final.normed`` of both loaded models on ``fit_docs``, then choose the head on
    ``val_docs`` (:func:`select_ridge_head`); stages are timed on ``clock`` when given and
    reported to ``progress`` (True: on stderr, :mod:`gradfree.base.progress`)."""
    import contextlib
    import tempfile

    from gradfree.capture import run_capture

    def stage(name: str) -> Any:
        return clock.stage(name) if clock is not None else contextlib.nullcontext()

    with (
        reporting(progress) as report,
        tempfile.TemporaryDirectory(prefix="gradfree-head-") as work,
    ):
        with stage("paired capture (final.normed)"):
            cap = run_capture(
                {"teacher": teacher, "student": student},
                fit_docs,
                Path(work) / "cap",
                {"sites": ["final.normed"], "max_length": max_length, "batch_size": batch_size},
                progress=report,
            )
        with stage("validation features (both models)"):
            val = validation_set(
                student.model, teacher.model, student.tokenizer, val_docs, max_length
            )
            report("validation features", len(val), len(val), "windows")
        with stage("ridge heads + choice"):
            return select_ridge_head(
                student.model, teacher.model, cap, val, lambdas, blends, progress=report
            )


def distill_head(
    teacher: Any,
    student: Any,
    fit_docs: Sequence[Any],
    val_docs: Sequence[Any],
    out: str | Path,
    *,
    lambdas: Sequence[float] = (0.1, 1.0, 10.0),
    blends: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    max_length: int = 256,
    batch_size: int = 4,
    overwrite: bool = False,
    inputs: dict[str, Any] | None = None,
    progress: bool | ProgressFn = False,
    save_format: str = "safetensors",
) -> HeadChoice:
    """:func:`fit_head`, then write ``out``: the student with the chosen head as a plain
    checkpoint (unchanged when its own head was best; ``save_format`` "fp8": Qwen's block-FP8
    format), ``head.json`` and ``report.md``."""
    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.models.fetch import save_checkpoint
    from gradfree.models.fp8 import check_weight_format

    check_weight_format(save_format)
    check_new_output(out, overwrite)
    clock = Stopwatch()
    with atomic_dir(out, overwrite) as tmp:
        choice = fit_head(
            teacher,
            student,
            fit_docs,
            val_docs,
            lambdas=lambdas,
            blends=blends,
            max_length=max_length,
            batch_size=batch_size,
            clock=clock,
            progress=progress,
        )
        with clock.stage("write checkpoint"):
            if choice.head is not None:
                apply_head_(student.model, choice.head)
            save_checkpoint(student.model, student.tokenizer, tmp, weight_format=save_format)
        record = {
            **choice.describe(),
            "fit_documents": [getattr(d, "id", i) for i, d in enumerate(fit_docs)],
            "validation_documents": [getattr(d, "id", i) for i, d in enumerate(val_docs)],
            "max_length": max_length,
            "save_format": save_format,
            "inputs": inputs or {},
            "stages": clock.rows,
            "machine": machine(),
            "versions": versions(),
        }
        write_json_atomic(tmp / "head.json", record)
        write_text_atomic(tmp / "report.md", _head_report(choice, clock))
    return choice


def run_distill_head(
    teacher: str,
    student: str,
    out: str | Path,
    *,
    corpus: str = "tourguide",
    split: str | None = "calibration",
    fit: int = 32,
    val: int = 12,
    device: str = "cpu",
    dtype: str = "float32",
    **options: Any,
) -> HeadChoice:
    """``gradfree distill-head`` as a library call: the first ``fit`` documents of the corpus
    fit the head, the next ``val`` choose it; both models (by name or folder) and the texts are
    recorded in ``head.json`` (fingerprints, corpus manifest). ``options`` go to
    :func:`distill_head`."""
    from gradfree.base.errors import GradfreeError
    from gradfree.base.io import check_new_output
    from gradfree.models.load import load_pair
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    check_new_output(out, bool(options.get("overwrite", False)))
    docs = load_corpus(corpus, split=split)
    if len(docs) < fit + val:
        raise GradfreeError(
            f"The corpus has {len(docs)} documents; --fit {fit} and --val {val} need {fit + val}."
        )
    t, s, inputs = load_pair(teacher, student, device, dtype)
    inputs.update(
        corpus=corpus, split=split, texts=corpus_manifest(docs[: fit + val], corpus)["sha256"]
    )
    return distill_head(t, s, docs[:fit], docs[fit : fit + val], out, inputs=inputs, **options)


def _head_report(choice: HeadChoice, clock: Any) -> str:
    s, c = choice.student, choice.chosen
    verdict = (
        "The student's own head had the lowest validation KL; the checkpoint is the student."
        if choice.head is None
        else f"Chosen: λ = {choice.lam} (relative), blend β = {choice.blend}."
    )
    lines = [
        "# LM-head distillation (closed form, chosen on validation KL)",
        "",
        verdict,
        "",
        f"Validation ({int(s['tokens'])} tokens): KL(teacher ‖ student) {s['kl']:.4f} → "
        f"{c['kl']:.4f}, perplexity {s['ppl']:.2f} → {c['ppl']:.2f}. These documents chose the "
        "head, so they are not an unbiased test: evaluate on held-out text.",
        "",
        "| λ (relative) | blend β | validation KL | validation ppl |",
        "|---:|---:|---:|---:|",
        *(
            f"| {r['lambda']:g} | {r['blend']:g} | {r['kl']:.4f} | {r['ppl']:.2f} |"
            for r in choice.candidates
        ),
        "",
        "## Time and memory per stage",
        "",
        clock.table(),
        "",
    ]
    return "\n".join(lines)
