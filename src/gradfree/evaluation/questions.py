"""The place questions: prompts, greedy answers, and their scores.

Questions are answered greedily (no sampling) with the system prompt, through the tokenizer's chat
template when it has one (thinking disabled for templates that support it), else a plain
"Question: …\\nAnswer:" prompt, and scored with :func:`gradfree.evaluation.metrics.answer_match`.
:func:`score_qa` adds what the alignment ablation reports: abstentions (an answer that says it
does not know, in any of the corpus's languages) and hallucinations (wrong and not abstaining).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradfree.evaluation import metrics
from gradfree.texts.windows import encode, pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gradfree.base.progress import ProgressFn


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
    progress: ProgressFn | None = None,
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
        pad_token_id=pad_id(tokenizer, model),
        eos_token_id=eos,
    )
    generate: Any = model.generate  # transformers' stubs type it through nn.Module.__getattr__
    prompts = [build_prompt(tokenizer, q.question, system_prompt) for q in questions]
    fmt = prompts[0][1] if prompts else "plain"
    encoded = [encode(tokenizer, text, add_special_tokens=fmt == "plain") for text, _ in prompts]
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
            progress("questions", len(generated), len(prompts), "questions")
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


# An answer holding one of these says it does not know (in the corpus's languages).
ABSTAIN = (
    "not sure",
    "don't know",
    "do not know",
    "i'm unable",
    "i am unable",
    "cannot answer",
    "no estoy seguro",
    "no sé",
    "je ne sais",
    "pas sûr",
    "weiß nicht",
    "nicht sicher",
    "non so",
    "não sei",
    "不知道",
    "不确定",
    "わかりません",
)


def abstained(answer: str) -> bool:
    low = answer.casefold()
    return any(p in low for p in ABSTAIN)


def score_qa(qa: dict[str, Any]) -> dict[str, Any]:
    """Add abstention and hallucination counts (overall and per language) to a QA result."""
    by: dict[str, dict[str, int]] = {}
    for it in qa["items"]:
        it["abstained"] = abstained(it["answer"]) and not it["matched"]
        it["hallucinated"] = not it["matched"] and not it["abstained"]
        e = by.setdefault(str(it["lang"]), {"n": 0, "matched": 0, "hallucinated": 0})
        e["n"] += 1
        e["matched"] += int(it["matched"])
        e["hallucinated"] += int(it["hallucinated"])
    n = max(1, qa["n"])
    qa["hallucinated"] = sum(int(it["hallucinated"]) for it in qa["items"])
    qa["abstained"] = sum(int(it["abstained"]) for it in qa["items"])
    qa["hallucination_rate"] = qa["hallucinated"] / n
    qa["by_lang"] = by
    return qa
