"""Shared pytest fixtures: a private GRADFREE_CACHE per test session and fixed seeds."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)
