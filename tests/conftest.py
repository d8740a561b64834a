"""Shared pytest fixtures: fixed seeds; ``one_thread`` for modules of tiny-model tests;
``run_cli`` to run the ``gradfree`` command line in-process.

Tests that write to a cache give themselves a private GRADFREE_CACHE (monkeypatch); the slow
tests read the user's cache to find the fetched real models and skip when they are missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny matmuls on a shared 2-core machine only contend (10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CliResult(NamedTuple):
    """Exit status and captured stdout/stderr of one in-process ``gradfree`` run."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], CliResult]:
    """``run_cli(argv)``: run ``gradfree argv`` as the console script would (errors become one
    line on stderr and an exit status), with what it printed since the last call."""
    from gradfree.cli import main

    def run(argv: list[str]) -> CliResult:
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
