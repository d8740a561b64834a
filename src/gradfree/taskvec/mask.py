"""Magnitude masks over task vectors, stored as sorted indices per module (not a dense mask).

Seed 003 keeps, for 8 LoRA task vectors of a 28-layer model, the top 892 entries of each
attention projection by the largest magnitude over the tasks (99,904 of 822M entries) and stores
that choice as an 822 MB dense tensor. Here a mask is the sorted flat indices of the kept
entries of each module (int32 where a module has fewer than 2³¹ entries), one safetensors tensor
per module plus ``mask.json``: 99,904 int32 indices are 400 KB.

Choices, all recorded in the manifest:

* modules: ``attention`` (q, k, v, o: the seed), ``mlp`` (gate, up, down), ``linears`` (all
  seven), or a regular expression over tensor names; modules no task vector touches are left out.
* aggregate over the tasks: ``max`` of |τᵢ| (the seed), ``mean`` of |τᵢ|, or ``sum`` = |Σ τᵢ|,
  the magnitude of the task-arithmetic sum, where opposing task vectors cancel.
* selection: ``per_module`` keeps ⌊k / modules⌋ entries of every module (the seed's balanced
  choice) and ``global`` the k largest anywhere. Ties are broken by module order, then flat index,
  so a mask equals the dense stable top-k exactly; the global choice streams over modules holding
  only O(k) candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

    from gradfree.taskvec.vector import BaseCheckpoint, TaskVector

FORMAT = "gradfree.taskvec-mask/1"
MASK_FILE = "mask.safetensors"
MANIFEST = "mask.json"
AGGREGATES = ("max", "mean", "sum")
SELECTIONS = ("per_module", "global")
MODULE_SETS = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "linears": ("q", "k", "v", "o", "gate", "up", "down"),
}
# Seed 003's dense mask: one byte per entry of its 822,083,584-entry task vectors.
SEED_DENSE_MASK_BYTES = 822_083_584


@dataclass
class Mask:
    """Kept entries per module: sorted flat indices into each module's weight."""

    indices: dict[str, Any]  # name → 1-D int tensor, sorted ascending
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.indices)

    @property
    def entries(self) -> int:
        return sum(int(v.numel()) for v in self.indices.values())

    @property
    def index_bytes(self) -> int:
        return sum(int(v.numel() * v.element_size()) for v in self.indices.values())

    @property
    def covered(self) -> int:
        """Entries of the selected modules (what a dense mask of them would hold)."""
        n = 0
        for s in self.shapes.values():
            size = 1
            for d in s:
                size *= d
            n += size
        return n

    def offsets(self) -> dict[str, tuple[int, int]]:
        """(start, stop) of each module's values in the flat compressed vector."""
        out, start = {}, 0
        for name, idx in self.indices.items():
            out[name] = (start, start + int(idx.numel()))
            start += int(idx.numel())
        return out

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """``folder``/mask.safetensors + mask.json, written atomically."""
        from safetensors.torch import save_file

        from gradfree.base.io import atomic_dir, sha256_file, write_json_atomic

        folder = Path(folder)
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            tensors = {n: v.contiguous() for n, v in self.indices.items()}
            save_file(tensors, str(tmp / MASK_FILE), metadata={"format": FORMAT})
            self.sha256 = sha256_file(tmp / MASK_FILE)
            write_json_atomic(tmp / MANIFEST, self.manifest())
        return folder

    def manifest(self) -> dict[str, Any]:
        file_bytes = self.index_bytes
        return {
            "format": FORMAT,
            "sha256": self.sha256,
            "entries": self.entries,
            "modules": [
                {"name": n, "shape": list(self.shapes[n]), "kept": int(v.numel())}
                for n, v in self.indices.items()
            ],
            **self.meta,
            "bytes": {
                "indices": file_bytes,
                "dense_bool_mask_of_these_modules": self.covered,
                "seed_003_dense_mask": SEED_DENSE_MASK_BYTES,
                "seed_003_dense_over_indices": SEED_DENSE_MASK_BYTES / max(1, file_bytes),
            },
        }


def load_mask(folder: str | Path) -> Mask:
    """Read a mask folder; its sha256 and index order are checked."""
    from safetensors.torch import load_file

    from gradfree.base.io import read_json, sha256_file

    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / MASK_FILE).is_file():
        raise GradfreeError(
            f"The folder {folder} is not a task-vector mask ({MANIFEST} and {MASK_FILE}); make "
            "one with `gradfree taskvec mask`."
        )
    manifest = read_json(folder / MANIFEST, "mask manifest")
    if manifest.get("format") != FORMAT:
        raise GradfreeError(
            f"The mask {folder} has format {manifest.get('format')!r}, not {FORMAT}."
        )
    sha = sha256_file(folder / MASK_FILE)
    if sha != manifest.get("sha256"):
        raise GradfreeError(
            f"The mask file {folder / MASK_FILE} does not match its manifest's sha256 (it was "
            "changed or is incomplete)."
        )
    tensors = load_file(str(folder / MASK_FILE))
    indices, shapes = {}, {}
    for m in manifest["modules"]:
        indices[m["name"]] = tensors[m["name"]]
        shapes[m["name"]] = tuple(m["shape"])
    meta = {
        k: v
        for k, v in manifest.items()
        if k not in ("format", "sha256", "entries", "modules", "bytes")
    }
    return Mask(indices, shapes, meta, sha)


