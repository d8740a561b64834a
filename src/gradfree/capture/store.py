"""On-disk capture folders: shards, manifest, and the lazy :class:`Capture` reader.

Layout of a capture folder::

    manifest.json          run id, versions, roles (name, source, config, fingerprint, dtype,
                           layers, keys, token counts), corpus manifest, sites, layer map,
                           window/mask settings, seed, indexes, and every shard's sha256 + size
    config.json            the resolved CaptureConfig
    documents.json         [{"id", "sha256", "tokens"}] in capture order (dumps' ``doc`` indexes it)
    <role>/layer_003.safetensors   moment stats of block 3 for role model|teacher|student
    <role>/final.safetensors       moment stats of the model-level sites (final.*)
    cross/layer_003.safetensors    teacher×student cross moments paired with student block 3
    cross/final.safetensors
    dumps/<role>/<key>/shard-00000.safetensors   optional token dumps (see dumps.py)

Inside a stats shard, tensor names are ``<key>/<part>/<field>``, e.g.
``blocks.3.resid_pre/body/m2``, with part ``body`` (positions ≥ split_first) and ``head``
(positions < split_first, stored only when the config can have any) and the fields of
:meth:`MomentStats.to_tensors`. Cross shards use
``<teacher key>~<student key>/<part>/<field>`` and the fields of :meth:`CrossStats.to_tensors`.
Part ``all`` is head + body, computed on load. Everything is float64 except ``count`` (int64).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradfree.base.errors import GradfreeError
from gradfree.base.io import as_created, read_json, sha256_file
from gradfree.capture.sites import shard_of
from gradfree.capture.stats import CrossStats, MomentStats

FORMAT = "gradfree.capture/1"
PARTS = ("head", "body")


def save_shard(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write a safetensors file atomically (temp file + rename); return its sha256 and size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        as_created(tmp, directory=False)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_shard(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read some (or all) tensors of a safetensors file, lazily (memory-mapped)."""
    with safe_open(str(path), framework="pt") as f:
        wanted = list(f.keys()) if names is None else list(names)
        return {n: f.get_tensor(n) for n in wanted}


def moment_shard(role: str, key: str) -> str:
    return f"{role}/{shard_of(key)}.safetensors"


def cross_name(teacher_key: str, student_key: str) -> str:
    return f"{teacher_key}~{student_key}"


def cross_shard(student_key: str) -> str:
    return f"cross/{shard_of(student_key)}.safetensors"


