"""The surgery proofs on the real models (slow; skipped when a model is not fetched).

SmolLM2-135M (Llama, tied embeddings, 9 query heads in 3 KV groups) and Qwen2.5-Coder-0.5B
(Qwen2, q/k/v biases, 14 query heads in 2 KV groups): fuse + untie + random rotation + random
KV-group/head/neuron permutations + value and RoPE-pair rotations leave the float32 logits of real
text unchanged (~1e-5 relative), and `gradfree rotate` writes a folder that reloads with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradfree.models import is_fetched, load_model
from gradfree.testing.scramble import rel_err, scramble
from gradfree.texts.corpora import load_corpus

REAL = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
BUDGET = 2e-5  # float32 through 24-30 blocks; the issue asks for ~1e-5


def _need(name: str) -> None:
    if not is_fetched(name):
        pytest.skip(f"{name} is not fetched (run `gradfree models fetch {name}`)")


def _ids(tok: object) -> torch.Tensor:
    text = load_corpus("tourguide", split="heldout")[0].text
    ids = tok(text)["input_ids"][:96]  # type: ignore[operator]
    return torch.tensor([ids])


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_all_exact_transforms_preserve_real_logits(name: str) -> None:
    _need(name)
    loaded = load_model(name)
    ids = _ids(loaded.tokenizer)
    with torch.no_grad():
        ref = loaded.model(ids).logits
        scramble(loaded.model, seed=3)
        out = loaded.model(ids).logits
    assert rel_err(out, ref) < BUDGET


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_rotate_command_on_a_real_model(name: str, tmp_path: Path) -> None:
    _need(name)
    from gradfree.cli import main

    out = tmp_path / "rotated"
    try:
        main(
            [
                "rotate",
                "--model",
                name,
                "--out",
                str(out),
                "--random-seed",
                "1",
                "--check-windows",
                "1",
                "--check-tokens",
                "96",
            ]
        )
    except SystemExit as e:
        assert not e.code
    loaded = load_model(name)
    ids = _ids(loaded.tokenizer)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(back(ids).logits, loaded.model(ids).logits) < BUDGET
    record = json.loads((out / "gradfree_surgery.json").read_text())
    assert record["result"]["check"]["reloaded_vs_original"]["max_rel"] < BUDGET
