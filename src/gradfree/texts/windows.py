"""How documents become token windows: one tokenization and one windowing for capture and scoring.

- :func:`encode` tokenizes one document as every command does (the tokenizer's special tokens
  by default).
- :func:`iter_windows` cuts each document into consecutive windows of at most ``max_length``
  tokens: the windows of a capture and of a teacher reference; ``first_only`` keeps each
  document's first window (its first ``max_length`` tokens), the held-out windows of the head's
  validation and of the alignment ablation. :func:`token_windows` is its first ``limit``.
- :func:`make_windows` is the overlapping sliding-window scheme of ``gradfree eval``'s perplexity
  (Hugging Face's "Perplexity of fixed-length models"): windows of ``max_length`` tokens whose
  starts advance by ``stride``, each scoring only the tokens not scored before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from gradfree.base.errors import GradfreeError
from gradfree.base.io import sha256_text


def document_text(d: Any) -> str:
    """The text of a document: a string, or an object with ``.text``."""
    return d if isinstance(d, str) else str(d.text)


def document_texts(documents: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(ids, texts) of ``documents``; a string's id is its hash. Ids must be unique."""
    ids, texts = [], []
    for d in documents:
        text = document_text(d)
        ids.append(sha256_text(text)[:16] if isinstance(d, str) else str(d.id))
        texts.append(text)
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise GradfreeError(f"Document '{i}' appears twice; document ids must be unique.")
        seen.add(i)
    return ids, texts


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one document, as every capture and every scorer tokenizes it."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
    return list(enc["input_ids"])


def iter_windows(
    tokenizer: Any,
    documents: Sequence[Any],
    max_length: int,
    add_special_tokens: bool = True,
    *,
    first_only: bool = False,
) -> Iterator[tuple[int, list[int]]]:
    """(document index, token ids) of every window in corpus order: each document tokenized as
    a capture does and cut into consecutive windows of at most ``max_length`` tokens (with
    ``first_only``, only the first window of each document)."""
    for i, text in enumerate(document_texts(documents)[1]):
        ids = encode(tokenizer, text, add_special_tokens)
        for start in range(0, len(ids), max_length):
            yield i, ids[start : start + max_length]
            if first_only:
                break


def token_windows(
    tokenizer: Any,
    documents: Sequence[Any],
    max_length: int,
    limit: int,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """The first ``limit`` capture windows in corpus order (:func:`iter_windows`)."""
    windows = iter_windows(tokenizer, documents, max_length, add_special_tokens)
    return [w for _, w in itertools.islice(windows, limit)]


def check_window_settings(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise GradfreeError("--max-length must be at least 2 tokens.")
    if not 1 <= stride <= max_length:
        raise GradfreeError("--stride must be between 1 and --max-length.")


def make_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (begin, end, first_target) over a document of ``n_tokens`` tokens.

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


def pad_id(tokenizer: Any, model: Any) -> int:
    """The id that pads a batch: the tokenizer's pad or end-of-text id, else the model's."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.eos_token_id):
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    return 0
