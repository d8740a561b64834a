"""Compressed task vectors: a task vector's values at a mask's entries, one safetensors file.

``compress(vector, mask)`` gathers ΔW at the kept entries of every module (float32 by default:
400 KB for seed 003's 99,904 entries); the file's metadata names the mask by its sha256, so a
compressed vector is never read against another mask. ``flat()`` is the vector in mask order,
the column a dictionary of tasks is built from; ``dense(name)`` decompresses a module (zeros
outside the mask), exact on the kept entries.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gradfree.taskvec.mask import Mask
    from gradfree.taskvec.vector import TaskVector

FORMAT = "gradfree.taskvec-compressed/1"
VALUE_DTYPES = ("float32", "float64")


@dataclass
class CompressedVector:
    label: str
    mask_sha256: str
    values: dict[str, Any]  # module name → 1-D tensor aligned with the mask's indices
    source: dict[str, Any] = field(default_factory=dict)

    def flat(self, mask: Mask) -> np.ndarray:
        """The values of every module of ``mask``, concatenated in mask order (float64)."""
        import numpy as np

        self.check_mask(mask)
        parts = [self.values[n].double().numpy() for n in mask.names]
        return np.concatenate(parts) if parts else np.zeros(0)

    def dense(self, name: str, mask: Mask) -> torch.Tensor:
        """Module ``name`` decompressed: its kept values, zeros elsewhere (float64)."""
        import torch

        self.check_mask(mask)
        out = torch.zeros(_numel(mask.shapes[name]), dtype=torch.float64)
        out[mask.indices[name].long()] = self.values[name].double()
        return out.view(mask.shapes[name])

    def check_mask(self, mask: Mask) -> None:
        if mask.sha256 and self.mask_sha256 and mask.sha256 != self.mask_sha256:
            raise GradfreeError(
                f"The compressed vector {self.label} was made with mask {self.mask_sha256[:12]}, "
                f"not with the mask given ({mask.sha256[:12]})."
            )

    @property
    def bytes(self) -> int:
        return sum(int(v.numel() * v.element_size()) for v in self.values.values())

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """One safetensors file, written atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        from gradfree.base.io import as_created

        path = Path(path)
        if path.exists() and not overwrite:
            raise GradfreeError(
                f"The file {path} already exists; choose another path or pass --overwrite."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "label": self.label,
            "mask_sha256": self.mask_sha256,
            "source": json.dumps(self.source, default=str),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        try:
            save_file({n: v.contiguous() for n, v in self.values.items()}, tmp, metadata=meta)
            as_created(tmp, directory=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def compress(
    vector: TaskVector, mask: Mask, *, dtype: str = "float32", device: Any = "cpu"
) -> CompressedVector:
    """``vector``'s values at ``mask``'s entries (zero on modules the vector does not touch)."""
    import torch

    if dtype not in VALUE_DTYPES:
        raise GradfreeError(f"Compressed values are {' or '.join(VALUE_DTYPES)}, not {dtype!r}.")
    out_dtype = getattr(torch, dtype)
    values = {}
    for name, idx in mask.indices.items():
        if vector.has(name):
            if tuple(vector.shape(name)) != tuple(mask.shapes[name]):
                raise GradfreeError(
                    f"Task vector {vector.label} has shape {list(vector.shape(name))} for "
                    f"'{name}' but the mask was made for {list(mask.shapes[name])}."
                )
            d = vector.delta(name, device).flatten()
            values[name] = d[idx.to(device).long()].to("cpu", out_dtype)
        else:
            values[name] = torch.zeros(idx.numel(), dtype=out_dtype)
    return CompressedVector(vector.label, mask.sha256, values, vector.describe())


def is_compressed(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def load_compressed(path: str | Path) -> CompressedVector:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GradfreeError(f"The compressed task vector {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            values = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise GradfreeError(f"The file {path} is not a readable safetensors file ({e}).") from e
    if meta.get("format") != FORMAT:
        raise GradfreeError(f"The file {path} is not a compressed task vector (format {FORMAT}).")
    return CompressedVector(
        meta.get("label", path.stem),
        meta.get("mask_sha256", ""),
        values,
        json.loads(meta.get("source", "{}")),
    )


__all__ = ["FORMAT", "CompressedVector", "compress", "is_compressed", "load_compressed"]
