"""Running a model's decoder blocks one at a time on cached inputs (SliceGPT's baseline and the
least-squares reconstruction both walk the blocks this way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError


def block_inputs(
    model: nn.Module, windows: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Run ``model`` once per window; return block 0's input per window and the keyword
    arguments every block received (attention mask, RoPE tables: they depend on the positions and
    the head width only, so a block of a sliced copy can be called with the same ones)."""
    a = get_adapter(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(a.num_layers)]

    def grab(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
            if args[1:]:
                raise GradfreeError(
                    "Running blocks one at a time needs decoder blocks called with keywords."
                )
            kw = dict(kw)
            x = args[0] if args else kw.pop("hidden_states")
            kwargs[i].append(kw)
            if i == 0:
                inputs.append(x.detach())

        return hook

    handles = [
        layer.module.register_forward_pre_hook(grab(layer.index), with_kwargs=True)
        for layer in a.layers
    ]
    dev = a.embed_tokens.weight.device
    try:
        for ids in windows:
            model(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, kwargs
