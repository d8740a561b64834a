"""Benchmark of the low-rank KV cache against what users pick instead (issue 14).

For each model: capture the keys (before and after RoPE), the queries and the values over the
tour-guide calibration text; fit the coders of every low-rank variant (``--variants``, each
``mode:metric:budget[:int8][:reconstruct]``: key mode, metric, byte budget, int8 latents,
attention on reconstructed states instead of latents; :func:`gradfree.kv.fit_bases`); then
score, on held-out text of the same domain (tourguide:heldout) and of another (news:heldout), the
model's own ``DynamicCache`` ("dense", the reference), every low-rank variant and, side by side
in the same run, transformers' ``QuantizedCache`` with the quanto and HQQ backends at int4 and
int2 (a backend that does not install or fails here becomes a row saying why). Every cache is
fed the same windows in chunks, so attention to earlier chunks goes through what it stores
(:func:`gradfree.kv.evaluate.score_caches`): perplexity, KL to dense, top-1 agreement and the
bytes it holds after a window (:func:`gradfree.kv.evaluate.cache_bytes`; the low-rank bases are
counted apart).

Then generation speed: greedy ``generate`` of ``--new-tokens`` tokens after contexts of
``--gen-contexts`` tokens (held-out text of both domains, concatenated) with DynamicCache, the
low-rank variants of ``--gen`` and the first int4 quantized cache that works; tokens/s over the
whole call and over the decoding steps after the prefill, and the peak memory of generation
above what was in use before it (RSS on the CPU, allocated memory on CUDA). Contexts the model's
``max_position_embeddings`` cannot take are skipped.

Usage (on the shared machine, one heavy job at a time; ``make bench-kv`` runs the defaults):
    flock /tmp/heavy.lock .venv/bin/python scripts/bench_kv.py --models smollm2-135m-instruct \
        --variants pre_rope:attention:0.5 --gen-contexts 512 --json runs/bench_kv/smollm2.json
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from gradfree.base.io import write_json_atomic
from gradfree.base.provenance import Stopwatch, machine, rss_bytes, versions
from gradfree.capture import run_capture
from gradfree.kv import LowRankCache, fit_bases
from gradfree.kv.evaluate import DENSE, cache_bytes, score_caches
from gradfree.kv.fit import output_metrics, rope_lags
from gradfree.models import load_model
from gradfree.texts.corpora import corpus_manifest, load_corpus
from gradfree.texts.windows import encode

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
TEXTS = {"tourguide": ("tourguide", "heldout"), "news": ("news", "heldout")}
QUANTIZED = [("quanto", 4), ("quanto", 2), ("hqq", 8), ("hqq", 4), ("hqq", 2)]
# Low-rank rows: key mode, metric, budget, latents (int8 or the model's dtype), attention.
# The first is the recommended cache; budget 0.625 meets the quantized int4 caches' bytes.
VARIANTS = [
    "pre_rope:attention:0.75",
    "pre_rope:attention:0.625",
    "pre_rope:attention:0.5",
    "pre_rope:attention:0.25",
    "pre_rope:none:0.5",
    "pairs:attention:0.5",
    "complex:attention:0.5",
    "post_rope:attention:0.5",
    "pre_rope:attention:1:int8",
    "pre_rope:attention:0.75:int8",
    "pre_rope:attention:0.5:int8",
    "pre_rope:attention:1:int4",
    "pre_rope:attention:0.75:int4",
]
GEN = [
    "pre_rope:attention:0.5",
    "pre_rope:attention:1:int8",
    "post_rope:attention:0.5",
    "post_rope:attention:0.5:reconstruct",
]


def parse_variant(spec: str) -> dict[str, Any]:
    """``mode:metric:budget[:int8|:int4][:reconstruct]`` as keyword arguments."""
    mode, metric, budget, *rest = spec.split(":")
    return {
        "key_mode": mode,
        "metric": metric,
        "budget": float(budget),
        "latent_bits": 8 if "int8" in rest else 4 if "int4" in rest else None,
        "attention": "reconstruct" if "reconstruct" in rest else "latent",
    }


def variant_name(spec: str) -> str:
    v = parse_variant(spec)
    extra = f" int{v['latent_bits']}" if v["latent_bits"] else ""
    extra += " (reconstruct)" if v["attention"] == "reconstruct" else ""
    return f"lowrank {v['key_mode']} {v['metric']} {v['budget']:g}{extra}"


def take_tokens(tok: Any, docs: list[Any], n: int) -> list[Any]:
    """Documents in corpus order until they hold at least ``n`` tokens."""
    out, total = [], 0
    for d in docs:
        out.append(d)
        total += len(encode(tok, d.text))
        if total >= n:
            break
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def quantized_factories(
    model: Any, residual_length: int | None, wanted: list[tuple[str, int]]
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The QuantizedCache factories that work here, and why the others do not: each is made
    and run on two chunks of 8 tokens before it is scored."""
    from transformers import QuantizedCache

    works: dict[str, Callable[[], Any]] = {}
    failed: dict[str, str] = {}
    probe = torch.arange(16, device=next(model.parameters()).device)[None] % 100 + 10
    for backend, nbits in wanted:
        name = f"{backend} int{nbits}"

        def make(b: str = backend, n: int = nbits) -> Any:
            kw = {"residual_length": residual_length} if residual_length is not None else {}
            return QuantizedCache(b, model.config, nbits=n, **kw)

        try:
            cache = make()
            with torch.no_grad():
                for s in (0, 8):
                    model(input_ids=probe[:, s : s + 8], past_key_values=cache, use_cache=True)
            works[name] = make
        except Exception as e:  # an uninstalled or broken backend is a row, not a crash
            failed[name] = first_line(e)
    return works, failed


