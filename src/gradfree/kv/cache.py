"""A transformers ``Cache`` that holds only low-rank latents of keys and values.

:class:`LowRankCache` has one :class:`LowRankLayer` per decoder layer (transformers'
``CacheLayerMixin``, as ``DynamicLayer`` and ``QuantizedLayer`` are), so ``model(...,
past_key_values=cache)`` and ``model.generate(..., past_key_values=cache)`` need no changes. The
attention hands ``update`` its post-RoPE keys and values (batch, kv_heads, tokens, head_dim); the
layer stores, per token, the latent z = E (x − μ) of its flattened keys and one of its values
(:class:`~gradfree.kv.bases.LayerCoder`), so attention sees only what is stored: with
``gradfree_lowrank`` attention (:mod:`gradfree.kv.attention`) the latents themselves, else the
reconstruction D z + μ of every cached token, the new ones included (also under
``gradfree_lowrank`` for an update of 64 or more new tokens, a prefill, where reconstructing once
lets the model's own sdpa kernel run; the maths is the same).

In ``pre_rope`` mode the bases describe keys before RoPE. The cache learns the positions of the
tokens being added from a forward hook on the model's rotary embedding (:class:`_RopeTap`, one per
rotary module, removed when the last cache using it is collected), un-rotates the incoming keys
with the model's own (cos, sin), stores the latent and the positions (int64, once per cache), and
re-rotates the reconstructed keys of all cached tokens with (cos, sin) of their positions, computed
once per forward pass and shared by the layers. RoPE's rotation times the rotary's attention
scaling s is inverted as (k cos − rotate_half(k) sin) / (cos² + sin²).

``LowRankCache(bases, model, latent_bits=8)`` (or 4: two codes per byte) stores the latents as
int8 with one float16 absmax
scale per token and KV head (per token, when latents mix heads): r + 2 bytes per token and
head instead of 4r (float32) or 2r (bf16).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from gradfree.base.errors import GradfreeError
from gradfree.kv.attention import MARK, use_lowrank_attention
from gradfree.kv.bases import KVBases, LayerCoder

ATTENTION = ("latent", "reconstruct")
PREFILL_QUERIES = 64  # from this many new tokens on, attention gets reconstructed states

_TAPS: weakref.WeakKeyDictionary[nn.Module, _RopeTap] = weakref.WeakKeyDictionary()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _RopeTap:
    """Records the position ids of the latest call of one rotary embedding module."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = weakref.ref(rotary)
        self.calls = 0
        self.positions: torch.Tensor | None = None
        self.users = 0
        self.handle = rotary.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
        self.positions = None if pos is None else pos.detach()
        self.calls += 1

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.handle.remove()
            rotary = self.rotary()
            if rotary is not None and _TAPS.get(rotary) is self:
                del _TAPS[rotary]

    @classmethod
    def acquire(cls, rotary: nn.Module) -> _RopeTap:
        tap = _TAPS.get(rotary)
        if tap is None:
            tap = _TAPS[rotary] = cls(rotary)
        tap.users += 1
        return tap


