"""Registry of architecture adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradfree.adapters.base import (
    ArchSpec,
    HeadGeometry,
    LayerAdapter,
    ModelAdapter,
    RopeInfo,
    config_for_shape,
    config_for_width,
    config_head_dim,
    set_saved_dtype_,
    untie_config_,
    validate_config,
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


LINEAR_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_KINDS = ("q", "k", "v", "o")


def linear_weight_names(model_type: str, num_layers: int) -> dict[str, str]:
    """Tensor name → kind (``q`` … ``down``) of every block linear's weight in a checkpoint of
    ``model_type`` with ``num_layers`` layers, read from the architecture's :class:`ArchSpec`
    (so task-vector code never names a Hugging Face module)."""
    spec = spec_for(model_type)
    out: dict[str, str] = {}
    for i in range(num_layers):
        for kind in LINEAR_KINDS:
            out[f"{spec.layers}.{i}.{getattr(spec, kind)}.weight"] = kind
    return out


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise GradfreeError("The object given is not a Hugging Face model (it has no config).")
    return ModelAdapter(model, spec_for(str(model_type)))


__all__ = [
    "ARCHITECTURES",
    "ATTENTION_KINDS",
    "LINEAR_KINDS",
    "ArchSpec",
    "HeadGeometry",
    "LayerAdapter",
    "ModelAdapter",
    "RopeInfo",
    "config_for_shape",
    "config_for_width",
    "config_head_dim",
    "get_adapter",
    "linear_weight_names",
    "set_saved_dtype_",
    "spec_for",
    "supported",
    "untie_config_",
    "validate_config",
]
