"""The compression pipeline: fold, calibrate, solve, write.

    fold_pair_(teacher, student)                         # function-preserving, in place
    cal = Calibration(teacher, student, docs)            # documents + cached paired capture
    cap = cal.capture(recipe, folder)                    # layer map + paired capture
    sol = cal.solve(recipe)                              # bases, plans, projected, interpolated
    save_checkpoint(sol.model, tokenizer, out); write_report(sol, out)

:func:`compress` runs them all on loaded models; :func:`run_compress` is ``gradfree compress`` as
a library call (models and corpus by name, their fingerprints and manifest recorded in the
report). The steps that solve from a capture live in :mod:`gradfree.compress.solution`, the
calibration (documents, captures, layer maps) in :mod:`gradfree.compress.calibration`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.provenance import Stopwatch
from gradfree.compress.calibration import (
    Calibration,
    as_subject,
)
from gradfree.compress.recipe import CompressRecipe, make_recipe
from gradfree.compress.solution import (
    Solution,
)
from gradfree.surgery import fuse_norms_

__all__ = ["compress", "fold_pair_", "run_compress"]


def fold_pair_(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Fold every residual RMSNorm of both models into its readers (untying tied heads)."""
    changes = []
    for name, m in (("teacher", teacher), ("student", student)):
        tied = get_adapter(m).tied_in_config
        fuse_norms_(m)
        if tied:
            changes.append(f"{name}: tie_word_embeddings true -> false (head merged separately)")
    return changes


def compress(
    teacher: Any,
    student: Any,
    documents: Sequence[Any],
    out: str | Path,
    recipe: CompressRecipe | dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    corpus: dict[str, Any] | None = None,
    keep_capture: bool = False,
    inputs: dict[str, Any] | None = None,
    save_format: str = "safetensors",
) -> tuple[Solution, Path]:
    """Fold, capture, solve and write ``out`` (checkpoint + tokenizer + recipe + report).

    ``teacher``/``student`` are loaded models (``.model``, ``.tokenizer``); their norms are folded
    in place (function-preserving). ``corpus``: the documents' manifest, recorded in the capture
    and, with ``inputs``, in the report. The capture lives in ``out/capture`` (kept with
    ``keep_capture``). ``save_format`` "fp8" writes the checkpoint in Qwen's block-FP8 format
    (:func:`~gradfree.models.fetch.save_checkpoint`). Returns the solution and the output folder.
    """
    from gradfree.base.io import atomic_dir, check_new_output
    from gradfree.compress.report import write_report
    from gradfree.models.fetch import save_checkpoint
    from gradfree.models.fp8 import check_weight_format

    recipe = make_recipe(recipe)
    check_weight_format(save_format)
    check_new_output(out, overwrite)
    tm, sm = as_subject(teacher).model, as_subject(student).model
    clock = Stopwatch()
    cal = Calibration(teacher, student, documents, manifest=corpus, progress=progress, clock=clock)
    if corpus is not None:
        inputs = {**(inputs or {}), "corpus": corpus}
    with atomic_dir(out, overwrite) as tmp:
        with clock.stage("fold norms"):
            changes = fold_pair_(tm, sm)
        cal.capture(recipe, tmp / "capture")
        sol = cal.solve(recipe, config_changes=changes)
        with clock.stage("write checkpoint"):
            save_checkpoint(sol.model, cal.tokenizer, tmp, weight_format=save_format)
        write_report(sol, tmp, clock=clock, inputs=inputs)
        if not keep_capture:
            shutil.rmtree(tmp / "capture", ignore_errors=True)
    return sol, Path(out)


def run_compress(
    teacher: str,
    student: str,
    corpus: str,
    out: str | Path,
    recipe: CompressRecipe | dict[str, Any] | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
    keep_capture: bool = False,
    save_format: str = "safetensors",
) -> tuple[Solution, Path]:
    """``gradfree compress``: load the corpus and both models by name, then :func:`compress`.

    The report records what went in: both models' specs and fingerprints, device, dtype, and the
    corpus manifest (every document's id and hash). The output folder is checked first, before
    anything is loaded.
    """
    from gradfree.base.io import check_new_output
    from gradfree.models import load_pair
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    check_new_output(out, overwrite)
    docs = load_corpus(corpus, split=split, limit=limit)
    manifest = corpus_manifest(docs, corpus if split is None else f"{corpus}:{split}")
    t, s, inputs = load_pair(teacher, student, device, dtype)
    return compress(
        t,
        s,
        docs,
        out,
        recipe,
        overwrite=overwrite,
        progress=progress,
        corpus=manifest,
        keep_capture=keep_capture,
        inputs=inputs,
        save_format=save_format,
    )
