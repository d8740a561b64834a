"""Output discipline: atomic folders and files get ordinary permissions, failures leave nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gradfree.base.errors import GradfreeError
from gradfree.base.io import atomic_dir, write_json_atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_outputs_have_the_modes_of_plain_mkdir_and_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            write_json_atomic(tmp / "a.json", {"x": 1})
        assert _mode(tmp_path / "out") == 0o755
        assert _mode(tmp_path / "out" / "a.json") == 0o644
    finally:
        os.umask(old)


def test_a_failed_block_leaves_no_output_and_keeps_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "keep.txt").write_text("new")
        raise RuntimeError("boom")
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(GradfreeError, match="already exists"), atomic_dir(out):
        pass
