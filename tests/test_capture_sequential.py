"""Sequential (layer-by-layer) capture equals the whole-model capture, with one block in memory.

Tiny checkpoints are written with ``save_tiny`` and captured twice: whole (``load_model``) and
sequentially from a meta-device skeleton (``load_lazy``). Every statistic of every role, part
and cross pair must agree to 1e-10 relative (float64 statistics), dumps and token counts exactly,
and the run hash must be the same (so captures of either kind resume and combine alike).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Capture, load_capture, run_capture, run_sequential
from gradfree.models import load_model
from gradfree.models.lazy import load_lazy
from gradfree.testing.tiny import HARBOUR_DOCS, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_SITES = (
    "resid_pre,attn_in,mlp_in,attn_heads,mlp_hidden,q_pre,q_rope,k_pre,k_rope,v,"
    "final.resid,final.normed"
)
CFG: dict[str, Any] = {
    "sites": ALL_SITES,
    "max_length": 24,  # several windows per document, a ragged last batch
    "batch_size": 3,
    "split_first": 2,
    "dump_sites": "resid_pre,q_rope,final.normed",
    "dump_rate": 0.3,
    "checkpoint_every": 10_000,  # one dump shard per site in both kinds of capture
}
MODELS = {
    "qwen2-untied": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "num_hidden_layers": 3}),
    "qwen3-tied": ("qwen3", {"num_hidden_layers": 3}),
    "qwen3-untied": ("qwen3", {"tie_word_embeddings": False}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq")
    out = {name: save_tiny(root / name, fam, **kw) for name, (fam, kw) in MODELS.items()}
    # Pairs with GQA (12 and 14 query heads over 2 KV heads), head_dim halved in the student.
    out["t2"] = save_tiny(root / "t2", "qwen2.5-1.5b-like", num_hidden_layers=4)
    out["s2"] = save_tiny(root / "s2", "qwen2.5-0.5b-like", seed=1, num_hidden_layers=3)
    out["t3"] = save_tiny(root / "t3", "qwen3", num_hidden_layers=4)
    out["s3"] = save_tiny(
        root / "s3", "qwen3", seed=1, hidden_size=48, num_hidden_layers=3, tie_word_embeddings=False
    )
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max(initial=0))


def _assert_same(whole: Capture, seq: Capture) -> None:
    assert seq.manifest["run_hash"] == whole.manifest["run_hash"]
    assert seq.roles == whole.roles
    worst = 0.0
    for role in whole.roles:
        assert seq.keys(role) == whole.keys(role)
        for part in ("all", "head", "body"):
            assert seq.tokens(role, part) == whole.tokens(role, part)
        for key in whole.keys(role):
            for part in ("head", "body"):
                a, b = whole.stats(role, key, part), seq.stats(role, key, part)
                assert a.count == b.count > 0
                for f in ("sum", "m2", "m3", "m4", "absmax"):
                    worst = max(worst, _rel(getattr(a, f), getattr(b, f)))
        assert seq.dump_keys(role) == whole.dump_keys(role)
        for key in whole.dump_keys(role):
            da, db = whole.dumps(role, key), seq.dumps(role, key)
            assert da["x"].shape[0] > 0
            for f in da:
                assert torch.equal(da[f], db[f]), (role, key, f)
    assert seq.cross_pairs() == whole.cross_pairs()
    for tk, sk in whole.cross_pairs():
        for part in ("head", "body"):
            a, b = whole.cross(tk, sk, part), seq.cross(tk, sk, part)
            assert a.count == b.count > 0
            for f in ("sum_a", "sum_b", "m_ab"):
                worst = max(worst, _rel(getattr(a, f), getattr(b, f)))
    assert worst <= 1e-10, worst


@pytest.mark.parametrize("name", list(MODELS))
def test_single_capture_matches_whole(folders: dict[str, Path], tmp_path: Path, name: str) -> None:
    whole = run_capture(load_model(str(folders[name])), HARBOUR_DOCS, tmp_path / "w", CFG)
    lazy = load_lazy(str(folders[name]))
    assert lazy.fingerprint == load_model(str(folders[name])).fingerprint
    seq = run_capture(lazy, HARBOUR_DOCS, tmp_path / "s", CFG, progress=False)
    _assert_same(whole, seq)
    assert not (tmp_path / "s.partial").exists()
    assert all(p.device.type == "meta" for p in lazy.model.parameters())


@pytest.mark.parametrize("pair", [("t2", "s2"), ("t3", "s3")])
@pytest.mark.parametrize("layers", [None, "0,2"])
def test_paired_capture_matches_whole(
    folders: dict[str, Path], tmp_path: Path, pair: tuple[str, str], layers: str | None
) -> None:
    cfg = {**CFG, "layers": layers, "cross_sites": "resid_pre,attn_in,v,final.normed"}
    if layers is not None:  # block sites only: the blocks after the last asked for never run
        cfg["sites"] = "resid_pre,attn_in,v,q_rope"
        cfg["cross_sites"] = "resid_pre,v"
        cfg["dump_sites"] = "resid_pre"
    t, s = (str(folders[p]) for p in pair)
    whole = run_capture(
        {"teacher": load_model(t), "student": load_model(s)}, HARBOUR_DOCS, tmp_path / "w", cfg
    )
    subjects = {"teacher": load_lazy(t), "student": load_lazy(s)}
    seq = run_capture(subjects, HARBOUR_DOCS, tmp_path / "s", cfg, progress=False)
    assert whole.cross_pairs()
    _assert_same(whole, seq)


def test_in_memory_models_run_block_by_block(folders: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_model(str(folders["qwen3-tied"]))
    whole = run_capture(loaded, HARBOUR_DOCS, tmp_path / "w", CFG)
    seq = run_capture(loaded, HARBOUR_DOCS, tmp_path / "s", CFG, sequential=True)
    _assert_same(whole, seq)


def test_bfloat16_matches_whole(folders: dict[str, Path], tmp_path: Path) -> None:
    spec = str(folders["qwen2-untied"])
    cfg = {**CFG, "sites": "resid_pre,q_rope,mlp_hidden,final.normed"}
    whole = run_capture(load_model(spec, dtype="bfloat16"), HARBOUR_DOCS, tmp_path / "w", cfg)
    seq = run_capture(load_lazy(spec, dtype="bfloat16"), HARBOUR_DOCS, tmp_path / "s", cfg)
    _assert_same(whole, seq)


def test_one_block_of_weights_in_memory(folders: dict[str, Path], tmp_path: Path) -> None:
    t, s = load_lazy(str(folders["t2"])), load_lazy(str(folders["s2"]))
    seen: list[tuple[str, int]] = []

    def on_block(role: str, i: int, lazy: Any) -> None:
        # Counted in the model, not timed: only block i's parameters are real right now.
        real = lazy.real_parameters()
        block = {n: p for n, p in lazy.modules[f"model.layers.{i}"].named_parameters()}
        assert set(real) == {f"model.layers.{i}.{n}" for n in block}, (role, i, set(real))
        assert lazy.loaded == sum(p.numel() for p in block.values()) > 0
        other = t if lazy is s else s
        assert other.loaded == 0 and not other.real_parameters()
        seen.append((role, i))

    cfg = {"sites": "resid_pre,mlp_hidden,final.normed", "max_length": 24, "batch_size": 3}
    run_sequential(
        {"teacher": t, "student": s}, HARBOUR_DOCS, tmp_path / "c", cfg, on_block=on_block
    )
    assert seen == [("teacher", i) for i in range(4)] + [("student", i) for i in range(3)]
    assert t.loaded == s.loaded == 0
    assert not t.real_parameters() and not s.real_parameters()


def test_whole_and_sequential_work_folders_are_not_mixed(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    spec = str(folders["qwen2-untied"])
    cfg = {**CFG, "checkpoint_every": 1}
    partial = tmp_path / "c.partial"

    def stop_batch(b: int) -> None:
        if b == 1:
            raise RuntimeError("stop")

    def stop(role: str, i: int, _: Any) -> None:
        stop_batch(i)

    with pytest.raises(RuntimeError, match="stop"):
        run_capture(load_model(spec), HARBOUR_DOCS, tmp_path / "c", cfg, on_batch=stop_batch)
    assert (partial / "progress.json").is_file()
    with pytest.raises(GradfreeError, match="without --sequential"):
        run_capture(load_lazy(spec), HARBOUR_DOCS, tmp_path / "c", cfg)
    with pytest.raises(RuntimeError, match="stop"):
        run_sequential(load_lazy(spec), HARBOUR_DOCS, tmp_path / "d", cfg, on_block=stop)
    assert (tmp_path / "d.partial" / "sequential.json").is_file()
    with pytest.raises(GradfreeError, match="with --sequential"):
        run_capture(load_model(spec), HARBOUR_DOCS, tmp_path / "d", cfg)
    # A work folder with no state to resume (interrupted before its first block) starts over.
    shutil.rmtree(partial)
    (partial / "sequential").mkdir(parents=True)
    (partial / "sequential" / "hidden-0.bin").write_bytes(b"left over")
    seq = run_capture(load_lazy(spec), HARBOUR_DOCS, tmp_path / "c", cfg)
    _assert_same(run_capture(load_model(spec), HARBOUR_DOCS, tmp_path / "w", cfg), seq)


@pytest.mark.parametrize("stop_at", [("teacher", 2), ("student", 0), ("student", 2)])
def test_interrupted_sequential_capture_resumes(
    folders: dict[str, Path], tmp_path: Path, stop_at: tuple[str, int]
) -> None:
    t, s = str(folders["t2"]), str(folders["s2"])
    cfg = {**CFG, "cross_sites": "resid_pre,v,final.normed"}

    def stop(role: str, i: int, _: Any) -> None:
        if (role, i) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sequential(
            {"teacher": load_lazy(t), "student": load_lazy(s)},
            HARBOUR_DOCS,
            tmp_path / "s",
            cfg,
            on_block=stop,
        )
    ran: list[tuple[str, int]] = []
    seq = run_sequential(
        {"teacher": load_lazy(t), "student": load_lazy(s)},
        HARBOUR_DOCS,
        tmp_path / "s",
        cfg,
        on_block=lambda role, i, _: ran.append((role, i)),
    )
    assert ran[0] == stop_at  # the interrupted block runs again, the finished ones do not
    assert not (tmp_path / "s.partial").exists()
    whole = run_capture(
        {"teacher": load_model(t), "student": load_model(s)}, HARBOUR_DOCS, tmp_path / "w", cfg
    )
    _assert_same(whole, seq)


def test_gguf_and_missing_tensors_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(GradfreeError, match="safetensors checkpoint folder"):
        load_lazy(str(gguf))
    broken = tmp_path / "broken"
    save_tiny(broken, "qwen2")
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GradfreeError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        run_capture(load_lazy(str(broken)), HARBOUR_DOCS, tmp_path / "c", CFG)


def test_cli_sequential(folders: dict[str, Path], tmp_path: Path, run_cli: Any) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(HARBOUR_DOCS))
    )
    argv = ["capture", "--corpus", str(docs), "--max-length", "24", "--no-progress"]
    argv += ["--teacher", str(folders["t3"]), "--student", str(folders["s3"])]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "s"), "--sequential"])
    assert code == 0, err
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "w")])
    assert code == 0, err
    _assert_same(load_capture(tmp_path / "w"), load_capture(out.strip().splitlines()[-1]))
