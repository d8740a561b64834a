"""Evaluation of a causal LM: perplexity, agreement with a teacher, and short factual answers.

Perplexity follows the standard sliding-window scheme of Hugging Face's "Perplexity of
fixed-length models" guide: windows of ``max_length`` tokens whose starts advance by ``stride``;
each window scores only the tokens not scored before, so every token after a document's first is
counted exactly once, with as much left context as its window gives it. The perplexity is
token-weighted over all documents: exp(Σ NLL / Σ tokens). Batches are right-padded and masked.

With a teacher that shares the tokenizer, the same tokens give KL(teacher ‖ model) and top-1
agreement, and the residual streams at mapped layers (``gradfree.solvers.layermap``) give
per-layer cosine (where widths match) and linear CKA from streamed statistics
(``gradfree.evaluation.metrics``). Hidden states skip each document's first token, whose massive
activations would otherwise dominate both.

Logits are never materialised for a whole batch: the final normed hidden states of the scored
positions are pushed through the LM head in chunks, so a 151,936-token vocabulary costs a chunk of
rows at a time.

Questions are answered greedily (no sampling) with the system prompt, through the tokenizer's chat
template when it has one (thinking disabled for templates that support it), else a plain
"Question: …\\nAnswer:" prompt, and scored with :func:`gradfree.evaluation.metrics.answer_match`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError
from gradfree.evaluation import metrics

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

LOGIT_CHUNK = 256  # rows of logits alive at once: 256 × 151,936 × 4 B ≈ 156 MB
SEED = 0


def check_window_settings(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise GradfreeError("--max-length must be at least 2 tokens.")
    if not 1 <= stride <= max_length:
        raise GradfreeError("--stride must be between 1 and --max-length.")


def make_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, first_target) over a document of ``n_tokens`` tokens.

    The window feeds tokens [begin, end) and scores targets [first_target, end). Token 0 has no
    context and is never scored; every other token is scored exactly once. With stride = max_length
    the next window starts one token early, so that the first new target still has a predictor.
    """
    check_window_settings(max_length, stride)
    out: list[tuple[int, int, int]] = []
    begin, scored_to = 0, 1
    while scored_to < n_tokens:
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, scored_to))
        scored_to = end
        begin = min(begin + stride, end - 1)
    return out


def _pad_id(tokenizer: Any, model: PreTrainedModel) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.eos_token_id):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    return 0


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


def _check_same_tokenizer(tokenizer: Any, teacher_tokenizer: Any) -> None:
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
                    "cka": metrics.linear_cka_from_stats(self.t[k], self.s[k], self.st[k])
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


