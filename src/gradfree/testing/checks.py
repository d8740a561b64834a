"""Small measurements the tests share: token windows of equal length, float64 logits, and the
relative Frobenius error between two outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def equal_windows(tokenizer: Any, texts: Sequence[str], max_tokens: int = 64) -> torch.Tensor:
    """The texts' token ids cut to one common length (at most ``max_tokens``): a batch."""
    rows = [tokenizer(t)["input_ids"][:max_tokens] for t in texts]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


@torch.no_grad()
def logits64(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``ids``, in float64."""
    return model(ids).logits.double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖_F / ‖ref‖_F."""
    return float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))
