"""Captured statistics against a direct float64 computation on tiny models.

The reference runs every window alone (no padding, batch 1) with ``output_hidden_states`` and
hooks written here against the Hugging Face modules, rebuilds q/k/v/mlp_hidden from the captured
norms with the model's own linears, applies RoPE from the formula (float64 angles), and keeps the
real tokens of each window under the exclude/split rules. The capture runs padded batches of
windows; any masking, windowing, site or pairing mistake changes the sums.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import (
    CaptureConfig,
    Subject,
    hook_count,
    make_config,
    parse_sites,
    run_capture,
    site_hooks,
)
from gradfree.capture.stats import MomentStats
from gradfree.testing.tiny import tiny_model, tiny_tokenizer

ALL_SITES = [
    "resid_pre",
    "attn_in",
    "mlp_in",
    "attn_heads",
    "mlp_hidden",
    "q_pre",
    "q_rope",
    "k_pre",
    "k_rope",
    "v",
    "final.resid",
    "final.normed",
]


@dataclass
class Doc:
    id: str
    text: str


def docs(n: int = 7, prefix: str = "d") -> list[Doc]:
    base = "Gradient-free capture: ünïcode, code `x = y + 1`, and numbers 12345. "
    return [Doc(f"{prefix}{i}", base[: 9 + 11 * i] + str(i) * (i % 3)) for i in range(n)]


def _rope(x: torch.Tensor, inv_freq: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF rotate-half RoPE of (t, heads·head_dim) at positions 0..t-1, angles in float64."""
    t = x.shape[0]
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    h = x.view(t, -1, head_dim)
    half = head_dim // 2
    rot = torch.cat((-h[..., half:], h[..., :half]), -1)
    return (h * cos + rot * sin).reshape(t, -1)


def window_acts(model: Any, ids: list[int]) -> dict[str, torch.Tensor]:
    """Every site of one window, each (t, d), from a batch-1 forward pass."""
    a = get_adapter(model)
    inner, g = model.model, a.geometry
    seen: dict[str, torch.Tensor] = {}
    handles = [inner.norm.register_forward_pre_hook(lambda m, x: seen.update(fr=x[0][0]))]
    for i, layer in enumerate(inner.layers):
        handles += [
            layer.input_layernorm.register_forward_hook(
                lambda m, x, o, i=i: seen.update({f"blocks.{i}.attn_in": o[0]})
            ),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, x, o, i=i: seen.update({f"blocks.{i}.mlp_in": o[0]})
            ),
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, x, i=i: seen.update({f"blocks.{i}.attn_heads": x[0][0]})
            ),
        ]
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    acts = {"final.resid": seen.pop("fr"), "final.normed": out.hidden_states[-1][0]}
    inv_freq = a.rope.inv_freq()
    with torch.no_grad():
        for i, layer in enumerate(inner.layers):
            p, att, mlp = f"blocks.{i}.", layer.self_attn, layer.mlp
            acts[p + "resid_pre"] = out.hidden_states[i][0]
            x, h = seen[p + "attn_in"], seen[p + "mlp_in"]
            acts.update(
                {p + "attn_in": x, p + "mlp_in": h, p + "attn_heads": seen[p + "attn_heads"]}
            )
            acts[p + "mlp_hidden"] = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
            q = att.q_proj(x).view(len(ids), -1, g.head_dim)
            k = att.k_proj(x).view(len(ids), -1, g.head_dim)
            if getattr(att, "q_norm", None) is not None:
                q, k = att.q_norm(q), att.k_norm(k)
            acts[p + "q_pre"], acts[p + "k_pre"] = q.reshape(len(ids), -1), k.reshape(len(ids), -1)
            acts[p + "q_rope"] = _rope(acts[p + "q_pre"], inv_freq, g.head_dim)
            acts[p + "k_rope"] = _rope(acts[p + "k_pre"], inv_freq, g.head_dim)
            acts[p + "v"] = att.v_proj(x)
    return acts


def reference(
    model: Any, texts: list[str], cfg: CaptureConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """key -> part -> X (n, d) of kept real tokens, over every window of every document."""
    tok = tiny_tokenizer()
    rows: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for text in texts:
        ids = tok(text)["input_ids"]
        for start in range(0, len(ids), cfg.max_length):
            w = ids[start : start + cfg.max_length]
            pos = torch.arange(len(w))
            keep = pos >= cfg.exclude_first
            masks = {
                "head": keep & (pos < cfg.split_first),
                "body": keep & (pos >= cfg.split_first),
            }
            for key, x in window_acts(model, w).items():
                for part, m in masks.items():
                    rows[key][part].append(x[m].double())
    out = {k: {p: torch.cat(v) for p, v in parts.items()} for k, parts in rows.items()}
    for parts in out.values():
        parts["all"] = torch.cat([parts["head"], parts["body"]])
    return out


def assert_moments(st: MomentStats, x: torch.Tensor, rtol: float = 1e-9) -> None:
    assert st.count == x.shape[0]
    if x.shape[0] == 0:
        return
    scale = x.abs().max().item()
    m2 = x.T @ x if st.full else (x * x).sum(0)
    for name, got, want, s in [
        ("sum", st.sum, x.sum(0), scale),
        ("m2", st.m2, m2, scale**2),
        ("m3", st.m3, (x**3).sum(0), scale**3),
        ("m4", st.m4, (x**4).sum(0), scale**4),
        ("absmax", st.absmax, x.abs().amax(0), scale),
    ]:
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * s * x.shape[0], msg=name)


