"""Read PEFT LoRA adapters and expand them to full task vectors, ΔW = scaling · B · A.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``,
refused: pickles are not read). Per targeted module the file has ``lora_A`` (r × in) and
``lora_B`` (out × r); PEFT's forward adds ``scaling · B A x`` with scaling ``lora_alpha / r``, or
``lora_alpha / √r`` with rsLoRA (Kalajdzievski 2023); ``rank_pattern`` / ``alpha_pattern``
override r and alpha for modules whose name ends with a pattern, and ``fan_in_fan_out`` means the
base stores the weight as (in × out) (GPT-2's Conv1D), so ΔW is transposed. What PEFT trains
beyond A and B (DoRA magnitudes, LoRA on embeddings, trained biases, ``modules_to_save`` copies)
is not a low-rank ΔW of a linear and is refused with one sentence.

Names: PEFT saves ``base_model.model.<module path>.lora_A.weight``; the task vector is keyed by the
base checkpoint's tensor name ``<module path>.weight``. Nothing here imports torch at import time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class LoraModule:
    """One adapted linear: ΔW = scaling · B @ A (transposed when ``fan_in_fan_out``)."""

    name: str  # the base tensor name, "<module>.weight"
    a: Any  # (r, in) torch tensor
    b: Any  # (out, r)
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def delta(self, device: Any = "cpu") -> torch.Tensor:
        """ΔW in float64 (computed on ``device``)."""
        import torch

        a = self.a.to(device=device, dtype=torch.float64)
        b = self.b.to(device=device, dtype=torch.float64)
        d = (b @ a) * self.scaling
        return d.T.contiguous() if self.fan_in_fan_out else d


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk: its config and its modules by base tensor name."""

    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.folder.name

    @property
    def base_model(self) -> str | None:
        v = self.config.get("base_model_name_or_path")
        return None if v is None else str(v)

    def describe(self) -> dict[str, Any]:
        c = self.config
        ranks = sorted({m.rank for m in self.modules.values()})
        return {
            "folder": str(self.folder),
            "peft_type": c.get("peft_type"),
            "r": c.get("r"),
            "lora_alpha": c.get("lora_alpha"),
            "use_rslora": bool(c.get("use_rslora", False)),
            "fan_in_fan_out": bool(c.get("fan_in_fan_out", False)),
            "target_modules": c.get("target_modules"),
            "base_model_name_or_path": self.base_model,
            "modules": len(self.modules),
            "ranks": ranks,
            "parameters": sum(m.a.numel() + m.b.numel() for m in self.modules.values()),
        }


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that matches the end of the
    module's dotted name (as a regular expression) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scaling_for(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, scaling) of ``module`` under the adapter's config (PEFT's rules)."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    alpha = float(
        _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    )
    if r <= 0:
        raise GradfreeError(f"The LoRA rank of module '{module}' is {r}; it must be positive.")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise GradfreeError(f"The adapter folder {folder} does not exist.")
    if not path.is_file():
        raise GradfreeError(
            f"The folder {folder} has no {CONFIG_FILE}; a PEFT adapter folder holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GradfreeError(f"The adapter config {path} is not valid JSON ({e}).") from e
    if not isinstance(config, dict):
        raise GradfreeError(f"The adapter config {path} is not a JSON object.")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise GradfreeError(
            f"The adapter {folder} is a {kind} adapter; only LoRA adapters expand to ΔW = B·A."
        )
    if config.get("use_dora"):
        raise GradfreeError(
            f"The adapter {folder} is a DoRA adapter; its magnitude vectors make ΔW depend on "
            "the base weights, and only plain LoRA is read."
        )
    if config.get("modules_to_save"):
        raise GradfreeError(
            f"The adapter {folder} also saves full copies of {config['modules_to_save']}; only "
            "LoRA factors are read (merge those modules separately)."
        )
    if str(config.get("bias", "none")) != "none":
        raise GradfreeError(
            f"The adapter {folder} trains biases (bias={config['bias']!r}); only LoRA factors of "
            "weights are read."
        )
    return config


def read_adapter(folder: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder; one-sentence errors for anything that is not a plain LoRA."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        extra = (
            " (a pickled adapter_model.bin is not read)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise GradfreeError(f"The adapter folder {folder} has no {WEIGHTS_FILE}{extra}.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise GradfreeError(f"The adapter weights {weights} could not be read ({e}).") from e
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise GradfreeError(
                f"The adapter {folder} has tensor '{key}'; LoRA on embeddings and DoRA "
                "magnitudes are not read."
            )
        m = _KEY.match(key)
        if m is None:
            raise GradfreeError(
                f"The adapter {folder} has tensor '{key}', which is not a LoRA factor "
                "(…lora_A.weight / …lora_B.weight)."
            )
        module = m["module"].removeprefix(_PREFIX)
        pairs.setdefault(module, {})[m["which"]] = t
    fan = bool(config.get("fan_in_fan_out", False))
    adapter = LoraAdapter(folder=folder, config=config)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise GradfreeError(f"Module '{module}' of adapter {folder} has no {missing} factor.")
        a, b = ab["A"], ab["B"]
        r, scale = scaling_for(config, module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise GradfreeError(
                f"Module '{module}' of adapter {folder} has factors of shapes {list(a.shape)} "
                f"and {list(b.shape)}, which do not multiply (B is out × r, A is r × in)."
            )
        if a.shape[0] != r:
            raise GradfreeError(
                f"Module '{module}' of adapter {folder} has rank {a.shape[0]} but its config "
                f"says r={r}."
            )
        name = f"{module}.weight"
        adapter.modules[name] = LoraModule(name, a, b, scale, fan)
    if not adapter.modules:
        raise GradfreeError(f"The adapter {folder} has no LoRA factors.")
    return adapter


def check_fits(adapter: LoraAdapter, shapes: dict[str, tuple[int, ...]], base_label: str) -> None:
    """One sentence if the adapter does not fit the base: a module the base lacks (another
    architecture) or a ΔW whose shape differs from the base weight's."""
    missing = [n for n in adapter.modules if n not in shapes]
    if missing:
        made_for = adapter.base_model
        hint = f" (it was made for {made_for})" if made_for else ""
        raise GradfreeError(
            f"Adapter {adapter.label} adapts '{missing[0]}', which base model {base_label} does "
            f"not have{hint}: it is an adapter for another architecture."
        )
    for name, m in adapter.modules.items():
        if tuple(shapes[name]) != m.shape:
            raise GradfreeError(
                f"Adapter {adapter.label} gives '{name}' a ΔW of shape {list(m.shape)} but base "
                f"model {base_label} has shape {list(shapes[name])}: it was made for a model "
                "of another size."
            )


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "LoraAdapter",
    "LoraModule",
    "check_fits",
    "read_adapter",
    "scaling_for",
]
