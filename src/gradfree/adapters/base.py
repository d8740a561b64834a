"""Architecture adapters: the only place that knows where a model keeps its parts.

Algorithms ask an adapter for "the first norm of layer i", "the attention inputs", "the MLP
output", the head geometry or the RoPE parameters; they never name a Hugging Face module. An
architecture is described as data (an :class:`ArchSpec` of dotted module paths, as
llm-compressor does), so supporting a new decoder family is usually one registry entry.

All supported families are pre-norm decoders with RMSNorm, rotary attention with grouped KV
heads and a gated MLP: ``x + o(attn(q(n1 x), k(n1 x), v(n1 x)))`` then
``x + down(act(gate(n2 x)) * up(n2 x))``, a final RMSNorm and an LM head.

The adapter is also the only writer of Hugging Face config keys: surgery and compression change
a model's shape (untie the head, cut the residual width, change the RMSNorm epsilon), and the
config edits that make a saved checkpoint describe the edited model are here
(:func:`config_for_width`, :func:`untie_config_`, :meth:`ModelAdapter.set_width_`,
:meth:`ModelAdapter.mark_untied_`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily so that `import gradfree` stays light
    import torch
    from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted paths of a decoder family's modules, relative to the model / to one layer."""

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q_norm: str | None = None
    k_norm: str | None = None
    # RMSNorm computes w * x / rms(x) (offset 0) or (1 + w) * x / rms(x) (Gemma, offset 1).
    norm_weight_offset: float = 0.0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadGeometry:
    """Grouped-query attention geometry: query heads, KV heads and their grouping."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_group(self, head: int) -> int:
        """The KV head (group) that query head ``head`` reads (HF's repeat_kv layout)."""
        return head // self.group_size

    def heads_in_group(self, group: int) -> range:
        return range(group * self.group_size, (group + 1) * self.group_size)


@dataclass(frozen=True)
class RopeInfo:
    """Rotary embedding parameters. HF's layout pairs dimension i with i + rotary_dim/2, and
    pair i turns at frequency theta^(-2i/rotary_dim)."""

    theta: float
    rotary_dim: int
    scaling: dict[str, Any] | None

    def inv_freq(self) -> torch.Tensor:
        import torch

        i = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64)
        return 1.0 / (self.theta ** (i / self.rotary_dim))


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def config_head_dim(config: Any) -> int:
    """The head dimension a config gives: ``head_dim`` when set, else hidden_size / heads."""
    n_heads = int(config.num_attention_heads)
    return int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)


def _write_width(config: Any, hidden_size: int, head_dim: int, norm_eps: float | None) -> None:
    config.hidden_size = hidden_size
    # Written explicitly: Llama and Qwen2 would otherwise derive it from the new hidden size.
    config.head_dim = head_dim
    if norm_eps is not None:
        config.rms_norm_eps = norm_eps


def config_for_width(config: Any, hidden_size: int, norm_eps: float | None = None) -> Any:
    """A copy of ``config`` for a residual stream of width ``hidden_size`` with the same heads
    (head_dim kept, written explicitly) and, when given, the RMSNorm epsilon ``norm_eps``."""
    out = copy.deepcopy(config)
    _write_width(out, hidden_size, config_head_dim(config), norm_eps)
    return out


def config_for_shape(config: Any, num_heads: int, intermediate_size: int) -> Any:
    """A copy of ``config`` with ``num_heads`` query heads (head_dim kept, written explicitly)
    and MLP width ``intermediate_size``: what structured pruning leaves."""
    out = copy.deepcopy(config)
    out.head_dim = config_head_dim(config)
    out.num_attention_heads = int(num_heads)
    out.intermediate_size = int(intermediate_size)
    return out


