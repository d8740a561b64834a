"""Scoring many models against one teacher without running the teacher again.

:func:`teacher_reference` runs the teacher once over the windows of some documents
(:func:`gradfree.texts.windows.iter_windows`) and keeps its outputs: a :class:`TeacherReference`.
Its options decide only how they are kept, never what the scores compute:

- on disk in float16, one file per window (``folder``; ``ref.json`` written last marks it
  complete and lets a later run reuse it): a 2,000-token reference over a 151,936-token vocabulary
  is 0.6 GB, which held in memory beside a paired capture would push a 24 GiB machine over. The
  experiment's references (``gradfree experiment``).
- in memory in float32 (``folder=None``): the distilled head's validation windows
  (:mod:`gradfree.compress.head`) and, as raw logits, the alignment ablation's held-out documents
  (:mod:`gradfree.align.evaluate`).
- every window of each document, or only its first (``first_only``: the first ``max_length``
  tokens).

:func:`score` then runs only the model: token-weighted KL(teacher ‖ model), perplexity and top-1
agreement over next-token positions, plus per-document KLs for :func:`bootstrap_delta`, the
bootstrap interval of a difference between two models. :class:`Sums` is the arithmetic of one
window, shared with the head's scores (which need no forward pass, only the final states).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.texts.windows import iter_windows


@dataclass
class TeacherReference:
    """Windows (token ids, document index) and the teacher's outputs on each, float32 when read.

    ``folder`` set: float16 log-probs on disk, one file per window. ``folder`` None: the outputs
    in ``held`` (log-probs, or raw logits when ``logits`` is set).
    """

    ids: list[torch.Tensor]
    docs: list[int]
    folder: Path | None = None
    held: list[torch.Tensor] = field(default_factory=list)
    logits: bool = False
    teacher: dict[str, float] = field(default_factory=dict)

    def teacher_logp(self, k: int) -> torch.Tensor:
        """The teacher's log-probs (t, vocab) on window ``k``."""
        if self.logits:
            raise ValueError("this reference holds the teacher's logits, not its log-probs")
        if self.folder is None:
            return self.held[k]
        return torch.load(self.folder / f"w{k:05d}.pt", weights_only=True).float()

    def teacher_logits(self, k: int) -> torch.Tensor:
        """The teacher's float32 logits (t, vocab) on window ``k`` (a reference of logits)."""
        if not self.logits:
            raise ValueError("this reference holds the teacher's log-probs, not its logits")
        return self.held[k]


def windows(
    tokenizer: Any,
    docs: Sequence[Any],
    max_length: int,
    *,
    first_only: bool = False,
    min_tokens: int = 2,
) -> tuple[list[torch.Tensor], list[int]]:
    """The capture's windows of every document (those of ≥ ``min_tokens`` tokens; with
    ``first_only`` each document's first), with their document's index."""
    ids, owner = [], []
    for i, w in iter_windows(tokenizer, docs, max_length, first_only=first_only):
        if len(w) >= min_tokens:
            ids.append(torch.tensor(w, dtype=torch.long))
            owner.append(i)
    return ids, owner


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _reuse(folder: Path, ids: list[torch.Tensor], owner: list[int]) -> TeacherReference | None:
    done = folder / "ref.json"
    if done.exists():
        meta = json.loads(done.read_text())
        if meta["windows"] == len(ids):
            return TeacherReference(ids, owner, folder, teacher=meta["teacher"])
    return None


@torch.no_grad()
def teacher_reference(
    teacher: nn.Module,
    tokenizer: Any,
    docs: Sequence[Any],
    folder: Path | None,
    max_length: int,
    *,
    first_only: bool = False,
    min_tokens: int = 2,
    logits: bool = False,
    each: Callable[[int, Any], None] | None = None,
) -> TeacherReference:
    """Run the teacher once over the windows of ``docs`` and keep its outputs (module docstring).

    With a ``folder``: float16 log-probs there, and a folder completed earlier is reused as it is.
    Without: float32 log-probs (or, with ``logits``, the logits themselves) in memory. ``each``,
    when given, sees every window's model output (hidden states included) as ``each(k, out)``.
    """
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    ids, owner = windows(tokenizer, docs, max_length, first_only=first_only, min_tokens=min_tokens)
    if folder is not None and (ref := _reuse(folder, ids, owner)) is not None:
        return ref
    ref = TeacherReference(ids, owner, folder, logits=logits)
    nll = 0.0
    n = 0
    for k, w in enumerate(ids):
        x = w[None].to(_device(teacher))
        out = teacher(input_ids=x, output_hidden_states=True) if each else teacher(input_ids=x)
        if each is not None:
            each(k, out)
        if logits:
            ref.held.append(out.logits[0].float().cpu())
            continue
        # Each storage keeps the order of operations its callers always had: the float16 file
        # from a log-softmax on the CPU, the in-memory log-probs from one where the teacher ran.
        if folder is not None:
            logp = torch.log_softmax(out.logits[0].float().cpu(), -1)
        else:
            logp = torch.log_softmax(out.logits[0].float(), -1).cpu()
        nll -= float(logp[:-1].gather(1, w[1:, None]).sum())
        n += len(w) - 1
        if folder is not None:
            torch.save(logp.half(), folder / f"w{k:05d}.pt")
        else:
            ref.held.append(logp)
    if not logits:
        ref.teacher = {"ppl": float(torch.exp(torch.tensor(nll / max(n, 1)))), "tokens": float(n)}
    if folder is not None:
        (folder / "ref.json").write_text(json.dumps({"windows": len(ids), "teacher": ref.teacher}))
    return ref


