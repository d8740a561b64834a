"""The registry of capture sites: where in a decoder an activation is read, and how wide it is.

Sites are named as in TransformerLens. Block sites are captured per layer under the key
``blocks.{i}.<site>``; model-level sites are keys themselves (``final.resid``, ``final.normed``).

==============  =======================================================  ===============  =====
site            what it is                                               width            full
==============  =======================================================  ===============  =====
resid_pre       residual stream entering block i (the block's input)     hidden           yes
attn_in         output of the attention norm (what q, k, v read)         hidden           yes
mlp_in          output of the MLP norm (what gate, up read)              hidden           yes
attn_heads      per-head attention output before o_proj (o's input)      heads·head_dim   yes
mlp_hidden      act(gate(x)) * up(x), down_proj's input                  intermediate     no
q_pre / k_pre   queries / keys before RoPE (after q_norm/k_norm if any)  q_dim / kv_dim   yes
q_rope / k_rope queries / keys after the model's own RoPE                q_dim / kv_dim   yes
v               values (v_proj output)                                   kv_dim           yes
final.resid     input of the final norm                                  hidden           yes
final.normed    output of the final norm (what the LM head reads)        hidden           yes
==============  =======================================================  ===============  =====

"full" says whether Σxxᵀ is accumulated as a full matrix by default or only its diagonal:
``mlp_hidden`` is diagonal-only by default because a 8960² float64 matrix is 640 MB per layer.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    from gradfree.adapters import ModelAdapter


@dataclass(frozen=True)
class Site:
    """One capture site: its name, what it is, its width on a model, and its default kind."""

    name: str
    description: str
    width: Callable[[ModelAdapter], int]
    full_default: bool = True

    @property
    def is_block(self) -> bool:
        return not self.name.startswith("final.")


def _hidden(a: ModelAdapter) -> int:
    return a.hidden_size


def _q(a: ModelAdapter) -> int:
    return a.geometry.q_dim


def _kv(a: ModelAdapter) -> int:
    return a.geometry.kv_dim


def _inter(a: ModelAdapter) -> int:
    return a.intermediate_size


SITES: dict[str, Site] = {
    s.name: s
    for s in [
        Site("resid_pre", "residual stream entering the block", _hidden),
        Site("attn_in", "output of the attention norm", _hidden),
        Site("mlp_in", "output of the MLP norm", _hidden),
        Site("attn_heads", "per-head attention output before o_proj", _q),
        Site("mlp_hidden", "act(gate) * up, the input of down_proj", _inter, full_default=False),
        Site("q_pre", "queries before RoPE (after q_norm when present)", _q),
        Site("q_rope", "queries after RoPE", _q),
        Site("k_pre", "keys before RoPE (after k_norm when present)", _kv),
        Site("k_rope", "keys after RoPE", _kv),
        Site("v", "values (v_proj output)", _kv),
        Site("final.resid", "input of the final norm", _hidden),
        Site("final.normed", "output of the final norm", _hidden),
    ]
}

DEFAULT_SITES: list[str] = ["resid_pre", "final.normed"]
DEFAULT_CROSS_SITES: list[str] = ["resid_pre", "final.normed"]


def valid_sites() -> str:
    return ", ".join(SITES)


def check_sites(names: Iterable[str], what: str = "site") -> list[str]:
    """Validate site names (order kept, duplicates dropped); unknown names raise one sentence."""
    out: list[str] = []
    for name in names:
        if name not in SITES:
            raise GradfreeError(f"Unknown {what} '{name}'; valid sites are: {valid_sites()}.")
        if name not in out:
            out.append(name)
    return out


def parse_sites(spec: str | Sequence[str] | None, default: Sequence[str] = ()) -> list[str]:
    """``"resid_pre,v"`` or a list → validated site names; None or empty → ``default``."""
    if spec is None:
        return list(default)
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [p.strip() for p in parts if p.strip()]
    return check_sites(names) if names else list(default)


def parse_layers(spec: str | Sequence[int] | None) -> list[int] | None:
    """``"all"``/None → None (every block); ``"0,2,5-7"`` or a list → sorted unique indices."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return None
    if not isinstance(spec, str):
        return sorted(set(int(i) for i in spec))
    out: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise GradfreeError("Layers are 'all' or indices such as '0,2,5-7'.") from None
    return sorted(out)


def site_key(site: str, layer: int | None) -> str:
    """The capture key of ``site`` at block ``layer`` (model-level sites ignore the layer)."""
    return f"blocks.{layer}.{site}" if SITES[site].is_block else site


def split_key(key: str) -> tuple[int | None, str]:
    """``blocks.3.resid_pre`` → (3, "resid_pre"); ``final.normed`` → (None, "final.normed")."""
    if key.startswith("blocks."):
        _, layer, site = key.split(".", 2)
        return int(layer), site
    return None, key


def keys_for(sites: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Every key of ``sites`` over ``layers``: block keys layer by layer, then model-level keys."""
    block = [s for s in sites if SITES[s].is_block]
    model = [s for s in sites if not SITES[s].is_block]
    return [site_key(s, i) for i in layers for s in block] + list(model)


def is_full(site: str, full: Sequence[str] = (), diagonal: Sequence[str] = ()) -> bool:
    """Whether ``site`` accumulates the full Σxxᵀ, after the ``full``/``diagonal`` overrides."""
    if site in full:
        return True
    if site in diagonal:
        return False
    return SITES[site].full_default


def width(site: str, adapter: ModelAdapter) -> int:
    return SITES[site].width(adapter)


def shard_of(key: str) -> str:
    """The stats shard (file stem) that holds ``key``: ``layer_003`` for blocks, else ``final``."""
    layer, _ = split_key(key)
    return "final" if layer is None else f"layer_{layer:03d}"
