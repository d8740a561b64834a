"""Teacher → student compression and activation-informed merging (seed 000), without gradients.

A teacher is projected into the student's exact shape through a residual basis V (d_T×d_S)
aligned to the student's coordinates, with KV-group-aware head selection/matching, RoPE-aware
head-dim reduction and neuron selection/matching, then merged with the student
(W = α W'_T + (1 − α) W_S, α per block and KV group) or ridge-distilled from captured statistics.

    from gradfree.compress import compress, make_recipe
    recipe = make_recipe(basis="joint", merge="optimal")
    sol, out = compress(teacher, student, docs, "out/c", recipe)

Modules: ``recipe`` (the strict recipe), ``bases`` (residual bases + diagnostics), ``attention``
(head plans), ``kv`` (seed 000's KV-basis reuse and dense value ablation), ``mlp`` (neuron
plans), ``project`` (W' = V_outᵀ W V_in), ``interpolate`` (α modes and W = α W'_T + (1 − α) W_S),
``distill`` (closed-form ridge of the readers), ``recapture`` (the ridge fitted block by block
from recaptured inputs), ``calibration`` (documents, layer map and paired capture, cached),
``solution`` (project, interpolate, solve from one capture), ``pipeline`` (the steps),
``attention_kl`` (attention KL per block and KV group against the teacher), ``head`` (the
distilled LM head), ``report`` (the output folder).
"""

from gradfree.compress.calibration import Calibration, capture_pair, resolve_layer_map
from gradfree.compress.pipeline import compress, fold_pair_, run_compress
from gradfree.compress.recipe import CompressRecipe, load_recipe, make_recipe
from gradfree.compress.report import write_report
from gradfree.compress.solution import Solution, interpolate, measure_attention_kl, project, solve
from gradfree.models.fetch import save_checkpoint

__all__ = [
    "Calibration",
    "CompressRecipe",
    "Solution",
    "capture_pair",
    "compress",
    "fold_pair_",
    "interpolate",
    "load_recipe",
    "make_recipe",
    "measure_attention_kl",
    "project",
    "resolve_layer_map",
    "run_compress",
    "save_checkpoint",
    "solve",
    "write_report",
]
