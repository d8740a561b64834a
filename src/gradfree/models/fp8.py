"""FP8 checkpoints in the format Qwen publishes for Qwen3 (transformers' "fine-grained FP8").

The format: ``config.json`` holds ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], "activation_scheme": "dynamic"}`` (``modules_to_not_convert``
optional); each quantised Linear weight ``<m>.weight`` is stored as ``torch.float8_e4m3fn`` beside
a float32 ``<m>.weight_scale_inv`` of shape ceil(out/128) × ceil(in/128), and the real weight is
``W = fp8 · scale_inv`` with each scale broadcast over its 128×128 block (the last blocks of a
row or column may be partial). Embeddings, norms, biases and the LM head stay in bf16.

Loading (:func:`read_fp8_state_dict`, :func:`load_fp8_model`) dequantises one block row at a
time into the requested compute dtype, on any device, without transformers' FP8 path (which
wants a GPU). Writing (:func:`quantize_folder_`) turns a plain checkpoint folder into this
format: per block, scale = amax / 448 (448 is e4m3's largest finite value), q = W / scale
rounded to e4m3. Malformed checkpoints (a missing or mis-shaped scale, an unknown ``fmt``, a bad
block size) are one-sentence :class:`GradfreeError`s. torch is imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value
SCALE_SUFFIX = "_scale_inv"  # "<m>.weight" -> "<m>.weight_scale_inv"
DEFAULT_BLOCK = (128, 128)
WEIGHT_FORMATS = ("safetensors", "fp8")
# Static activation scales are only for FP8 matmuls; dequantised weights do not need them.
_ACTIVATION_KEYS = ("activation_scale", "input_scale")


@dataclass(frozen=True)
class Fp8Format:
    """A checked ``quantization_config`` of quant_method fp8 (``block`` None: one scale per
    tensor)."""

    block: tuple[int, int] | None
    activation_scheme: str = "dynamic"

    def config(self, not_converted: Iterable[str] = ()) -> dict[str, Any]:
        """The ``quantization_config`` that describes this format in ``config.json``."""
        return {
            "activation_scheme": self.activation_scheme,
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(self.block) if self.block else None,
            "modules_to_not_convert": sorted(not_converted),
        }


def check_weight_format(value: str) -> str:
    """``value`` when it is one of :data:`WEIGHT_FORMATS`, else one sentence."""
    if value not in WEIGHT_FORMATS:
        raise GradfreeError(
            f"Unknown save format '{value}'; choose one of: {', '.join(WEIGHT_FORMATS)}."
        )
    return value


def fp8_format(config: Mapping[str, Any], where: str = "The checkpoint") -> Fp8Format | None:
    """The FP8 format a ``config.json`` mapping declares, None when it declares no fp8
    quantization, a one-sentence error when the declaration is malformed."""
    q = config.get("quantization_config")
    if not isinstance(q, Mapping) or q.get("quant_method") != "fp8":
        return None
    fmt = q.get("fmt", "e4m3")  # transformers' own configs omit fmt: e4m3 is the only one
    if fmt != "e4m3":
        raise GradfreeError(
            f"{where} declares FP8 format '{fmt}', but only 'e4m3' (float8_e4m3fn) is supported."
        )
    block = q.get("weight_block_size", list(DEFAULT_BLOCK))
    ok = block is None or (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    )
    if not ok:
        raise GradfreeError(
            f"{where} has weight_block_size {block!r}; it must be two positive integers "
            "such as [128, 128]."
        )
    if q.get("scale_fmt", "float") != "float":
        raise GradfreeError(f"{where} stores its FP8 scales as '{q['scale_fmt']}'; only float.")
    return Fp8Format(
        None if block is None else (int(block[0]), int(block[1])),
        str(q.get("activation_scheme", "dynamic")),
    )


def folder_fp8_format(folder: str | Path) -> Fp8Format | None:
    """:func:`fp8_format` of ``folder/config.json`` (None when it has none or is unreadable)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return fp8_format(config, f"The checkpoint {folder}") if isinstance(config, dict) else None


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, int]:
    """The scale grid of a (rows, cols) weight: ceil(rows/bm) × ceil(cols/bn) (1 × 1 per
    tensor)."""
    if block is None:
        return (1, 1)
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def dequantize(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] | None,
    dtype: torch.dtype,
    name: str = "a weight",
) -> torch.Tensor:
    """``q · scale_inv`` broadcast over blocks, in ``dtype``, one block row at a time (so the
    float32 intermediate is one block row, not the whole matrix)."""
    import torch

    if q.dtype != torch.float8_e4m3fn:
        raise GradfreeError(f"{name} is stored as {q.dtype}, not float8_e4m3fn.")
    if q.ndim != 2:
        raise GradfreeError(f"{name} is an FP8 tensor of {q.ndim} dimensions; expected 2.")
    rows, cols = q.shape
    want = scale_shape((rows, cols), block)
    got = tuple(scale_inv.shape) if scale_inv.ndim == 2 else (scale_inv.numel(), -1)
    if block is None and scale_inv.numel() == 1:
        got = want
    if got != want:
        grid = "one per tensor" if block is None else f"{block[0]}×{block[1]} blocks"
        raise GradfreeError(
            f"The scale of {name} has shape {tuple(scale_inv.shape)}, but a {rows}×{cols} "
            f"weight in {grid} needs {want[0]}×{want[1]}."
        )
    bm, bn = block or (rows, cols)
    # fp8 × float32 is exact in float32 (3 + 24 bits); float64 keeps it exact for float64.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale_inv.reshape(want).to(work)
    out = torch.empty(rows, cols, dtype=dtype, device=q.device)
    for i in range(want[0]):
        r0, r1 = i * bm, min((i + 1) * bm, rows)
        col_scale = s[i].repeat_interleave(bn)[:cols]
        out[r0:r1] = (q[r0:r1].to(work) * col_scale).to(dtype)
    return out


