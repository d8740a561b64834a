"""Capture folders: manifest, lazy loading and corruption checks, merging, resuming, dumps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Capture, Subject, combine_captures, load_capture, run_capture
from gradfree.capture.dumps import doc_key, uniform
from gradfree.testing.tiny import tiny_model, tiny_tokenizer
from test_capture import Doc, docs, window_acts

CFG: dict[str, Any] = {
    "sites": "resid_pre,attn_in,mlp_hidden,k_rope,final.normed",
    "max_length": 16,
    "batch_size": 2,
    "checkpoint_every": 2,
    "dump_sites": "resid_pre,final.normed",
    "dump_rate": 0.3,
}


@pytest.fixture(scope="module")
def pair() -> dict[str, Subject]:
    tok = tiny_tokenizer()
    return {
        "teacher": Subject(tiny_model("qwen3", dtype=torch.float64, num_hidden_layers=3), tok),
        "student": Subject(tiny_model("qwen2", seed=1, dtype=torch.float64, hidden_size=48), tok),
    }


def _run(subjects: Any, documents: list[Doc], out: Path, **kw: Any) -> Capture:
    cfg = {**CFG, **kw.pop("cfg", {})}
    return run_capture(subjects, documents, out, cfg, progress=False, **kw)


def _close(x: torch.Tensor, y: torch.Tensor, rtol: float, msg: str) -> None:
    """Equal up to ``rtol`` relative to the tensor's scale (sums cancel, so not per element)."""
    atol = rtol * float(y.abs().max()) if y.numel() else 0.0
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=msg)


def _all_equal(a: Capture, b: Capture, rtol: float = 0.0) -> None:
    """Every statistic, cross statistic and dump of ``a`` equals ``b`` (exactly when rtol=0)."""
    assert a.roles == b.roles and a.cross_pairs() == b.cross_pairs()
    for role in a.roles:
        assert a.keys(role) == b.keys(role)
        for key in a.keys(role):
            for part in ("head", "body"):
                ta = a.stats(role, key, part).to_tensors()
                tb = b.stats(role, key, part).to_tensors()
                for f in ta:
                    _close(ta[f], tb[f], rtol, f"{key} {f}")
        for key in a.dump_keys(role):
            da, db = a.dumps(role, key), b.dumps(role, key)
            for f in ("x", "doc", "pos"):
                assert torch.equal(da[f], db[f]), f"dump {role} {key} {f}"
    for tk, sk in a.cross_pairs():
        ta, tb = a.cross(tk, sk).to_tensors(), b.cross(tk, sk).to_tensors()
        for f in ta:
            _close(ta[f], tb[f], rtol, f"{tk}~{sk} {f}")


def test_layout_manifest_and_lazy_reader(pair: dict[str, Subject], tmp_path: Path) -> None:
    corpus = docs(5)
    cap = _run(pair, corpus, tmp_path / "cap", corpus={"name": "toy", "sha256": "abc"})
    m = cap.manifest
    assert m["format"] == "gradfree.capture/1" and len(m["run_id"]) == 32
    assert set(m["versions"]) >= {"gradfree", "torch", "transformers"}
    assert m["corpus"] == {"name": "toy", "sha256": "abc"}
    assert m["layer_map"] == [0, 2] and m["dtypes"]["stats"] == "float64"
    assert m["roles"]["teacher"]["dtype"] == "float64" and m["roles"]["student"]["config"]
    assert m["roles"]["student"]["fingerprint"]["tokenizer_sha256"]
    assert [d["id"] for d in cap.documents()] == [d.id for d in corpus]
    assert json.loads((cap.path / "config.json").read_text())["max_length"] == 16
    files = {p.relative_to(cap.path).as_posix() for p in cap.path.rglob("*.safetensors")}
    assert files == set(m["shards"])
    assert "teacher/layer_002.safetensors" in files and "cross/final.safetensors" in files
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(GradfreeError, match=r"has no statistics for student blocks\.0\.v"):
        cap.stats("student", "blocks.0.v")
    with pytest.raises(GradfreeError, match="no role 'model'"):
        cap.keys("model")


def test_corrupted_shard_is_named(pair: dict[str, Subject], tmp_path: Path) -> None:
    cap = _run(pair, docs(3), tmp_path / "cap")
    shard = cap.path / "teacher" / "layer_001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    msg = r"Shard teacher/layer_001.safetensors of capture .* is corrupted \(sha256 mismatch\)"
    with pytest.raises(GradfreeError, match=msg):
        load_capture(cap.path)


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    subject = Subject(tiny_model("llama"), tiny_tokenizer())
    first = _run(subject, docs(2), tmp_path / "c", cfg={"dump_sites": []})
    with pytest.raises(GradfreeError, match="already exists; choose another path or pass"):
        _run(subject, docs(3), tmp_path / "c", cfg={"dump_sites": []})
    second = _run(subject, docs(3), tmp_path / "c", cfg={"dump_sites": []}, overwrite=True)
    assert second.manifest["run_id"] != first.manifest["run_id"]
    assert second.manifest["documents"]["count"] == 3