class _Positions:
    """What the layers of one pre-RoPE cache share: the cached token positions (batch, tokens)
    and, per forward pass, (cos, sin) of all of them."""

    def __init__(self, tap: _RopeTap, rotary: nn.Module) -> None:
        self.tap = tap
        self.rotary = rotary
        self.positions: torch.Tensor | None = None
        self.seen = -1
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def advance(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) in float32 of every cached token after adding ``keys``' tokens; the first
        layer of a forward pass appends the new positions."""
        if self.tap.calls != self.seen:
            new = self.tap.positions
            b, t = keys.shape[0], keys.shape[-2]
            if new is None or new.shape[-1] != t:
                raise GradfreeError(
                    "The low-rank cache could not see the positions of the new tokens "
                    "(the model's rotary embedding was not called for them)."
                )
            new = new.to(device=keys.device, dtype=torch.int64).expand(b, t)
            old = self.positions
            self.positions = new.clone() if old is None else torch.cat([old, new], dim=1)
            # The model's own rotary, in the keys' dtype: the same (cos, sin) values that rotated
            # them. ``forward`` is called directly so that the tap does not count this call.
            like = torch.empty(0, dtype=keys.dtype, device=keys.device)
            cos, sin = self.rotary.forward(like, self.positions)
            self.cos_sin = (cos.float(), sin.float())
            self.seen = self.tap.calls
        assert self.cos_sin is not None
        return self.cos_sin

    def nbytes(self) -> int:
        p = self.positions
        return 0 if p is None else p.numel() * p.element_size()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.positions is not None:
            self.positions = fn(self.positions)
            self.seen = -1  # (cos, sin) follow the positions on the next forward pass

    def reset(self) -> None:
        self.positions, self.cos_sin, self.seen = None, None, -1


class _Coder:
    """One layer's :class:`~gradfree.kv.bases.LayerCoder` on one device in float32, with each KV
    head's decoder block for attention on the latents."""

    def __init__(self, coder: LayerCoder, n_kv: int, hd: int, device: torch.device) -> None:
        self.encoder = coder.encoder.to(device=device, dtype=torch.float32)
        self.decoder = coder.decoder.to(device=device, dtype=torch.float32)
        self.mean = coder.mean.to(device=device, dtype=torch.float32)
        self.n_kv, self.hd = n_kv, hd
        slices = coder.head_slices()
        self.blocks = slices  # per-head latent columns, None when latents mix heads
        cols = slices or [slice(None)] * n_kv
        self.heads = [
            (
                self.decoder[g * hd : (g + 1) * hd, cols[g]],
                self.mean[g * hd : (g + 1) * hd],
                cols[g],
            )
            for g in range(n_kv)
        ]

    def encode(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(b, heads, t, hd) → (b, t, R) in ``dtype``."""
        b, n, t, hd = x.shape
        flat = x.float().transpose(1, 2).reshape(b, t, n * hd) - self.mean
        if self.blocks is None:
            return (flat @ self.encoder.T).to(dtype)
        # block-diagonal: each head's latent reads only its own dims
        parts = [
            flat[..., g * hd : (g + 1) * hd] @ self.encoder[cols, g * hd : (g + 1) * hd].T
            for g, cols in enumerate(self.blocks)
        ]
        return torch.cat(parts, dim=-1).to(dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(b, T, R) → (b, heads, T, hd) in float32."""
        z = z.float()
        return torch.stack([z[..., cols] @ d.T + mu for d, mu, cols in self.heads], dim=1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.encoder, self.decoder, self.mean))


class _Latents:
    """What attention on the latents needs of one layer's keys or values: all cached latents
    (b, T, R) in float32 and the per-head decoder blocks."""

    def __init__(self, latents: torch.Tensor, coder: _Coder) -> None:
        self.latents = latents
        self.heads = coder.heads


class _Store:
    """The latents of one layer's keys or values (b, tokens, R): in the states' own dtype, or
    (``bits`` 8 or 4) as symmetric integers with one float16 absmax scale per token and latent
    block (``blocks``: a KV head's block for per-head coders, the whole latent otherwise; for
    4 bits, groups of 16 dims of it); 4-bit codes are packed two per byte (uint8)."""

    def __init__(self, bits: int | None, blocks: list[slice] | None) -> None:
        self.bits = bits
        self.blocks = blocks
        self.data: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.width = 0

    def append(self, z: torch.Tensor) -> None:
        scales = None
        self.width = z.shape[-1]
        if self.bits is not None:
            z, scales = _quantize(z, self.blocks, self.bits)
        self.data = z if self.data is None else torch.cat([self.data, z], dim=1)
        if scales is not None:
            self.scales = scales if self.scales is None else torch.cat([self.scales, scales], 1)

    def latents(self) -> torch.Tensor:
        """Every cached latent (b, T, R) in float32."""
        assert self.data is not None
        if self.bits is None:
            return self.data.float()
        assert self.scales is not None
        q = _unpack4(self.data, self.width) if self.bits == 4 else self.data
        return _dequantize(q, self.scales, self.blocks)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.data is not None:
            self.data = fn(self.data)
        if self.scales is not None:
            self.scales = fn(self.scales)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales) if t is not None)

    def clear(self) -> None:
        self.data, self.scales = None, None


