"""Tiny models and a tokenizer built in code, for offline tests (no hub, no downloads).

``tiny_model("qwen3")`` gives a randomly initialised 2-layer causal LM of the requested family
with GQA; keyword overrides change the config (``tie_word_embeddings``, ``num_hidden_layers``...).
Presets cover the geometries later stages must handle: Qwen3 with the 32B/4B ratios and the
Qwen2.5-Coder 1.5B/0.5B pair (more student heads per group, head_dim halved).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

TINY_VOCAB = 262  # 256 byte-level symbols + specials; see tiny_tokenizer()

_BASE: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}

_FAMILY: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # Qwen2 always has q/k/v biases
    "qwen3": {"tie_word_embeddings": True},
}

# Named geometries (scaled down) that the compression stages must support.
PRESETS: dict[str, dict[str, Any]] = {
    # Qwen3-32B -> 4B ratios: 64 -> 36 layers (scaled 16 -> 9), 64 -> 32 query heads in 8 KV groups.
    "qwen3-32b-like": {
        "model_type": "qwen3",
        "hidden_size": 80,
        "intermediate_size": 160,
        "num_hidden_layers": 16,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 8,
        "tie_word_embeddings": False,
    },
    "qwen3-4b-like": {
        "model_type": "qwen3",
        "hidden_size": 40,
        "intermediate_size": 96,
        "num_hidden_layers": 9,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 8,
        "tie_word_embeddings": True,
    },
    # Qwen2.5-Coder 1.5B -> 0.5B: 12 vs 14 query heads, 2 KV heads, head_dim 128 vs 64.
    "qwen2.5-1.5b-like": {
        "model_type": "qwen2",
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 7,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "qwen2.5-0.5b-like": {
        "model_type": "qwen2",
        "hidden_size": 56,
        "intermediate_size": 96,
        "num_hidden_layers": 6,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 8,
    },
}


# Short repetitive documents: enough distinct tokens for a tiny byte-level model's statistics.
HARBOUR_DOCS = [
    f"Stop {i}: the old harbour, {i * 7} steps from the square; " * 3
    + "abcdefghijklmnopqrstuvwxyz"[i % 26 :]
    for i in range(8)
]


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A transformers config of family ``model_type`` (or a PRESETS name) at toy size."""
    from transformers import AutoConfig

    kw: dict[str, Any] = dict(_BASE)
    if model_type in PRESETS:
        preset = dict(PRESETS[model_type])
        model_type = preset.pop("model_type")
        kw.update(_FAMILY.get(model_type, {}))
        kw.update(preset)
    else:
        kw.update(_FAMILY.get(model_type, {}))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(
    model_type: str = "llama",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    *,
    norm_noise: float = 0.2,
    **overrides: Any,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM, in eval mode.

    Norm weights are perturbed away from 1 (``norm_noise``) so that tests of norm folding can fail;
    biases, where present, are made non-zero for the same reason.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * norm_noise
                p.copy_((1.0 + noise).to(p.dtype))
            elif name.endswith(".bias"):
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1).to(p.dtype))
    model.eval()
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (vocab 256 + 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<bos>", "<eos>", "<pad>"):
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def save_tiny(path: Any, model_type: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """Write a tiny model and the tiny tokenizer as a plain Hugging Face folder; return the path."""
    from pathlib import Path

    path = Path(path)
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
