"""Extract concept directions from a decoder: concept mean − mean over concepts, per layer.

Each concept is rendered into every template; the residual stream at the OUTPUT of decoder block
``L`` (Hugging Face's ``hidden_states[L + 1]``, before the final norm even for the last block) is
pooled over the concept's own tokens, found through the fast tokenizer's offset mapping (every
token whose character span overlaps the concept's), either as their mean (``"mean"``) or as the
last one (``"last"``). Pooled vectors are upcast to float64 at once (a bf16 model is fine),
averaged over templates, and the mean over concepts is subtracted.

Only blocks ``0 … max(layers)`` run: forward hooks on the requested blocks keep their outputs and
the hook of the deepest one raises a private exception that ends the forward pass, so the later
blocks, the final norm and the vocabulary-wide logits are never computed. Batches are padded on
the right, so real tokens keep their positions and, under the causal mask, never see the padding;
sequences are sorted by length to keep the padding small.

A template's text before the concept is the same for every concept, so (``prefix_cache=True``)
its keys and values are computed once and every batch runs only the tokens from the concept on,
attending to that cache: about 2.5x fewer tokens with the default templates. A sequence whose
first tokens are not the prefix's own tokenization (a merge across the boundary) runs in full.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gradfree.base.errors import GradfreeError
from gradfree.base.progress import ProgressFn, counter, reporting
from gradfree.directions.concepts import TEMPLATES
from gradfree.directions.store import POOLINGS, Directions, direction_key

if TYPE_CHECKING:
    import torch

PLACEHOLDER = "{concept}"


class _StopAfterDeepest(Exception):
    """Raised by the deepest requested block's hook: nothing after it is needed."""


@dataclass(frozen=True)
class _Item:
    """One (concept, template) sequence: the token ids after the cached prefix (all of them when
    ``prefix`` is 0) and the inclusive range of the concept's tokens among those ids."""

    concept: int
    ids: list[int]
    first: int
    last: int
    template: int = 0
    prefix: int = 0  # number of leading tokens served from the template's prefix cache

    @property
    def group(self) -> tuple[int, int]:
        return (self.template, self.prefix)


def _check_concepts(concepts: Sequence[str]) -> list[str]:
    if isinstance(concepts, str):
        raise GradfreeError("The concepts must be a list of words, not one string.")
    out = list(concepts)
    if not out:
        raise GradfreeError("The concept list is empty.")
    bad = next((c for c in out if not isinstance(c, str)), None)
    if bad is not None:
        raise GradfreeError(f"Every concept must be a string, not {type(bad).__name__} {bad!r}.")
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(c for c in out if c in seen or seen.add(c))  # type: ignore[func-returns-value]
        raise GradfreeError(f"The concept list has duplicates (for example '{dup}').")
    return out


def _check_templates(templates: Sequence[str]) -> list[str]:
    out = [templates] if isinstance(templates, str) else list(templates)
    if not out:
        raise GradfreeError("At least one template is needed.")
    for t in out:
        if not isinstance(t, str) or t.count(PLACEHOLDER) != 1:
            raise GradfreeError(f"The template {t!r} must contain '{PLACEHOLDER}' exactly once.")
    if len(set(out)) != len(out):
        raise GradfreeError("The template list has duplicates.")
    return out


def _check_layers(layers: Sequence[int] | int, num_layers: int) -> list[int]:
    raw = [layers] if isinstance(layers, int) else list(layers)
    if not raw:
        raise GradfreeError("At least one layer is needed.")
    for L in raw:
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
            raise GradfreeError(f"Layers are block indices (integers), not {L!r}.")
        if not 0 <= int(L) < num_layers:
            raise GradfreeError(
                f"Layer {L} does not exist: the model has blocks 0 to {num_layers - 1}."
            )
    return sorted({int(L) for L in raw})


def _check_poolings(poolings: Sequence[str]) -> list[str]:
    out = [poolings] if isinstance(poolings, str) else list(poolings)
    if not out or any(p not in POOLINGS for p in out) or len(set(out)) != len(out):
        raise GradfreeError(
            f"Poolings must be distinct values among {', '.join(POOLINGS)}, not {out}."
        )
    return out


