"""``gradfree capture`` as a library call: models and corpus by name, their provenance recorded.

:func:`capture_corpus` loads the corpus and the model (or the teacher/student pair), then runs
:func:`~gradfree.capture.runner.run_capture`; the capture's manifest records the corpus manifest
(every document's id and hash) beside the models' names, sources and fingerprints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradfree.capture.config import CaptureConfig
from gradfree.capture.runner import run_capture
from gradfree.capture.store import Capture


def corpus_inputs(
    models: str | Mapping[str, str],
    corpus: str,
    split: str | None,
    limit: int | None,
    load: Callable[[str], Any],
) -> tuple[list[Any], dict[str, Any], Any]:
    """(documents, their manifest, the subjects) of a capture by names: one model or a
    ``{"teacher": ..., "student": ...}`` pair, each loaded with ``load`` (whole, lazy, or on a
    rank's device)."""
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    docs = load_corpus(corpus, split=split, limit=limit)
    manifest = corpus_manifest(docs, corpus if split is None else f"{corpus}:{split}")
    if isinstance(models, str):
        return docs, manifest, load(models)
    return docs, manifest, {role: load(spec) for role, spec in models.items()}


def capture_corpus(
    models: str | Mapping[str, str],
    corpus: str,
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Capture:
    """Capture one model (``models`` a name or folder) or a pair (``{"teacher": ...,
    "student": ...}``) over ``corpus`` into ``out``. The output folder is checked first, before
    anything is loaded; an interrupted capture resumes from ``out``.partial when run again."""
    from gradfree.base.io import check_new_output
    from gradfree.models import load_model

    check_new_output(out, overwrite)
    docs, manifest, subjects = corpus_inputs(
        models, corpus, split, limit, lambda spec: load_model(spec, device=device, dtype=dtype)
    )
    return run_capture(
        subjects, docs, out, config, corpus=manifest, overwrite=overwrite, progress=progress
    )
