"""Where gradfree keeps fetched models and texts (overridable with GRADFREE_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the cache: $GRADFREE_CACHE, else ~/.cache/gradfree."""
    env = os.environ.get("GRADFREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradfree"


def models_dir() -> Path:
    return cache_dir() / "models"


def texts_dir() -> Path:
    return cache_dir() / "texts"
