"""Evaluation of alignment variants against a teacher whose outputs are cached once.

The teacher runs once (:func:`build_reference`): its logits on held-out documents, its residual
streams at the mapped layers projected onto its calibration principal frames (the coordinates the
rotations aim at), its logits on short continuations of the style prompts (system prompt + place
names, the seed's prompt-only check) and its answers to the place questions. Each variant then
runs the student alone (:func:`evaluate_variant`):

* logit KL(teacher ‖ variant) and top-1 agreement per token, overall and per language;
* per layer, the centered pooled cosine between the variant's residual coordinates (first k) and
  the teacher's principal coordinates, and the RMS of their difference over the teacher's RMS
  (both from sums, first token of each document left out);
* prompt KL on the teacher's continuations;
* held-out question accuracy, abstentions and hallucination rate (wrong and not abstaining), per
  language (:func:`gradfree.evaluation.questions.score_qa`).

The held-out windows and the teacher's logits on them are a
:class:`~gradfree.evaluation.reference.TeacherReference` kept in memory as float32 logits: the
KL here is taken from the two models' logits (:func:`gradfree.evaluation.metrics.kl_per_token`),
as it always was, not from stored log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradfree.evaluation import metrics
from gradfree.evaluation.questions import answer_questions, score_qa
from gradfree.evaluation.reference import TeacherReference


@dataclass
class AlignReference:
    """The teacher's outputs that every variant is compared with."""

    teacher: TeacherReference  # first window of each document: its ids and float32 logits
    docs: list[dict[str, Any]]  # {"id", "lang", "ids"} of each window's document
    coords: list[list[torch.Tensor]]  # per doc, per compared site (blocks then final): (T-1, k)
    prompts: list[tuple[list[int], int]] = field(default_factory=list)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    qa: dict[str, Any] | None = None


def _forward(model: Any, ids: list[int]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    dev = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    with torch.inference_mode():
        out = model(input_ids=x, output_hidden_states=True, use_cache=False)
    return out.logits[0].float().cpu(), tuple(h[0] for h in out.hidden_states)


def build_reference(
    teacher: Any,
    tokenizer: Any,
    docs: Sequence[Any],
    plan: Any,
    *,
    max_length: int,
    prompts: list[tuple[list[int], int]] | None = None,
    questions: Sequence[Any] | None = None,
    system_prompt: str = "",
    max_new_tokens: int = 16,
) -> AlignReference:
    """Run the teacher once: logits and principal coordinates on the first ``max_length`` tokens
    of each document, logits on the prompts' continuations, answers to the questions."""
    from gradfree.evaluation.reference import teacher_reference

    pairs = [*plan.layer_map, None]
    coords: list[list[torch.Tensor]] = []

    def project(_k: int, out: Any) -> None:
        hs = tuple(h[0] for h in out.hidden_states)
        per_site = []
        for idx, i in enumerate(pairs):
            h = hs[-1] if i is None else hs[i]
            mu = plan.mean_t[idx].to(h.device, torch.float64)
            p_t = plan.p_t[idx].to(h.device)
            per_site.append(((h[1:].double() - mu) @ p_t).float().cpu())
        coords.append(per_site)

    # The first max_length tokens of each document, its logits kept in float32 in memory.
    tref = teacher_reference(
        teacher,
        tokenizer,
        docs,
        None,
        max_length,
        first_only=True,
        min_tokens=1,
        logits=True,
        each=project,
    )
    meta = [
        {"id": docs[i].id, "lang": docs[i].lang, "ids": w.tolist()}
        for w, i in zip(tref.ids, tref.docs, strict=True)
    ]
    ref = AlignReference(tref, meta, coords)
    for ids, start in prompts or []:
        logits, _ = _forward(teacher, ids)
        ref.prompts.append((ids, start))
        ref.prompt_logits.append(logits[start - 1 : -1].contiguous())
    if questions:
        ref.qa = score_qa(
            answer_questions(teacher, tokenizer, questions, system_prompt, max_new_tokens)
        )
    return ref


def evaluate_variant(
    model: Any,
    tokenizer: Any,
    ref: AlignReference,
    k: int,
    *,
    questions: Sequence[Any] | None = None,
    system_prompt: str = "",
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    n_sites = len(ref.coords[0]) if ref.coords else 0
    sums: list[dict[str, Any]] = [
        {"n": 0, "st": 0.0, "ss": 0.0, "tt": 0.0, "s": None, "t": None} for _ in range(n_sites)
    ]
    kl_total, agree, tokens = 0.0, 0, 0
    per_lang: dict[str, dict[str, float]] = {}
    for j, (doc, coords) in enumerate(zip(ref.docs, ref.coords, strict=True)):
        tlog = ref.teacher.teacher_logits(j)[:-1]
        logits, hs = _forward(model, doc["ids"])
        slog = logits[:-1]
        kl = metrics.kl_per_token(tlog, slog).double()
        kl_total += float(kl.sum())
        a = int(metrics.top1_agreement(tlog, slog).sum())
        agree += a
        tokens += int(kl.numel())
        e = per_lang.setdefault(doc["lang"], {"kl_sum": 0.0, "tokens": 0, "agree": 0})
        e["kl_sum"] += float(kl.sum())
        e["tokens"] += int(kl.numel())
        e["agree"] += a
        sites = [*hs[: n_sites - 1], hs[-1]]
        for acc, h, t in zip(sums, sites, coords, strict=True):
            s = h[1:, :k].double().cpu()
            t = t.double()
            acc["n"] += s.shape[0]
            acc["st"] += float((s * t).sum())
            acc["ss"] += float((s * s).sum())
            acc["tt"] += float((t * t).sum())
            acc["s"] = s.sum(0) if acc["s"] is None else acc["s"] + s.sum(0)
            acc["t"] = t.sum(0) if acc["t"] is None else acc["t"] + t.sum(0)
    layers = []
    for idx, acc in enumerate(sums):
        n = acc["n"]
        ms, mt = acc["s"] / n, acc["t"] / n
        st = acc["st"] - n * float(ms @ mt)
        ss = acc["ss"] - n * float(ms @ ms)
        tt = acc["tt"] - n * float(mt @ mt)
        layers.append(
            {
                "site": "final" if idx == n_sites - 1 else idx,
                "cosine": st / (ss * tt) ** 0.5 if ss > 0 and tt > 0 else 0.0,
                "rms_ratio": max(ss + tt - 2 * st, 0.0) ** 0.5 / tt**0.5 if tt > 0 else 0.0,
            }
        )
    pkl, ptok = 0.0, 0
    for (ids, start), tlog in zip(ref.prompts, ref.prompt_logits, strict=True):
        logits, _ = _forward(model, ids)
        kl = metrics.kl_per_token(tlog, logits[start - 1 : -1]).double()
        pkl += float(kl.sum())
        ptok += int(kl.numel())
    result: dict[str, Any] = {
        "kl": kl_total / max(1, tokens),
        "top1": agree / max(1, tokens),
        "tokens": tokens,
        "by_lang": {
            lang: {
                "kl": e["kl_sum"] / max(1, e["tokens"]),
                "top1": e["agree"] / max(1, e["tokens"]),
                "tokens": e["tokens"],
            }
            for lang, e in sorted(per_lang.items())
        },
        "layers": layers,
        "prompt_kl": pkl / ptok if ptok else None,
        "prompt_tokens": ptok,
        "qa": None,
    }
    if questions:
        result["qa"] = score_qa(
            answer_questions(model, tokenizer, questions, system_prompt, max_new_tokens)
        )
    return result
