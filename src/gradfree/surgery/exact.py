"""RMSNorm computed in the input's dtype, for proving float64 exactness of surgery.

Hugging Face's RMSNorm (Llama, Mistral, Qwen2, Qwen3 in transformers 5) upcasts to *float32*,
not to float64: ``hidden_states.to(torch.float32)``. A float64 model therefore normalises at
float32 precision, and two mathematically equal models differ by ~1e-7 relative. (The rotary
cos/sin tables are also float32, but they are identical before and after a transform, and the
transforms commute with them exactly, so they cost nothing.) To show that a transform is exact
to ~1e-12 we temporarily replace each norm's ``forward`` on the given model instances by the
same formula evaluated in the input dtype; the ``finally`` restores the stock forward. A deep
copy made inside the block (as :func:`per_layer_rotation_error` makes) is patched too, for good.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.surgery.edit import all_norms, norm_eps, param


def _forward_in_input_dtype(offset: float) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # epsilon and weight are read at call time, so a model sliced inside the block works
        var = x.pow(2).mean(-1, keepdim=True)
        return (param(self) + offset) * (x * torch.rsqrt(var + norm_eps(self)))

    return forward


@contextlib.contextmanager
def exact_rmsnorm(*models: nn.Module) -> Iterator[None]:
    """Within the block, every RMSNorm of ``models`` computes in its input's dtype."""
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for model in models:
            a = get_adapter(model)
            for norm in all_norms(a).values():
                patched.append((norm, norm.__dict__.get("forward")))
                fwd = _forward_in_input_dtype(a.spec.norm_weight_offset)
                # a bound method, so copy.deepcopy(model) binds the copy's own norms
                norm.forward = types.MethodType(fwd, norm)
        yield
    finally:
        for norm, previous in reversed(patched):
            if previous is None:
                del norm.forward
            else:
                norm.forward = previous