def select_modules(base: BaseCheckpoint, vectors: list[TaskVector], modules: str) -> list[str]:
    """The base tensor names a mask may draw from, in checkpoint order, touched by some task."""
    if modules in MODULE_SETS:
        kinds = set(MODULE_SETS[modules])
        names = [n for n, k in base.kinds.items() if k in kinds]
    else:
        try:
            pattern = re.compile(modules)
        except re.error as e:
            raise GradfreeError(
                f"The module pattern {modules!r} is neither one of {', '.join(MODULE_SETS)} nor "
                f"a valid regular expression ({e})."
            ) from None
        names = [n for n in base.shapes if pattern.search(n) and len(base.shapes[n]) >= 1]
    touched = [n for n in names if any(v.has(n) for v in vectors)]
    if not touched:
        raise GradfreeError(
            f"No task vector changes any module selected by {modules!r}; choose other modules "
            f"({', '.join(MODULE_SETS)}, or a pattern)."
        )
    return touched


def aggregate_magnitude(deltas: list[torch.Tensor], how: str) -> torch.Tensor:
    """Per-entry importance over the tasks (flattened, float64)."""
    import torch

    if how == "max":
        out = deltas[0].abs().flatten()
        for d in deltas[1:]:
            out = torch.maximum(out, d.abs().flatten())
        return out
    if how == "mean":
        return sum((d.abs().flatten() for d in deltas), deltas[0].flatten() * 0) / len(deltas)
    if how == "sum":
        return sum((d.flatten() for d in deltas), deltas[0].flatten() * 0).abs()
    raise GradfreeError(f"Unknown aggregate {how!r}; choose one of {', '.join(AGGREGATES)}.")


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest values, ties by lower index (a stable sort)."""
    import torch

    order = torch.sort(values, descending=True, stable=True).indices
    return order[:k]


def _index_dtype(numel: int) -> Any:
    import torch

    return torch.int32 if numel < 2**31 else torch.int64


def build_mask(
    base: BaseCheckpoint,
    vectors: list[TaskVector],
    k: int,
    *,
    aggregate: str = "max",
    selection: str = "per_module",
    modules: str = "attention",
    device: Any = "cpu",
    progress: Any = None,
) -> Mask:
    """The magnitude mask of ``vectors`` keeping ``k`` entries in all (see the module doc)."""
    import torch

    if aggregate not in AGGREGATES:
        raise GradfreeError(
            f"Unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}."
        )
    if selection not in SELECTIONS:
        raise GradfreeError(
            f"Unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}."
        )
    if not vectors:
        raise GradfreeError("A mask needs at least one task vector.")
    if k < 1:
        raise GradfreeError(f"The mask budget k must be at least 1, not {k}.")
    names = select_modules(base, vectors, modules)
    per_module = k // len(names)
    if selection == "per_module" and per_module < 1:
        raise GradfreeError(
            f"A budget of {k} entries over {len(names)} modules keeps no entry per module; use "
            f"k ≥ {len(names)} or --selection global."
        )
    from gradfree.taskvec.vector import delta_or_zero

    chosen: dict[str, Any] = {}
    best_v = torch.empty(0, dtype=torch.float64, device=device)
    best_m = torch.empty(0, dtype=torch.int64, device=device)
    best_i = torch.empty(0, dtype=torch.int64, device=device)
    for mi, name in enumerate(names):
        shape = tuple(base.shapes[name])
        mag = aggregate_magnitude(
            [delta_or_zero(v, name, shape, device) for v in vectors], aggregate
        )
        if selection == "per_module":
            idx = _top(mag, min(per_module, mag.numel()))
            chosen[name] = torch.sort(idx).values
        else:
            idx = _top(mag, min(k, mag.numel()))
            cand_v = torch.cat([best_v, mag[idx]])
            cand_m = torch.cat([best_m, torch.full_like(idx, mi)])
            cand_i = torch.cat([best_i, idx])
            keep = _top(cand_v, min(k, cand_v.numel()))  # stable: earlier modules win ties
            best_v, best_m, best_i = cand_v[keep], cand_m[keep], cand_i[keep]
        if progress is not None:
            progress("mask", mi + 1, len(names), "modules")
    if selection == "global":
        for mi, name in enumerate(names):
            sel = best_i[best_m == mi]
            if sel.numel():
                chosen[name] = torch.sort(sel).values
    indices = {
        n: chosen[n].to("cpu", _index_dtype(_numel(base.shapes[n]))) for n in names if n in chosen
    }
    meta = {
        "k": k,
        "aggregate": aggregate,
        "selection": selection,
        "modules_selector": modules,
        "per_module_k": per_module if selection == "per_module" else None,
        "tasks": [v.describe() for v in vectors],
        "base": {"spec": base.spec, "model_type": base.model_type, "folder": str(base.folder)},
    }
    return Mask(indices, {n: tuple(base.shapes[n]) for n in indices}, meta)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def describe_bytes(mask: Mask) -> str:
    b = mask.manifest()["bytes"]
    return (
        f"{mask.entries:,} entries in {len(mask.indices)} modules: {b['indices'] / 1e3:,.1f} KB of "
        f"indices (a dense bool mask of these modules: "
        f"{b['dense_bool_mask_of_these_modules'] / 1e6:,.1f} MB; "
        f"seed 003's: {SEED_DENSE_MASK_BYTES / 1e6:,.0f} MB)"
    )


__all__ = [
    "AGGREGATES",
    "FORMAT",
    "MODULE_SETS",
    "SEED_DENSE_MASK_BYTES",
    "SELECTIONS",
    "Mask",
    "aggregate_magnitude",
    "build_mask",
    "describe_bytes",
    "load_mask",
    "select_modules",
]
