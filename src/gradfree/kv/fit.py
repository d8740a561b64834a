"""``gradfree kv fit``: bases of a low-rank KV cache from one capture, measured on held-out text.

Steps: capture the keys (before and after RoPE), the values and, for the attention metric, the
queries of every layer over the fit text (:mod:`gradfree.capture`, full float64 covariances); fit
the per-layer coders with ranks allocated under the byte budget
(:func:`gradfree.kv.solve.fit_bases`, with the output metrics of o_proj and the RoPE lags of the
model: :func:`output_metrics`, :func:`rope_lags`); score the model with its own
``DynamicCache`` and with the :class:`~gradfree.kv.cache.LowRankCache` on held-out windows, fed
in chunks so that attention to earlier chunks goes through what the cache stores
(:func:`gradfree.kv.evaluate.score_caches`); write the bases, ``kv.json`` (budget, bytes held by
both caches, perplexities, KL, ranks, provenance) and ``report.md`` into ``out`` atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradfree.base.errors import GradfreeError

# What every kv.json records at its top level, so that any run can be checked at a glance.
SUMMARY_KEYS = (
    "budget",
    "cache_bytes",
    "dense_cache_bytes",
    "bytes_ratio",
    "ppl_dense",
    "ppl_kv",
)


def _held_out(corpus: str, split: str | None, eval_split: str | None, fit_docs: int) -> Any:
    """The evaluation documents: ``eval_split`` of the corpus, or (None) the documents of
    ``split`` after the fit's."""
    from gradfree.texts.corpora import load_corpus

    if eval_split is not None:
        return load_corpus(corpus, split=eval_split)
    rest = load_corpus(corpus, split=split)[fit_docs:]
    if not rest:
        raise GradfreeError(
            "No held-out documents: pass --eval-split, or a --limit below the split's size."
        )
    return rest


def output_metrics(model: Any) -> list[list[Any]]:
    """Per layer and KV head, Σ over the group's query heads of W_o,hᵀ W_o,h (hd, hd) in
    float64: what a value error costs the attention output (:mod:`gradfree.kv.solve`)."""
    import torch

    from gradfree.adapters import get_adapter

    a = get_adapter(model)
    geo = a.geometry
    hd, rep = geo.head_dim, geo.num_heads // geo.num_kv_heads
    out = []
    for layer in a.layers:
        w = layer.o_proj.weight.detach().to(device="cpu", dtype=torch.float64)
        blocks = [w[:, h * hd : (h + 1) * hd] for h in range(geo.num_heads)]
        out.append(
            [
                sum(blocks[h].T @ blocks[h] for h in range(g * rep, (g + 1) * rep))
                for g in range(geo.num_kv_heads)
            ]
        )
    return out


def rope_lags(model: Any, span: int) -> tuple[Any, Any, Any]:
    """(cos, sin) (span, hd) of the model's own rotary at lags 0 … span − 1, in float64, and
    the share of (query, key) pairs of a causal window of ``span`` tokens at each lag
    (span − L): what :func:`gradfree.kv.solve.rotation_averaged` averages over."""
    import torch

    from gradfree.adapters import get_adapter

    a = get_adapter(model)
    dev = next(model.parameters()).device
    lags = torch.arange(span, device=dev)[None]
    cos, sin = a.rotary(torch.empty(0, dtype=torch.float32, device=dev), lags)
    norm = (cos.double() ** 2 + sin.double() ** 2).sqrt()  # the rotary's attention scaling
    weights = torch.arange(span, 0, -1, dtype=torch.float64)
    return (cos.double() / norm)[0].cpu(), (sin.double() / norm)[0].cpu(), weights


