"""The low-rank KV cache on a GPU (issue 14): CUDA and bf16 correctness, then decoding speed and
memory at long contexts with a 32B-shaped attention.

1. Correctness: tiny Qwen2, Qwen3 and Llama models built in code, on the GPU, fp32 and bf16:
   bases of every key mode fitted at full rank from a capture on the GPU; logits fed in chunks
   through ``LowRankCache`` (latent attention) against one plain forward pass; greedy
   ``generate`` with the cache against ``DynamicCache``.
2. Speed: a Qwen3 model with Qwen3-32B's attention and width (hidden 5120, 64 query heads, 8 KV
   heads, head_dim 128, MLP 25600) but ``--layers`` layers, random weights, bf16. Bases at budget
   0.5 from a capture of random tokens (quality means nothing here, only time and bytes); for
   each context, prefill (fed in chunks of ``--prefill-chunk`` tokens, the same for every cache)
   then ``--new-tokens`` greedy decoding steps: decode tokens/s, bytes the cache holds and the
   peak CUDA memory of the call above the level before it.

Usage (on a CUDA machine): python scripts/bench_kv_gpu.py --json out.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from gradfree.base.io import write_json_atomic
from gradfree.base.provenance import machine, versions
from gradfree.capture import Subject, run_capture
from gradfree.kv import KEY_MODES, LowRankCache, fit_bases
from gradfree.kv.evaluate import cache_bytes
from gradfree.testing.tiny import tiny_model, tiny_tokenizer


@dataclass
class Doc:
    id: str
    text: str


def _docs(n: int, words: int) -> list[Doc]:
    g = torch.Generator().manual_seed(0)
    vocab = ["harbour", "tower", "key", "value", "cache", "x", "=", "1", "def", "(", ")", "ü"]
    return [
        Doc(
            f"d{i}",
            " ".join(vocab[int(j)] for j in torch.randint(0, len(vocab), (words,), generator=g)),
        )
        for i in range(n)
    ]


def _capture(model: Any, tok: Any, docs: list[Doc], folder: Path, max_length: int) -> Any:
    sites = ["k_pre", "k_rope", "v"]
    cfg = {"sites": sites, "full": sites, "max_length": max_length}
    return run_capture(Subject(model, tok, name="m"), docs, folder, cfg, progress=False)


def _chunked(model: Any, ids: torch.Tensor, cache: Any, chunk: int = 8) -> torch.Tensor:
    """Float32 logits of ``ids`` (b, t) fed ``chunk`` tokens at a time through ``cache``."""
    parts = [
        model(ids[:, s : s + chunk], past_key_values=cache, use_cache=True).logits.float()
        for s in range(0, ids.shape[1], chunk)
    ]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def correctness(dev: torch.device) -> list[dict[str, Any]]:
    rows = []
    tok = tiny_tokenizer()
    docs = _docs(6, 40)
    for family in ("qwen2", "qwen3", "llama"):
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model(family, dtype=dtype).to(dev).eval()
            with tempfile.TemporaryDirectory() as tmp:
                cap = _capture(model, tok, docs, Path(tmp) / "cap", 32)
                ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
                ids = ids.to(dev)
                model.set_attn_implementation("sdpa")
                ref = model(ids).logits.float()
                chunked = _chunked(model, ids, DynamicCache(config=model.config))
                dense_rel = float((chunked - ref).norm() / ref.norm())
                gen_ref = model.generate(
                    ids[:1, :8],
                    max_new_tokens=12,
                    do_sample=False,
                    past_key_values=DynamicCache(config=model.config),
                    pad_token_id=0,
                )
                for mode in KEY_MODES:
                    bases = fit_bases(cap, 1.0, key_mode=mode)
                    got = _chunked(model, ids, LowRankCache(bases, model))
                    gen = model.generate(
                        ids[:1, :8],
                        max_new_tokens=12,
                        do_sample=False,
                        past_key_values=LowRankCache(bases, model),
                        pad_token_id=0,
                    )
                    rel = float((got - ref).norm() / ref.norm())
                    rows.append(
                        {
                            "family": family,
                            "dtype": str(dtype).removeprefix("torch."),
                            "key_mode": mode,
                            "logits_rel_err": rel,
                            "dense_chunked_rel_err": dense_rel,
                            "generate_equal": bool(torch.equal(gen, gen_ref)),
                        }
                    )
                    print(
                        f"| {family} | {rows[-1]['dtype']} | {mode} | {rel:.2e} | "
                        f"{dense_rel:.2e} | "
                        f"{rows[-1]['generate_equal']} |",
                        flush=True,
                    )
                    model.set_attn_implementation("sdpa")
    return rows


SHAPE_32B = {
    "vocab_size": 151936,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
SHAPE_SMOKE = {
    "vocab_size": 1000,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


def big_model(layers: int, dev: torch.device, shape: dict[str, int]) -> Any:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        **shape,
        num_hidden_layers=layers,
        head_dim=128,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.set_attn_implementation("sdpa")
    return model.eval()


@torch.no_grad()
def timed(model: Any, make: Any, context: int, new: int, chunk: int) -> dict[str, Any]:
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=g).to(dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda d: None)
    sync(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else 0
    cache = make()
    t0 = time.perf_counter()
    out = None
    for s in range(0, context, chunk):
        out = model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True)
    sync(dev)
    t1 = time.perf_counter()
    assert out is not None
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(new):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    sync(dev)
    t2 = time.perf_counter()
    return {
        "context": context,
        "prefill_s": round(t1 - t0, 3),
        "decode_tokens_per_s": new / (t2 - t1),
        "cache_bytes": cache_bytes(cache),
        "peak_delta_bytes": int(torch.cuda.max_memory_allocated(dev) - base) if cuda else 0,
    }


def speed(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    model = big_model(args.layers, dev, SHAPE_SMOKE if args.smoke else SHAPE_32B)
    tok = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        cap = _capture(model, tok, _docs(8, 400), Path(tmp) / "cap", 512)
        bases = {m: fit_bases(cap, 0.5, key_mode=m) for m in ("pre_rope", "post_rope")}
    caches = {
        "dense (DynamicCache, sdpa)": lambda: DynamicCache(config=model.config),
        "lowrank pre_rope 0.5": lambda: LowRankCache(bases["pre_rope"], model),
        "lowrank post_rope 0.5 (k-space)": lambda: LowRankCache(bases["post_rope"], model),
        "lowrank pre_rope 0.5 int8": lambda: LowRankCache(bases["pre_rope"], model, latent_bits=8),
    }
    rows = []
    for make in caches.values():  # warm-up: kernels and allocator
        timed(model, make, 256, 2, args.prefill_chunk)
        model.set_attn_implementation("sdpa")
    for ctx in [int(c) for c in args.contexts.split(",")]:
        for name, make in caches.items():
            r = timed(model, make, ctx, args.new_tokens, args.prefill_chunk)
            r["cache"] = name
            rows.append(r)
            print(
                f"| {ctx} | {name} | {r['decode_tokens_per_s']:.1f} | {r['prefill_s']} | "
                f"{r['cache_bytes'] / 2**20:.0f} | {r['peak_delta_bytes'] / 2**20:.0f} |",
                flush=True,
            )
            model.set_attn_implementation("sdpa")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="A small model: check the script runs.")
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(name)
    print(
        "\n| family | dtype | key mode | logits rel. err (full rank) | DynamicCache's | "
        "generate equal |"
    )
    print("|---|---|---|---:|---:|---|")
    rows = correctness(dev)
    print(
        f"\n{args.layers} layers of Qwen3-32B's attention, bf16, batch 1, {args.new_tokens} "
        f"decoding steps after a prefill in chunks of {args.prefill_chunk}.\n"
    )
    print("| context | cache | decode tokens/s | prefill (s) | cache MiB | peak Δ MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    fast = speed(args, dev)
    if args.json:
        write_json_atomic(
            Path(args.json),
            {
                "config": vars(args),
                "versions": versions(),
                "machine": machine(),
                "device": name,
                "correctness": rows,
                "speed": fast,
            },
        )


if __name__ == "__main__":
    main()
