"""The rotation ledger: a JSON-ready record of every matrix a surgery step applied.

Each entry says where a rotation went (name, layer), how orthogonal it really is (``max |RᵀR −
I|``, extreme singular values) and carries a sha256 of its float64 bytes, so an output folder can
prove which rotation produced it and two runs can be compared without storing the matrices.
The alignment ledger (:mod:`gradfree.align.ledger`) records the same hash and :func:`orthogonality`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from gradfree.base.io import sha256_bytes
from gradfree.surgery.maths import orthogonality_error


def rotation_hash(r: torch.Tensor) -> str:
    """sha256 of the matrix as contiguous little-endian float64 bytes, row-major."""
    arr = r.detach().to(torch.float64).cpu().contiguous().numpy()
    return sha256_bytes(arr.astype("<f8", copy=False).tobytes())


def orthogonality(r: torch.Tensor) -> dict[str, float]:
    """max |RᵀR − I| and max |RRᵀ − I| in float64, for a square matrix (the alignment ledger's
    per-matrix record; :func:`rotation_entry` keeps the one-sided error and singular values)."""
    r64 = r.detach().to(torch.float64)
    return {
        "max_abs_rtr_minus_i": orthogonality_error(r64),
        "max_abs_rrt_minus_i": orthogonality_error(r64.T),
    }


def rotation_entry(r: torch.Tensor, name: str, layer: int | None = None) -> dict[str, Any]:
    """One ledger line for matrix ``r`` (square, or with orthonormal columns after slicing)."""
    r64 = r.detach().to(torch.float64)
    sv = torch.linalg.svdvals(r64)
    return {
        "name": name,
        "layer": layer,
        "shape": list(r64.shape),
        "orthogonality_error": orthogonality_error(r64),
        "sv_min": float(sv.min()),
        "sv_max": float(sv.max()),
        "sha256": rotation_hash(r64),
    }


def rotation_ledger(items: Iterable[tuple[str, int | None, torch.Tensor]]) -> list[dict[str, Any]]:
    """Ledger lines for ``(name, layer, matrix)`` triples, in order."""
    return [rotation_entry(r, name, layer) for name, layer, r in items]
