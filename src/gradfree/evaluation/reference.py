"""Scoring many models against one teacher without running the teacher again.

The teacher's log-probabilities on every evaluation window are computed once
(:func:`teacher_reference`) and kept on disk in float16, one file per window (a 2,000-token
reference over a 151,936-token vocabulary is 0.6 GB: held in memory beside a paired capture it
would push a 24 GiB machine over). :func:`score` then runs only the model: token-weighted
KL(teacher ‖ model), perplexity and top-1 agreement over next-token positions, plus per-document
KLs for a bootstrap interval of a difference between two models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Reference:
    """Windows (token ids, document index) and the teacher's float16 log-probs on disk."""

    folder: Path
    ids: list[torch.Tensor]
    docs: list[int]
    teacher: dict[str, float] = field(default_factory=dict)

    def teacher_logp(self, k: int) -> torch.Tensor:
        return torch.load(self.folder / f"w{k:05d}.pt", weights_only=True).float()


def windows(tokenizer: Any, docs: Sequence[Any], max_length: int) -> tuple[list[Any], list[int]]:
    """The capture's windows of every document (those of ≥ 2 tokens), with their document."""
    from gradfree.capture.plan import iter_windows

    ids, owner = [], []
    for i, w in iter_windows(tokenizer, docs, max_length):
        if len(w) >= 2:
            ids.append(torch.tensor(w, dtype=torch.long))
            owner.append(i)
    return ids, owner


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_reference(
    teacher: nn.Module, tokenizer: Any, docs: Sequence[Any], folder: Path, max_length: int
) -> Reference:
    """Run the teacher once over ``docs`` and store its log-probs (float16) under ``folder``;
    a folder completed earlier (``ref.json`` written last) is reused as it is."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    ids, owner = windows(tokenizer, docs, max_length)
    done = folder / "ref.json"
    if done.exists():
        meta = json.loads(done.read_text())
        if meta["windows"] == len(ids):
            return Reference(folder, ids, owner, meta["teacher"])
    nll = 0.0
    n = 0
    for k, w in enumerate(ids):
        logits = teacher(input_ids=w[None].to(_device(teacher))).logits[0].float().cpu()
        logp = torch.log_softmax(logits, -1)
        nll -= float(logp[:-1].gather(1, w[1:, None]).sum())
        n += len(w) - 1
        torch.save(logp.half(), folder / f"w{k:05d}.pt")
    ref = Reference(folder, ids, owner)
    ref.teacher = {"ppl": float(torch.exp(torch.tensor(nll / max(n, 1)))), "tokens": float(n)}
    done.write_text(json.dumps({"windows": len(ids), "teacher": ref.teacher}))
    return ref


@torch.no_grad()
def score(model: nn.Module, ref: Reference) -> dict[str, Any]:
    """KL(teacher ‖ model), perplexity and top-1 agreement of ``model`` on the reference windows;
    ``doc_kl``/``doc_tokens`` per document for paired bootstrap intervals."""
    kl = nll = 0.0
    agree = n = 0
    n_docs = max(ref.docs) + 1 if ref.docs else 0
    doc_kl = [0.0] * n_docs
    doc_n = [0] * n_docs
    for k, w in enumerate(ref.ids):
        logits = model(input_ids=w[None].to(_device(model))).logits[0].float().cpu()
        logp = torch.log_softmax(logits, -1)[:-1]
        lt = ref.teacher_logp(k)[:-1]
        # The float16 reference can hold -inf for vanishing probabilities: exp gives 0, and
        # 0·(−inf − x) would be NaN, so those terms are dropped (their true weight is < 1e-7).
        pt = lt.exp()
        term = torch.where(pt > 0, pt * (lt - logp), torch.zeros_like(pt)).sum()
        kl += float(term)
        doc_kl[ref.docs[k]] += float(term)
        doc_n[ref.docs[k]] += len(w) - 1
        nll -= float(logp.gather(1, w[1:, None]).sum())
        agree += int((logp.argmax(-1) == lt.argmax(-1)).sum())
        n += len(w) - 1
    if n == 0:
        raise ValueError("no tokens to score")
    return {
        "kl": kl / n,
        "ppl": float(torch.exp(torch.tensor(nll / n))),
        "top1": agree / n,
        "tokens": n,
        "doc_kl": doc_kl,
        "doc_tokens": doc_n,
    }


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
