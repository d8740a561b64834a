"""Scratch files of a sequential capture: tensors appended to a file and read back by position.

A sequential capture (:mod:`.sequential`) keeps every window's hidden states between blocks, and
a paired one the teacher's activations at the paired sites, on disk in ``<out>.partial/
sequential/``. They are plain reads and writes rather than a memory map, so the data sits in
the page cache and not in the process's resident memory. The bytes are the tensors' own (any
dtype, bfloat16 included); :meth:`ScratchFile.describe` and :meth:`ScratchFile.reopen` carry a
file's index through a checkpoint so an interrupted capture can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class ScratchFile:
    """Tensors appended to one file, read back by the position :meth:`append` returned."""

    def __init__(self, path: Path, described: dict[str, Any] | None = None) -> None:
        self.path = path
        self.index: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        self.end = 0
        if described is None:
            self.file = open(path, "w+b")  # noqa: SIM115 - closed by close()
            return
        # Reopened after an interruption: anything past the recorded end is overwritten.
        self.file = open(path, "r+b")  # noqa: SIM115
        self.end = int(described["end"])
        for offset, shape, dtype in described["index"]:
            self.index.append((int(offset), tuple(shape), getattr(torch, dtype)))

    @classmethod
    def reopen(cls, root: Path, described: dict[str, Any]) -> ScratchFile:
        return cls(root / described["file"], described)

    def describe(self) -> dict[str, Any]:
        """The file name and index, as JSON (for a checkpoint)."""
        index = [[o, list(s), str(d).removeprefix("torch.")] for o, s, d in self.index]
        return {"file": self.path.name, "end": self.end, "index": index}

    def append(self, x: torch.Tensor) -> int:
        raw = x.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        self.file.seek(self.end)
        self.file.write(raw.tobytes())
        self.index.append((self.end, tuple(x.shape), x.dtype))
        self.end += raw.nbytes
        return len(self.index) - 1

    def read(self, i: int, device: torch.device) -> torch.Tensor:
        offset, shape, dtype = self.index[i]
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        if n == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        buf = bytearray(n)
        self.file.seek(offset)
        self.file.readinto(buf)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape).to(device)

    def flush(self) -> None:
        self.file.flush()

    def close(self, unlink: bool = True) -> None:
        """Close the file; delete it unless it must outlive an interruption (``unlink=False``)."""
        self.file.close()
        if unlink:
            self.path.unlink(missing_ok=True)


__all__ = ["ScratchFile"]
