"""Layer-by-layer ridge distillation: each block fitted from inputs recaptured through the blocks
already fitted (``merge: ridge`` with ``ridge_recapture``).

One-pass ridge (:func:`.distill.ridge_readers_`) fits every block from the native student's
inputs, but once the earlier blocks change, the later blocks no longer see those inputs; on
Qwen2.5-Coder 1.5B → 0.5B the one-pass fit was destroyed by that mismatch (among others). Here
the blocks are fitted in order, in chunks of ``recapture_every`` blocks; for each chunk

1. a paired capture of (teacher, current model) on the calibration documents records the
   chunk's ``attn_in`` and its teacher×student cross-moments through the layer map, and the
   chunk's q/k/v rows are fitted (:func:`.distill.ridge_block_`);
2. a second pass records the chunk's ``mlp_in`` (which now reflects the fitted attention) and
   gate/up are fitted.

With ``recapture_every = 1`` every reader is fitted to exactly the inputs it will see on the
calibration tokens: 2·L passes for L blocks. A chunk of k blocks costs two passes, so k > 1
divides the passes by k, at the price that block j+1 of a chunk is fitted from inputs through the
unfitted block j. With ``ridge_head`` one last pass recaptures ``final.normed`` for the head.
Each pass runs the teacher too (its cross-moments pair tokens, so they cannot be cached as
moments); the passes are listed in ``Solution.recaptures`` and, with ``progress``, on stderr.
Recaptures go to a temporary folder that is deleted.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import Capture, Subject, run_capture
from gradfree.compress.attention import AttentionPlan
from gradfree.compress.bases import BasisSet
from gradfree.compress.distill import block_moments, ridge_block_, ridge_head_
from gradfree.compress.recipe import CompressRecipe


def require_calibration(documents: Sequence[Any] | None, tokenizer: Any) -> None:
    """Fail in one sentence when ``ridge_recapture`` lacks what it recaptures with."""
    if documents is None or tokenizer is None:
        raise GradfreeError(
            "ridge_recapture needs the calibration documents and their tokenizer: pass "
            "documents= and tokenizer= to interpolate() or solve()."
        )


def chunks(n_layers: int, every: int) -> list[list[int]]:
    """Student blocks in order, ``every`` at a time."""
    return [list(range(i, min(i + every, n_layers))) for i in range(0, n_layers, every)]


def recapture(
    teacher: nn.Module,
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[Any],
    folder: Path,
    recipe: CompressRecipe,
    layer_map: Sequence[int],
    site: str,
    blocks: Sequence[int] | None,
    *,
    progress: bool = False,
) -> Capture:
    """A paired capture of (teacher, model) with only ``site`` of ``blocks`` (of the model; the
    teacher's blocks through ``layer_map``) and its cross-moments; windows as the recipe's."""
    cfg = {
        "sites": [site],
        "cross_sites": [site],
        "layers": None if blocks is None else list(blocks),
        "layer_map": list(layer_map),
        "max_length": recipe.max_length,
        "batch_size": recipe.batch_size,
        "seed": recipe.seed,
    }
    subjects = {"teacher": Subject(teacher, tokenizer), "student": Subject(model, tokenizer)}
    return run_capture(subjects, documents, folder, cfg, progress=progress, resume=False)


@torch.no_grad()
def ridge_recaptured_(
    model: nn.Module,
    student: nn.Module,
    projected: nn.Module,
    teacher: nn.Module,
    bases: BasisSet,
    layer_map: Sequence[int],
    attn: Sequence[AttentionPlan],
    c: float,
    recipe: CompressRecipe,
    documents: Sequence[Any] | None,
    tokenizer: Any,
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Fit ``model``'s readers block by block from recaptured inputs (see the module docstring)
    and, with ``recipe.ridge_head``, its head; return one row per recapture pass."""
    require_calibration(documents, tokenizer)
    assert documents is not None  # for mypy: checked just above
    n = get_adapter(model).num_layers
    steps: list[tuple[str, list[int] | None]] = [
        (site, blocks)
        for blocks in chunks(n, recipe.recapture_every)
        for site in ("attn_in", "mlp_in")
    ]
    if recipe.ridge_head:
        steps.append(("final.normed", None))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gradfree-recapture-") as tmp:
        for i, (site, blocks) in enumerate(steps):
            t0 = time.perf_counter()
            folder = Path(tmp) / f"pass-{i:03d}"
            cap = recapture(
                teacher,
                model,
                tokenizer,
                documents,
                folder,
                recipe,
                layer_map,
                site,
                blocks,
                progress=progress,
            )
            if blocks is None:  # the head, from the final states of the fully fitted model
                ridge_head_(model, student, teacher, cap, recipe.ridge_lambda)
            for j in blocks or []:
                mom = block_moments(cap, site, j, layer_map[j], bases.read(j), c)
                ridge_block_(
                    model,
                    student,
                    projected,
                    j,
                    attn[j],
                    recipe.ridge_lambda,
                    attn_moments=mom if site == "attn_in" else None,
                    mlp_moments=mom if site == "mlp_in" else None,
                )
            row = {
                "pass": i + 1,
                "site": site,
                "blocks": blocks if blocks is not None else [],
                "tokens": cap.tokens("student"),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            rows.append(row)
            shutil.rmtree(folder, ignore_errors=True)  # the moments are read; free the disk
            if progress:
                where = f"blocks {blocks[0]}-{blocks[-1]}" if blocks else "the head"
                print(
                    f"recapture {i + 1}/{len(steps)}: {site} of {where} "
                    f"({row['tokens']} tokens, teacher + student, {row['seconds']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return rows
