"""Token dumps: a seeded, batching-independent subsample of raw token vectors per site.

A token at position p of document d is dumped when ``u(seed, id(d), p) < rate``, where ``u`` is
a splitmix64 hash mapped to [0, 1). The choice depends only on the document and the position in
it, so it does not change with batching, windowing or resuming, and every dumped site holds the
same tokens (rows align across sites and roles). At most ``dump_max`` rows are kept per site, in
corpus order.

Rows are written as ``dumps/<role>/<key>/shard-00000.safetensors`` holding ``x`` (n, d) float32,
``doc`` (n,) int64 (index into the capture's ``documents.json``) and ``pos`` (n,) int64 (position
in the document). Buffers are flushed at checkpoints and at the end.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfree.capture.store import save_shard

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def doc_key(seed: int, doc_id: str) -> int:
    """A 64-bit key of (seed, document id)."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """splitmix64(key + golden · position) mapped to [0, 1), elementwise (uint64 wraps)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + _GOLDEN * positions.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def select(keys: np.ndarray, positions: np.ndarray, rate: float) -> np.ndarray:
    """Boolean mask of the tokens (given by per-token document key and position) to dump."""
    return uniform(keys, positions) < rate


@dataclass
class _Site:
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"file", "rows"} written so far
    rows: int = 0  # rows written or buffered
    buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class DumpWriter:
    """Per (role, key) buffers of dumped rows, bounded by ``dump_max``, flushed as shards."""

    def __init__(self, dump_max: int) -> None:
        self.dump_max = dump_max
        self.sites: dict[tuple[str, str], _Site] = {}

    def full(self, role: str, key: str) -> bool:
        site = self.sites.get((role, key))
        return site is not None and site.rows >= self.dump_max

    def add(
        self, role: str, key: str, x: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor
    ) -> None:
        site = self.sites.setdefault((role, key), _Site())
        room = self.dump_max - site.rows
        if room <= 0 or x.shape[0] == 0:
            return
        x, doc, pos = x[:room], doc[:room], pos[:room]
        site.buffer.append((x.detach().to("cpu", torch.float32), doc.cpu(), pos.cpu()))
        site.rows += int(x.shape[0])

    def flush(self, root: Path) -> dict[str, dict[str, Any]]:
        """Write every non-empty buffer as a new shard under ``root``; return {relpath: info}."""
        written: dict[str, dict[str, Any]] = {}
        for (role, key), site in self.sites.items():
            if not site.buffer:
                continue
            tensors = {
                "x": torch.cat([b[0] for b in site.buffer]).contiguous(),
                "doc": torch.cat([b[1] for b in site.buffer]).to(torch.int64),
                "pos": torch.cat([b[2] for b in site.buffer]).to(torch.int64),
            }
            rel = f"dumps/{role}/{key}/shard-{len(site.shards):05d}.safetensors"
            info = save_shard(root / rel, tensors)
            site.shards.append({"file": rel, "rows": int(tensors["x"].shape[0])})
            site.buffer.clear()
            written[rel] = info
        return written

    def state(self) -> dict[str, dict[str, Any]]:
        """The flushed shards per ``role/key`` (buffers must be flushed first)."""
        return {
            f"{role}/{key}": {"shards": list(s.shards), "rows": sum(x["rows"] for x in s.shards)}
            for (role, key), s in self.sites.items()
        }

    def restore(self, state: dict[str, dict[str, Any]]) -> None:
        for name, entry in state.items():
            role, key = name.split("/", 1)
            self.sites[(role, key)] = _Site(list(entry["shards"]), int(entry["rows"]))


__all__ = ["DumpWriter", "doc_key", "select", "uniform"]