def validate_config(trial: Any, what: str) -> None:
    """Refuse, in one sentence, a config (``trial``: as it would be after an edit) that
    transformers would not save or load; ``what`` names the edit's widths."""
    from gradfree.base.errors import GradfreeError

    validate = getattr(trial, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as e:  # transformers wraps its ValueError in a hub validation error
        cause = e.__cause__ or e
        raise GradfreeError(f"transformers refuses {what} for this model: {cause}") from e


def untie_config_(config: Any) -> Any:
    """Record in ``config`` that the LM head has its own weight (transformers 5 ties the head to
    the embeddings at load time when ``tie_word_embeddings`` is set); returns ``config``."""
    if getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return config


def set_saved_dtype_(config: Any, dtype: torch.dtype) -> None:
    """Record the dtype of a checkpoint's weights in its config (a model's ``save_pretrained``
    does it itself; a checkpoint written tensor by tensor must say it)."""
    config.dtype = dtype


class LayerAdapter:
    """One decoder block seen through its :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, module: nn.Module, index: int) -> None:
        self.spec = spec
        self.module = module
        self.index = index

    def _get(self, path: str) -> Any:
        return self.module.get_submodule(path)

    # norms
    @property
    def attn_norm(self) -> nn.Module:
        return self._get(self.spec.attn_norm)

    @property
    def mlp_norm(self) -> nn.Module:
        return self._get(self.spec.mlp_norm)

    @property
    def q_norm(self) -> nn.Module | None:
        return self._get(self.spec.q_norm) if self.spec.q_norm else None

    @property
    def k_norm(self) -> nn.Module | None:
        return self._get(self.spec.k_norm) if self.spec.k_norm else None

    # linears
    @property
    def q_proj(self) -> nn.Linear:
        return self._get(self.spec.q)

    @property
    def k_proj(self) -> nn.Linear:
        return self._get(self.spec.k)

    @property
    def v_proj(self) -> nn.Linear:
        return self._get(self.spec.v)

    @property
    def o_proj(self) -> nn.Linear:
        return self._get(self.spec.o)

    @property
    def gate_proj(self) -> nn.Linear:
        return self._get(self.spec.gate)

    @property
    def up_proj(self) -> nn.Linear:
        return self._get(self.spec.up)

    @property
    def down_proj(self) -> nn.Linear:
        return self._get(self.spec.down)

    @property
    def attention(self) -> nn.Module:
        return self._get(self.spec.attention)

    @property
    def mlp(self) -> nn.Module:
        return self._get(self.spec.mlp)

    # groups that algorithms reason about
    def attn_inputs(self) -> list[nn.Linear]:
        """Linears that read the normed residual stream before attention (q, k, v)."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def attn_output(self) -> nn.Linear:
        """The linear that writes attention back into the residual stream (o)."""
        return self.o_proj

    def mlp_inputs(self) -> list[nn.Linear]:
        """Linears that read the normed residual stream before the MLP (gate, up)."""
        return [self.gate_proj, self.up_proj]

    def mlp_output(self) -> nn.Linear:
        """The linear that writes the MLP back into the residual stream (down)."""
        return self.down_proj

    def linears(self) -> dict[str, nn.Linear]:
        """Every linear of the block by canonical name: q, k, v, o, gate, up, down."""
        return {
            "q": self.q_proj,
            "k": self.k_proj,
            "v": self.v_proj,
            "o": self.o_proj,
            "gate": self.gate_proj,
            "up": self.up_proj,
            "down": self.down_proj,
        }

    def set_group_size_(self, query_heads_per_kv: int) -> None:
        """Tell the attention module how many query heads now read each KV head (transformers
        repeats K/V by this attribute, not by the weights' shapes)."""
        if hasattr(self.attention, "num_key_value_groups"):
            setattr(self.attention, "num_key_value_groups", int(query_heads_per_kv))  # noqa: B010

    def norms(self) -> dict[str, nn.Module]:
        out = {"attn_norm": self.attn_norm, "mlp_norm": self.mlp_norm}
        if self.q_norm is not None:
            out["q_norm"] = self.q_norm
        if self.k_norm is not None:
            out["k_norm"] = self.k_norm
        return out


class ModelAdapter:
    """A causal LM seen through its :class:`ArchSpec`: parts, geometry, RoPE, tying."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.model = model
        self.spec = spec
        self.config: Any = model.config

    # parts
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_submodule(self.spec.embed)  # type: ignore[return-value]

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.spec.lm_head)  # type: ignore[return-value]

    @property
    def rotary_emb(self) -> nn.Module:
        return self.model.get_submodule(self.spec.rotary)

    @property
    def layer_modules(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)  # type: ignore[return-value]

    @property
    def layers(self) -> list[LayerAdapter]:
        return [LayerAdapter(self.spec, m, i) for i, m in enumerate(self.layer_modules)]

    def layer(self, i: int) -> LayerAdapter:
        return LayerAdapter(self.spec, self.layer_modules[i], i)

    # facts
    @property
    def model_type(self) -> str:
        return self.spec.model_type

    @property
    def num_layers(self) -> int:
        return len(self.layer_modules)

    @property
    def hidden_size(self) -> int:
        return int(self.embed_tokens.weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.layer(0).up_proj.weight.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.embed_tokens.weight.shape[0])

    @property
    def norm_eps(self) -> float:
        return float(getattr(self.config, "rms_norm_eps", 1e-6))

    @property
    def has_qk_norm(self) -> bool:
        return self.spec.q_norm is not None

    @property
    def has_attn_bias(self) -> bool:
        return self.layer(0).q_proj.bias is not None

    @property
    def tied(self) -> bool:
        """True when the LM head shares its weight tensor with the embeddings."""
        return self.lm_head.weight is self.embed_tokens.weight or (
            self.lm_head.weight.data_ptr() == self.embed_tokens.weight.data_ptr()
        )

    @property
    def tied_in_config(self) -> bool:
        """What the config says (``tie_word_embeddings``); :attr:`tied` is what the weights do."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def geometry(self) -> HeadGeometry:
        c = self.config
        n_heads = int(c.num_attention_heads)
        n_kv = int(getattr(c, "num_key_value_heads", None) or n_heads)
        return HeadGeometry(n_heads, n_kv, config_head_dim(c))

    # config edits (the only writes of Hugging Face config keys)
    def set_width_(self, hidden_size: int, norm_eps: float) -> None:
        """Record a new residual width in the model's config once its weights were cut to it:
        ``hidden_size``, head_dim (unchanged, written explicitly) and the RMSNorm epsilon."""
        _write_width(self.config, hidden_size, self.geometry.head_dim, norm_eps)

    def set_shape_(self, num_heads: int, intermediate_size: int) -> None:
        """Record pruned query heads and MLP neurons (every block the same) in the config, and
        tell each attention module its new number of query heads per KV head."""
        n_kv = self.geometry.num_kv_heads
        c = config_for_shape(self.config, num_heads, intermediate_size)
        for key in ("head_dim", "num_attention_heads", "intermediate_size"):
            setattr(self.config, key, getattr(c, key))
        for layer in self.layers:
            layer.set_group_size_(int(num_heads) // n_kv)

    def mark_untied_(self) -> None:
        """Make the config and the model's record of tied keys agree with a separate LM head:
        transformers 5 ties at load time from the config, and re-ties on ``tie_weights()`` from
        ``all_tied_weights_keys``."""
        untie_config_(self.config)
        expand = getattr(self.model, "get_expanded_tied_weights_keys", None)
        if expand is not None and hasattr(self.model, "all_tied_weights_keys"):
            self.model.all_tied_weights_keys = expand(all_submodels=False)

    @property
    def rope(self) -> RopeInfo:
        c = self.config
        params = dict(getattr(c, "rope_parameters", None) or {})
        theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        factor = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
        rtype = params.get("rope_type", "default")
        scaling = None if rtype == "default" else params
        return RopeInfo(float(theta), int(self.geometry.head_dim * factor), scaling)

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's own (cos, sin) for ``position_ids``: RoPE exactly as the model applies it."""
        return tuple(self.rotary_emb(x, position_ids))

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (batch, heads, tokens, head_dim) in HF's rotate-half layout."""
        import torch

        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)

    def describe(self) -> dict[str, Any]:
        g = self.geometry
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "num_heads": g.num_heads,
            "num_kv_heads": g.num_kv_heads,
            "head_dim": g.head_dim,
            "tied_embeddings": self.tied,
            "qk_norm": self.has_qk_norm,
            "attn_bias": self.has_attn_bias,
            "rope_theta": self.rope.theta,
        }
