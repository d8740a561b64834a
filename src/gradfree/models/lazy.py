"""Lazy models: a skeleton on the meta device whose weights are read from safetensors on demand.

:func:`load_lazy` builds the model of a checkpoint folder with every parameter on the meta device
(accelerate's ``init_empty_weights``; buffers such as RoPE frequencies stay real) and returns a
:class:`LazyModel` with the same tokenizer and fingerprint as :func:`~gradfree.models.load_model`.
``with lazy.materialised(module):`` reads exactly that module's tensors from the checkpoint's
shards (``safe_open``, one tensor at a time, cast to the model dtype as ``from_pretrained`` does)
and puts them back on the meta device on exit, so memory holds one module's weights at a time.
Used by sequential capture (:mod:`gradfree.capture.sequential`) to run models larger than RAM.
Only local checkpoint folders with safetensors weights can be read this way.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError
from gradfree.models.fetch import quiet_transformers
from gradfree.models.load import (
    SpecKind,
    _check_device,
    fingerprint,
    resolve_dtype,
    resolve_model,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


_ROW_CHUNK = 8192  # rows of an embedding table read at once by LazyModel.read_rows


def _weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors shard that holds it (single file or indexed shards)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GradfreeError(
            f"Sequential capture needs a safetensors checkpoint folder; {folder} has none."
        )
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


@dataclass
class LazyModel:
    """A model whose parameters live on the meta device until :meth:`materialised` reads them.

    Same fields as :class:`~gradfree.models.LoadedModel` (so a capture records the same identity
    and run hash), plus the ``device`` and ``dtype`` that materialised weights get.
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    weights: dict[str, Path]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    kind: SpecKind = "folder"
    loaded: int = 0  # parameters currently materialised (every module together)
    # The module tree as built, taken once: a caller may swap modules of the tree meanwhile.
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())
        self._names = {id(m): n for n, m in self.modules.items()}

    def real_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter of the model as built that is materialised now (not on meta)."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            for leaf, p in m.named_parameters(recurse=False):
                if p.device.type != "meta":
                    out[f"{name}.{leaf}" if name else leaf] = p
        return out

    def _name(self, module: nn.Module) -> str:
        try:
            return self._names[id(module)]
        except KeyError:
            raise GradfreeError("That module is not part of this lazy model.") from None

    def _read(self, files: dict[Path, list[tuple[str, Any]]]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for path, wanted in files.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name, like in wanted:
                    out[name] = f.get_tensor(name).to(self.device, like.dtype)
        return out

    def read_rows(self, module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of ``module``'s weight, read in chunks of the table
        (an embedding lookup needs only the rows of the tokens it sees)."""
        import torch
        from safetensors import safe_open

        name = self._name(module) + ".weight"
        like = module.get_parameter("weight")
        out: list[torch.Tensor] = []
        with safe_open(str(self.weights[name]), framework="pt", device="cpu") as f:
            table = f.get_slice(name)
            n = int(table.get_shape()[0])
            for a in range(0, n, _ROW_CHUNK):
                inside = rows[(rows >= a) & (rows < a + _ROW_CHUNK)]
                if inside.numel():
                    out.append(table[a : a + _ROW_CHUNK].index_select(0, inside - a))
        return torch.cat(out).to(self.device, like.dtype)

    @contextlib.contextmanager
    def materialised(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` (a submodule of :attr:`model`) with its weights read from the checkpoint;
        they are back on the meta device (and freed) on exit, whatever happens."""
        import torch

        prefix = self._name(module)
        prefix = prefix + "." if prefix else ""
        params = list(module.named_parameters())
        files: dict[Path, list[tuple[str, Any]]] = {}
        for name, p in params:
            full = prefix + name
            if full not in self.weights:
                raise GradfreeError(
                    f"The checkpoint in {self.source} has no tensor '{full}', which the model "
                    "needs; sequential capture reads tensors under the model's own names."
                )
            files.setdefault(self.weights[full], []).append((full, p))
        slots = [
            (module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n, _ in params
        ]
        try:
            tensors = self._read(files)
            for (owner, leaf), (name, _) in zip(slots, params, strict=True):
                real = torch.nn.Parameter(tensors.pop(prefix + name), requires_grad=False)
                owner._parameters[leaf] = real
                self.loaded += int(real.numel())
            yield module
        finally:
            for owner, leaf in slots:
                held = owner._parameters[leaf]
                if held is not None and held.device.type != "meta":
                    self.loaded -= int(held.numel())
                    meta = torch.empty_like(held, device="meta")
                    owner._parameters[leaf] = torch.nn.Parameter(meta, requires_grad=False)


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """Put the real buffers (RoPE frequencies) on ``device``; parameters stay on meta."""
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)


def load_lazy(spec: str, device: str = "cpu", dtype: str = "float32") -> LazyModel:
    """The model named by ``spec`` as a meta-device skeleton over its safetensors checkpoint.

    ``spec`` must name a known model or a local folder: a GGUF file or a hub id has no
    safetensors folder to read blocks from (load it whole instead)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = _check_device(device)
    resolved = resolve_model(spec)
    if resolved.kind not in ("known", "folder"):
        raise GradfreeError(
            f"Sequential capture needs a safetensors checkpoint folder, and '{spec}' is a "
            f"{'GGUF file' if resolved.kind == 'gguf' else 'hub id'}; capture it without "
            "--sequential or save it as a folder first."
        )
    folder = Path(resolved.source)
    weights = _weight_map(folder)
    try:
        with quiet_transformers(progress=False):
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise GradfreeError(
            f"Could not load the model in {folder}: {str(e).splitlines()[0]}"
        ) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # as load_model does: batching needs a pad token
    model.eval()
    model.requires_grad_(False)
    _move_buffers(model, dev)
    return LazyModel(
        model=model,
        tokenizer=tok,
        name=resolved.name,
        source=resolved.source,
        device=dev,
        dtype=torch_dtype,
        weights=weights,
        fingerprint=fingerprint(resolved, model, tok, dtype),
        kind=resolved.kind,
    )


__all__ = ["LazyModel", "load_lazy"]