def evaluate(
    model: PreTrainedModel,
    tokenizer: Any,
    docs: Sequence[Any],
    *,
    teacher: PreTrainedModel | None = None,
    teacher_tokenizer: Any = None,
    questions: Sequence[Any] | None = None,
    system_prompt: str | None = None,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    device: str = "cpu",
    layer_map: str | list[int] | None = None,
    compare_layers: Sequence[int] | None = None,
    max_new_tokens: int = 24,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``docs`` (objects with ``.text``, or strings); with a
    ``teacher``, KL/agreement and per-layer similarity; with ``questions``, greedy answers.

    ``teacher_tokenizer``, when given, must have the same vocabulary as ``tokenizer``.
    ``compare_layers`` limits the per-layer similarity to some model blocks (default: all; the
    final normed states are always compared): each compared pair holds d_t² + d_t·d_s + d_s²
    float64 sums, 370 MB for a 5120-wide teacher and a 2560-wide student.
    Models are used where they are (placing them is the caller's choice); inputs go to ``device``.
    """
    import torch

    torch.manual_seed(SEED)
    check_window_settings(max_length, stride)
    if batch_size < 1:
        raise GradfreeError("--batch-size must be at least 1.")
    _check_same_tokenizer(tokenizer, teacher_tokenizer)
    texts = [d if isinstance(d, str) else d.text for d in docs]
    token_ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    windows = [
        (i, *w)
        for i, ids in enumerate(token_ids)
        for w in make_windows(len(ids), max_length, stride)
    ]
    if not windows:
        raise GradfreeError("The documents have no tokens to score (each needs at least two).")
    run = _Pass(model, teacher, layer_map, len(tokenizer), compare_layers)
    pad = _pad_id(tokenizer, model)
    for b0 in range(0, len(windows), batch_size):
        run.step(_Batch(windows[b0 : b0 + batch_size], token_ids, pad), device)
        if progress is not None:
            progress("perplexity", min(b0 + batch_size, len(windows)), len(windows))
    result: dict[str, Any] = {
        "settings": {
            "max_length": max_length,
            "stride": stride,
            "batch_size": batch_size,
            "device": device,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "seed": SEED,
        },
        "perplexity": {
            "documents": len(texts),
            "windows": len(windows),
            "tokens": run.count,
            "nll_sum": run.nll_sum,
            "nll_mean": run.nll_sum / run.count,
            "ppl": metrics.perplexity(run.nll_sum, run.count),
        },
        "teacher": None,
        "qa": None,
    }
    if run.tstats is not None and run.trunner is not None:
        n_s, n_t = run.runner.adapter.num_layers, run.trunner.adapter.num_layers
        result["teacher"] = {
            **run.tstats.result(n_s, n_t, run.vocab),
            "layer_map": run.layer_map,
        }
    if questions:
        if system_prompt is None:
            from gradfree.texts.corpora import system_prompt as default_prompt

            system_prompt = default_prompt()
        result["qa"] = answer_questions(
            model, tokenizer, questions, system_prompt, max_new_tokens, device, progress
        )
    return result


def build_prompt(tokenizer: Any, question: str, system: str) -> tuple[str, str]:
    """(prompt text, format): the chat template with a generation prompt, or the plain format."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
        except Exception:  # templates without a system role: fold it into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{question}"}]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return str(text), "chat_template"
    return f"{system}\n\nQuestion: {question}\nAnswer:", "plain"


_THINK = re.compile(r"<think>.*?(</think>|$)", flags=re.DOTALL)


def _answer_part(generated: str, fmt: str) -> str:
    """The part of a generation that is scored: without any thinking block; in the plain format
    only the first non-empty line, since a base model goes on to invent further questions."""
    text = _THINK.sub("", generated).strip()
    if fmt == "plain":
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return text


class _PrefixCache:
    """The key/value cache of the token prefix shared by all prompts (or nothing)."""

    def __init__(self, ids: list[int], cache: Any) -> None:
        self.ids, self.cache = ids, cache

    @classmethod
    def build(
        cls, model: Any, encoded: Sequence[list[int]], device: str, enabled: bool
    ) -> _PrefixCache:
        import torch

        n = min((len(e) for e in encoded), default=0) - 1  # every prompt keeps >= 1 own token
        k = 0
        while enabled and k < n and all(e[k] == encoded[0][k] for e in encoded):
            k += 1
        if k < 8:  # not worth a cache
            return cls([], None)
        ids = torch.tensor([encoded[0][:k]], device=device)
        with torch.inference_mode():
            cache = model(input_ids=ids, use_cache=True).past_key_values
        return cls(list(encoded[0][:k]), cache)

    def batch(self, chunk: Sequence[list[int]], pad: int, device: str) -> tuple[Any, Any, Any]:
        """(ids, mask, cache) of a batch: prefix, then each prompt's rest padded on its left."""
        import copy

        import torch

        k = len(self.ids)
        rest = [e[k:] for e in chunk]
        width = max(len(r) for r in rest)
        ids = torch.full((len(chunk), k + width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), k + width), dtype=torch.long)
        for i, r in enumerate(rest):
            ids[i, :k], mask[i, :k] = torch.tensor(self.ids, dtype=torch.long), 1
            ids[i, k + width - len(r) :], mask[i, k + width - len(r) :] = torch.tensor(r), 1
        cache = None
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(len(chunk))
        return ids.to(device), mask.to(device), cache


def answer_questions(
    model: PreTrainedModel,
    tokenizer: Any,
    questions: Sequence[Any],
    system_prompt: str,
    max_new_tokens: int = 24,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    batch_size: int = 16,
    share_prefix: bool = True,
) -> dict[str, Any]:
    """Greedy answers to ``questions`` (objects with .id, .question, .answers, .lang), scored.

    Questions are generated ``batch_size`` at a time, padded on the left of each question
    (generation appends on the right, so every prompt must end at the same column; the mask and
    the position ids that transformers derives from it make padding invisible). Batching makes
    the decode steps, which read every weight once per step, several times cheaper on a CPU;
    ``batch_size=1`` generates one at a time. With ``share_prefix`` the tokens that every prompt
    starts with (the system prompt, ~80 of ~110 tokens here) are run once and their key/value
    cache is reused by every batch: the prompts' prefill was most of the question time.
    """
    import torch
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    gen = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=_pad_id(tokenizer, model),
        eos_token_id=eos,
    )
    generate: Any = model.generate  # transformers' stubs type it through nn.Module.__getattr__
    prompts = [build_prompt(tokenizer, q.question, system_prompt) for q in questions]
    fmt = prompts[0][1] if prompts else "plain"
    encoded = [
        list(tokenizer(text, add_special_tokens=fmt == "plain")["input_ids"]) for text, _ in prompts
    ]
    generated: list[str] = []
    prefix = _PrefixCache.build(model, encoded, device, share_prefix)
    step = max(1, batch_size)
    for start in range(0, len(encoded), step):
        chunk = encoded[start : start + step]
        with torch.inference_mode():
            ids, mask, cache = prefix.batch(chunk, gen.pad_token_id, device)
            out = generate(
                input_ids=ids, attention_mask=mask, past_key_values=cache, generation_config=gen
            )
        generated += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        if progress is not None:
            progress("questions", len(generated), len(prompts))
    items = []
    for q, text in zip(questions, generated, strict=True):
        answer = _answer_part(text, fmt)
        items.append(
            {
                "id": q.id,
                "lang": getattr(q, "lang", None),
                "question": q.question,
                "answers": list(q.answers),
                "generated": text,
                "answer": answer,
                "matched": metrics.answer_match(answer, q.answers),
            }
        )
    by_lang: dict[str, dict[str, Any]] = {}
    for it in items:
        entry = by_lang.setdefault(str(it["lang"]), {"n": 0, "matched": 0})
        entry["n"] += 1
        entry["matched"] += int(it["matched"])
    for entry in by_lang.values():
        entry["score"] = entry["matched"] / entry["n"]
    matched = sum(int(it["matched"]) for it in items)
    return {
        "n": len(items),
        "matched": matched,
        "score": matched / len(items) if items else 0.0,
        "prompt_format": fmt,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "by_lang": by_lang,
        "items": items,
    }


def write_eval(result: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write ``eval.json`` and ``eval.md`` into the folder ``out``, atomically."""
    from gradfree.base.io import atomic_dir, write_json_atomic, write_text_atomic
    from gradfree.evaluation.report import render_markdown

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "eval.json", result)
        write_text_atomic(tmp / "eval.md", render_markdown(result))
    return out
