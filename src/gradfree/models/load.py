"""The universal model loader: one spec string in, a model + tokenizer + fingerprint out.

A spec is a known model name (fetched with ``gradfree models fetch``), a local Hugging Face
folder (with ``config.json``; an FP8 folder in Qwen's format is dequantised into the requested
dtype by :mod:`gradfree.models.fp8`), a ``.gguf`` file, or a hub id. The fingerprint (config hash,
weight-file hashes, tokenizer hash) is what output folders record as their input's identity.
torch and transformers are imported inside functions, so importing this module is cheap and
never touches CUDA.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gradfree.base import paths
from gradfree.base.configfile import DTYPES, check_device, check_dtype
from gradfree.base.errors import GradfreeError
from gradfree.base.io import sha256_file, sha256_text, write_json_atomic
from gradfree.models.fetch import known_model_dir, load_gguf, quiet_transformers, read_record
from gradfree.models.fp8 import folder_fp8_format, load_fp8_model
from gradfree.models.registry import MODELS

if TYPE_CHECKING:
    import torch

# Config keys that say how the model was loaded or saved, not what it is.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "_name_or_path"}
_VOLATILE_CONFIG_KEYS |= {"quantization_config", "_commit_hash", "_attn_implementation_autoset"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

SpecKind = Literal["known", "folder", "gguf", "hub"]


@dataclass(frozen=True)
class ResolvedModel:
    """What a spec points at, before anything is loaded."""

    spec: str
    kind: SpecKind
    name: str  # short name for reports: registry name, folder or file stem, or hub id
    source: str  # absolute path, or the hub id
    gguf_file: str | None = None  # file name within the folder of ``source`` (kind "gguf")


@dataclass
class LoadedModel:
    """A model in eval mode with frozen weights, its tokenizer (pad token set) and identity."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str
    source: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    kind: SpecKind = "folder"


