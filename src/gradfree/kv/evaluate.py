"""One scoring protocol for every KV cache: the bytes it holds and what it costs the model.

:func:`cache_bytes` counts the bytes of every tensor a transformers ``Cache`` holds after a
forward pass: ``DynamicCache``'s keys and values; ``QuantizedCache``'s quantized payloads with
their scales and zero points *and* its full-precision residual buffer (quanto, HQQ and FP8
backends); a cache with its own ``nbytes()`` (:class:`~gradfree.kv.cache.LowRankCache`: latents
and positions, its bases counted apart by ``bases_nbytes()``) answers for itself.

:func:`score_caches` runs the model over the windows of some documents
(:func:`gradfree.evaluation.reference.windows`: each document cut into consecutive windows of at
most ``max_length`` tokens) once per cache, each window with a fresh cache from its factory, and
scores every cache against the model's own ``DynamicCache`` ("dense", always scored, the
reference): perplexity, KL(dense ‖ cache) per predicted token, top-1 agreement with dense, the
bytes the cache holds after the window, with :class:`~gradfree.evaluation.reference.Sums`' and
:class:`~gradfree.evaluation.reference.TeacherRows`' arithmetic on float64 log-probs.

Why chunks. A window is fed ``chunk`` tokens at a time with ``use_cache=True``, so every chunk
after the first attends to the earlier ones only through what the cache stores. Fed in one
forward pass, a window would never read the cache back: attention would use the incoming
full-precision states, and every cache would score exactly as dense. ``QuantizedCache`` is the
sharpest case: the update that initialises a layer returns the incoming states unquantized (and
stores them quantized), later updates return the dequantized store, its full-precision residual
buffer (at most ``residual_length`` tokens, 128 by default) and the new states. Within one chunk
the tokens see each other as the cache returns them for that update, as in a prefill; ``chunk=1``
is token-by-token decoding. The dense reference is fed in the same chunks (its logits equal
one unchunked pass to float rounding, which the tests check).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradfree.base.errors import GradfreeError
from gradfree.evaluation.reference import Sums, TeacherRows, windows

if TYPE_CHECKING:
    from torch import nn
    from transformers.cache_utils import Cache

    from gradfree.base.progress import ProgressFn

DENSE = "dense"


def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor ``cache`` holds (module docstring).

    A cache with an ``nbytes()`` method counts itself. Otherwise the cache's attributes are
    walked (its layers, and the lists, tuples and dicts they hold, such as HQQ's
    ``(payload, meta)`` with ``meta["scale"]``/``meta["zero"]``). A plain tensor counts the
    bytes of its storage, each storage once, since that is the memory kept alive (views share
    it; the empty placeholders of an unfilled buffer count 0). A tensor subclass that wraps
    others (quanto's ``WeightQBitsTensor``, whose ``nbytes`` reports the dequantized size) is
    counted through ``__tensor_flatten__``: its ``_data`` (a ``PackedTensor`` of uint8, two 4-bit
    or four 2-bit codes per byte, itself flattened to its ``_data``), ``_scale`` and ``_shift``.
    Objects that are neither caches, layers nor containers (quanto's optimizer, HQQ's quantizer
    class) hold no cached state and are not entered.
    """
    own = getattr(cache, "nbytes", None)
    if callable(own):
        return int(own())
    return _held(cache, set(), set())


