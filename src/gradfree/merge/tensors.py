"""Lazy tensor IO for merges: read Hugging Face safetensors folders tensor by tensor, write
sharded safetensors, and check that inputs have the same tensors with the same shapes.

Inputs are memory-mapped (``safe_open``): a tensor is read when a merge asks for it, so a merge
of N models holds one tensor of each at a time, not N models. The writer keeps at most one output
shard (``max_shard_mb``) in memory and writes ``model.safetensors`` or numbered shards plus the
``model.safetensors.index.json`` that transformers expects, with tensor names exactly as in the
first input (so a tied checkpoint, which stores no ``lm_head.weight``, stays tied).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"


class TensorSource:
    """The tensors of one Hugging Face folder, opened lazily; use as a context manager."""

    def __init__(self, folder: str | Path, label: str) -> None:
        self.folder = Path(folder)
        self.label = label
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise GradfreeError(
                f"Model {label} ({self.folder}) has no safetensors weights; merges read "
                "safetensors folders (save the model with save_pretrained first)."
            )
        self._files = files
        self._weight_map = weight_map
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}

    def __enter__(self) -> TensorSource:
        from safetensors import safe_open

        for f in self._files:
            h = self._stack.enter_context(safe_open(str(self.folder / f), framework="pt"))
            self._handles[f] = h
            for k in h.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                self.where.setdefault(k, f)
        if self._weight_map is not None:
            self.where = {k: v for k, v in self._weight_map.items() if v in self._handles}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._handles = {}

    def names(self) -> list[str]:
        """Tensor names in file order (files sorted, then each file's own order)."""
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._handles[self.where[name]].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise GradfreeError(f"Model {self.label} has no tensor '{name}'.")
        return self._handles[self.where[name]].get_tensor(name)


def check_same_shapes(sources: list[TensorSource]) -> list[str]:
    """The common tensor names (first source's order); a one-sentence error on the first tensor
    that is missing somewhere or whose shape differs."""
    first = sources[0]
    names = first.names()
    for src in sources[1:]:
        for n in names:
            if n not in src.where:
                raise GradfreeError(
                    f"Tensor '{n}' of model {first.label} is missing in model {src.label}; "
                    "same-shape merges need the same tensors."
                )
            a, b = first.shape(n), src.shape(n)
            if a != b:
                raise GradfreeError(
                    f"Tensor '{n}' has shape {list(a)} in model {first.label} but {list(b)} in "
                    f"model {src.label}; same-shape merges need identical shapes."
                )
        extra = [n for n in src.names() if n not in first.where]
        if extra:
            raise GradfreeError(
                f"Tensor '{extra[0]}' of model {src.label} is missing in model {first.label}; "
                "same-shape merges need the same tensors."
            )
    return names


class ShardWriter:
    """Collects output tensors and writes safetensors shards of at most ``max_bytes`` each."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = t.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the files as transformers expects; return file names."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            (self.folder / self._written[0][0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map: dict[str, str] = {}
        files = []
        for i, (tmp, names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files


@contextlib.contextmanager
def open_sources(folders: list[tuple[str, str]]) -> Iterator[list[TensorSource]]:
    """Open (folder, label) pairs as lazy sources; all are closed on exit."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(TensorSource(f, label)) for f, label in folders]


__all__ = ["INDEX", "ShardWriter", "TensorSource", "check_same_shapes", "open_sources"]
