"""Offline validation of the packaged tour-guide corpus (blurbs, questions, system prompt)."""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from importlib import resources
from typing import Any

import pytest

PACKAGE = "gradfree.data"
CJK_LANGS = frozenset({"zh", "ja", "ko"})
INHABITED = ("Africa", "Asia", "Europe", "North America", "South America", "Oceania")
CONTINENTS = frozenset({*INHABITED, "Antarctica"})
SPLITS = frozenset({"calibration", "heldout"})
BLURB_KEYS = frozenset({"id", "place", "country", "continent", "lang", "split", "text"})
QUESTION_KEYS = frozenset({"id", "question", "answers", "lang", "place_id"})


def _read_text(name: str) -> str:
    return resources.files(PACKAGE).joinpath(name).read_text(encoding="utf-8")


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(_read_text(name).splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{lineno} is not a JSON object"
        rows.append(row)
    return rows


@cache
def blurbs() -> list[dict[str, Any]]:
    return _read_jsonl("tourguide.jsonl")


@cache
def questions() -> list[dict[str, Any]]:
    return _read_jsonl("tourguide_questions.jsonl")


def word_count(lang: str, text: str) -> float:
    """Whitespace words; for CJK scripts (no spaces) characters / 2 stands in for words."""
    if lang in CJK_LANGS:
        return len(text) / 2
    return float(len(text.split()))


def test_blurb_count_and_schema() -> None:
    rows = blurbs()
    assert len(rows) >= 200
    for row in rows:
        assert set(row) == BLURB_KEYS, row.get("id")
        for key in BLURB_KEYS:
            assert isinstance(row[key], str), (row["id"], key)
            assert row[key].strip(), (row["id"], key)
        assert row["id"].startswith("tg-")
        assert row["continent"] in CONTINENTS, row["id"]


def test_ids_and_places_unique() -> None:
    rows = blurbs()
    ids = Counter(r["id"] for r in rows)
    places = Counter(r["place"] for r in rows)
    assert [k for k, n in ids.items() if n > 1] == []
    assert [k for k, n in places.items() if n > 1] == []


def test_blurb_lengths() -> None:
    bad = [
        (r["id"], word_count(r["lang"], r["text"]))
        for r in blurbs()
        if not 60 <= word_count(r["lang"], r["text"]) <= 200
    ]
    assert bad == []


def test_language_mix() -> None:
    rows = blurbs()
    non_english = sum(r["lang"] != "en" for r in rows)
    assert non_english / len(rows) >= 0.20
    assert len({r["lang"] for r in rows}) >= 6


@pytest.mark.parametrize("continent", INHABITED)
def test_continent_coverage(continent: str) -> None:
    assert sum(r["continent"] == continent for r in blurbs()) >= 10


def test_splits() -> None:
    rows = blurbs()
    splits = Counter(r["split"] for r in rows)
    assert set(splits) <= SPLITS
    share = splits["heldout"] / len(rows)
    assert 0.15 <= share <= 0.25, share


def test_questions() -> None:
    rows = questions()
    assert len(rows) >= 40
    assert len({q["id"] for q in rows}) == len(rows)
    blurb_ids = {r["id"] for r in blurbs()}
    for q in rows:
        assert set(q) == QUESTION_KEYS, q.get("id")
        answers = q["answers"]
        assert isinstance(answers, list) and answers, q["id"]
        assert all(isinstance(a, str) and a.strip() for a in answers), q["id"]
        text = q["question"].strip()
        marks = ("?", "？") if q["lang"] in CJK_LANGS else ("?",)
        assert text.endswith(marks), q["id"]
        assert q["place_id"] is None or q["place_id"] in blurb_ids, q["id"]
    assert sum(q["lang"] != "en" for q in rows) >= 6


def test_system_prompt() -> None:
    assert _read_text("tourguide_system_prompt.txt").strip()