def _quantize(
    z: torch.Tensor, blocks: list[slice] | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes in [−L, L] (L = 2^(bits−1) − 1) with a float16 absmax scale per token and
    block, z ≈ q · scale: int8, or for 4 bits packed two per byte."""
    levels = 2 ** (bits - 1) - 1
    z = z.float()
    parts = blocks or [slice(None)]
    amax = torch.stack(
        [
            z[..., s].abs().amax(dim=-1) if z[..., s].numel() else z.new_zeros(z.shape[:-1])
            for s in parts
        ],
        dim=-1,
    )
    scale = (amax / levels).to(torch.float16)
    safe = _expand(scale.float().clamp_min(torch.finfo(torch.float16).tiny), blocks, z.shape[-1])
    q = torch.round(z / safe).clamp_(-levels, levels).to(torch.int8)
    return (_pack4(q) if bits == 4 else q), scale


INT4_GROUP = 16  # latent dims per int4 scale: PCA latents span a wide range within a head


def _groups(coder: LayerCoder, bits: int | None) -> list[slice] | None:
    """The latent columns that share one scale: a KV head's block (the whole latent when
    latents mix heads), cut into groups of INT4_GROUP consecutive dims for int4."""
    blocks = coder.head_slices() or [slice(0, coder.rank)]
    if bits != 4:
        return coder.head_slices()
    return [
        slice(a, min(a + INT4_GROUP, b.stop))
        for b in blocks
        for a in range(b.start, b.stop, INT4_GROUP)
    ] or None


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [−7, 7] (…, R) → uint8 (…, ⌈R/2⌉), two offset nibbles per byte."""
    u = (q + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.cat([u, u.new_full((*u.shape[:-1], 1), 8)], dim=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(p: torch.Tensor, width: int) -> torch.Tensor:
    lo, hi = (p & 15).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], -1)[..., :width]


def _expand(scale: torch.Tensor, blocks: list[slice] | None, width: int) -> torch.Tensor:
    """Per-block scales (b, T, blocks) → per latent dim (b, T, width)."""
    if blocks is None:
        return scale.expand(*scale.shape[:-1], width)
    sizes = torch.tensor([s.stop - s.start for s in blocks], device=scale.device)
    return scale.repeat_interleave(sizes, dim=-1)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, blocks: list[slice] | None) -> torch.Tensor:
    return q.float() * _expand(scale.float(), blocks, q.shape[-1])