def _subject(model: Any) -> Subject:
    return Subject(model, tiny_tokenizer(), name="tiny")


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_statistics_equal_direct_float64(family: str, tmp_path: Path) -> None:
    model = tiny_model(family, dtype=torch.float64, num_hidden_layers=2)
    corpus = docs(6)
    cfg = make_config(sites=ALL_SITES, max_length=24, batch_size=3, exclude_first=1, split_first=3)
    cap = run_capture(_subject(model), corpus, tmp_path / "cap", cfg, progress=False)
    ref = reference(model, [d.text for d in corpus], cfg)
    assert sorted(cap.keys("model")) == sorted(ref)
    for key, parts in ref.items():
        # The model's RoPE uses float32 cos/sin even in a float64 model; the reference does not.
        rtol = 1e-5 if key.endswith("_rope") else 1e-9
        for part in ("all", "head", "body"):
            assert_moments(cap.stats("model", key, part), parts[part], rtol)
    tokens = sum(len(tiny_tokenizer()(d.text)["input_ids"]) for d in corpus)
    windows = cap.manifest["windows"]
    assert windows > len(corpus)  # long documents were split into windows, not truncated
    assert cap.tokens("model") == tokens - windows  # exclude_first=1 drops one token per window
    assert not cap.stats("model", "blocks.0.mlp_hidden").full  # diagonal-only by default
    assert cap.stats("model", "blocks.0.resid_pre").full


def test_float32_model_and_full_override(tmp_path: Path) -> None:
    """A float32 model is captured in float64 sums; ``full`` forces mlp_hidden's full matrix."""
    model = tiny_model("qwen3")
    corpus = docs(4)
    cfg = make_config(sites="mlp_hidden,k_rope", full=["mlp_hidden"], max_length=32, split_first=0)
    cap = run_capture(_subject(model), corpus, tmp_path / "c", cfg, progress=False)
    ref = reference(model.double(), [d.text for d in corpus], cfg)
    for key in ("blocks.1.mlp_hidden", "blocks.0.k_rope"):
        st = cap.stats("model", key)
        assert st.full and st.m2.dtype == torch.float64
        assert_moments(st, ref[key]["all"], rtol=1e-4)
        assert cap.stats("model", key, "head").count == 0


def test_batching_does_not_change_statistics(tmp_path: Path) -> None:
    model = tiny_model("qwen2", dtype=torch.float64)
    corpus = docs(5)
    caps = [
        run_capture(
            _subject(model),
            corpus,
            tmp_path / f"b{b}",
            {"batch_size": b, "max_length": 20},
            progress=False,
        )
        for b in (1, 4)
    ]
    for key in caps[0].keys("model"):
        a, b = caps[0].stats("model", key), caps[1].stats("model", key)
        assert a.count == b.count > 0
        torch.testing.assert_close(a.m2, b.m2, rtol=1e-10, atol=1e-10)


def test_paired_cross_moments_and_layer_map(tmp_path: Path) -> None:
    teacher = tiny_model("qwen3", dtype=torch.float64, num_hidden_layers=3)
    student = tiny_model(
        "qwen3", seed=1, dtype=torch.float64, hidden_size=48, head_dim=12, intermediate_size=80
    )
    corpus = docs(5)
    cfg = make_config(sites="resid_pre,v,final.normed", max_length=16, batch_size=2)
    subjects = {"teacher": _subject(teacher), "student": _subject(student)}
    cap = run_capture(subjects, corpus, tmp_path / "p", cfg, progress=False)
    assert cap.roles == ["teacher", "student"]
    assert cap.layer_map == [0, 2]  # proportional: student 0 -> teacher 0, student 1 -> teacher 2
    assert cap.cross_pairs() == [
        ("blocks.0.resid_pre", "blocks.0.resid_pre"),
        ("blocks.2.resid_pre", "blocks.1.resid_pre"),
        ("final.normed", "final.normed"),
    ]
    texts = [d.text for d in corpus]
    rt, rs = reference(teacher, texts, cfg), reference(student, texts, cfg)
    for tk, sk in cap.cross_pairs():
        for part in ("all", "head", "body"):
            c = cap.cross(tk, sk, part)
            a, b = rt[tk][part], rs[sk][part]
            assert c.count == a.shape[0] == b.shape[0]
            torch.testing.assert_close(c.m_ab, a.T @ b, rtol=1e-9, atol=1e-8)
            torch.testing.assert_close(c.sum_b, b.sum(0), rtol=1e-9, atol=1e-8)
    assert_moments(cap.stats("teacher", "blocks.1.v"), rt["blocks.1.v"]["all"])
    assert_moments(cap.stats("student", "blocks.1.v"), rs["blocks.1.v"]["all"])
    assert cap.tokens("teacher") == cap.tokens("student")