def capture_kv(loaded: Any, docs: list[Any], folder: Path, max_length: int) -> Any:
    sites = ["k_pre", "k_rope", "v", "q_pre", "q_rope"]
    cfg = {"sites": sites, "full": sites, "max_length": max_length}
    return run_capture(
        loaded, docs, folder, cfg, corpus=corpus_manifest(docs, "tourguide"), progress=False
    )


class _Stamps:
    """A logits processor that only records when each decoding step reaches it."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _peak_cuda(dev: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0


def generation_speed(
    model: Any, tok: Any, context: torch.Tensor, make: Callable[[], Any], new_tokens: int
) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` after ``context`` (1, t) with a fresh cache: wall
    tokens/s, decode tokens/s (the steps after the first token, whose time is the prefill) and
    the peak memory above the level before the call."""
    from transformers import LogitsProcessorList

    dev = next(model.parameters()).device
    stamps = _Stamps()
    cache = make()
    x = context.to(dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base_rss, base_cuda = rss_bytes(), _peak_cuda(dev)
    watch = Stopwatch(interval=0.005)
    t0 = time.perf_counter()
    with watch.stage("generate"), torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([stamps]),
        )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    made = out.shape[1] - x.shape[1]
    peak = (
        _peak_cuda(dev) - base_cuda
        if dev.type == "cuda"
        else int(watch.rows[0]["peak_rss_gib"] * 2**30) - base_rss
    )
    decode = stamps.times[-1] - stamps.times[0] if len(stamps.times) > 1 else float("nan")
    return {
        "context": int(x.shape[1]),
        "new_tokens": int(made),
        "seconds": round(seconds, 3),
        "tokens_per_s": made / seconds,
        "prefill_s": round(stamps.times[0] - t0, 3) if stamps.times else None,
        "decode_tokens_per_s": (len(stamps.times) - 1) / decode if decode > 0 else None,
        "peak_delta_bytes": max(peak, 0),
        "cache_bytes": cache_bytes(cache),
        "cache_tokens": int(cache.get_seq_length()),
        "peak_memory": "cuda allocated" if dev.type == "cuda" else "process RSS",
    }


def context_ids(tok: Any, n: int) -> torch.Tensor:
    """The first ``n`` tokens of both held-out texts concatenated (repeated if too short)."""
    ids: list[int] = []
    for corpus, split in TEXTS.values():
        for d in load_corpus(corpus, split=split):
            ids.extend(encode(tok, d.text))
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor(ids[:n])[None]


@torch.no_grad()
def long_bytes(
    model: Any, tok: Any, factories: dict[str, Callable[[], Any]], n: int, chunk: int = 512
) -> dict[str, int]:
    """Bytes each cache (and dense) holds after ``n`` tokens fed in chunks of ``chunk``: at long
    contexts a QuantizedCache's full-precision residual buffer (≤ 128 tokens) no longer counts
    much, so this is the per-token cost its codes tend to."""
    dev = next(model.parameters()).device
    ids = context_ids(tok, n).to(dev)
    makers = {DENSE: lambda: DynamicCache(config=model.config), **factories}
    out: dict[str, int] = {}
    for name, make in makers.items():
        cache = make()
        for s in range(0, n, chunk):
            model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True)
        out[name] = cache_bytes(cache)
        print(f"| {n} tokens | {name} | {out[name]:,} | {out[name] / out[DENSE]:.3f} |", flush=True)
        del cache
    return out


def clean(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("doc_kl", "doc_tokens")}


