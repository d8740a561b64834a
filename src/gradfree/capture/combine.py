"""Associative merging of captures made over disjoint documents.

Every statistic is a sum (count, Σx, Σxxᵀ, Σx³, Σx⁴, Σabᵀ) or a maximum (absmax), so the capture
of a corpus equals, up to float64 rounding, the combination of captures of its parts: shards are
added tensor by tensor, one shard file at a time. Token dumps are concatenated in order (document
indexes shifted) and cut at ``dump_max`` rows, which is exactly what one run over the concatenated
documents keeps. Captures of different models or settings, or sharing a document, are refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.io import atomic_dir, sha256_file, sha256_text, write_json_atomic
from gradfree.capture.store import Capture, load_capture, read_shard, save_shard


def _difference(a: Capture, b: Capture) -> str | None:
    """The first setting in which two captures differ, or None when they may be combined."""
    if a.manifest["settings_hash"] == b.manifest["settings_hash"]:
        return None
    for k in sorted(set(a.config) | set(b.config)):
        if a.config.get(k) != b.config.get(k):
            return f"the setting '{k}'"
    if a.roles != b.roles:
        return "their roles"
    for r in a.roles:
        ia, ib = a.manifest["roles"][r], b.manifest["roles"][r]
        for k in ("fingerprint", "dtype", "num_layers", "model_type"):
            if ia.get(k) != ib.get(k):
                return f"the {r} ({k})"
    return "their layer map"


def _check(caps: list[Capture]) -> None:
    first = caps[0]
    seen: dict[str, Path] = {d["id"]: first.path for d in first.documents()}
    for cap in caps[1:]:
        diff = _difference(first, cap)
        if diff is not None:
            raise GradfreeError(
                f"Captures {first.path} and {cap.path} differ in {diff}; only captures of the "
                "same models and settings can be combined."
            )
        for d in cap.documents():
            if d["id"] in seen:
                raise GradfreeError(
                    f"Captures {seen[d['id']]} and {cap.path} share document '{d['id']}'; "
                    "merging needs disjoint documents."
                )
            seen[d["id"]] = cap.path


def _combine_shard(caps: list[Capture], rel: str) -> dict[str, torch.Tensor]:
    merged = read_shard(caps[0].path / rel)
    for cap in caps[1:]:
        other = read_shard(cap.path / rel)
        if set(other) != set(merged):
            raise GradfreeError(f"Shard {rel} of {cap.path} holds other statistics; re-capture.")
        for name, t in other.items():
            if name.endswith("/absmax"):
                merged[name] = torch.maximum(merged[name], t)
            else:
                merged[name] = merged[name] + t
    return merged


def _combine_dumps(
    caps: list[Capture], tmp: Path, dump_max: int, shards: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for name in caps[0].manifest.get("dumps", {}):
        written: list[dict[str, Any]] = []
        rows, offset = 0, 0
        for cap in caps:
            for s in cap.manifest["dumps"].get(name, {"shards": []})["shards"]:
                room = dump_max - rows
                if room <= 0:
                    break
                t = read_shard(cap.path / s["file"])
                n = min(room, int(t["x"].shape[0]))
                t = {"x": t["x"][:n], "doc": t["doc"][:n] + offset, "pos": t["pos"][:n]}
                rel = f"dumps/{name}/shard-{len(written):05d}.safetensors"
                shards[rel] = save_shard(tmp / rel, t)
                written.append({"file": rel, "rows": n})
                rows += n
            offset += int(cap.manifest["documents"]["count"])
        state[name] = {"shards": written, "rows": rows}
    return state


def combine_captures(
    captures: Sequence[Capture | str | Path], out: str | Path, *, overwrite: bool = False
) -> Capture:
    """Merge captures of the same models and settings over disjoint documents into ``out``."""
    caps = [c if isinstance(c, Capture) else load_capture(c) for c in captures]
    if len(caps) < 2:
        raise GradfreeError("Merging needs at least two captures.")
    _check(caps)
    first = caps[0]
    with atomic_dir(out, overwrite) as tmp:
        shards: dict[str, dict[str, Any]] = {}
        for rel in first.manifest["shards"]:
            if not rel.startswith("dumps/"):
                shards[rel] = save_shard(tmp / rel, _combine_shard(caps, rel))
        dumps = _combine_dumps(caps, tmp, int(first.config["dump_max"]), shards)
        documents = [d for cap in caps for d in cap.documents()]
        write_json_atomic(tmp / "documents.json", documents)
        write_json_atomic(tmp / "config.json", first.config)
        m = json.loads(json.dumps(first.manifest))
        for role in m["roles"]:
            m["roles"][role]["tokens"] = {
                part: sum(c.tokens(role, part) for c in caps) for part in ("all", "head", "body")
            }
        docs_hash = sha256_text(json.dumps(documents, sort_keys=True))
        m.update(
            run_id=uuid.uuid4().hex,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            run_hash=sha256_text(m["settings_hash"] + docs_hash),
            corpus={"merged": [c.manifest["corpus"] for c in caps]},
            documents={
                "file": "documents.json",
                "count": len(documents),
                "sha256": sha256_file(tmp / "documents.json"),
            },
            windows=sum(int(c.manifest["windows"]) for c in caps),
            seconds=round(sum(float(c.manifest["seconds"]) for c in caps), 3),
            cpu_seconds=round(sum(float(c.manifest.get("cpu_seconds", 0)) for c in caps), 3),
            dumps=dumps,
            shards=shards,
            merged_from=[c.manifest["run_id"] for c in caps],
        )
        write_json_atomic(tmp / "manifest.json", m)
    return load_capture(out, verify=False)  # just written and hashed


__all__ = ["combine_captures"]
