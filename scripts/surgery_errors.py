"""Print the logit error of all exact surgery transforms combined, per architecture.

Usage: .venv/bin/python scripts/surgery_errors.py
Uses the scramble of :mod:`gradfree.testing.scramble` (fuse + untie + random rotation +
KV-group/head/neuron permutations + per-head value rotations + RoPE-pair rotations where exact),
the one tests/test_surgery.py checks.
"""

from __future__ import annotations

import torch

from gradfree.testing.scramble import CASES, logits, make, rel_err, scramble


def main() -> None:
    print("| case | float32 | float64 (stock HF norms) | float64 (float64 norms) |")
    print("|---|---:|---:|---:|")
    for case in CASES:
        m32 = make(case)
        ref32 = logits(m32)
        scramble(m32)
        m64 = make(case, torch.float64)
        ref_stock, ref_exact = logits(m64), logits(m64, exact=True)
        scramble(m64, seed=1)
        e32 = rel_err(logits(m32), ref32)
        stock = rel_err(logits(m64), ref_stock)
        exact = rel_err(logits(m64, exact=True), ref_exact)
        print(f"| {case} | {e32:.1e} | {stock:.1e} | {exact:.1e} |")


if __name__ == "__main__":
    main()
