"""Task vectors on tiny models with synthetic PEFT adapters: expansion equals peft's own merge,
masks keep exactly k entries and equal the dense top-k, compression is exact on the kept entries,
merges equal base + Σ cᵢ τᵢ, planted merges are unmerged exactly, and every error path."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gradfree.base.errors import GradfreeError
from gradfree.taskvec.compress import compress, is_compressed, load_compressed
from gradfree.taskvec.lora import read_adapter, scaling_for
from gradfree.taskvec.mask import build_mask, load_mask
from gradfree.taskvec.merge import merge_task_vectors
from gradfree.taskvec.unmerge import trim_ranks, trimmed, unmerge
from gradfree.taskvec.vector import open_base, open_task_vector
from gradfree.testing.lora import make_lora
from gradfree.testing.tiny import save_tiny

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("taskvec")
    base = save_tiny(root / "base", "llama", seed=0)
    for i in range(5):
        make_lora(base, root / f"task{i}", seed=10 + i, rank=2 + i % 3)
    make_lora(base, root / "rslora", seed=3, rank=4, use_rslora=True)
    make_lora(
        base,
        root / "patterns",
        seed=4,
        rank=4,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    make_lora(base, root / "attn_only", seed=5, targets=("q_proj", "v_proj"))
    save_tiny(root / "wide", "llama", seed=1, hidden_size=48, intermediate_size=80)
    make_lora(root / "wide", root / "wide_lora", seed=6)
    save_tiny(root / "qwen", "qwen2", seed=2)
    make_lora(root / "qwen", root / "qwen_lora", seed=7)
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    return PeftModel.from_pretrained(m, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("name", ["task0", "task1", "rslora", "patterns", "attn_only"])
def test_expansion_equals_peft_merge_and_unload(work: Path, name: str) -> None:
    base = _weights(work / "base")
    merged = _peft_merged(work / "base", work / name)
    adapter = read_adapter(work / name)
    assert adapter.modules
    for tensor, module in adapter.modules.items():
        ours = base[tensor].double() + module.delta()
        assert torch.allclose(ours, merged[tensor], atol=1e-12, rtol=0), tensor
    untouched = [n for n in base if n not in adapter.modules]
    for n in untouched:  # peft changes nothing else
        assert torch.equal(base[n].double(), merged[n].to(torch.float64))


def test_rank_and_alpha_patterns_follow_peft(work: Path) -> None:
    cfg = read_adapter(work / "patterns").config
    r, s = scaling_for(cfg, "model.layers.0.self_attn.q_proj")
    assert (r, s) == (2, cfg["lora_alpha"] / 2)
    r, s = scaling_for(cfg, "model.layers.1.mlp.down_proj")
    assert (r, s) == (4, 3.0 / 4)
    rs = read_adapter(work / "rslora")
    m = next(iter(rs.modules.values()))
    assert m.scaling == pytest.approx(rs.config["lora_alpha"] / 4**0.5)


def test_fan_in_fan_out_transposes(tmp_path: Path) -> None:
    a, b = torch.randn(3, 5), torch.randn(7, 3)
    key = "base_model.model.h.0.attn.c_attn"
    save_file(
        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b},
        str(tmp_path / "adapter_model.safetensors"),
    )
    cfg = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "fan_in_fan_out": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    m = read_adapter(tmp_path).modules["h.0.attn.c_attn.weight"]
    assert m.shape == (5, 7)
    assert torch.allclose(m.delta(), (2.0 * (b.double() @ a.double())).T)


def test_adapter_errors(work: Path, tmp_path: Path) -> None:
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        with pytest.raises(GradfreeError, match="another size"):
            open_task_vector(str(work / "wide_lora"), b, st)
        with pytest.raises(GradfreeError, match="is a 'qwen2' model"):
            open_task_vector(str(work / "qwen"), b, st)
    # an adapter whose modules the base lacks: rename its keys to another architecture's
    bad = tmp_path / "gpt2ish"
    bad.mkdir()
    t = load_file(str(work / "task0" / "adapter_model.safetensors"))
    save_file(
        {k.replace("self_attn", "attn"): v for k, v in t.items()},
        str(bad / "adapter_model.safetensors"),
    )
    (bad / "adapter_config.json").write_text((work / "task0" / "adapter_config.json").read_text())
    with (
        open_base(str(work / "base")) as b,
        contextlib.ExitStack() as st,
        pytest.raises(GradfreeError, match="another architecture"),
    ):
        open_task_vector(str(bad), b, st)
    cases = [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"modules_to_save": ["lm_head"]}, "full copies"),
        ({"bias": "all"}, "trains biases"),
    ]
    for i, (change, match) in enumerate(cases):
        d = tmp_path / f"cfg{i}"
        d.mkdir()
        cfg = json.loads((work / "task0" / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        (d / "adapter_model.safetensors").write_bytes(
            (work / "task0" / "adapter_model.safetensors").read_bytes()
        )
        with pytest.raises(GradfreeError, match=match):
            read_adapter(d)
    with pytest.raises(GradfreeError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GradfreeError, match=r"no adapter_config\.json"):
        read_adapter(empty)


def _dense_aggregate(
    work: Path, tasks: list[str], names: list[str], how: str
) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        ds = []
        for t in tasks:
            a = read_adapter(work / t)
            ds.append(a.modules[n].delta().flatten() if n in a.modules else None)
        ds = [d for d in ds if d is not None]
        stacked = torch.stack(ds)
        out[n] = {
            "max": stacked.abs().amax(0),
            "mean": stacked.abs().mean(0),
            "sum": stacked.sum(0).abs(),
        }[how]
    return out


@pytest.mark.parametrize("how", ["max", "mean", "sum"])
def test_per_module_mask_is_the_dense_top_k(work: Path, how: str) -> None:
    tasks = ["task0", "task1", "task2"]
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        vs = [open_task_vector(str(work / t), b, st) for t in tasks]
        m = build_mask(b, vs, 100, aggregate=how, modules="linears")
    assert len(m.indices) == 14 and m.entries == 14 * (100 // 14)
    dense = _dense_aggregate(work, tasks, m.names, how)
    for n, idx in m.indices.items():
        assert idx.dtype == torch.int32 and torch.equal(idx, torch.sort(idx).values)
        kept = torch.zeros(dense[n].numel(), dtype=torch.bool)
        kept[idx.long()] = True
        assert int(kept.sum()) == 100 // 14  # exactly k per module, no duplicates
        assert dense[n][kept].min() >= dense[n][~kept].max()


def test_global_mask_equals_the_dense_global_top_k(work: Path) -> None:
    tasks = ["task0", "task3", "attn_only"]
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        vs = [open_task_vector(str(work / t), b, st) for t in tasks]
        m = build_mask(b, vs, 777, selection="global", modules="linears")
        names = [n for n in b.kinds if any(v.has(n) for v in vs)]
    dense = _dense_aggregate(work, tasks, names, "max")
    flat = torch.cat([dense[n] for n in names])
    top = set(torch.topk(flat, 777).indices.tolist())
    ours, start = set(), 0
    for n in names:
        if n in m.indices:
            ours |= {start + int(i) for i in m.indices[n]}
        start += dense[n].numel()
    assert m.entries == 777 and ours == top


def test_attention_modules_and_patterns(work: Path) -> None:
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        vs = [open_task_vector(str(work / "task0"), b, st)]
        att = build_mask(b, vs, 80)
        assert {n.split(".")[-2] for n in att.indices} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        mlp = build_mask(b, vs, 60, modules=r"mlp\.(gate|up)_proj")
        assert {n.split(".")[-2] for n in mlp.indices} == {"gate_proj", "up_proj"}
        with pytest.raises(GradfreeError, match="regular expression"):
            build_mask(b, vs, 60, modules="mlp[")
        with pytest.raises(GradfreeError, match="No task vector changes"):
            build_mask(b, vs, 60, modules="embed_tokens")
        with pytest.raises(GradfreeError, match="keeps no entry per module"):
            build_mask(b, vs, 3)
        with pytest.raises(GradfreeError, match="Unknown aggregate"):
            build_mask(b, vs, 80, aggregate="median")


def test_mask_roundtrip_and_tamper(work: Path, tmp_path: Path) -> None:
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        vs = [open_task_vector(str(work / t), b, st) for t in ("task0", "task1")]
        m = build_mask(b, vs, 64)
    m.save(tmp_path / "mask")
    with pytest.raises(GradfreeError, match="already exists"):
        m.save(tmp_path / "mask")
    back = load_mask(tmp_path / "mask")
    assert back.sha256 == m.sha256 and back.names == m.names
    assert all(torch.equal(back.indices[n], m.indices[n]) for n in m.names)
    manifest = json.loads((tmp_path / "mask" / "mask.json").read_text())
    assert manifest["bytes"]["indices"] == 4 * m.entries
    raw = (tmp_path / "mask" / "mask.safetensors").read_bytes()
    (tmp_path / "mask" / "mask.safetensors").write_bytes(raw[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(GradfreeError, match="does not match its manifest"):
        load_mask(tmp_path / "mask")


def test_compress_decompress_is_exact_on_kept_entries(work: Path, tmp_path: Path) -> None:
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        vs = [open_task_vector(str(work / t), b, st) for t in ("task0", "attn_only")]
        m = build_mask(b, vs, 140, modules="linears")
        m.save(tmp_path / "mask")
        m = load_mask(tmp_path / "mask")
        c = compress(vs[1], m, dtype="float64")
        c.save(tmp_path / "c.safetensors")
        assert is_compressed(tmp_path / "c.safetensors")
        back = load_compressed(tmp_path / "c.safetensors")
        for n in m.names:
            dense = back.dense(n, m)
            keep = torch.zeros(dense.numel(), dtype=torch.bool)
            keep[m.indices[n].long()] = True
            if vs[1].has(n):
                assert torch.equal(dense.flatten()[keep], vs[1].delta(n).flatten()[keep])
            else:
                assert not dense.any()  # modules the adapter does not touch are zero
            assert not dense.flatten()[~keep].any()
        other = build_mask(b, vs, 28, modules="linears")
        other.save(tmp_path / "other")
        with pytest.raises(GradfreeError, match="was made with mask"):
            back.flat(load_mask(tmp_path / "other"))


def test_checkpoint_task_vector_is_the_difference(work: Path, tmp_path: Path) -> None:
    base = _weights(work / "base")
    tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    folder = tmp_path / "tuned"
    folder.mkdir()
    save_file(tuned, str(folder / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((work / "base" / f).read_bytes())
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        v = open_task_vector(str(folder), b, st)
        for n in base:
            assert torch.equal(v.delta(n), tuned[n].double() - base[n].double())


def test_task_arithmetic_merge_is_base_plus_weighted_sum(work: Path, tmp_path: Path) -> None:
    tasks = [str(work / t) for t in ("task0", "task1", "attn_only")]
    rec = merge_task_vectors(
        str(work / "base"),
        tasks,
        tmp_path / "m",
        weights=[0.5, 0.25, 1.0],
        scaling=0.8,
        say=lambda s: None,
    )
    assert [t["effective_coefficient"] for t in rec["tasks"]] == [0.4, 0.2, 0.8]
    base, out = _weights(work / "base"), _weights(tmp_path / "m")
    adapters = [read_adapter(t) for t in tasks]
    coefs = [0.4, 0.2, 0.8]
    for n, x in base.items():
        touched = [(c, a) for c, a in zip(coefs, adapters, strict=True) if n in a.modules]
        if not touched:  # a tensor no task changes is the base's, bit for bit
            assert torch.equal(out[n], x)
            continue
        want = x.double() + sum(c * a.modules[n].delta() for c, a in touched)
        assert torch.equal(out[n], want.to(x.dtype)), n
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a plain checkpoint
    with pytest.raises(GradfreeError, match="already exists"):
        merge_task_vectors(str(work / "base"), tasks, tmp_path / "m", say=lambda s: None)
    with pytest.raises(GradfreeError, match="3 task vectors were given but 2 weights"):
        merge_task_vectors(
            str(work / "base"), tasks, tmp_path / "m2", weights=[1, 2], say=lambda s: None
        )
    with pytest.raises(GradfreeError, match="not 'slerp'"):
        merge_task_vectors(
            str(work / "base"), tasks, tmp_path / "m3", method="slerp", say=lambda s: None
        )
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def _unmerge(work: Path, tmp: Path, merged: Path, dictionary: list[str], k: int = 400, **kw):
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        vs = [open_task_vector(str(work / t), b, st) for t in dictionary]
        m = build_mask(b, vs, k, modules="linears")
    m.save(tmp / f"mask{k}")
    return unmerge(
        str(work / "base"),
        str(merged),
        [str(work / t) for t in dictionary],
        tmp / f"mask{k}",
        tmp / f"un-{merged.name}",
        say=lambda s: None,
        **kw,
    )


def test_planted_task_arithmetic_merge_is_recovered_exactly(work: Path, tmp_path: Path) -> None:
    merge_task_vectors(
        str(work / "base"),
        [str(work / "task1"), str(work / "task3")],
        tmp_path / "ta",
        weights=[0.6, 0.3],
        say=lambda s: None,
        dtype="float64",
    )
    rec = _unmerge(work, tmp_path, tmp_path / "ta", ["task0", "task1", "task2", "task3"])
    assert rec["truth"] == {"task1": 0.6, "task3": 0.3}
    for name in ("nnls", "omp", "lasso"):
        r = rec["solvers"][name]
        assert r["f1"] == 1.0 and r["coef_error"]["max_abs"] < 1e-9, name
        assert r["residual"] < 1e-9
    assert rec["solvers"]["ridge"]["f1"] == 1.0
    assert rec["warning"] is None and rec["best_fit"] in ("nnls", "omp", "lasso")
    assert (tmp_path / "un-ta" / "unmerge.json").is_file()
    assert "| nnls |" in (tmp_path / "un-ta" / "report.md").read_text()


def test_planted_ties_merge_is_recovered_by_the_sign_aware_solve(
    work: Path, tmp_path: Path
) -> None:
    merge_task_vectors(
        str(work / "base"),
        [str(work / t) for t in ("task0", "task2", "task4")],
        tmp_path / "ties",
        weights=[1.0, 0.5, 0.5],
        method="ties",
        densities=[0.5, 0.5, 0.5],
        say=lambda s: None,
        dtype="float64",
    )
    rec = _unmerge(
        work, tmp_path, tmp_path / "ties", ["task0", "task1", "task2", "task3", "task4"], k=1400
    )
    r = rec["solvers"]["ties"]
    assert r["density"] == 0.5  # from the merge's record
    assert r["f1"] == 1.0 and r["coef_error"]["max_abs"] < 1e-6, r
    assert r["residual"] < 1e-6
    assert r["residual"] < min(
        rec["solvers"][s]["residual"] for s in ("nnls", "omp", "lasso", "ridge")
    )


def test_ties_trim_matches_the_merge_methods_trim(work: Path) -> None:
    from gradfree.merge.sparse import magnitude_mask

    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        v = open_task_vector(str(work / "task1"), b, st)
        m = build_mask(b, [v], 7000, modules="linears")
        ranks, sizes = trim_ranks(v, m)
        col = compress(v, m, dtype="float64").flat(m)
        ours = trimmed(col[:, None], ranks[:, None], sizes, 0.2)[:, 0]
        theirs = np.concatenate(
            [
                (v.delta(n) * magnitude_mask(v.delta(n), 0.2))
                .flatten()[m.indices[n].long()]
                .numpy()
                for n in m.names
            ]
        )
    assert np.array_equal(ours, theirs) and (ours == 0).any() and (ours != 0).any()


def test_out_of_dictionary_task_shows_as_residual(work: Path, tmp_path: Path) -> None:
    merge_task_vectors(
        str(work / "base"),
        [str(work / t) for t in ("task0", "task1", "task4")],
        tmp_path / "ood",
        weights=[0.5, 0.5, 0.5],
        say=lambda s: None,
    )
    rec = _unmerge(work, tmp_path, tmp_path / "ood", ["task0", "task1", "task2", "task3"])
    assert rec["merged_tasks_not_in_dictionary"] == ["task4"]
    assert rec["warning"] is not None and "missing from the dictionary" in rec["warning"]
    for name in ("nnls", "omp"):
        r = rec["solvers"][name]
        assert r["largest_absent_weight"] <= 0.05, (name, r["weights"])
        assert r["residual"] > 0.1


def test_unmerge_errors(work: Path, tmp_path: Path) -> None:
    with open_base(str(work / "base")) as b, contextlib.ExitStack() as st:
        m = build_mask(b, [open_task_vector(str(work / "task0"), b, st)], 100)
    m.save(tmp_path / "mask")
    args = (str(work / "base"), str(work / "task1"), [str(work / "task0")], tmp_path / "mask")
    with pytest.raises(GradfreeError, match="Unknown solver"):
        unmerge(*args, tmp_path / "u1", solvers=["magic"], say=lambda s: None)
    with pytest.raises(GradfreeError, match="at least one"):
        unmerge(args[0], args[1], [], args[3], tmp_path / "u2", say=lambda s: None)
    with pytest.raises(GradfreeError, match="density"):
        unmerge(*args, tmp_path / "u3", density=1.5, say=lambda s: None)
    with pytest.raises(GradfreeError, match="was made for another model"):
        unmerge(
            str(work / "wide"),
            str(work / "wide_lora"),
            [str(work / "wide_lora")],
            tmp_path / "mask",
            tmp_path / "u4",
            say=lambda s: None,
        )
    assert not any((tmp_path / f"u{i}").exists() for i in range(1, 5))