def concept_items(
    tokenizer: Any, concepts: list[str], templates: list[str], prefix_cache: bool = False
) -> tuple[list[_Item], dict[int, list[int]]]:
    """Tokenize every (concept, template) and locate the concept's tokens by their offsets.

    Returns the items and, with ``prefix_cache``, each template's prefix token ids (for the
    items whose sequence starts with them; their ``ids`` are the rest)."""
    if not getattr(tokenizer, "is_fast", False):
        raise GradfreeError(
            "Extracting directions needs a fast tokenizer (one that gives offset mappings)."
        )
    items: list[_Item] = []
    prefixes: dict[int, list[int]] = {}
    for t_idx, template in enumerate(templates):
        prefix, suffix = template.split(PLACEHOLDER)
        pre_ids: list[int] = []
        # Without its trailing space: BPE tokenizers attach the space to the concept's first token.
        if prefix_cache and prefix.rstrip():
            pre_ids = list(tokenizer(prefix.rstrip(), add_special_tokens=True)["input_ids"])
            prefixes[t_idx] = pre_ids
        p = len(pre_ids)
        texts = [prefix + c + suffix for c in concepts]
        enc = tokenizer(
            texts, add_special_tokens=True, return_offsets_mapping=True, truncation=False
        )
        start = len(prefix)
        for i, (c, ids, offsets) in enumerate(
            zip(concepts, enc["input_ids"], enc["offset_mapping"], strict=True)
        ):
            end = start + len(c)
            # Overlap with the concept's characters; special tokens have empty (0, 0) spans.
            hit = [j for j, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if not hit:
                raise GradfreeError(
                    f"The concept {c!r} tokenizes to nothing in the template {template!r}."
                )
            ids = list(ids)
            if p and ids[:p] == pre_ids and hit[0] >= p:
                items.append(_Item(i, ids[p:], hit[0] - p, hit[-1] - p, t_idx, p))
            else:
                items.append(_Item(i, ids, hit[0], hit[-1], t_idx, 0))
    return items, prefixes


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _prefix_kv(model: Any, deepest: Any, ids: list[int], device: Any) -> list[tuple[Any, Any]]:
    """Keys and values (batch 1) of blocks ``0 … deepest`` for one prefix (no later block runs)."""
    import torch
    from transformers import DynamicCache

    def stop(module: Any, args: Any, output: Any) -> None:
        raise _StopAfterDeepest

    cache = DynamicCache()
    handle = deepest.register_forward_hook(stop)
    try:
        model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
    except _StopAfterDeepest:
        pass
    finally:
        handle.remove()
    layers: list[Any] = list(cache.layers)
    filled = [layer for layer in layers if layer.is_initialized]
    return [(layer.keys, layer.values) for layer in filled]


def _run_batch(
    model: Any,
    blocks: Mapping[int, Any],
    batch: list[_Item],
    pad_id: int,
    device: Any,
    prefix_kv: list[tuple[Any, Any]] | None = None,
) -> dict[int, torch.Tensor]:
    """Hidden states (B, T, d) at the output of each block in ``blocks`` for one batch, whose
    items all share ``prefix_kv`` (their ``prefix`` tokens) or have none."""
    import torch

    b, t = len(batch), max(len(it.ids) for it in batch)
    p = batch[0].prefix
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p + t), dtype=torch.long)
    mask[:, :p] = 1
    for r, it in enumerate(batch):
        ids[r, : len(it.ids)] = torch.tensor(it.ids, dtype=torch.long)
        mask[r, p : p + len(it.ids)] = 1
    extra: dict[str, Any] = {}
    if p:
        from transformers import DynamicCache

        assert prefix_kv is not None
        # A fresh cache per batch: the forward appends to it, the shared prefix stays intact.
        kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv]
        positions = torch.arange(p, p + t).unsqueeze(0).expand(b, t)
        extra = {"past_key_values": DynamicCache(kv), "position_ids": positions.to(device)}
    captured: dict[int, torch.Tensor] = {}
    deepest = max(blocks)

    def make_hook(layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[layer] = _block_output(output)
            if layer == deepest:
                raise _StopAfterDeepest

        return hook

    handles = [blocks[L].register_forward_hook(make_hook(L)) for L in sorted(blocks)]
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=bool(p), **extra)
    except _StopAfterDeepest:
        pass
    finally:
        for h in handles:
            h.remove()
    if set(captured) != set(blocks):
        raise RuntimeError(f"blocks {sorted(set(blocks) - set(captured))} never ran")
    return captured


