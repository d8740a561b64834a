"""``gradfree eval`` from names: load the corpus and the models, evaluate, record, write.

:func:`evaluate_corpus` is what the command calls: it checks the cheap things first (output
folder, window settings, documents), loads the model (and teacher), runs
:func:`~gradfree.evaluation.run.evaluate`, records the provenance (each model's spec, name,
source and fingerprint, the corpus manifest, the library versions) in the result and writes it
with :func:`~gradfree.evaluation.run.write_eval`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradfree.base.progress import ProgressFn


def evaluate_corpus(
    model: str,
    corpus: str,
    out: str | Path,
    *,
    teacher: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    questions: bool = True,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    layer_map: str | list[int] | None = "proportional",
    compare_layers: Sequence[int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (a name or folder) on ``corpus``, against ``teacher`` when given, and
    write ``out``/eval.json and eval.md. Returns the result dict."""
    from gradfree.base.errors import GradfreeError
    from gradfree.base.io import check_new_output
    from gradfree.base.provenance import versions
    from gradfree.evaluation.run import evaluate, write_eval
    from gradfree.models import load_model
    from gradfree.texts.corpora import corpus_manifest, load_corpus, load_questions, system_prompt
    from gradfree.texts.windows import check_window_settings

    check_new_output(out, overwrite)  # cheap checks first, before loading anything big
    check_window_settings(max_length, stride)
    docs = load_corpus(corpus, split=split, limit=limit)
    if not docs:
        where = f" in split '{split}'" if split else ""
        raise GradfreeError(f"The corpus {corpus} has no documents{where}.")
    qs, prompt = (load_questions(), system_prompt()) if questions else (None, None)
    loaded = load_model(model, device=device, dtype=dtype)
    tloaded = load_model(teacher, device=device, dtype=dtype) if teacher else None
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        docs,
        teacher=tloaded.model if tloaded else None,
        teacher_tokenizer=tloaded.tokenizer if tloaded else None,
        questions=qs,
        system_prompt=prompt,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        device=device,
        layer_map=layer_map,
        compare_layers=compare_layers,
        progress=progress,
    )
    for key, spec, info in (("model", model, loaded), ("teacher_model", teacher, tloaded)):
        if info is not None:
            result[key] = {
                "spec": spec,
                "name": info.name,
                "source": info.source,
                "fingerprint": info.fingerprint,
            }
    result["corpus"] = corpus_manifest(docs, corpus)
    result["versions"] = versions()
    write_eval(result, out, overwrite=overwrite)
    return result