def quantize(
    w: torch.Tensor, block: tuple[int, int] | None = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as float8_e4m3fn, float32 scale_inv) of a 2-D weight: per block, scale = amax / 448
    (1 for an all-zero block), q = W / scale rounded to nearest e4m3, so that W ≈ q · scale."""
    import torch

    rows, cols = w.shape
    bm, bn = block or (rows, cols)
    grid = scale_shape((rows, cols), block)
    scales = torch.empty(grid, dtype=torch.float32, device=w.device)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=w.device)
    pad = grid[1] * bn - cols
    for i in range(grid[0]):
        r0, r1 = i * bm, min((i + 1) * bm, rows)
        stripe = w[r0:r1].to(torch.float32)
        padded = torch.nn.functional.pad(stripe, (0, pad)) if pad else stripe
        amax = padded.view(r1 - r0, grid[1], bn).abs().amax(dim=(0, 2))
        scales[i] = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        # Divide by the stored float32 scale, so that dequantising multiplies by the same.
        scaled = stripe / scales[i].repeat_interleave(bn)[:cols]
        q[r0:r1] = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scales


def _shard_keys(folder: Path) -> dict[str, Path]:
    """Every tensor name of the folder's safetensors shards, with the shard holding it."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise GradfreeError(f"The FP8 checkpoint {folder} has no .safetensors weight files.")
    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[k] = shard
    return where


