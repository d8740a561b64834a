"""Registry of architecture adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradfree.adapters.base import (
    ArchSpec,
    HeadGeometry,
    LayerAdapter,
    ModelAdapter,
    RopeInfo,
    config_for_width,
    config_head_dim,
    set_saved_dtype_,
    untie_config_,
)
from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", notes="Llama 2/3, SmolLM2; optional attention/MLP biases"),
    "mistral": ArchSpec("mistral", notes="Mistral; sliding-window attention"),
    "qwen2": ArchSpec("qwen2", notes="Qwen2/2.5; biases on q, k, v"),
    "qwen3": ArchSpec(
        "qwen3",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        notes="Qwen3 dense; per-head RMSNorm on queries and keys (q_norm/k_norm)",
    ),
}


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def spec_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise GradfreeError(
            f"Model type '{model_type}' is not supported; gradfree supports: "
            f"{', '.join(supported())}."
        ) from None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise GradfreeError("The object given is not a Hugging Face model (it has no config).")
    return ModelAdapter(model, spec_for(str(model_type)))


__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadGeometry",
    "LayerAdapter",
    "ModelAdapter",
    "RopeInfo",
    "config_for_width",
    "config_head_dim",
    "get_adapter",
    "set_saved_dtype_",
    "spec_for",
    "supported",
    "untie_config_",
]
