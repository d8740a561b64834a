"""``gradfree eval`` as a library call: perplexity, agreement with a teacher, short answers.

:func:`evaluate` runs the paired sliding-window pass (:mod:`gradfree.evaluation.perplexity`) and,
with questions, the greedy answers (:mod:`gradfree.evaluation.questions`), and returns one result
dict; :func:`write_eval` writes it as ``eval.json`` and ``eval.md``
(:mod:`gradfree.evaluation.report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError
from gradfree.evaluation.perplexity import check_same_tokenizer, paired_pass
from gradfree.evaluation.questions import answer_questions
from gradfree.texts.windows import check_window_settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gradfree.base.progress import ProgressFn

SEED = 0


def evaluate(
    model: PreTrainedModel,
    tokenizer: Any,
    docs: Sequence[Any],
    *,
    teacher: PreTrainedModel | None = None,
    teacher_tokenizer: Any = None,
    questions: Sequence[Any] | None = None,
    system_prompt: str | None = None,
    max_length: int = 512,
    stride: int = 256,
    batch_size: int = 4,
    device: str = "cpu",
    layer_map: str | list[int] | None = None,
    compare_layers: Sequence[int] | None = None,
    max_new_tokens: int = 24,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``docs`` (objects with ``.text``, or strings); with a
    ``teacher``, KL/agreement and per-layer similarity; with ``questions``, greedy answers.

    ``teacher_tokenizer``, when given, must have the same vocabulary as ``tokenizer``.
    ``compare_layers`` limits the per-layer similarity to some model blocks (default: all; the
    final normed states are always compared): each compared pair holds d_t² + d_t·d_s + d_s²
    float64 sums, 370 MB for a 5120-wide teacher and a 2560-wide student.
    Models are used where they are (placing them is the caller's choice); inputs go to ``device``.
    """
    import torch

    torch.manual_seed(SEED)
    check_window_settings(max_length, stride)
    if batch_size < 1:
        raise GradfreeError("--batch-size must be at least 1.")
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    ppl, against_teacher = paired_pass(
        model,
        tokenizer,
        docs,
        teacher=teacher,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        device=device,
        layer_map=layer_map,
        compare_layers=compare_layers,
        progress=progress,
    )
    result: dict[str, Any] = {
        "settings": {
            "max_length": max_length,
            "stride": stride,
            "batch_size": batch_size,
            "device": device,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "seed": SEED,
        },
        "perplexity": ppl,
        "teacher": against_teacher,
        "qa": None,
    }
    if questions:
        if system_prompt is None:
            from gradfree.texts.corpora import system_prompt as default_prompt

            system_prompt = default_prompt()
        result["qa"] = answer_questions(
            model, tokenizer, questions, system_prompt, max_new_tokens, device, progress
        )
    return result


def write_eval(result: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write ``eval.json`` and ``eval.md`` into the folder ``out``, atomically."""
    from gradfree.base.io import atomic_dir, write_json_atomic, write_text_atomic
    from gradfree.evaluation.report import render_markdown

    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "eval.json", result)
        write_text_atomic(tmp / "eval.md", render_markdown(result))
    return out
