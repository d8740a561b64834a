"""The paired perplexity pass of ``gradfree eval``: the model (and a teacher) over sliding windows.

Perplexity follows the standard sliding-window scheme of Hugging Face's "Perplexity of
fixed-length models" guide (:func:`gradfree.texts.windows.make_windows`): windows of
``max_length`` tokens whose starts advance by ``stride``; each window scores only the tokens not
scored before, so every token after a document's first is counted exactly once, with as much left
context as its window gives it. The perplexity is token-weighted over all documents:
exp(Σ NLL / Σ tokens). Batches are right-padded and masked.

With a teacher that shares the tokenizer, the same tokens give KL(teacher ‖ model) and top-1
agreement, and the residual streams at mapped layers (``gradfree.solvers.layermap``) give
per-layer cosine (where widths match) and linear CKA from streamed statistics
(``gradfree.capture.similarity``). Hidden states skip each document's first token, whose massive
activations would otherwise dominate both. The teacher runs beside the model here, on the same
batches, because the hidden states are compared too; scoring many models against one stored
teacher output is :mod:`gradfree.evaluation.reference`.

Logits are never materialised for a whole batch: the final normed hidden states of the scored
positions are pushed through the LM head in chunks, so a 151,936-token vocabulary costs a chunk of
rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError
from gradfree.evaluation import metrics
from gradfree.texts.windows import document_text, encode, make_windows, pad_id

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from gradfree.base.progress import ProgressFn

LOGIT_CHUNK = 256  # rows of logits alive at once: 256 × 151,936 × 4 B ≈ 156 MB


class _Runner:
    """Runs one model on padded batches and returns its final normed hidden states (and, when
    asked, every residual stream), without computing the full logits tensor."""

    def __init__(self, model: PreTrainedModel) -> None:
        from gradfree.adapters import get_adapter

        self.model = model
        self.adapter = get_adapter(model)

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, hidden: bool
    ) -> tuple[torch.Tensor, Sequence[torch.Tensor] | None]:
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: Any, _i: Any, output: torch.Tensor) -> None:
            captured["h"] = output

        handle = self.adapter.final_norm.register_forward_hook(hook)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                output_hidden_states=hidden,
                use_cache=False,
                logits_to_keep=1,  # logits are computed by us, for the scored rows only
            )
        finally:
            handle.remove()
        return captured["h"], (out.hidden_states if hidden else None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head(h)


def check_same_tokenizer(tokenizer: Any, teacher_tokenizer: Any) -> None:
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise GradfreeError(
            "The teacher and the model do not share a tokenizer; KL and agreement need one."
        )


class _TeacherStats:
    """Running sums for KL, agreement and per-layer hidden-state similarity."""

    def __init__(self, pairs: list[tuple[int, int]], d_student: int, d_teacher: int) -> None:
        from gradfree.capture.stats import CrossStats, MomentStats

        self.pairs = pairs
        self.kl_sum, self.agree, self.tokens = 0.0, 0, 0
        self.teacher_nll_sum = 0.0  # the teacher's own NLL on the same targets (its perplexity)
        self.cos_sum = [0.0 for _ in pairs]
        self.same_width = d_student == d_teacher
        self.s = [MomentStats.empty(d_student) for _ in pairs]
        self.t = [MomentStats.empty(d_teacher) for _ in pairs]
        self.st = [CrossStats.empty(d_teacher, d_student) for _ in pairs]

    def update_hidden(self, k: int, hs: torch.Tensor, ht: torch.Tensor) -> None:
        if self.same_width:
            self.cos_sum[k] += float(metrics.cosine_per_row(hs, ht).sum())
        self.s[k].update(hs)
        self.t[k].update(ht)
        self.st[k].update(ht, hs)

    def result(self, n_student: int, n_teacher: int, vocab: int) -> dict[str, Any]:
        from gradfree.capture.similarity import linear_cka_from_stats

        layers = []
        for k, (j, i) in enumerate(self.pairs):
            n = self.s[k].count
            final = j == n_student
            layers.append(
                {
                    "student_layer": "final" if final else j,
                    "teacher_layer": "final" if final else i,
                    "site": "final.normed" if final else "resid_pre",
                    "tokens": n,
                    "cosine": self.cos_sum[k] / n if self.same_width and n else None,
                    "cka": linear_cka_from_stats(self.t[k], self.s[k], self.st[k], undefined=0.0)
                    if n > 1
                    else None,
                }
            )
        return {
            "tokens": self.tokens,
            "kl_sum": self.kl_sum,
            "kl_mean": self.kl_sum / self.tokens if self.tokens else None,
            "top1_agreement": self.agree / self.tokens if self.tokens else None,
            "teacher_nll_sum": self.teacher_nll_sum,
            "teacher_ppl": metrics.perplexity(self.teacher_nll_sum, self.tokens)
            if self.tokens
            else None,
            "vocab_compared": vocab,
            "layers": layers,
        }


class _Batch:
    """A padded batch of windows and the positions that are scored in it."""

    def __init__(self, windows: Sequence[tuple[int, int, int, int]], token_ids: Any, pad: int):
        import torch

        width = max(end - begin for _, begin, end, _ in windows)
        self.ids = torch.full((len(windows), width), pad, dtype=torch.long)
        self.mask = torch.zeros((len(windows), width), dtype=torch.long)
        rows, cols, targets, hrows, hcols = [], [], [], [], []
        for r, (doc, begin, end, first) in enumerate(windows):
            self.ids[r, : end - begin] = torch.tensor(token_ids[doc][begin:end])
            self.mask[r, : end - begin] = 1
            pos = list(range(first - 1 - begin, end - 1 - begin))  # predictors of the targets
            rows += [r] * len(pos)
            cols += pos
            targets += token_ids[doc][first:end]
            hpos = [p for p in pos if begin + p >= 1]  # hidden states: skip the first token
            hrows += [r] * len(hpos)
            hcols += hpos
        self.sel = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        self.hsel = (torch.tensor(hrows, dtype=torch.long), torch.tensor(hcols, dtype=torch.long))
        self.targets = torch.tensor(targets, dtype=torch.long)


class _Pass:
    """One pass over the windows: NLL of the model and, with a teacher, the comparison sums."""

    def __init__(
        self,
        model: PreTrainedModel,
        teacher: PreTrainedModel | None,
        layer_map: Any,
        n_vocab: int,
        compare_layers: Sequence[int] | None = None,
    ):
        from gradfree.solvers.layermap import resolve_map

        self.runner = _Runner(model)
        self.nll_sum, self.count = 0.0, 0
        self.trunner: _Runner | None = None
        self.tstats: _TeacherStats | None = None
        self.layer_map: list[int] = []
        self.vocab = 0  # logits columns compared with the teacher
        if teacher is None:
            return
        self.trunner = _Runner(teacher)
        sa, ta = self.runner.adapter, self.trunner.adapter
        self.layer_map = resolve_map(layer_map, ta.num_layers, sa.num_layers)
        wanted = range(sa.num_layers) if compare_layers is None else sorted(set(compare_layers))
        if any(not 0 <= j < sa.num_layers for j in wanted):
            raise GradfreeError(f"Compared layers must lie in 0..{sa.num_layers - 1}.")
        pairs = [(j, self.layer_map[j]) for j in wanted]
        pairs.append((sa.num_layers, ta.num_layers))  # the final normed states
        self.tstats = _TeacherStats(pairs, sa.hidden_size, ta.hidden_size)
        # Heads padded to different sizes still compare on the tokenizer's ids.
        self.vocab = min(sa.vocab_size, ta.vocab_size)
        if self.vocab < n_vocab:
            raise GradfreeError(
                "The teacher's and the model's LM heads do not cover the tokenizer."
            )

    def step(self, b: _Batch, device: str) -> None:
        import torch

        ids, mask, tgt = b.ids.to(device), b.mask.to(device), b.targets.to(device)
        sel = (b.sel[0].to(device), b.sel[1].to(device))
        hsel = (b.hsel[0].to(device), b.hsel[1].to(device))
        ts, tr = self.tstats, self.trunner
        with torch.inference_mode():
            h, hs = self.runner(ids, mask, hidden=ts is not None)
            h = h[sel]
            ht, hts = tr(ids, mask, hidden=True) if tr is not None else (None, None)
            ht = ht[sel] if ht is not None else None
            for c in range(0, h.shape[0], LOGIT_CHUNK):
                logits = self.runner.logits(h[c : c + LOGIT_CHUNK])
                self.nll_sum += float(metrics.nll_per_token(logits, tgt[c : c + LOGIT_CHUNK]).sum())
                if ts is not None and tr is not None and ht is not None:
                    tlogits = tr.logits(ht[c : c + LOGIT_CHUNK])
                    ts.teacher_nll_sum += float(
                        metrics.nll_per_token(tlogits, tgt[c : c + LOGIT_CHUNK]).sum()
                    )
                    tlogits = tlogits[:, : self.vocab]
                    logits = logits[:, : self.vocab]
                    ts.kl_sum += float(metrics.kl_per_token(tlogits, logits).double().sum())
                    ts.agree += int(metrics.top1_agreement(tlogits, logits).sum())
                    ts.tokens += int(logits.shape[0])
                del logits  # free each chunk of logits before the next
            self.count += int(tgt.shape[0])
            if ts is not None and hs is not None and hts is not None and hsel[0].numel():
                for k, (j, i) in enumerate(ts.pairs):
                    ts.update_hidden(k, hs[j][hsel], hts[i][hsel])


def paired_pass(
    model: PreTrainedModel,
    tokenizer: Any,
    docs: Sequence[Any],
    *,
    teacher: PreTrainedModel | None,
    max_length: int,
    stride: int,
    batch_size: int,
    device: str,
    layer_map: str | list[int] | None,
    compare_layers: Sequence[int] | None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``perplexity`` and ``teacher`` parts of :func:`gradfree.evaluation.run.evaluate`'s
    result: one pass over the sliding windows of ``docs`` (the teacher part is None without one)."""
    texts = [document_text(d) for d in docs]
    token_ids = [encode(tokenizer, t) for t in texts]
    windows = [
        (i, *w)
        for i, ids in enumerate(token_ids)
        for w in make_windows(len(ids), max_length, stride)
    ]
    if not windows:
        raise GradfreeError("The documents have no tokens to score (each needs at least two).")
    run = _Pass(model, teacher, layer_map, len(tokenizer), compare_layers)
    pad = pad_id(tokenizer, model)
    for b0 in range(0, len(windows), batch_size):
        run.step(_Batch(windows[b0 : b0 + batch_size], token_ids, pad), device)
        if progress is not None:
            progress("perplexity", min(b0 + batch_size, len(windows)), len(windows), "windows")
    ppl = {
        "documents": len(texts),
        "windows": len(windows),
        "tokens": run.count,
        "nll_sum": run.nll_sum,
        "nll_mean": run.nll_sum / run.count,
        "ppl": metrics.perplexity(run.nll_sum, run.count),
    }
    if run.tstats is None or run.trunner is None:
        return ppl, None
    n_s, n_t = run.runner.adapter.num_layers, run.trunner.adapter.num_layers
    return ppl, {**run.tstats.result(n_s, n_t, run.vocab), "layer_map": run.layer_map}
