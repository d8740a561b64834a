"""Task vectors as lazy sources of ΔW, tensor by tensor, over one base checkpoint.

A task vector is what fine-tuning added to a base model: τ = θ_task − θ_base. Three kinds share
one small interface (``names``, ``shape``, ``delta(name)`` in float64), so masks, compression,
merges and unmerging never hold more than one tensor of each task at a time:

* :class:`LoraTaskVector`: a PEFT LoRA adapter, ΔW = scaling · B · A on the modules it adapts
  (zero elsewhere);
* :class:`CheckpointTaskVector`: a full checkpoint minus the base (a fine-tuned model, or any
  merged model's delta from the base);
* :class:`DenseTaskVector`: tensors in memory (decompressed vectors, tests).

:class:`BaseCheckpoint` is the base: its lazily read tensors and the linear weights of its
architecture by kind (from :mod:`gradfree.adapters`), which masks select from.
:func:`open_task_vector` opens a spec (an adapter folder, a checkpoint folder or a known model).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError
from gradfree.taskvec.lora import CONFIG_FILE, LoraAdapter, check_fits, read_adapter

if TYPE_CHECKING:
    import torch

    from gradfree.merge.tensors import TensorSource


class BaseCheckpoint:
    """The base model's folder, its tensors (lazy) and the kind of each block linear's weight."""

    def __init__(self, spec: str, source: TensorSource, folder: Path, config: dict[str, Any]):
        from gradfree.adapters import linear_weight_names

        self.spec = spec
        self.source = source
        self.folder = folder
        self.config = config
        self.model_type = str(config.get("model_type", ""))
        layers = int(config.get("num_hidden_layers", 0))
        kinds = linear_weight_names(self.model_type, layers)
        self.kinds = {n: k for n, k in kinds.items() if n in source.where}
        self.shapes = {n: source.shape(n) for n in source.names()}

    @property
    def label(self) -> str:
        return self.spec

    def tensor(self, name: str, device: Any = "cpu") -> torch.Tensor:
        import torch

        return self.source.get(name).to(device=device, dtype=torch.float64)


@contextlib.contextmanager
def open_base(spec: str) -> Any:
    """A :class:`BaseCheckpoint` for a known model name or a Hugging Face folder."""
    from gradfree.merge.run import resolve_input
    from gradfree.merge.tensors import TensorSource

    m = resolve_input(spec, spec)
    config = _read_model_config(m.folder, spec)
    with TensorSource(m.folder, spec) as src:
        yield BaseCheckpoint(spec, src, m.folder, config)


def _read_model_config(folder: Path, spec: str) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GradfreeError(f"Model {spec} has no readable config.json in {folder}.") from e
    from gradfree.adapters import supported

    if config.get("model_type") not in supported():
        raise GradfreeError(
            f"Model {spec} is a '{config.get('model_type')}' model; task vectors know the "
            f"linears of: {', '.join(supported())}."
        )
    return dict(config)


class TaskVector:
    """ΔW per tensor name (float64); names it does not have are zero."""

    label: str = ""
    kind: str = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def delta(self, name: str, device: Any = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        return name in set(self.names())

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "tensors": len(self.names())}


class LoraTaskVector(TaskVector):
    kind = "lora"

    def __init__(self, adapter: LoraAdapter, base: BaseCheckpoint, label: str | None = None):
        check_fits(adapter, base.shapes, base.label)
        self.adapter = adapter
        self.label = label or adapter.label
        self._names = list(adapter.modules)

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self.adapter.modules

    def shape(self, name: str) -> tuple[int, ...]:
        return self.adapter.modules[name].shape

    def delta(self, name: str, device: Any = "cpu") -> torch.Tensor:
        return self.adapter.modules[name].delta(device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "adapter": self.adapter.describe()}


class CheckpointTaskVector(TaskVector):
    """θ − θ_base for a same-shape checkpoint (a fine-tuned or a merged model)."""

    kind = "checkpoint"

    def __init__(self, source: TensorSource, base: BaseCheckpoint, spec: str, label: str):
        from gradfree.merge.tensors import check_same_shapes

        check_same_shapes([base.source, source])
        self.source = source
        self.base = base
        self.spec = spec
        self.label = label
        self._names = base.source.names()

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self.base.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shapes[name]

    def delta(self, name: str, device: Any = "cpu") -> torch.Tensor:
        import torch

        x = self.source.get(name).to(device=device, dtype=torch.float64)
        return x - self.base.tensor(name, device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "spec": self.spec}


class DenseTaskVector(TaskVector):
    kind = "dense"

    def __init__(self, tensors: dict[str, Any], label: str):
        self.tensors = tensors
        self.label = label

    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def delta(self, name: str, device: Any = "cpu") -> torch.Tensor:
        import torch

        return self.tensors[name].to(device=device, dtype=torch.float64)


def delta_or_zero(vector: TaskVector, name: str, shape: tuple[int, ...], device: Any) -> Any:
    import torch

    if vector.has(name):
        return vector.delta(name, device)
    return torch.zeros(shape, dtype=torch.float64, device=device)


def is_adapter(spec: str | Path) -> bool:
    return (Path(spec) / CONFIG_FILE).is_file()


def open_task_vector(
    spec: str, base: BaseCheckpoint, stack: contextlib.ExitStack, label: str | None = None
) -> TaskVector:
    """The task vector named by ``spec``: a PEFT adapter folder (``adapter_config.json``), or a
    checkpoint (folder or known model) whose delta from ``base`` is taken. Sources opened here
    are closed with ``stack``."""
    from gradfree.merge.run import resolve_input
    from gradfree.merge.tensors import TensorSource

    name = label or Path(spec).name or spec
    if is_adapter(spec):
        return LoraTaskVector(read_adapter(spec), base, name)
    m = resolve_input(spec, name)
    cfg = _read_model_config(m.folder, spec)
    if cfg.get("model_type") != base.model_type:
        raise GradfreeError(
            f"Model {spec} is a '{cfg.get('model_type')}' model but the base {base.label} is "
            f"'{base.model_type}'; a task vector needs a fine-tune of the same base."
        )
    src = stack.enter_context(TensorSource(m.folder, name))
    return CheckpointTaskVector(src, base, spec, name)


def unique_labels(specs: list[str]) -> list[str]:
    """Labels for specs: the folder's name, numbered when two are equal."""
    names = [Path(s).name or s for s in specs]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


__all__ = [
    "BaseCheckpoint",
    "CheckpointTaskVector",
    "DenseTaskVector",
    "LoraTaskVector",
    "TaskVector",
    "delta_or_zero",
    "is_adapter",
    "open_base",
    "open_task_vector",
    "unique_labels",
]
