"""Atomic writes, hashing and output-folder discipline shared by every command.

Policy: an output is written into a temporary sibling and renamed into place only when complete,
so a crash never leaves a half-written result; an existing output is never overwritten unless the
caller passes ``overwrite=True``; inputs are only ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradfree.base.errors import GradfreeError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_created(path: str | Path, directory: bool) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def share_folder(folder: str | Path) -> None:
    """Give a folder and the files in it the modes a plain mkdir()/open() would have: a folder
    built with :func:`atomic_dir` and written with the atomic writers is meant for every user of
    a shared cache, not only for its creator."""
    folder = Path(folder)
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~mask)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        as_created(tmp, directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise GradfreeError(f"The {what} {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GradfreeError(f"The {what} {path} is not valid JSON ({e.__class__.__name__}).") from e


def check_new_output(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output folder that already exists, unless the caller asked to overwrite it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise GradfreeError(
            f"The output folder {out} already exists; choose another path or pass --overwrite."
        )
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the block finishes without error.

    On failure the temporary folder is removed and ``out`` (if it existed) is left untouched.
    """
    out = check_new_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    as_created(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.with_name(f".{out.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
