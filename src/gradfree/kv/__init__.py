"""Low-rank KV caches (issue 14): per-layer linear coders of keys and values fitted from
captured statistics (PCA per head, RoPE pairs or complex maps across heads, optionally in the
attention metric), ranks under a byte budget, and a transformers ``Cache`` that holds only the
latents.

    bases = fit_bases(load_capture("cap"), 0.5, key_mode="pre_rope")   # sites k_pre, k_rope, v
    bases.save("kv")
    out = model.generate(ids, past_key_values=LowRankCache.from_dir("kv", model))

:mod:`.bases` and :mod:`.solve` are pure maths on statistics; :mod:`.cache` imports
transformers and is loaded only when :class:`LowRankCache` is first used, so that
``import gradfree.kv`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradfree.kv.bases import (
    KEY_MODES,
    METRICS,
    KVBases,
    LayerCoder,
    allocate_ranks,
    check_budget,
)
from gradfree.kv.solve import fit_bases

if TYPE_CHECKING:
    from gradfree.kv.cache import LowRankCache


def __getattr__(name: str) -> Any:
    if name == "LowRankCache":
        from gradfree.kv.cache import LowRankCache

        return LowRankCache
    raise AttributeError(f"module 'gradfree.kv' has no attribute {name!r}")


__all__ = [
    "KEY_MODES",
    "METRICS",
    "KVBases",
    "LayerCoder",
    "LowRankCache",
    "allocate_ranks",
    "check_budget",
    "fit_bases",
]