def _unknown(spec: str) -> GradfreeError:
    close = difflib.get_close_matches(spec, list(MODELS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return GradfreeError(
        f"'{spec}' is not a known model name, a local folder, a .gguf file, "
        f"or a reachable hub id{hint}."
    )


def resolve_model(spec: str) -> ResolvedModel:
    """Decide what ``spec`` names, without loading it (hub ids are only checked by loading)."""
    if spec in MODELS:
        folder = known_model_dir(spec)
        if read_record(folder) is None:
            raise GradfreeError(
                f"Model '{spec}' is not fetched yet; run `gradfree models fetch {spec}`."
            )
        return ResolvedModel(spec, "known", spec, str(folder))
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GradfreeError(f"The folder {p} has no config.json, so it is not a model folder.")
        return ResolvedModel(spec, "folder", p.resolve().name, str(p.resolve()))
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise GradfreeError(f"The GGUF file {p} does not exist.")
        p = p.resolve()
        return ResolvedModel(spec, "gguf", p.stem, str(p), gguf_file=p.name)
    if p.exists() or not _HUB_ID.fullmatch(spec):
        raise _unknown(spec)
    return ResolvedModel(spec, "hub", spec, spec)


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype called ``dtype`` (one of DTYPES)."""
    import torch

    return getattr(torch, check_dtype(dtype))  # type: ignore[no-any-return]


def _check_device(device: str) -> Any:
    import torch

    dev = torch.device(check_device(device))
    # Only a device the user asked for is probed, so CPU runs never initialise CUDA.
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GradfreeError(f"Device '{device}' was requested but CUDA is not available here.")
    return dev


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of what a tokenizer maps text to: the backend's JSON minus runtime padding and
    truncation settings (fast tokenizers), else the sorted vocabulary. Equal fingerprints mean
    two models share a tokenizer, whichever folder or GGUF each was loaded from."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        obj = json.loads(backend.to_str())
        obj.pop("padding", None)
        obj.pop("truncation", None)
    else:
        obj = {"vocab": sorted(tok.get_vocab().items())}
    obj["special_tokens"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    return sha256_text(json.dumps(obj, sort_keys=True, ensure_ascii=False))


def config_fingerprint(config: Any) -> str:
    """sha256 of the model config as sorted JSON, without load-time keys (dtype, versions)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return sha256_text(json.dumps(d, sort_keys=True, default=str))


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered in ``<cache>/hashes.json`` under path + mtime + size so a
    multi-gigabyte file is hashed once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}"
    store = paths.cache_dir() / "hashes.json"
    try:
        known: dict[str, str] = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        write_json_atomic(store, known)
    return digest


def _weight_hashes(resolved: ResolvedModel, config: Any) -> dict[str, str]:
    if resolved.kind == "hub":
        return {"hub_id": resolved.source, "revision": str(getattr(config, "_commit_hash", None))}
    if resolved.kind == "gguf":
        return {str(resolved.gguf_file): cached_sha256(Path(resolved.source))}
    folder = Path(resolved.source)
    record = read_record(folder)
    if record is not None:
        return {k: v["sha256"] for k, v in record["files"].items()}
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return {p.name: cached_sha256(p) for p in weights}


def _is_fp8(resolved: ResolvedModel) -> bool:
    return resolved.kind in ("known", "folder") and folder_fp8_format(resolved.source) is not None


def fingerprint(resolved: ResolvedModel, model: Any, tok: Any, dtype: str) -> dict[str, Any]:
    """The identity of a loaded model, as recorded in every output that used it."""
    fp: dict[str, Any] = {
        "name": resolved.name,
        "kind": resolved.kind,
        "source": resolved.source,
        "model_type": str(model.config.model_type),
        "architecture": type(model).__name__,
        "dtype": dtype,
        "config_sha256": config_fingerprint(model.config),
        "weights_sha256": _weight_hashes(resolved, model.config),
        "tokenizer_sha256": tokenizer_fingerprint(tok),
    }
    if _is_fp8(resolved):  # only then, so that dense fingerprints (and caches) are unchanged
        fp["weight_format"] = "fp8"
    tj = Path(resolved.source) / "tokenizer.json"
    if resolved.kind in ("known", "folder") and tj.is_file():
        fp["tokenizer_json_sha256"] = sha256_file(tj)
    return fp


def _hub_offline() -> bool:
    """True when the hub is switched off or cannot be reached at all.

    HF_HUB_OFFLINE is read at call time (huggingface_hub reads it once at import). Otherwise one
    short TCP probe decides, so that an unreachable hub fails at once instead of after ~50 s of
    retries per file."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load the model named by ``spec`` on ``device`` in ``dtype``, in eval mode, frozen."""
    torch_dtype = resolve_dtype(dtype)
    dev = _check_device(device)
    resolved = resolve_model(spec)
    if resolved.kind == "gguf":
        path = Path(resolved.source)
        model, tok = load_gguf(path, dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = resolved.kind != "hub"
        # FP8 folders are dequantised here, not by transformers (whose FP8 path wants a GPU).
        fp8 = folder_fp8_format(resolved.source) if local else None
        try:
            with quiet_transformers(progress=False):
                tok = AutoTokenizer.from_pretrained(
                    resolved.source, local_files_only=local or _hub_offline()
                )
                if fp8 is not None:
                    model = load_fp8_model(resolved.source, torch_dtype, fp8)
                else:
                    model = AutoModelForCausalLM.from_pretrained(
                        resolved.source,
                        dtype=torch_dtype,
                        local_files_only=local or _hub_offline(),
                    )
        except (OSError, ValueError) as e:
            if resolved.kind == "hub":
                raise _unknown(spec) from e
            raise GradfreeError(
                f"Could not load the model in {resolved.source}: {str(e).splitlines()[0]}"
            ) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; it is masked out anyway
    model.eval()
    model.requires_grad_(False)
    if dev.type != "cpu":
        model.to(dev)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        name=resolved.name,
        source=resolved.source,
        fingerprint=fingerprint(resolved, model, tok, dtype),
        kind=resolved.kind,
    )


def weights_digest(fp: dict[str, Any]) -> str:
    """One short hash summarising a fingerprint's weight hashes (for folder names and logs)."""
    blob = json.dumps(fp.get("weights_sha256", {}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = [
    "DTYPES",
    "LoadedModel",
    "ResolvedModel",
    "cached_sha256",
    "config_fingerprint",
    "fingerprint",
    "known_model_dir",
    "load_model",
    "load_pair",
    "resolve_dtype",
    "resolve_model",
    "tokenizer_fingerprint",
]


def load_pair(
    teacher: str, student: str, device: str, dtype: str
) -> tuple[Any, Any, dict[str, Any]]:
    """Both models, refused unless they share one vocabulary; and their input record."""
    t = load_model(teacher, device=device, dtype=dtype)
    s = load_model(student, device=device, dtype=dtype)
    if t.tokenizer.get_vocab() != s.tokenizer.get_vocab():
        raise GradfreeError("The teacher and the student must share one tokenizer vocabulary.")
    inputs: dict[str, Any] = {
        "teacher": {"spec": teacher, "fingerprint": t.fingerprint},
        "student": {"spec": student, "fingerprint": s.fingerprint},
        "device": device,
        "dtype": dtype,
    }
    return t, s, inputs