def pool(h: torch.Tensor, first: torch.Tensor, last: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, d) float64 pooled over the inclusive token ranges ``first … last`` of each row."""
    import torch

    h64 = h.to(torch.float64)
    if pooling == "last":
        return h64[torch.arange(h64.shape[0], device=h64.device), last]
    pos = torch.arange(h64.shape[1], device=h64.device).unsqueeze(0)
    inside = (pos >= first.unsqueeze(1)) & (pos <= last.unsqueeze(1))
    # where(), not a product: whatever sits at padded positions cannot leak in (0 * nan = nan).
    total = torch.where(inside.unsqueeze(-1), h64, torch.zeros((), dtype=torch.float64)).sum(1)
    return total / inside.sum(1, keepdim=True).to(torch.float64)


def _model_record(
    adapter: Any, fingerprint: Mapping[str, Any] | None, spec: str | None, dtype: str
) -> dict[str, Any]:
    from gradfree.models.load import weights_digest

    fp = dict(fingerprint or {})
    name = fp.get("name") or getattr(adapter.config, "_name_or_path", None) or None
    return {
        "spec": spec,
        "name": name,
        "weights_sha256": weights_digest(fp) if fp.get("weights_sha256") else None,
        "tokenizer_sha256": fp.get("tokenizer_sha256"),
        "hidden_size": adapter.hidden_size,
        "model_type": adapter.model_type,
        "num_layers": adapter.num_layers,
        "dtype": dtype,
    }


def extract_directions(
    model: Any,
    tokenizer: Any,
    concepts: Sequence[str],
    *,
    layers: Sequence[int] | int,
    templates: Sequence[str] = TEMPLATES,
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 64,
    device: str | Any = "cpu",
    progress: bool | ProgressFn | None = None,
    prefix_cache: bool = True,
    fingerprint: Mapping[str, Any] | None = None,
    spec: str | None = None,
    concept_source: Mapping[str, Any] | None = None,
) -> Directions:
    """Directions of ``concepts`` at the output of blocks ``layers`` (see the module docstring).

    ``model`` stays on its own device and dtype; inputs go to ``device``. ``fingerprint`` and
    ``spec`` (from :func:`gradfree.models.load_model`) identify the model in the result, and
    ``concept_source`` (the record of :func:`~gradfree.directions.concepts.word_list`) says where
    the concepts came from; timings, throughput and peak memory are in ``source["timings"]``.
    """
    import torch

    from gradfree.adapters import get_adapter
    from gradfree.base.provenance import Stopwatch, lifetime_peak_rss_bytes

    concepts = _check_concepts(concepts)
    templates = _check_templates(templates)
    poolings = _check_poolings(poolings)
    adapter = get_adapter(model)
    layers = _check_layers(layers, adapter.num_layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GradfreeError(f"The batch size must be a positive integer, not {batch_size!r}.")
    dev = torch.device(device)
    model_dtype = next(model.parameters()).dtype
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    clock = Stopwatch()
    t0 = time.perf_counter()
    with clock.stage("tokenize"):
        items, prefixes = concept_items(tokenizer, concepts, templates, prefix_cache)
        # Batches never mix prefixes; a stable sort by length keeps the padding small and gives
        # the same batches on every run.
        items.sort(key=lambda it: (it.group, len(it.ids)))
    n, d = len(concepts), adapter.hidden_size
    keys = [direction_key(L, p) for L in layers for p in poolings]
    sums = {k: torch.zeros((n, d), dtype=torch.float64) for k in keys}
    blocks = {L: adapter.layer(L).module for L in layers}
    batches: list[list[_Item]] = []
    for _, grp in itertools.groupby(items, key=lambda it: it.group):
        g = list(grp)
        batches += [g[i : i + batch_size] for i in range(0, len(g), batch_size)]
    n_tokens = sum(len(it.ids) + it.prefix for it in items)
    with clock.stage("forward"), reporting(progress) as report, torch.inference_mode():
        advance = counter(report, "extract directions", len(items), "sequences")
        kv_cache: dict[int, list[tuple[Any, Any]]] = {}
        for batch in batches:
            tpl, n_prefix = batch[0].group
            if n_prefix and tpl not in kv_cache:
                kv_cache[tpl] = _prefix_kv(model, blocks[max(layers)], prefixes[tpl], dev)
            kv = kv_cache[tpl] if n_prefix else None
            hidden = _run_batch(model, blocks, batch, pad_id, dev, kv)
            first = torch.tensor([it.first for it in batch], device=dev)
            last = torch.tensor([it.last for it in batch], device=dev)
            rows = torch.tensor([it.concept for it in batch])
            for L in layers:
                for p in poolings:
                    pooled = pool(
                        hidden[L], first.to(hidden[L].device), last.to(hidden[L].device), p
                    )
                    sums[direction_key(L, p)].index_add_(0, rows, pooled.cpu())
            advance(len(batch))
    total_s = time.perf_counter() - t0

    vectors: dict[str, np.ndarray] = {}
    means: dict[str, np.ndarray] = {}
    for k in keys:
        concept_mean = sums[k].numpy() / len(templates)
        means[k] = concept_mean.mean(axis=0)
        vectors[k] = (concept_mean - means[k]).astype(np.float32)
    del sums

    stages = {r["stage"]: r for r in clock.rows}
    timings = {
        "tokenize_s": stages["tokenize"]["seconds"],
        "forward_s": stages["forward"]["seconds"],
        "total_s": round(total_s, 2),
        "concepts_per_s": round(n / total_s, 2) if total_s > 0 else None,
        "sequences": len(items),
        "tokens": n_tokens,
        "tokens_run": sum(len(it.ids) for it in items),
        "padded_tokens_run": sum(len(b) * max(len(it.ids) for it in b) for b in batches),
        "prefix_cache": prefix_cache,
        "cached_sequences": sum(1 for it in items if it.prefix),
        "batch_size": batch_size,
        "blocks_run": max(layers) + 1,
        "peak_rss_gib": round(max(r["peak_rss_gib"] for r in clock.rows), 3),
        "lifetime_peak_rss_gib": round(lifetime_peak_rss_bytes() / 2**30, 3),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }
    source: dict[str, Any] = dict(concept_source or {})
    source.update(
        {
            "n_concepts": n,
            "add_special_tokens": True,
            "padding": "right",
            "timings": timings,
        }
    )
    return Directions(
        concepts=concepts,
        templates=templates,
        layers=layers,
        poolings=poolings,
        vectors=vectors,
        global_mean=means,
        model=_model_record(adapter, fingerprint, spec, str(model_dtype).removeprefix("torch.")),
        source=source,
    )
