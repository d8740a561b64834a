"""A transformers ``Cache`` that holds only low-rank latents of keys and values.

:class:`LowRankCache` has one :class:`LowRankLayer` per decoder layer (transformers'
``CacheLayerMixin``, as ``DynamicLayer`` and ``QuantizedLayer`` are), so ``model(...,
past_key_values=cache)`` and ``model.generate(..., past_key_values=cache)`` need no changes. The
attention hands ``update`` its post-RoPE keys and values (batch, kv_heads, tokens, head_dim); per
KV head h the layer stores z = (x − μ_h) P_h (batch, tokens, r_h), and returns the reconstruction
μ_h + z P_hᵀ of every cached token, the new ones included, so attention sees only what is stored.

In ``pre_rope`` mode the bases describe keys before RoPE. The cache learns the positions of the
tokens being added from a forward hook on the model's rotary embedding (:class:`_RopeTap`, one per
rotary module, removed when the last cache using it is collected), un-rotates the incoming keys
with the model's own (cos, sin), stores the latent and the positions (int64, once per cache), and
re-rotates the reconstructed keys of all cached tokens with (cos, sin) of their positions, computed
once per forward pass and shared by the layers. RoPE's rotation times the rotary's attention
scaling s is inverted as (k cos − rotate_half(k) sin) / (cos² + sin²).

``LowRankCache(bases, model, latent_bits=8)`` stores the latents as int8 with one float16 absmax
scale per (token, head): r + 2 bytes per token and head instead of 4r (float32) or 2r (bf16).
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
from gradfree.kv.bases import KVBases

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
    """The bases of one layer's keys or values, stacked on one device in float32."""

    def __init__(self, heads: list[Any], device: torch.device) -> None:
        self.bases = [h.basis.to(device=device, dtype=torch.float32) for h in heads]
        self.means = [h.mean.to(device=device, dtype=torch.float32) for h in heads]

    def encode(self, x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """(b, heads, t, hd) → per head (b, t, r_h) in ``dtype``."""
        x = x.float()
        pairs = zip(self.bases, self.means, strict=True)
        return [((x[:, h] - mu) @ p).to(dtype) for h, (p, mu) in enumerate(pairs)]

    def decode(self, z: list[torch.Tensor]) -> torch.Tensor:
        """Per head (b, T, r_h) → (b, heads, T, hd) in float32."""
        return torch.stack(
            [zh.float() @ p.T + mu for zh, p, mu in zip(z, self.bases, self.means, strict=True)],
            dim=1,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.bases + self.means)


class _Store:
    """The latents of one layer's keys or values, per head (b, tokens, r_h): in the states' own
    dtype, or (``bits=8``) as int8 with one float16 absmax scale per (token, head)."""

    def __init__(self, bits: int | None) -> None:
        self.bits = bits
        self.data: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []

    def append(self, z: list[torch.Tensor]) -> None:
        scales: list[torch.Tensor] = []
        if self.bits == 8:
            pairs = [_quantize(zh) for zh in z]
            z, scales = [q for q, _ in pairs], [sc for _, sc in pairs]
        if not self.data:
            self.data, self.scales = z, scales
            return
        self.data = [torch.cat(p, dim=1) for p in zip(self.data, z, strict=True)]
        if scales:
            self.scales = [torch.cat(p, dim=1) for p in zip(self.scales, scales, strict=True)]

    def latents(self) -> list[torch.Tensor]:
        if self.bits == 8:
            return [q.float() * sc.float() for q, sc in zip(self.data, self.scales, strict=True)]
        return self.data

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.data = [fn(z) for z in self.data]
        self.scales = [fn(z) for z in self.scales]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data + self.scales)

    def clear(self) -> None:
        self.data, self.scales = [], []


def _quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a float16 absmax scale per token: z ≈ q · scale."""
    z = z.float()
    scale = (z.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16)
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    q = torch.round(z / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


class LowRankLayer(CacheLayerMixin):
    """One decoder layer's cache: per KV head, latents of its keys and values (b, tokens, r),
    in the states' dtype or, with ``latent_bits=8``, as int8 with a per-token scale."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(
        self,
        keys: list[Any],
        values: list[Any],
        positions: _Positions | None,
        latent_bits: int | None = None,
    ) -> None:
        super().__init__()
        self._key_heads, self._value_heads = keys, values
        self._positions = positions
        self.latent_keys, self.latent_values = _Store(latent_bits), _Store(latent_bits)
        self.length = 0
        self._k: _Coder | None = None
        self._v: _Coder | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self._k is None or self._k.bases[0].device != self.device:
            self._k = _Coder(self._key_heads, self.device)
            self._v = _Coder(self._value_heads, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None
        if key_states.shape[1] != len(self._k.bases):
            raise GradfreeError(
                f"The low-rank cache holds {len(self._k.bases)} KV heads per layer, the model "
                f"gave {key_states.shape[1]}."
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
        k_hat = self._k.decode(self.latent_keys.latents())
        if cos_sin is not None:
            k_hat = k_hat * cos_sin[0] + _rotate_half(k_hat) * cos_sin[1]
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
        if self._k is None or self._v is None:
            return sum(
                h.basis.numel() * 4 + h.mean.numel() * 4
                for h in self._key_heads + self._value_heads
            )
        return self._k.nbytes() + self._v.nbytes()

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
    """A KV cache of per-head low-rank latents from :class:`~gradfree.kv.bases.KVBases`.

    ``LowRankCache(bases, model)`` checks the bases against ``model`` (type, depth, KV heads,
    head_dim, config fingerprint). ``latent_bits=8`` stores the latents as int8 with a float16
    absmax scale per token and head (None: in the model's dtype). :meth:`nbytes` counts every
    tensor the cache holds (latents, scales, and positions in pre_rope mode); :meth:`bases_nbytes`
    the bases, counted separately.
    """

    def __init__(self, bases: KVBases, model: nn.Module, *, latent_bits: int | None = None) -> None:
        from gradfree.adapters import get_adapter

        if latent_bits not in (None, 8):
            raise GradfreeError(f"latent_bits must be 8 or None, not {latent_bits}.")
        bases.check_model(model)
        self.bases = bases
        self._positions: _Positions | None = None
        if bases.key_mode == "pre_rope":
            rotary = get_adapter(model).rotary_emb
            tap = _RopeTap.acquire(rotary)
            self._positions = _Positions(tap, rotary)
            weakref.finalize(self, tap.release)
        layers: list[Any] = [
            LowRankLayer(k, v, self._positions, latent_bits)
            for k, v in zip(bases.keys, bases.values, strict=True)
        ]
        super().__init__(layers=layers)

    @classmethod
    def from_dir(
        cls, folder: str | Path, model: nn.Module, *, latent_bits: int | None = None
    ) -> LowRankCache:
        """The cache of the bases saved in ``folder`` (:meth:`KVBases.save`) for ``model``."""
        return cls(KVBases.load(folder, model), model, latent_bits=latent_bits)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: latents, plus positions in pre_rope mode."""
        held = sum(layer.nbytes() for layer in self._low_rank_layers())
        return held + (self._positions.nbytes() if self._positions is not None else 0)

    def bases_nbytes(self) -> int:
        """Bytes of the bases (float32 basis and mean of every head), not in :meth:`nbytes`."""
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
