"""Concept word lists from installable packages, prompt templates, and the split by concept.

Concepts come from an installed word list, never from the network, so that a list is reproducible
from a package name and version: ``wordfreq`` (English words in frequency order, the default) or
``english-words`` (the ``web2`` set, which has no order, so a seeded shuffle of its sorted words
decides which ``n`` are taken). Filtering is deterministic: ASCII lowercase alphabetic words of at
least ``min_len`` letters, first occurrence kept. With wordfreq the first ``n`` words of a longer
list are the list for ``n`` (20k is a prefix of 50k).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from gradfree.base.errors import GradfreeError

# Every template puts text before the concept: a decoder reads a concept at its own positions,
# which see only what precedes them, and position 0 is the attention sink whose residual stream is
# dominated by massive activations in mid layers (Qwen2.5), so a bare "{concept}" would be a
# poor reading. Text after the concept would never be seen, so templates end at the concept.
TEMPLATES: tuple[str, ...] = (
    "The word {concept}",
    "Topic: {concept}",
    "I keep thinking about {concept}",
)

SOURCES = ("wordfreq", "english-words")

_PACKAGES = {"wordfreq": "wordfreq", "english-words": "english-words"}
_PINS = {"wordfreq": "wordfreq==3.1.1", "english-words": "english-words==2.0.2"}


def _keep(word: str, min_len: int) -> bool:
    return word.isascii() and word.isalpha() and word.islower() and len(word) >= min_len


def _package_version(source: str) -> str:
    try:
        return version(_PACKAGES[source])
    except PackageNotFoundError:
        raise GradfreeError(
            f"The word list '{source}' needs the package {_PACKAGES[source]} "
            f"(pip install {_PINS[source]})."
        ) from None


def word_list(
    n: int, source: str = "wordfreq", min_len: int = 3, seed: int = 0
) -> tuple[list[str], dict[str, Any]]:
    """The first ``n`` concepts of ``source`` after filtering, and a record of how they were made.

    ``seed`` matters only for ``english-words`` (an unordered set); wordfreq's order is its own.
    """
    if source not in SOURCES:
        raise GradfreeError(f"Unknown word list '{source}'; choose one of {', '.join(SOURCES)}.")
    if n < 1:
        raise GradfreeError(f"The number of concepts must be at least 1, not {n}.")
    if min_len < 1:
        raise GradfreeError(f"The minimum word length must be at least 1, not {min_len}.")
    pkg_version = _package_version(source)
    words: list[str] = []
    seen: set[str] = set()
    if source == "wordfreq":
        from wordfreq import iter_wordlist

        candidates: Any = iter_wordlist("en", wordlist="best")
        order = "wordfreq frequency order (iter_wordlist('en', 'best'))"
    else:
        import numpy as np
        from english_words import get_english_words_set

        pool = sorted(get_english_words_set(["web2"], lower=True, alpha=True))
        perm = np.random.default_rng(seed).permutation(len(pool))
        candidates = (pool[i] for i in perm)
        order = f"sorted web2 set, numpy default_rng({seed}) permutation"
    for w in candidates:
        if w in seen or not _keep(w, min_len):
            continue
        seen.add(w)
        words.append(w)
        if len(words) == n:
            break
    if len(words) < n:
        raise GradfreeError(
            f"The word list '{source}' has only {len(words)} words of at least {min_len} letters, "
            f"fewer than the {n} asked for."
        )
    record = {
        "package": _PACKAGES[source],
        "version": pkg_version,
        "n_requested": n,
        "filters": {
            "min_len": min_len,
            "rule": "ascii, lowercase, alphabetic; first occurrence kept",
            "order": order,
            "seed": seed if source == "english-words" else None,
        },
    }
    return words, record


def split_concepts(
    concepts: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[int]]:
    """Indices of ``concepts`` split into disjoint ``train``/``val``/``test`` sets (seeded).

    Concepts must be distinct, so that no concept (not merely no index) is in two splits.
    """
    import numpy as np

    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise GradfreeError(
            f"The split fractions must be three non-negative numbers summing to 1, not {fractions}."
        )
    n = len(concepts)
    if n == 0:
        raise GradfreeError("The concept list is empty.")
    if len(set(concepts)) != n:
        raise GradfreeError("The concept list has duplicates, so a split could share a concept.")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    n_train = n - n_val - n_test
    return {
        "train": sorted(int(i) for i in perm[:n_train]),
        "val": sorted(int(i) for i in perm[n_train : n_train + n_val]),
        "test": sorted(int(i) for i in perm[n_train + n_val :]),
    }