def print_scores(model: str, text: str, got: dict[str, Any], failed: dict[str, str]) -> None:
    dense = got[DENSE]
    for name, r in got.items():
        ratio = r["bytes"] / max(dense["bytes"], 1)
        mean = r["bytes_per_token"] / max(dense["bytes_per_token"], 1e-30)
        change = 100 * (r["ppl"] / dense["ppl"] - 1)
        bases = f"{r['bases_bytes']:,}" if r["bases_bytes"] else "–"
        print(
            f"| {model} | {text} | {name} | {r['bytes']:,} | {ratio:.3f} | {mean:.3f} | {bases} | "
            f"{r['ppl']:.3f} | {change:+.2f} | {r['kl']:.4f} | {r['top1']:.3f} |",
            flush=True,
        )
    for name, why in failed.items():
        print(f"| {model} | {text} | {name} | – | – | – | – | not run: {why} | | | |", flush=True)


def bench_model(
    name: str,
    args: argparse.Namespace,
    variants: list[str],
    gen_specs: list[str],
    contexts: list[int],
) -> tuple[dict[str, Any], list[str]]:
    """One model: capture, fit, score on both texts (printing rows), then generation speed;
    returns its JSON entry and the rows of the speed table."""
    watch = Stopwatch()
    with watch.stage("load"):
        loaded = load_model(name, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    calib = take_tokens(tok, load_corpus("tourguide", split="calibration"), args.calib_tokens)
    entry: dict[str, Any] = {"model": name, "fingerprint": loaded.fingerprint}
    fp = loaded.fingerprint.get("config_sha256")
    specs = list(dict.fromkeys(variants + gen_specs))
    fits = {(v["key_mode"], v["metric"], v["budget"]) for v in map(parse_variant, specs)}
    with tempfile.TemporaryDirectory() as tmp:
        with watch.stage("capture"):
            cap = capture_kv(loaded, calib, Path(tmp) / "cap", args.max_length)
        entry["capture_tokens"] = cap.manifest["roles"]["model"]["tokens"]
        with watch.stage("fit bases"):
            metrics = output_metrics(model)
            lags = rope_lags(model, args.max_length)
            bases = {
                (m, g, b): fit_bases(
                    cap,
                    b,
                    key_mode=m,
                    metric=g,
                    value_metrics=metrics if g == "attention" else None,
                    rope_lags=lags if g == "attention" else None,
                    fingerprint=fp,
                )
                for m, g, b in sorted(fits)
            }
    entry["bases"] = {
        f"{m} {g} {b:g}": {"kept_share": kb.kept_share(), "ranks": kb.ranks()}
        for (m, g, b), kb in bases.items()
    }

    def factory(spec: str) -> Callable[[], Any]:
        v = parse_variant(spec)
        kb = bases[(v["key_mode"], v["metric"], v["budget"])]
        return functools.partial(
            LowRankCache, kb, model, latent_bits=v["latent_bits"], attention=v["attention"]
        )

    factories: dict[str, Callable[[], Any]] = {variant_name(v): factory(v) for v in variants}
    wanted = [(b, int(n)) for b, n in (q.split(":") for q in args.quantized.split(",") if q)]
    quantized, failed = quantized_factories(model, args.residual_length, wanted)
    factories.update(quantized)
    entry["not_run"] = failed
    entry["scores"] = {}
    for text in [t for t in args.texts.split(",") if t]:
        corpus, split = TEXTS[text]
        docs = take_tokens(tok, load_corpus(corpus, split=split), args.eval_tokens)
        with watch.stage(f"score {text}"):
            got = score_caches(
                model, tok, docs, factories, max_length=args.max_length, chunk=args.chunk
            )
        print_scores(name, text, got, failed)
        entry["scores"][text] = {k: clean(v) for k, v in got.items()}

    if args.long_bytes:
        entry["long_bytes"] = long_bytes(model, tok, factories, args.long_bytes)

    # generation speed: dense, the low-rank variants of --gen, the first int4 that works
    gen: dict[str, Callable[[], Any]] = {DENSE: lambda: DynamicCache(config=model.config)}
    gen.update({variant_name(v): factory(v) for v in gen_specs})
    int4 = [k for k in quantized if k.endswith("int4")]
    if int4:
        gen[int4[0]] = quantized[int4[0]]
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    entry["generation"] = []
    lines: list[str] = []
    warm = context_ids(tok, 16)
    for make in gen.values():  # first calls (kernels, allocator) are not timed
        generation_speed(model, tok, warm, make, 2)
    for ctx in contexts:
        if limit and ctx + args.new_tokens > limit:
            entry["generation"].append({"context": ctx, "skipped": f"max positions {limit}"})
            lines.append(f"| {name} | {ctx} | – | skipped: max positions {limit} | | | | |")
            continue
        ids = context_ids(tok, ctx)
        for cname, make in gen.items():
            with watch.stage(f"generate {ctx} {cname}"):
                s = generation_speed(model, tok, ids, make, args.new_tokens)
            s["cache"] = cname
            entry["generation"].append(s)
            dec = s["decode_tokens_per_s"]
            lines.append(
                f"| {name} | {ctx} | {cname} | {s['tokens_per_s']:.1f} | "
                f"{'–' if dec is None else f'{dec:.1f}'} | {s['prefill_s']} | "
                f"{s['peak_delta_bytes'] / 2**20:.0f} | {s['cache_bytes'] / 2**20:.1f} |"
            )
    entry["stages"] = watch.rows
    return entry, lines


def memory_table(record: dict[str, Any], lengths: tuple[int, ...] = (2048, 8192, 32768)) -> None:
    """Seed 002's table rebuilt from measurements: per model, the KV memory per sequence of
    each length held by dense and by each low-rank variant (measured bytes per token after the
    longest window: both grow linearly, the low-rank latents and positions per token), next to
    the perplexity change each costs on the first text scored."""
    print()
    print(
        "KV memory per sequence (bytes per token measured after the longest window, times the "
        "length; the run's dtype), and what it costs (Δppl on the first text)."
    )
    print()
    head = " | ".join(f"{n // 1024}k tokens (MiB)" for n in lengths)
    print(f"| model | cache | Δppl % | bytes/token | {head} | × smaller |")
    print("|---|---|---:|---:|" + "---:|" * len(lengths) + "---:|")
    for entry in record["models"]:
        if not entry["scores"]:
            continue
        scores = next(iter(entry["scores"].values()))
        dense = scores[DENSE]
        per_dense = dense["bytes"] / dense["bytes_tokens"]
        for name, r in scores.items():
            if name != DENSE and not name.startswith("lowrank"):
                continue
            per = r["bytes"] / r["bytes_tokens"]
            change = 100 * (r["ppl"] / dense["ppl"] - 1)
            cells = " | ".join(f"{per * n / 2**20:.1f}" for n in lengths)
            print(
                f"| {entry['model']} | {name} | {change:+.2f} | {per:,.0f} | {cells} | "
                f"{per_dense / per:.2f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="Low-rank rows, each mode:metric:budget[:int8|:int4][:reconstruct].",
    )
    ap.add_argument("--gen", default=",".join(GEN), help="Low-rank caches timed in generate.")
    ap.add_argument("--texts", default=",".join(TEXTS), help="Held-out texts scored.")
    ap.add_argument("--calib-tokens", type=int, default=20000)
    ap.add_argument("--eval-tokens", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=512, help="Window length in tokens.")
    ap.add_argument("--chunk", type=int, default=32, help="Tokens fed per step when scoring.")
    ap.add_argument(
        "--residual-length", type=int, default=None, help="QuantizedCache's (default 128)."
    )
    ap.add_argument("--gen-contexts", default="512,2048,8192")
    ap.add_argument(
        "--quantized",
        default=",".join(f"{b}:{n}" for b, n in QUANTIZED),
        help="QuantizedCache rows, backend:bits.",
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--long-bytes",
        type=int,
        default=0,
        help="Also print the bytes every cache holds after this many tokens (0: not measured).",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--render", default=None, help="Only print the memory table of a JSON.")
    args = ap.parse_args()
    if args.render:
        import json

        memory_table(json.loads(Path(args.render).read_text()))
        return
    torch.manual_seed(0)
    variants = [v for v in args.variants.split(",") if v]
    gen_specs = [v for v in args.gen.split(",") if v]
    contexts = [int(c) for c in args.gen_contexts.split(",") if c]
    record: dict[str, Any] = {
        "config": vars(args),
        "versions": versions(),
        "machine": machine(),
        "models": [],
    }
    print(
        f"Windows of {args.max_length} tokens fed in chunks of {args.chunk}. Bytes held and their "
        "ratio to dense: after the longest window; mean ratio: per token over all windows."
    )
    print()
    print(
        "| model | text | cache | bytes held | bytes ratio | mean ratio | bases bytes | ppl | "
        "Δppl % | KL to dense | top-1 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    speed_lines: list[str] = []
    for name in args.models.split(","):
        entry, lines = bench_model(name, args, variants, gen_specs, contexts)
        record["models"].append(entry)
        speed_lines.extend(lines)
    print()
    print(
        f"Generation ({args.new_tokens} new tokens, greedy): tokens/s over the call and over the "
        "decoding steps, prefill seconds, peak memory above the level before the call (MiB), "
        "bytes the cache holds at the end (MiB)."
    )
    print()
    print(
        "| model | context | cache | tokens/s | decode tokens/s | prefill (s) | peak Δ (MiB) | "
        "cache held (MiB) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for line in speed_lines:
        print(line)
    memory_table(record)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), record)


if __name__ == "__main__":
    main()