class Fp8Reader:
    """Tensors of an FP8 checkpoint folder, one at a time, in ``dtype``: an FP8 weight is
    dequantised with its scale (scales and static activation scales are not tensors of the
    model), the others are cast. For layer-by-layer readers that never hold the whole model."""

    def __init__(self, folder: str | Path, dtype: torch.dtype, fmt: Fp8Format | None = None):
        self.folder, self.dtype = Path(folder), dtype
        found = fmt or folder_fp8_format(self.folder)
        if found is None:
            raise GradfreeError(f"The checkpoint {folder} declares no fp8 quantization_config.")
        self.fmt = found
        self.where = _shard_keys(self.folder)
        self._handles: dict[Path, Any] = {}
        for key in self.where:
            if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) not in self.where:
                raise GradfreeError(f"The FP8 checkpoint {folder} has {key} but no weight for it.")

    def names(self) -> list[str]:
        """The model's tensor names (no scales)."""
        return [
            k
            for k in self.where
            if not k.endswith(SCALE_SUFFIX) and k.rsplit(".", 1)[-1] not in _ACTIVATION_KEYS
        ]

    def stored(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as the checkpoint stores it (float8 codes, scales, bf16...)."""
        from safetensors import safe_open

        shard = self.where[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        return self._handles[shard].get_tensor(key)  # type: ignore[no-any-return]

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in the reader's dtype (FP8 weights dequantised)."""
        import torch

        t, scale_key, where = (
            self.stored(key),
            key + SCALE_SUFFIX,
            f"The FP8 checkpoint {self.folder}",
        )
        if t.dtype == torch.float8_e4m3fn:
            if scale_key not in self.where:
                raise GradfreeError(f"{where} stores {key} in float8 without its {scale_key}.")
            return dequantize(t, self.stored(scale_key), self.fmt.block, self.dtype, key)
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:
            raise GradfreeError(f"{where} stores {key} as {t.dtype}, not float8_e4m3fn.")
        if scale_key in self.where:
            raise GradfreeError(f"{where} has a scale for {key}, which is not float8.")
        return t.to(self.dtype) if t.dtype.is_floating_point else t


def read_fp8_state_dict(
    folder: str | Path, dtype: torch.dtype, fmt: Fp8Format | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 checkpoint folder in ``dtype`` (:class:`Fp8Reader`), read one
    tensor (and its scale) at a time."""
    reader = Fp8Reader(folder, dtype, fmt)
    return {k: reader.get(k) for k in reader.names()}


def load_fp8_model(folder: str | Path, dtype: torch.dtype, fmt: Fp8Format | None = None) -> Any:
    """The causal LM of an FP8 checkpoint folder, dequantised into ``dtype`` (on the CPU): the
    model is built from the config minus its quantization_config, then given the state dict."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    folder = Path(folder)
    sd = read_fp8_state_dict(folder, dtype, fmt)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # No folder here (transformers refuses a folder together with a state dict), so the Auto
    # class cannot be used: its concrete class for this config is.
    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise GradfreeError(f"The FP8 checkpoint {folder} is not a causal LM transformers knows.")
    model = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype)
    del sd
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def fp8_eligible(model: Any) -> tuple[list[str], list[str]]:
    """(weights to quantise, Linear modules left alone): every ``nn.Linear`` weight except the
    output embedding (the LM head) and any Linear tied to the input embedding, as
    transformers' FP8 integration and Qwen's checkpoints do."""
    from torch import nn

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(in_emb.weight)} if in_emb is not None else set()
    keep, skip = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if m is out_emb or id(m.weight) in tied:
            skip.append(name)
        else:
            keep.append(f"{name}.weight")
    return keep, skip


def quantize_folder_(
    folder: str | Path,
    weights: Iterable[str],
    not_converted: Iterable[str] = (),
    block: tuple[int, int] | None = DEFAULT_BLOCK,
) -> int:
    """Rewrite the plain checkpoint in ``folder`` in FP8, in place: each of ``weights`` becomes
    float8_e4m3fn plus its float32 scale_inv, the shard index and ``config.json`` follow.
    Returns the number of weights quantised. Each shard is replaced atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    todo = set(weights)
    where = _shard_keys(folder)
    done = 0
    new_map: dict[str, str] = {}
    for shard in sorted(set(where.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {"format": "pt"}
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                if key in todo and t.ndim == 2 and t.dtype.is_floating_point:
                    q, s = quantize(t, block)
                    tensors[key], tensors[key + SCALE_SUFFIX] = q, s
                    done += 1
                else:
                    tensors[key] = t
        tmp = shard.with_name(f".{shard.name}.partial")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, shard)
        new_map.update({k: shard.name for k in tensors})
        del tensors
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text(encoding="utf-8"))
        idx["weight_map"] = dict(sorted(new_map.items()))
        idx.setdefault("metadata", {})["total_size"] = sum(
            p.stat().st_size for p in folder.glob("*.safetensors")
        )
        _write_json(index, idx)
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    config["quantization_config"] = Fp8Format(block).config(not_converted)
    _write_json(cfg_path, config)
    return done


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_fp8_(model: Any, folder: str | Path, block: tuple[int, int] | None = DEFAULT_BLOCK) -> int:
    """Turn ``folder`` (``model`` just saved there by ``save_pretrained``) into an FP8
    checkpoint: :func:`fp8_eligible` weights quantised per block. ``model`` None: the module
    tree is built from ``folder/config.json`` on the meta device (no memory, no weights)."""
    if model is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    keep, skip = fp8_eligible(model)
    return quantize_folder_(folder, keep, skip, block)


__all__ = [
    "DEFAULT_BLOCK",
    "E4M3_MAX",
    "SCALE_SUFFIX",
    "WEIGHT_FORMATS",
    "Fp8Format",
    "Fp8Reader",
    "check_weight_format",
    "dequantize",
    "folder_fp8_format",
    "fp8_eligible",
    "fp8_format",
    "load_fp8_model",
    "quantize",
    "quantize_folder_",
    "read_fp8_state_dict",
    "save_fp8_",
    "scale_shape",
]
