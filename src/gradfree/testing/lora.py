"""Synthetic PEFT LoRA adapters for tests: peft's own LoraModel with random A and B, saved as a
plain PEFT folder (what ``gradfree taskvec`` reads), without any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora(
    base: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = ALL_LINEARS,
    scale: float = 0.05,
    **config: Any,
) -> Path:
    """Save a LoRA adapter of ``base`` with seeded random factors (B is not zero, unlike a fresh
    adapter) scaled by ``scale``; extra ``config`` goes to peft's LoraConfig (use_rslora,
    rank_pattern, alpha_pattern...)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lc = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        lora_dropout=0.0,
        **config,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    out = Path(out)
    peft_model.save_pretrained(str(out))
    return out


__all__ = ["ALL_LINEARS", "make_lora"]
