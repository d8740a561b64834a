"""Shared pytest fixtures: fixed seeds; ``one_thread`` for modules of tiny-model tests.

Tests that write to a cache give themselves a private GRADFREE_CACHE (monkeypatch); the slow
tests read the user's cache to find the fetched real models and skip when they are missing.
"""

from __future__ import annotations

from collections.abc import Iterator

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