class LowRankLayer(CacheLayerMixin):
    """One decoder layer's cache: the latents of its keys and of its values (b, tokens, R), in
    the states' dtype or, with ``latent_bits`` 8 or 4, as integers with per-token scales."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(
        self,
        keys: LayerCoder,
        values: LayerCoder,
        n_kv: int,
        head_dim: int,
        positions: _Positions | None,
        latent_bits: int | None = None,
        latent_attention: bool = True,
    ) -> None:
        super().__init__()
        self._coders = (keys, values)
        self._shape = (n_kv, head_dim)
        self._positions = positions
        self.latent_attention = latent_attention
        self.latent_keys = _Store(latent_bits, _groups(keys, latent_bits))
        self.latent_values = _Store(latent_bits, _groups(values, latent_bits))
        self.length = 0
        self._k: _Coder | None = None
        self._v: _Coder | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self._k is None or self._k.encoder.device != self.device:
            self._k = _Coder(self._coders[0], *self._shape, self.device)
            self._v = _Coder(self._coders[1], *self._shape, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None
        if tuple(key_states.shape[1:2]) + tuple(key_states.shape[3:]) != self._shape:
            raise GradfreeError(
                f"The low-rank cache holds {self._shape[0]} KV heads of {self._shape[1]} dims "
                f"per layer, the model gave {key_states.shape[1]} of {key_states.shape[-1]}."
            )
        cos_sin = None
        keys = key_states
        if self._positions is not None:
            # .to: under a device map the layers (and their keys) live on several devices.
            cos, sin = (x.to(key_states.device) for x in self._positions.advance(key_states))
            t = key_states.shape[-2]
            c, s = cos[:, -t:].unsqueeze(1), sin[:, -t:].unsqueeze(1)
            k = key_states.float()
            keys = (k * c - _rotate_half(k) * s) / (c * c + s * s)
            cos_sin = (cos.unsqueeze(1), sin.unsqueeze(1))
        self.latent_keys.append(self._k.encode(keys, key_states.dtype))
        self.latent_values.append(self._v.encode(value_states, value_states.dtype))
        self.length += key_states.shape[-2]
        z_k = self.latent_keys.latents()
        # Many queries at once (a prefill): reconstructing the cached states once costs less than
        # latent attention's extra work per query, and lets the model's sdpa kernel run. Same
        # maths either way: attention sees what is stored.
        latent = self.latent_attention and key_states.shape[-2] < PREFILL_QUERIES
        k_hat: torch.Tensor | None = None
        if cos_sin is not None or not latent:
            k_hat = self._k.decode(z_k)
            if cos_sin is not None:
                k_hat = k_hat * cos_sin[0] + _rotate_half(k_hat) * cos_sin[1]
        if latent:
            # A placeholder that carries the latents to gradfree_lowrank attention.
            mark = torch.empty(0, device=value_states.device, dtype=value_states.dtype)
            setattr(
                mark,
                MARK,
                (_Latents(z_k, self._k), _Latents(self.latent_values.latents(), self._v), k_hat),
            )
            keys_out = mark if k_hat is None else k_hat.to(key_states.dtype)
            return keys_out, mark
        assert k_hat is not None
        v_hat = self._v.decode(self.latent_values.latents())
        return k_hat.to(key_states.dtype), v_hat.to(value_states.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return self.latent_keys.nbytes() + self.latent_values.nbytes()

    def bases_nbytes(self) -> int:
        return sum(t.numel() * 4 for c in self._coders for t in (c.encoder, c.decoder, c.mean))

    # transformers' cache operations -------------------------------------------------------
    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.length:
            self.latent_keys.map(fn)
            self.latent_values.map(fn)

    def reset(self) -> None:
        self.latent_keys.clear()
        self.latent_values.clear()
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda z: z.index_select(0, beam_idx.to(z.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda z: z.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda z: z[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers 5's convention: negative)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        n = min(-tokens_to_remove, self.length)
        if n:
            self._map(lambda z: z[:, : self.length - n])
            self.length -= n
            if self.length == 0:
                self.reset()

    def offload(self) -> None:  # latents stay where they are (no offloading)
        return None

    def prefetch(self) -> None:
        return None


class LowRankCache(Cache):
    """A KV cache of low-rank latents from :class:`~gradfree.kv.bases.KVBases`.

    ``LowRankCache(bases, model)`` checks the bases against ``model`` (type, depth, KV heads,
    head_dim, config fingerprint). ``latent_bits=8`` (or 4) stores the latents as int8 (or
    int4, two per byte) with a float16 absmax scale per token and block (None: in the model's
    dtype). ``attention="latent"`` (the default) switches ``model`` to ``gradfree_lowrank``
    attention (:mod:`gradfree.kv.attention`: scores on the key latents where the key mode
    allows, values decoded once per query token; sdpa for every other cache);
    ``attention="reconstruct"`` leaves the model's attention as it is and hands it the
    reconstructed keys and values of every cached token. :meth:`nbytes` counts every tensor
    the cache holds (latents, scales, and positions in pre_rope mode); :meth:`bases_nbytes` the
    bases, counted separately.
    """

    def __init__(
        self,
        bases: KVBases,
        model: nn.Module,
        *,
        latent_bits: int | None = None,
        attention: str = "latent",
    ) -> None:
        from gradfree.adapters import get_adapter

        if latent_bits not in (None, 8, 4):
            raise GradfreeError(f"latent_bits must be 8, 4 or None, not {latent_bits}.")
        if attention not in ATTENTION:
            raise GradfreeError(
                f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}."
            )
        bases.check_model(model)
        self.bases = bases
        self.attention = attention
        if attention == "latent":
            use_lowrank_attention(model)
        self._positions: _Positions | None = None
        if bases.key_mode == "pre_rope":
            rotary = get_adapter(model).rotary_emb
            tap = _RopeTap.acquire(rotary)
            self._positions = _Positions(tap, rotary)
            weakref.finalize(self, tap.release)
        shape = (bases.num_kv_heads, bases.head_dim)
        layers: list[Any] = [
            LowRankLayer(k, v, *shape, self._positions, latent_bits, attention == "latent")
            for k, v in zip(bases.keys, bases.values, strict=True)
        ]
        super().__init__(layers=layers)

    @classmethod
    def from_dir(
        cls,
        folder: str | Path,
        model: nn.Module,
        *,
        latent_bits: int | None = None,
        attention: str = "latent",
    ) -> LowRankCache:
        """The cache of the bases saved in ``folder`` (:meth:`KVBases.save`) for ``model``."""
        bases = KVBases.load(folder, model)
        return cls(bases, model, latent_bits=latent_bits, attention=attention)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: latents, plus positions in pre_rope mode."""
        held = sum(layer.nbytes() for layer in self._low_rank_layers())
        return held + (self._positions.nbytes() if self._positions is not None else 0)

    def bases_nbytes(self) -> int:
        """Bytes of the coders (float32 encoder, decoder and mean per layer), not in
        :meth:`nbytes`."""
        return sum(layer.bases_nbytes() for layer in self._low_rank_layers())

    def _low_rank_layers(self) -> list[LowRankLayer]:
        return [layer for layer in self.layers if isinstance(layer, LowRankLayer)]

    def _map_positions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._positions is not None:
            self._positions.map(fn)

    def reset(self) -> None:
        super().reset()
        if self._positions is not None:
            self._positions.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda p: p.index_select(0, beam_idx.to(p.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda p: p.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda p: p[indices])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        length = self.get_seq_length()
        self._map_positions(lambda p: p[:, :length])


__all__ = ["LowRankCache", "LowRankLayer"]
