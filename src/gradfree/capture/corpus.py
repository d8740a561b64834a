"""``gradfree capture`` as a library call: models and corpus by name, their provenance recorded.

:func:`capture_corpus` loads the corpus and the model (or the teacher/student pair), then runs
:func:`~gradfree.capture.runner.run_capture`; the capture's manifest records the corpus manifest
(every document's id and hash) beside the models' names, sources and fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradfree.capture.config import CaptureConfig
from gradfree.capture.runner import run_capture
from gradfree.capture.store import Capture


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
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    check_new_output(out, overwrite)
    docs = load_corpus(corpus, split=split, limit=limit)
    manifest = corpus_manifest(docs, corpus if split is None else f"{corpus}:{split}")
    subjects: Any
    if isinstance(models, str):
        subjects = load_model(models, device=device, dtype=dtype)
    else:
        subjects = {
            role: load_model(spec, device=device, dtype=dtype) for role, spec in models.items()
        }
    return run_capture(
        subjects, docs, out, config, corpus=manifest, overwrite=overwrite, progress=progress
    )