@dataclass
class TeacherRows:
    """The teacher's side of one window's scores, prepared once for any number of models:
    its probabilities, its Σ p·log p and its top-1 token per position."""

    p: torch.Tensor  # (t, vocab) float32
    plogp: float
    top: torch.Tensor  # (t,)
    scratch: torch.Tensor | None = None  # (t, vocab): the products of one score, reused

    @classmethod
    def of(cls, lt: torch.Tensor) -> TeacherRows:
        """From the teacher's float32 log-probs ``lt`` (one row per predicted position)."""
        # The float16 reference can hold -inf for vanishing probabilities: exp gives 0, and
        # 0·(−inf) would be NaN, so those terms are dropped (their true weight is < 1e-7).
        p = lt.exp()
        plogp = float(torch.where(p > 0, p * lt, torch.zeros_like(p)).sum(dtype=torch.float64))
        return cls(p, plogp, lt.argmax(-1))


class Sums:
    """Running sums of KL(teacher ‖ model), NLL and top-1 agreement over next-token positions,
    overall and per document."""

    def __init__(self, n_docs: int = 0) -> None:
        self.kl = self.nll = 0.0
        self.agree = self.n = 0
        self.doc_kl = [0.0] * n_docs
        self.doc_n = [0] * n_docs

    def add(
        self, logp: torch.Tensor, lt: torch.Tensor, targets: torch.Tensor, doc: int | None = None
    ) -> None:
        """One window: the model's log-probs ``logp`` and the teacher's ``lt`` (float32, one row
        per predicted position) and the ``targets`` they predict."""
        self.add_rows(logp, TeacherRows.of(lt), targets, doc)

    def add_rows(
        self,
        logp: torch.Tensor,
        teacher: TeacherRows,
        targets: torch.Tensor,
        doc: int | None = None,
    ) -> None:
        """:meth:`add` with the teacher's side prepared (:class:`TeacherRows`), for scoring
        many models on one window: KL = Σ p·log p − Σ p·logp (the model's log-probs are finite,
        so terms with p = 0 add nothing). The sums are ~4× the KL and of ~40M terms: a float32
        BLAS dot product of that length was off by 0.2 %, torch's (cascade) sum of the products
        is within 1e-7 and 5× cheaper than a float64 one; the products go to one buffer."""
        if teacher.scratch is None or teacher.scratch.shape != logp.shape:
            teacher.scratch = torch.empty_like(logp)
        prod = torch.mul(teacher.p, logp, out=teacher.scratch)
        term = teacher.plogp - float(prod.sum())
        self.kl += term
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        self.agree += int((logp.argmax(-1) == teacher.top).sum())
        self.n += len(targets)
        if doc is not None:
            self.doc_kl[doc] += term
            self.doc_n[doc] += len(targets)

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no tokens to score")
        return {
            "kl": self.kl / self.n,
            "ppl": float(torch.exp(torch.tensor(self.nll / self.n))),
            "top1": self.agree / self.n,
            "tokens": self.n,
            "doc_kl": self.doc_kl,
            "doc_tokens": self.doc_n,
        }


@torch.no_grad()
def score(model: nn.Module, ref: TeacherReference) -> dict[str, Any]:
    """KL(teacher ‖ model), perplexity and top-1 agreement of ``model`` on the reference windows;
    ``doc_kl``/``doc_tokens`` per document for paired bootstrap intervals."""
    sums = Sums(max(ref.docs) + 1 if ref.docs else 0)
    for k, w in enumerate(ref.ids):
        logits = model(input_ids=w[None].to(_device(model))).logits[0].float().cpu()
        logp = torch.log_softmax(logits, -1)[:-1]
        sums.add(logp, ref.teacher_logp(k)[:-1], w[1:], ref.docs[k])
    return sums.result()


def bootstrap_delta(
    a: dict[str, Any], b: dict[str, Any], samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of KL(b) − KL(a) (token-weighted), resampling documents with replacement."""
    ka, kb = torch.tensor(a["doc_kl"]), torch.tensor(b["doc_kl"])
    nt = torch.tensor(a["doc_tokens"], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(nt), (samples, len(nt)), generator=g)
    tok = nt[idx].sum(1).clamp_min(1)
    d = ((kb - ka).to(torch.float64)[idx].sum(1)) / tok
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)
