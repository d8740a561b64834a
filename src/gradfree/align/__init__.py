"""Seed 001's gradient-free alignment of a student to a teacher, as a toolkit of toggles.

* :mod:`.rotations` — one orthogonal basis (or per-stage / per-layer bases) rotating the
  student's residual stream to the teacher's principal coordinates: PCA to a shared k, optional
  whitening with ridge, Procrustes; Householder refinement per stage.
* :mod:`.permutations` — Hungarian matching of heads (attention patterns) and neurons (activation
  correlation), within KV groups.
* :mod:`.head` — the LM-head ridge fit to the teacher's logits, chunked over the vocabulary.
* :mod:`.fit` — capture once, solve everything into an :class:`AlignmentPlan`.
* :mod:`.apply` — fold a plan into a student, toggle by toggle.
* :mod:`.evaluate`, :mod:`.report` — variants against a cached teacher; the results page.
* :mod:`.ledger` — run manifest, per-layer rotation ledger and its sanity check.
* :mod:`.run` — :func:`run_align` and :func:`run_ablation`, the two entry points.

Importing this package imports torch (it is model plumbing); the CLI imports it lazily.
"""

from gradfree.align.apply import apply_plan_, function_preserving
from gradfree.align.config import VARIANTS, AblateConfig, AlignConfig, load_config
from gradfree.align.fit import AlignmentPlan, fit_alignment
from gradfree.align.head import fit_ridge_head
from gradfree.align.ledger import check_ledger, plot_check, write_ledger
from gradfree.align.run import run_ablation, run_align

__all__ = [
    "VARIANTS",
    "AblateConfig",
    "AlignConfig",
    "AlignmentPlan",
    "apply_plan_",
    "check_ledger",
    "fit_alignment",
    "fit_ridge_head",
    "function_preserving",
    "load_config",
    "plot_check",
    "run_ablation",
    "run_align",
    "write_ledger",
]