def _held(obj: Any, storages: set[tuple[str, int]], visited: set[int]) -> int:
    from transformers.cache_utils import Cache, CacheLayerMixin

    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
            obj, "__tensor_flatten__"
        ):
            names, _ = obj.__tensor_flatten__()
            return sum(_held(getattr(obj, n), storages, visited) for n in names)
        storage = obj.untyped_storage()
        key = (str(obj.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in storages:
            return 0
        storages.add(key)
        return int(storage.nbytes())
    if id(obj) in visited:
        return 0
    visited.add(id(obj))
    if isinstance(obj, dict):
        return sum(_held(v, storages, visited) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_held(v, storages, visited) for v in obj)
    if isinstance(obj, Cache | CacheLayerMixin):
        inner = getattr(obj, "nbytes", None)
        if callable(inner) and isinstance(obj, CacheLayerMixin):
            return int(inner())
        return sum(_held(v, storages, visited) for v in vars(obj).values())
    return 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def chunked_logits(model: nn.Module, ids: torch.Tensor, cache: Cache, chunk: int) -> torch.Tensor:
    """Float32 logits (t, vocab) on the CPU of one window ``ids`` (t,) fed ``chunk`` tokens at a
    time through ``model`` with ``cache`` (filled in place)."""
    dev = _device(model)
    rows = []
    for s in range(0, len(ids), chunk):
        x = ids[s : s + chunk][None].to(dev)
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        rows.append(out.logits[0].float().cpu())
    return torch.cat(rows)


def _fresh(name: str, factory: Callable[[], Cache]) -> Cache:
    cache = factory()
    if cache.get_seq_length() != 0:
        raise GradfreeError(
            f"The cache factory '{name}' returned a cache that already holds tokens; "
            "it must make a new one on every call."
        )
    return cache


@torch.no_grad()
def score_caches(
    model: nn.Module,
    tokenizer: Any,
    docs: Sequence[Any],
    factories: dict[str, Callable[[], Cache]],
    *,
    max_length: int,
    chunk: int,
    min_tokens: int = 2,
    progress: ProgressFn | None = None,
) -> dict[str, dict[str, Any]]:
    """Score each cache of ``factories`` (name → a function making a new, empty cache) and the
    dense ``DynamicCache`` on the windows of ``docs`` fed in chunks (module docstring).

    Per name ("dense" first, then the factories' order): ``ppl``, ``kl`` (KL(dense ‖ cache) per
    predicted token, nats), ``top1`` (agreement with dense's argmax), ``tokens`` (predicted
    positions), ``doc_kl``/``doc_tokens`` (per document, for
    :func:`~gradfree.evaluation.reference.bootstrap_delta`), ``bytes`` (:func:`cache_bytes`
    after the longest window, of ``bytes_tokens`` tokens: the same window for every cache),
    ``bytes_per_token`` (Σ bytes after each window / Σ window tokens: QuantizedCache's count
    swings with how full its residual buffer happens to be when a window ends),
    ``bases_bytes`` (for a cache that has ``bases_nbytes()``, else 0), ``windows`` and
    ``seconds`` (this cache's forward passes).
    """
    from transformers import DynamicCache

    if DENSE in factories:
        raise GradfreeError(f"'{DENSE}' is the reference DynamicCache; name the factory otherwise.")
    if chunk < 1 or max_length < 2:
        raise GradfreeError(
            f"The chunk must be at least 1 and the window at least 2 tokens, not {chunk} and "
            f"{max_length}."
        )
    ids, owner = windows(tokenizer, docs, max_length, min_tokens=min_tokens)
    if not ids:
        raise GradfreeError("The documents have no window of at least two tokens to score.")
    config = getattr(model, "config", None)  # a transformers model's; None for a bare module
    makers: dict[str, Callable[[], Cache]] = {DENSE: lambda: DynamicCache(config=config)}
    makers.update(factories)
    n_docs = max(owner) + 1
    sums = {name: Sums(n_docs) for name in makers}
    held = dict.fromkeys(makers, 0)
    total = dict.fromkeys(makers, 0)
    bases = dict.fromkeys(makers, 0)
    seconds = dict.fromkeys(makers, 0.0)
    longest = max(range(len(ids)), key=lambda k: (len(ids[k]), -k))
    for k, w in enumerate(ids):
        targets = w[1:]
        rows: TeacherRows | None = None
        for name, make in makers.items():
            cache = _fresh(name, make)
            t0 = time.perf_counter()
            # float64: the KL is a difference of two sums over t × vocab terms; in float32 a
            # real model's dense run scored against itself came out at -3e-4 nats per token.
            logits = chunked_logits(model, w, cache, chunk).double()
            logp = torch.log_softmax(logits, -1)[:-1]
            seconds[name] += time.perf_counter() - t0
            if rows is None:  # dense comes first: the reference of this window
                rows = TeacherRows.of(logp)
            sums[name].add_rows(logp, rows, targets, owner[k])
            now = cache_bytes(cache)
            total[name] += now
            if k == longest:
                held[name] = now
                own_bases = getattr(cache, "bases_nbytes", None)
                bases[name] = int(own_bases()) if callable(own_bases) else 0
            del cache
        if progress is not None:
            progress("score caches", k + 1, len(ids), "windows")
    return {
        name: {
            **sums[name].result(),
            "bytes": held[name],
            "bytes_tokens": len(ids[longest]),
            "bytes_per_token": total[name] / sum(len(w) for w in ids),
            "bases_bytes": bases[name],
            "windows": len(ids),
            "seconds": round(seconds[name], 3),
        }
        for name in makers
    }


__all__ = ["DENSE", "cache_bytes", "chunked_logits", "score_caches"]
