"""Concept directions: extraction equals a direct float64 computation, early stopping changes
nothing, the store round-trips and refuses tampering or another model, and bad input is one
sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.directions.concepts import TEMPLATES, split_concepts, word_list
from gradfree.directions.extract import extract_directions
from gradfree.directions.store import Directions, check_model, load_directions
from gradfree.models.load import LoadedModel, weights_digest
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

# Lengths differ (é is two byte-level tokens), so batches pad and spans differ.
CONCEPTS = ["cat", "dog", "café", "harbour", "x", "blue sky", "zebra"]
# The last template has no prefix, so it runs uncached next to the cached ones.
TEMPS = ["The word {concept}", "Topic: {concept} and more", "{concept} is"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model64():
    return tiny_model("qwen2", num_hidden_layers=3, dtype=torch.float64)


def reference(model, tok, concepts, templates, layers):
    """Unbatched full forwards with output_hidden_states, tokens located by byte arithmetic:
    {(layer, pooling): (directions, global mean)} in float64."""
    acc: dict = {(L, p): [] for L in layers for p in ("mean", "last")}
    for c in concepts:
        per_t: dict = {k: [] for k in acc}
        for t in templates:
            prefix, suffix = t.split("{concept}")
            ids = tok(prefix + c + suffix, add_special_tokens=True)["input_ids"]
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            # The tiny tokenizer has one token per UTF-8 byte and no specials.
            a = len(prefix.encode())
            b = a + len(c.encode())
            for L in layers:
                h = out.hidden_states[L + 1][0].to(torch.float64).numpy()
                per_t[(L, "mean")].append(h[a:b].mean(0))
                per_t[(L, "last")].append(h[b - 1])
        for k in acc:
            acc[k].append(np.mean(per_t[k], axis=0))
    out = {}
    for k, rows in acc.items():
        m = np.asarray(rows)
        out[k] = (m - m.mean(0), m.mean(0))
    return out


@pytest.fixture(scope="module")
def ref64(model64, tok):
    with torch.no_grad():
        return reference(model64, tok, CONCEPTS, TEMPS, [0, 1])


def one_sentence(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".") and len(msg) < 200, msg
    return msg


# extraction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_directions_equal_direct_float64_computation(model64, tok, ref64, prefix_cache):
    with torch.no_grad():
        d = extract_directions(
            model64,
            tok,
            CONCEPTS,
            layers=[0, 1],
            templates=TEMPS,
            batch_size=3,
            prefix_cache=prefix_cache,
        )
        for layer in (0, 1):
            for pooling in ("mean", "last"):
                ref, ref_mean = ref64[(layer, pooling)]
                got = d.get(layer, pooling)
                assert got.dtype == np.float32 and got.shape == ref.shape
                mean = d.global_mean[d.key(layer, pooling)]
                np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(got, ref.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert d.layers == [0, 1] and d.poolings == ["mean", "last"] and d.concepts == CONCEPTS
    # Two of the three templates have a prefix, served from the cache when it is on.
    cached = 2 * len(CONCEPTS) if prefix_cache else 0
    assert d.source["timings"]["cached_sequences"] == cached


def test_mean_and_last_differ_for_multitoken_concepts(model64, tok):
    d = extract_directions(model64, tok, CONCEPTS, layers=1, templates=TEMPS)
    assert not np.allclose(d.get(1, "mean"), d.get(1, "last"))
    np.testing.assert_allclose(d.get(1, "mean").mean(0), 0.0, atol=1e-5)  # centred


def test_fewer_blocks_give_identical_vectors_and_later_blocks_never_run(model64, tok):
    calls = {"block1": 0, "block2": 0, "norm": 0}
    inner = model64.model
    before = len(inner.layers[0]._forward_hooks)
    handles = [
        inner.layers[1].register_forward_hook(lambda *a: calls.__setitem__("block1", 1)),
        inner.layers[2].register_forward_hook(lambda *a: calls.__setitem__("block2", 1)),
        inner.norm.register_forward_hook(lambda *a: calls.__setitem__("norm", 1)),
    ]
    try:
        short = extract_directions(model64, tok, CONCEPTS, layers=[0], batch_size=4)
        assert calls == {"block1": 0, "block2": 0, "norm": 0}
        deep = extract_directions(model64, tok, CONCEPTS, layers=[0, 2], batch_size=4)
        assert calls == {"block1": 1, "block2": 1, "norm": 0}
    finally:
        for h in handles:
            h.remove()
    for p in ("mean", "last"):
        np.testing.assert_array_equal(short.get(0, p), deep.get(0, p))
    assert short.source["timings"]["blocks_run"] == 1 and deep.source["timings"]["blocks_run"] == 3
    assert len(inner.layers[0]._forward_hooks) == before  # extraction removed its hooks


def test_batching_does_not_change_the_result(model64, tok):
    a = extract_directions(model64, tok, CONCEPTS, layers=[1], batch_size=1)
    b = extract_directions(model64, tok, CONCEPTS, layers=[1], batch_size=64)
    for p in ("mean", "last"):
        np.testing.assert_allclose(a.get(1, p), b.get(1, p), rtol=1e-6, atol=1e-7)


def test_low_precision_model_is_upcast(tok):
    m32 = tiny_model("llama", num_hidden_layers=2)
    ref = extract_directions(m32.to(torch.float64), tok, CONCEPTS, layers=[1])
    bf = extract_directions(
        tiny_model("llama", num_hidden_layers=2, dtype=torch.bfloat16), tok, CONCEPTS, layers=[1]
    )
    assert bf.model["dtype"] == "bfloat16"
    for p in ("mean", "last"):
        x, y = bf.get(1, p), ref.get(1, p)
        assert np.isfinite(x).all()
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() > 0.98, cos


def test_timings_and_identity_are_recorded(model64, tok):
    fp = {"name": "tiny", "model_type": "qwen2", "weights_sha256": {"w.safetensors": "ab"}}
    src = {"package": "wordfreq", "version": "3.1.1", "n_requested": 7}
    d = extract_directions(
        model64, tok, CONCEPTS, layers=[0], fingerprint=fp, spec="tiny-spec", concept_source=src
    )
    t = d.source["timings"]
    assert t["concepts_per_s"] > 0 and t["peak_rss_gib"] > 0
    assert t["sequences"] == len(CONCEPTS) * len(TEMPLATES)
    assert d.source["package"] == "wordfreq" and d.model["spec"] == "tiny-spec"
    assert d.model["weights_sha256"] == weights_digest(fp)
    assert d.model["hidden_size"] == 64 and d.model["num_layers"] == 3


# bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"layers": [-1]}, "does not exist"),
        ({"layers": [3]}, "does not exist"),
        ({"layers": []}, "At least one layer"),
        ({"concepts": []}, "empty"),
        ({"concepts": ["cat", "dog", "cat"]}, "duplicates"),
        ({"concepts": ["cat", ""]}, "tokenizes to nothing"),
        ({"templates": ["no placeholder"]}, "exactly once"),
        ({"poolings": ["max"]}, "Poolings"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_bad_input_is_one_sentence(model64, tok, kwargs, needle):
    args = {"concepts": ["cat", "dog"], "layers": [0]} | kwargs
    concepts = args.pop("concepts")
    with pytest.raises(GradfreeError) as e:
        extract_directions(model64, tok, concepts, **args)
    assert needle in one_sentence(e)


def test_slow_tokenizer_is_refused(model64):
    class Slow:
        is_fast = False
        pad_token_id = 0

    with pytest.raises(GradfreeError) as e:
        extract_directions(model64, Slow(), ["cat"], layers=[0])
    assert "fast tokenizer" in one_sentence(e)


# store --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(model64, tok, tmp_path_factory):
    fp = {"name": "tiny", "model_type": "qwen2", "weights_sha256": {"w.safetensors": "ab"}}
    d = extract_directions(model64, tok, CONCEPTS, layers=[0, 2], templates=TEMPS, fingerprint=fp)
    folder = tmp_path_factory.mktemp("dirs") / "tiny"
    d.save(folder)
    return d, folder, fp


def test_save_load_roundtrip(saved):
    d, folder, _ = saved
    e = load_directions(folder)
    assert (e.concepts, e.templates, e.layers, e.poolings) == (
        d.concepts,
        d.templates,
        d.layers,
        d.poolings,
    )
    assert e.model == d.model and e.source == json.loads(json.dumps(d.source))
    for k in d.vectors:
        np.testing.assert_array_equal(e.vectors[k], d.vectors[k])
        assert e.global_mean[k].dtype == np.float64
        np.testing.assert_array_equal(e.global_mean[k], d.global_mean[k])
    assert e.index("café") == CONCEPTS.index("café")
    with pytest.raises(GradfreeError) as err:
        d.save(folder)
    assert "already exists" in one_sentence(err)
    d.save(folder, overwrite=True)


def test_tampering_is_detected(saved, tmp_path):
    import shutil

    _, folder, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    blob = bytearray((bad / "directions.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (bad / "directions.safetensors").write_bytes(bytes(blob))
    with pytest.raises(GradfreeError) as e:
        load_directions(bad)
    assert "sha256" in one_sentence(e)

    shutil.rmtree(bad)
    shutil.copytree(folder, bad)
    man = json.loads((bad / "directions.json").read_text())
    man["concepts"][0] = "lion"
    (bad / "directions.json").write_text(json.dumps(man))
    with pytest.raises(GradfreeError) as e:
        load_directions(bad)
    assert "concept list" in one_sentence(e)

    man["format"] = "something/else"
    (bad / "directions.json").write_text(json.dumps(man))
    with pytest.raises(GradfreeError) as e:
        load_directions(bad)
    one_sentence(e)
    with pytest.raises(GradfreeError) as e:
        load_directions(tmp_path / "missing")
    one_sentence(e)


def test_check_model(saved, model64, tok):
    d, _, fp = saved
    check_model(d, model64)
    check_model(d, fp)
    check_model(d, LoadedModel(model=model64, tokenizer=tok, name="t", source="t", fingerprint=fp))
    other = dict(fp, weights_sha256={"w.safetensors": "cd"})
    for target in (other, LoadedModel(model64, tok, "t", "t", other)):
        with pytest.raises(GradfreeError) as e:
            check_model(d, target)
        assert "weights" in one_sentence(e)
    with pytest.raises(GradfreeError) as e:
        check_model(d, tiny_model("qwen2", num_hidden_layers=3, hidden_size=32, head_dim=8))
    assert "wide" in one_sentence(e)
    with pytest.raises(GradfreeError) as e:
        check_model(d, tiny_model("qwen2", num_hidden_layers=2))
    assert "layer" in one_sentence(e)
    with pytest.raises(GradfreeError) as e:
        check_model(d, tiny_model("llama", num_hidden_layers=3))
    one_sentence(e)


def test_inconsistent_directions_cannot_be_saved(tmp_path):
    d = Directions(
        ["a", "b"],
        ["{concept}"],
        [0],
        ["mean"],
        vectors={"layer0.mean": np.zeros((3, 4), np.float32)},
        global_mean={"layer0.mean": np.zeros(4)},
    )
    with pytest.raises(GradfreeError) as e:
        d.save(tmp_path / "x")
    one_sentence(e)
    assert not (tmp_path / "x").exists()


# concepts -----------------------------------------------------------------------------------------
def test_word_lists_are_deterministic_and_filtered():
    pytest.importorskip("wordfreq", reason="wordfreq (the default word list) is not installed")
    w50, rec = word_list(50_000)
    w20, _ = word_list(20_000)
    assert len(w50) == 50_000 == len(set(w50)) and w20 == w50[:20_000]
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 3 for w in w50)
    assert rec["package"] == "wordfreq" and rec["version"] and rec["n_requested"] == 50_000
    assert word_list(100, min_len=5)[0] == [w for w in w50 if len(w) >= 5][:100]


def test_english_words_list_is_seeded():
    pytest.importorskip("english_words", reason="english-words is not installed")
    a, rec = word_list(500, source="english-words", seed=1)
    assert a == word_list(500, source="english-words", seed=1)[0]
    assert a != word_list(500, source="english-words", seed=2)[0]
    assert len(set(a)) == 500 and rec["package"] == "english-words"
    with pytest.raises(GradfreeError) as e:
        word_list(10, source="nltk")
    one_sentence(e)


def test_split_is_disjoint_and_complete():
    concepts = [f"w{i}" for i in range(101)]
    s = split_concepts(concepts, seed=3)
    sets = [set(s[k]) for k in ("train", "val", "test")]
    assert sum(map(len, sets)) == 101 and set().union(*sets) == set(range(101))
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert s == split_concepts(concepts, seed=3) and s != split_concepts(concepts, seed=4)
    with pytest.raises(GradfreeError) as e:
        split_concepts(["a", "a", "b"])
    one_sentence(e)