def test_merge_equals_capture_of_the_whole(pair: dict[str, Subject], tmp_path: Path) -> None:
    corpus = docs(8)
    # Split at a batch boundary so both sides see the same padded batches as the whole run.
    cut = next(i for i in range(1, 8) if _windows(corpus[:i]) % CFG["batch_size"] == 0)
    whole = _run(pair, corpus, tmp_path / "whole", cfg={"dump_max": 40})
    a = _run(pair, corpus[:cut], tmp_path / "a", cfg={"dump_max": 40})
    b = _run(pair, corpus[cut:], tmp_path / "b", cfg={"dump_max": 40})
    merged = combine_captures([a, b.path], tmp_path / "ab")
    _all_equal(merged, whole, rtol=1e-12)
    assert merged.tokens("student") == whole.tokens("student")
    assert merged.manifest["run_hash"] == whole.manifest["run_hash"]
    assert merged.manifest["merged_from"] == [a.manifest["run_id"], b.manifest["run_id"]]
    assert merged.dumps("teacher", "final.normed")["x"].shape[0] == 40  # dump_max holds

    with pytest.raises(GradfreeError, match="share document 'd0'; merging needs disjoint"):
        combine_captures([a, whole], tmp_path / "bad")
    other = _run(pair, corpus[cut:], tmp_path / "o", cfg={"dump_max": 40, "seed": 1})
    with pytest.raises(GradfreeError, match="differ in the setting 'seed'; only captures of"):
        combine_captures([a, other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _windows(corpus: list[Doc]) -> int:
    tok = tiny_tokenizer()
    return sum(-(-len(tok(d.text)["input_ids"]) // CFG["max_length"]) for d in corpus)


def test_resume_after_interrupt_is_identical(pair: dict[str, Subject], tmp_path: Path) -> None:
    corpus = docs(8)
    ref = _run(pair, corpus, tmp_path / "ref")
    calls: list[int] = []

    def interrupt(batch: int) -> None:
        calls.append(batch)
        if batch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pair, corpus, tmp_path / "cap", on_batch=interrupt)
    partial = tmp_path / "cap.partial"
    assert json.loads((partial / "progress.json").read_text())["batches_done"] == 4
    assert not (tmp_path / "cap").exists()
    with pytest.raises(GradfreeError, match="interrupted capture with other models, documents"):
        _run(pair, corpus[:-1], tmp_path / "cap")
    calls.clear()
    resumed = _run(pair, corpus, tmp_path / "cap", on_batch=calls.append)
    assert calls[0] == 4  # batches 0-3 came from the checkpoint
    _all_equal(resumed, ref)
    assert resumed.tokens("teacher") == ref.tokens("teacher")
    assert not partial.exists()


def test_dumps_are_seeded_batching_independent_and_exact(tmp_path: Path) -> None:
    model = tiny_model("qwen3", dtype=torch.float64)
    subject = Subject(model, tiny_tokenizer())
    corpus = docs(6)
    cfg = {"dump_max": 10_000, "exclude_first": 1}
    a = _run(subject, corpus, tmp_path / "a", cfg={**cfg, "batch_size": 1})
    b = _run(subject, corpus, tmp_path / "b", cfg={**cfg, "batch_size": 3, "max_length": 10})
    da, db = a.dumps("model", "blocks.1.resid_pre"), b.dumps("model", "blocks.1.resid_pre")
    # Same tokens are chosen whatever the batching: (doc, pos) pairs with u(seed, id, pos) < rate.
    tok = tiny_tokenizer()
    expected = []
    for i, d in enumerate(corpus):
        n = len(tok(d.text)["input_ids"])
        u = uniform(np.full(n, doc_key(0, d.id), dtype=np.uint64), np.arange(n))
        expected += [(i, p) for p in range(n) if u[p] < CFG["dump_rate"] and p % 16 >= 1]
    assert list(zip(da["doc"].tolist(), da["pos"].tolist(), strict=True)) == expected
    assert 0.15 < len(expected) / a.tokens("model") < 0.45
    # Rows are the activations themselves (float32 copies).
    ids0 = tok(corpus[3].text)["input_ids"][:16]
    ref = window_acts(model, ids0)["blocks.1.resid_pre"]
    rows = [r for r, (d, p) in enumerate(expected) if d == 3 and p < 16]
    want = ref[[expected[r][1] for r in rows]].float()
    torch.testing.assert_close(da["x"][rows], want)
    assert a.dumps("model", "final.normed")["x"].shape == (len(expected), 64)
    # exclude_first applies per window: b's windows of 10 drop positions 0, 10, 20...
    assert all(p % 10 >= 1 for p in db["pos"].tolist())
    capped = _run(subject, corpus, tmp_path / "c", cfg={"dump_max": 7})
    assert capped.dumps("model", "blocks.0.resid_pre")["x"].shape[0] == 7


def test_merge_refuses_other_models(tmp_path: Path) -> None:
    tok, cfg = tiny_tokenizer(), {"dump_sites": []}
    a = _run(Subject(tiny_model("llama"), tok), docs(2, "a"), tmp_path / "a", cfg=cfg)
    b = _run(Subject(tiny_model("llama", seed=5), tok), docs(2, "b"), tmp_path / "b", cfg=cfg)
    with pytest.raises(GradfreeError, match=r"differ in the model \(fingerprint\); only captures"):
        combine_captures([a, b], tmp_path / "ab")
