"""Shared pytest fixtures: fixed seeds.

Tests that write to a cache give themselves a private GRADFREE_CACHE (monkeypatch); the slow
tests read the user's cache to find the fetched real models and skip when they are missing.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)