def run_kv_fit(
    model: str,
    corpus: str,
    out: str | Path,
    *,
    budget: float,
    split: str | None = None,
    limit: int | None = None,
    eval_split: str | None = "heldout",
    eval_limit: int | None = 12,
    key_mode: str = "pre_rope",
    metric: str = "attention",
    allocation: str = "waterfill",
    latent_bits: int | None = None,
    max_length: int = 256,
    chunk: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit and measure a low-rank KV cache for ``model`` (module docstring); returns kv.json."""
    from gradfree.adapters import get_adapter
    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic, write_text_atomic
    from gradfree.base.progress import reporting
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.capture import run_capture
    from gradfree.kv.bases import KEY_MODES, METRICS, check_budget
    from gradfree.kv.cache import LowRankCache
    from gradfree.kv.evaluate import score_caches
    from gradfree.kv.solve import fit_bases
    from gradfree.models import load_model
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    check_budget(budget)
    if latent_bits not in (None, 8, 4):
        raise GradfreeError(f"--latent-bits must be 8 or 4 (or left out), not {latent_bits}.")
    if key_mode not in KEY_MODES:
        raise GradfreeError(f"--key-mode must be one of {', '.join(KEY_MODES)}, not {key_mode!r}.")
    if metric not in METRICS:
        raise GradfreeError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}.")
    if allocation not in ("waterfill", "uniform"):
        raise GradfreeError(f"--allocation must be waterfill or uniform, not {allocation!r}.")
    out = check_new_output(out, overwrite)
    docs = load_corpus(corpus, split=split, limit=limit)
    held = _held_out(corpus, split, eval_split, len(docs))[: eval_limit or None]
    watch = Stopwatch()
    with watch.stage("load the model"):
        loaded = load_model(model, device=device, dtype=dtype)
    get_adapter(loaded.model)  # an unsupported architecture is one sentence, before any work
    fp = loaded.fingerprint
    with atomic_dir(out, overwrite=overwrite) as tmp, reporting(progress) as report:
        queries = ["q_pre", "q_rope"] if metric == "attention" else []
        sites = ["k_pre", "k_rope", "v", *queries]
        with watch.stage("capture keys and values"):
            cap = run_capture(
                loaded,
                docs,
                tmp / ".scratch" / "capture",
                {"sites": sites, "full": sites, "max_length": max_length},
                corpus=corpus_manifest(docs, corpus),
                progress=report,
            )
        with watch.stage("fit the bases"):
            bases = fit_bases(
                cap,
                budget,
                key_mode=key_mode,
                metric=metric,
                value_metrics=output_metrics(loaded.model) if metric == "attention" else None,
                rope_lags=rope_lags(loaded.model, max_length) if metric == "attention" else None,
                allocation=allocation,
                fingerprint=fp.get("config_sha256"),
            )
            bases.save(tmp)
        with watch.stage("score dense and low-rank caches on held-out windows"):
            got = score_caches(
                loaded.model,
                loaded.tokenizer,
                held,
                {"kv": lambda: LowRankCache(bases, loaded.model, latent_bits=latent_bits)},
                max_length=max_length,
                chunk=chunk,
                progress=report,
            )
        dense, kv = got["dense"], got["kv"]
        record: dict[str, Any] = {
            "budget": budget,
            "cache_bytes": kv["bytes"],
            "dense_cache_bytes": dense["bytes"],
            "bytes_ratio": kv["bytes"] / max(dense["bytes"], 1),
            "ppl_dense": dense["ppl"],
            "ppl_kv": kv["ppl"],
            "ppl_change": kv["ppl"] / dense["ppl"] - 1.0,
            "kl": kv["kl"],
            "top1": kv["top1"],
            "tokens": kv["tokens"],
            "bases_bytes": LowRankCache(bases, loaded.model).bases_nbytes(),
            "latent_bits": latent_bits,
            "key_mode": key_mode,
            "metric": metric,
            "allocation": allocation,
            "kept_share": bases.kept_share(),
            "ranks": bases.ranks(),
            "config": {
                "model": model,
                "corpus": corpus,
                "split": split,
                "limit": limit,
                "eval_split": eval_split,
                "eval_limit": eval_limit,
                "max_length": max_length,
                "chunk": chunk,
                "device": device,
                "dtype": dtype,
            },
            "model": fp,
            "texts": {
                "fit": corpus_manifest(docs, corpus),
                "heldout": corpus_manifest(held, corpus),
            },
            "capture": {"tokens": cap.manifest["roles"]["model"]["tokens"]},
            "versions": versions(),
            "machine": machine(),
            "stages": watch.rows,
        }
        import shutil

        shutil.rmtree(tmp / ".scratch")
        write_json_atomic(tmp / "kv.json", record)
        write_text_atomic(tmp / "report.md", _report(record, watch))
    return record


def _report(r: dict[str, Any], watch: Any) -> str:
    c = r["config"]
    lines = [
        f"# Low-rank KV cache: {c['model']}, budget {r['budget']:g}",
        "",
        f"Keys: {r['key_mode']}; metric: {r['metric']}; latents: "
        f"{'int' + str(r['latent_bits']) if r['latent_bits'] else c['dtype']}; "
        f"ranks: {r['allocation']}; "
        f"kept share of the key and value dimensions {r['kept_share']:.3f}. "
        f"Held-out: {c['corpus']}:{c['eval_split']} "
        f"({r['tokens']} scored tokens, windows of {c['max_length']} fed in chunks of "
        f"{c['chunk']}).",
        "",
        "| cache | bytes held | bytes ratio | perplexity | KL to dense | top-1 |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense (DynamicCache) | {r['dense_cache_bytes']:,} | 1.000 | {r['ppl_dense']:.3f} "
        "| 0 | 1.000 |",
        f"| low-rank | {r['cache_bytes']:,} | {r['bytes_ratio']:.3f} | {r['ppl_kv']:.3f} "
        f"({100 * r['ppl_change']:+.2f} %) | {r['kl']:.4f} | {r['top1']:.3f} |",
        "",
        f"The bases themselves: {r['bases_bytes']:,} bytes (not in the cache's count).",
        "",
        "## Time and memory per stage",
        "",
        watch.table(),
        "",
    ]
    return "\n".join(lines)


__all__ = ["SUMMARY_KEYS", "output_metrics", "rope_lags", "run_kv_fit"]
