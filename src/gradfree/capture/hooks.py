"""Forward hooks that read capture sites, installed in a context manager and always removed.

:func:`site_hooks` installs one hook per module that a requested key needs (all module access
goes through the adapter; no Hugging Face module is named here) and hands every activation to a
``sink(key, x)`` as soon as the module produces it, with ``x`` of shape (batch, tokens, width).
The sink folds it into statistics at once, so a forward pass never holds more than the model's
own activations plus one site at a time. The hooks are removed in ``finally``, whatever happens.

``q_rope``/``k_rope`` are computed from the pre-RoPE projections with the model's own (cos, sin)
(``adapter.rotary``) at the window positions, in at least float32. When no requested key needs
later modules, the forward pass is cut short by :class:`StopForward` after the last needed module:
a capture of ``final.normed`` never computes the (vocab-wide) logits.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from gradfree.adapters import ModelAdapter
from gradfree.capture.sites import split_key

Sink = Callable[[str, torch.Tensor], None]


class StopForward(Exception):
    """Raised by the last needed hook to skip the rest of the forward pass."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class SiteHooks:
    """The installed hooks of one model; ``forward`` runs one batch through it."""

    def __init__(
        self, adapter: ModelAdapter, keys: Sequence[str], sink: Sink, stop_early: bool = True
    ) -> None:
        self.adapter = adapter
        self.keys = list(keys)
        self.sink = sink
        self.stop_early = stop_early
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self._positions: torch.Tensor | None = None
        self._cos_sin: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    # running ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run the model on one right-padded batch; activations go to the sink."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        self._positions, self._cos_sin = positions, {}
        try:
            self.adapter.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=False,
            )
        except StopForward:
            pass
        finally:
            self._positions, self._cos_sin = None, {}

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (batch, tokens, heads·head_dim) projections with the model's own cos/sin."""
        assert self._positions is not None, "rope() is only valid during forward()"
        b, t, d = x.shape
        hd = self.adapter.geometry.head_dim
        dtype = torch.promote_types(x.dtype, torch.float32)
        xh = x.to(dtype).view(b, t, d // hd, hd).transpose(1, 2)
        cache_key = (dtype, x.device)
        if cache_key not in self._cos_sin:
            self._cos_sin[cache_key] = self.adapter.rotary(xh, self._positions.to(x.device))
        cos, sin = self._cos_sin[cache_key][:2]
        return self.adapter.apply_rope(xh, cos, sin).transpose(1, 2).reshape(b, t, d)

    # installing ---------------------------------------------------------------------------------
    def _emit(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.sink(key, _first(output))

        return hook

    def _emit_input(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any = None) -> None:
            x = args[0] if args else (kwargs or {})["hidden_states"]
            self.sink(key, x)

        return hook

    def _emit_projection(self, pre: str | None, rope: str | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = _first(output)
            x = x.reshape(*x.shape[:2], -1)  # (b, t, heads, head_dim) after q/k_norm
            if pre is not None:
                self.sink(pre, x)
            if rope is not None:
                self.sink(rope, self.rope(x))

        return hook

    def _add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.handles.append(handle)

    def install(self) -> None:
        by_layer: dict[int | None, set[str]] = defaultdict(set)
        for key in self.keys:
            index, site = split_key(key)
            by_layer[index].add(site)
        a = self.adapter
        for i in sorted(k for k in by_layer if k is not None):
            sites, layer, prefix = by_layer[i], a.layer(i), f"blocks.{i}."
            if "resid_pre" in sites:
                fn = self._emit_input(prefix + "resid_pre")
                self._add(layer.module.register_forward_pre_hook(fn, with_kwargs=True))
            if "attn_in" in sites:
                self._add(layer.attn_norm.register_forward_hook(self._emit(prefix + "attn_in")))
            if "mlp_in" in sites:
                self._add(layer.mlp_norm.register_forward_hook(self._emit(prefix + "mlp_in")))
            if "attn_heads" in sites:
                fn = self._emit_input(prefix + "attn_heads")
                self._add(layer.o_proj.register_forward_pre_hook(fn))
            if "mlp_hidden" in sites:
                fn = self._emit_input(prefix + "mlp_hidden")
                self._add(layer.down_proj.register_forward_pre_hook(fn))
            for name, norm, proj in (
                ("q", layer.q_norm, layer.q_proj),
                ("k", layer.k_norm, layer.k_proj),
            ):
                pre = prefix + f"{name}_pre" if f"{name}_pre" in sites else None
                rope = prefix + f"{name}_rope" if f"{name}_rope" in sites else None
                if pre or rope:
                    module = norm if norm is not None else proj
                    self._add(module.register_forward_hook(self._emit_projection(pre, rope)))
            if "v" in sites:
                self._add(layer.v_proj.register_forward_hook(self._emit(prefix + "v")))
        final = by_layer.get(None, set())
        if "final.resid" in final:
            fn = self._emit_input("final.resid")
            self._add(a.final_norm.register_forward_pre_hook(fn))
        if "final.normed" in final:
            self._add(a.final_norm.register_forward_hook(self._emit("final.normed")))
        if self.stop_early and by_layer:
            # Registered last, so it runs after every other hook of the same module.
            last: nn.Module
            if final:
                last = a.final_norm
            else:
                last = a.layer(max(k for k in by_layer if k is not None)).module
            self._add(last.register_forward_hook(_stop))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def _stop(module: nn.Module, args: Any, output: Any) -> None:
    raise StopForward


@contextlib.contextmanager
def site_hooks(
    adapter: ModelAdapter, keys: Sequence[str], sink: Sink, stop_early: bool = True
) -> Iterator[SiteHooks]:
    """Install the hooks for ``keys`` on ``adapter.model``; they are removed on exit, always."""
    hooks = SiteHooks(adapter, keys, sink, stop_early)
    try:
        hooks.install()
        yield hooks
    finally:
        hooks.remove()


def hook_count(model: nn.Module) -> int:
    """How many forward (pre-)hooks are installed anywhere in ``model`` (0 after a capture)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