def test_paired_explicit_layers_capture_mapped_teacher_blocks(tmp_path: Path) -> None:
    teacher = tiny_model("qwen2", num_hidden_layers=4)
    student = tiny_model("qwen2", seed=3, num_hidden_layers=2)
    subjects = {"teacher": _subject(teacher), "student": _subject(student)}
    cfg = make_config(layers="1", layer_map="0,3", sites="resid_pre", max_length=16)
    cap = run_capture(subjects, docs(3), tmp_path / "p", cfg, progress=False)
    assert cap.keys("student") == ["blocks.1.resid_pre"]
    assert cap.keys("teacher") == ["blocks.3.resid_pre"]
    assert cap.cross_pairs() == [("blocks.3.resid_pre", "blocks.1.resid_pre")]


def test_mismatched_tokenizers_are_refused(tmp_path: Path) -> None:
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    subjects = {
        "teacher": _subject(tiny_model("qwen3")),
        "student": Subject(tiny_model("qwen3", seed=2), other),
    }
    with pytest.raises(GradfreeError, match="tokenizers differ; paired capture needs one"):
        run_capture(subjects, docs(2), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_unknown_site_and_bad_config_are_one_sentence() -> None:
    with pytest.raises(GradfreeError, match=r"Unknown site 'resid'; valid sites are: resid_pre, "):
        parse_sites("resid_pre,resid")
    with pytest.raises(GradfreeError, match="Unknown capture option 'sitez'"):
        make_config(sitez="v")
    with pytest.raises(GradfreeError, match="exclude_first must be smaller than max_length"):
        make_config(max_length=4, exclude_first=4)
    with pytest.raises(GradfreeError, match="dump site 'v' is not among the captured sites"):
        make_config(dump_sites="v")
    with pytest.raises(GradfreeError, match="out of range for the model"):
        run_capture(_subject(tiny_model("llama")), docs(1), "unused", {"layers": [5]})


def test_hooks_are_removed_after_an_exception() -> None:
    model = tiny_model("qwen3")
    adapter = get_adapter(model)

    def sink(key: str, x: torch.Tensor) -> None:
        raise RuntimeError("boom")

    keys = ["blocks.0.resid_pre", "blocks.1.k_rope", "blocks.1.mlp_hidden", "final.normed"]
    with pytest.raises(RuntimeError, match="boom"), site_hooks(adapter, keys, sink) as hooks:
        assert hook_count(model) == 5  # four sites + the early stop
        hooks.forward(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    assert hook_count(model) == 0


def test_interrupted_capture_leaves_no_hooks(tmp_path: Path) -> None:
    model = tiny_model("llama")

    def stop(batch: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_capture(
            _subject(model),
            docs(4),
            tmp_path / "c",
            {"batch_size": 1},
            progress=False,
            on_batch=stop,
        )
    assert hook_count(model) == 0


def test_blocked_gram_of_wide_sites_equals_full_product() -> None:
    """Sites wider than two Gram blocks take the strip-wise path of MomentStats.update."""
    x = torch.randn(300, 700, dtype=torch.float64) * torch.linspace(0.1, 10, 700)
    st = MomentStats.empty(700).update(x[:100]).update(x[100:])
    torch.testing.assert_close(st.m2, x.T @ x, rtol=1e-12, atol=1e-9)
    assert torch.equal(st.m2[:256, 256:], st.m2[256:, :256].T)


def test_no_tensor_outlives_its_batch(tmp_path: Path) -> None:
    """Memory does not grow with tokens: after batch 1 and after the last batch, the same number
    of tensors is alive (accumulators only; activations are dropped with their batch)."""
    import gc
    import warnings

    alive: dict[int, int] = {}

    def count(batch: int) -> None:
        if batch in (1, 9):
            gc.collect()
            with warnings.catch_warnings():  # isinstance() pokes deprecated torch objects
                warnings.simplefilter("ignore")
                alive[batch] = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    cfg = {"sites": "resid_pre,attn_heads,k_rope,final.normed", "batch_size": 1, "max_length": 12}
    run_capture(
        _subject(tiny_model("qwen3")), docs(5), tmp_path / "c", cfg, progress=False, on_batch=count
    )
    assert len(alive) == 2 and alive[1] == alive[9]