@dataclass
class Accumulators:
    """Every running statistic of a capture: moments[role][key][part], cross[(tk, sk)][part]."""

    moments: dict[str, dict[str, dict[str, MomentStats]]] = field(default_factory=dict)
    cross: dict[tuple[str, str], dict[str, CrossStats]] = field(default_factory=dict)

    def shards(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of every shard file, by relative path (still on the stats device)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for role, keys in self.moments.items():
            for key, parts in keys.items():
                shard = out.setdefault(moment_shard(role, key), {})
                for part, st in parts.items():
                    for f, t in st.to_tensors().items():
                        shard[f"{key}/{part}/{f}"] = t
        for (tk, sk), cparts in self.cross.items():
            shard = out.setdefault(cross_shard(sk), {})
            for part, cs in cparts.items():
                for f, t in cs.to_tensors().items():
                    shard[f"{cross_name(tk, sk)}/{part}/{f}"] = t
        return out

    def save(self, root: Path) -> dict[str, dict[str, Any]]:
        """Write every shard under ``root``; return {relpath: {"sha256", "bytes"}}."""
        return {rel: save_shard(root / rel, t) for rel, t in self.shards().items()}

    def load(self, root: Path) -> None:
        """Replace every accumulator by the one saved under ``root`` (same layout), in place."""
        for role, keys in self.moments.items():
            for key, parts in keys.items():
                names = [f"{key}/{p}/{f}" for p in parts for f in _MOMENT_FIELDS]
                t = read_shard(root / moment_shard(role, key), names)
                for p, st in parts.items():
                    loaded = MomentStats.from_tensors(_sub(t, f"{key}/{p}/"))
                    parts[p] = loaded.to(st.device)
        for (tk, sk), cparts in self.cross.items():
            name = cross_name(tk, sk)
            names = [f"{name}/{p}/{f}" for p in cparts for f in _CROSS_FIELDS]
            t = read_shard(root / cross_shard(sk), names)
            for p, cs in cparts.items():
                cparts[p] = CrossStats.from_tensors(_sub(t, f"{name}/{p}/")).to(cs.device)


_MOMENT_FIELDS = ("count", "sum", "m2", "m3", "m4", "absmax")
_CROSS_FIELDS = ("count", "sum_a", "sum_b", "m_ab")


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # Cloned into fresh (aligned) memory: BLAS rounds ``addmm_`` differently on the unaligned
    # buffers safetensors returns, and a resumed capture must equal an uninterrupted one bitwise.
    return {k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}


def verify_shards(root: Path, shards: dict[str, dict[str, Any]], what: str) -> None:
    """Check that every listed shard exists with the recorded size and sha256."""
    for rel, info in shards.items():
        path = root / rel
        if not path.is_file():
            raise GradfreeError(f"Shard {rel} of {what} is missing; re-run the capture.")
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise GradfreeError(
                f"Shard {rel} of {what} is corrupted (sha256 mismatch); re-run the capture."
            )


class Capture:
    """A finished capture folder, read lazily: each call opens only the shard it needs."""

    def __init__(self, path: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.config = config

    def __repr__(self) -> str:
        return f"Capture({str(self.path)!r}, roles={self.roles})"

    # structure ----------------------------------------------------------------------------------
    @property
    def roles(self) -> list[str]:
        return list(self.manifest["roles"])

    @property
    def layer_map(self) -> list[int] | None:
        m = self.manifest.get("layer_map")
        return None if m is None else [int(i) for i in m]

    def keys(self, role: str) -> list[str]:
        return list(self._role(role)["keys"])

    def tokens(self, role: str, part: str = "all") -> int:
        """How many tokens the role's statistics hold (``all``, ``head`` or ``body``)."""
        return int(self._role(role)["tokens"][part])

    def documents(self) -> list[dict[str, Any]]:
        return list(read_json(self.path / "documents.json", "capture document list"))

    def cross_pairs(self) -> list[tuple[str, str]]:
        pairs = [name.split("~", 1) for name in self.manifest.get("cross_index", {})]
        return [(t, s) for t, s in pairs]

    def _role(self, role: str) -> dict[str, Any]:
        try:
            return dict(self.manifest["roles"][role])
        except KeyError:
            raise GradfreeError(
                f"Capture {self.path} has no role '{role}'; it has: {', '.join(self.roles)}."
            ) from None

    @staticmethod
    def _check_part(part: str) -> None:
        if part not in ("all", "head", "body"):
            raise GradfreeError(f"Unknown part '{part}'; use 'all', 'body' or 'head'.")

    # statistics ---------------------------------------------------------------------------------
    def stats(self, role: str, key: str, part: str = "all") -> MomentStats:
        """Moment statistics of ``key`` for ``role`` over all / body / head positions."""
        self._check_part(part)
        index = self.manifest["stats_index"].get(role, {}) if role in self.roles else {}
        if key not in index:
            self._role(role)
            raise GradfreeError(
                f"Capture {self.path} has no statistics for {role} {key}; "
                f"it holds: {', '.join(self.keys(role))}."
            )
        parts = self._read(index[key], key, _MOMENT_FIELDS)
        body = MomentStats.from_tensors(parts["body"])
        head = (
            MomentStats.from_tensors(parts["head"])
            if "head" in parts
            else MomentStats.empty(body.dim, body.full)
        )
        return {"all": head + body, "head": head, "body": body}[part]

    def cross(self, teacher_key: str, student_key: str, part: str = "all") -> CrossStats:
        """Teacher×student cross moments of a paired site (see :meth:`cross_pairs`)."""
        self._check_part(part)
        name = cross_name(teacher_key, student_key)
        index = self.manifest.get("cross_index", {})
        if name not in index:
            raise GradfreeError(
                f"Capture {self.path} has no cross statistics for {teacher_key} ~ {student_key}."
            )
        parts = self._read(index[name], name, _CROSS_FIELDS)
        body = CrossStats.from_tensors(parts["body"])
        head = (
            CrossStats.from_tensors(parts["head"])
            if "head" in parts
            else CrossStats.empty(body.dim_a, body.dim_b)
        )
        return {"all": head + body, "head": head, "body": body}[part]

    def _read(self, rel: str, name: str, fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with safe_open(str(self.path / rel), framework="pt") as f:
            present = set(f.keys())
            for part in PARTS:
                names = [f"{name}/{part}/{fld}" for fld in fields]
                if all(n in present for n in names):
                    out[part] = {fld: f.get_tensor(n) for fld, n in zip(fields, names, strict=True)}
        return out

    # dumps --------------------------------------------------------------------------------------
    def dump_keys(self, role: str) -> list[str]:
        prefix = f"{role}/"
        return [k[len(prefix) :] for k in self.manifest.get("dumps", {}) if k.startswith(prefix)]

    def dumps(self, role: str, key: str) -> dict[str, torch.Tensor]:
        """Dumped token vectors of ``key``: ``x`` (n, d) float32, ``doc`` and ``pos`` int64."""
        entry = self.manifest.get("dumps", {}).get(f"{role}/{key}")
        if entry is None:
            raise GradfreeError(f"Capture {self.path} has no token dumps for {role} {key}.")
        parts = [read_shard(self.path / s["file"]) for s in entry["shards"]]
        if not parts:
            width = int(self.manifest["roles"][role]["widths"][key])
            return {
                "x": torch.zeros(0, width),
                "doc": torch.zeros(0, dtype=torch.int64),
                "pos": torch.zeros(0, dtype=torch.int64),
            }
        return {n: torch.cat([p[n] for p in parts]) for n in ("x", "doc", "pos")}


def load_capture(path: str | Path, verify: bool = True) -> Capture:
    """Open a capture folder lazily; with ``verify`` every shard's sha256 is checked first
    (streamed from disk: nothing is loaded into memory)."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise GradfreeError(f"{path} is not a capture folder (it has no manifest.json).")
    manifest = read_json(path / "manifest.json", "capture manifest")
    if manifest.get("format") != FORMAT:
        raise GradfreeError(f"{path} holds an unknown capture format {manifest.get('format')!r}.")
    config = read_json(path / "config.json", "capture config")
    if verify:
        verify_shards(path, manifest["shards"], f"capture {path}")
    return Capture(path, manifest, config)


__all__ = [
    "FORMAT",
    "Accumulators",
    "Capture",
    "cross_name",
    "load_capture",
    "read_shard",
    "save_shard",
    "verify_shards",
]
