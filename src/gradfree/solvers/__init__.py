"""Pure solvers shared by compression (teacher → student) and alignment: tensor in, tensor out.

No model plumbing, no Hugging Face and no capture imports: every function takes matrices (often
streamed statistics such as XᵀX, XᵀY or a teacher×student cross-moment, which
:mod:`gradfree.capture` turns into covariances) and returns matrices or numbers. Numerics follow
:mod:`gradfree.base.numerics`: everything is computed in float64 and returned in float64 on the
input's device, since results feed further solves and are folded into weights in float64 before
the one final cast to the model's dtype; eigenvector signs are deterministic.

Modules: ``procrustes`` (orthogonal / semi-orthogonal / block-diagonal Procrustes), ``pca``
(principal bases), ``tiers`` (seed 000's trunk/residual basis and per-tier alignment),
``grassmann`` (transition costs, principal angles, geodesic blend of bases), ``ridge`` (ridge
toward a prior from sufficient statistics, chunked for LM heads), ``assign`` (Hungarian matching,
grouped, and Pearson correlation from a cross-covariance), ``layermap`` (linear CKA from
covariances, monotone layer maps by dynamic programming), ``merge_alpha`` (closed-form merge
weights), ``householder`` (reflections as a closed-form refinement), ``information`` (Gaussian
mutual information from canonical correlations, causal attention distributions and their KL),
``rope_pairs`` (per-frequency-pair SO(2) rotations that commute with RoPE, and their Procrustes),
``obs`` (structured Optimal Brain Surgeon: which neurons or heads to remove so that the
least-squares refit loses least).
"""

from gradfree.solvers.assign import correlation_from_covariance, grouped_hungarian, hungarian
from gradfree.solvers.grassmann import (
    geodesic_average,
    principal_angles,
    transition_cost,
    transition_costs,
)
from gradfree.solvers.householder import (
    best_reflection,
    best_reflection_from_cross,
    householder_from_vectors,
    refine_with_reflections,
    reflection_gain,
)
from gradfree.solvers.information import (
    canonical_correlations,
    causal_attention_logprobs,
    gaussian_mi_per_dim,
    gaussian_mutual_information,
    kl_rows,
    mi_from_correlations,
)
from gradfree.solvers.layermap import linear_cka_from_moments, monotone_layer_map
from gradfree.solvers.merge_alpha import (
    linear_loss_from_stats,
    optimal_alpha,
    optimal_alpha_per_row,
)
from gradfree.solvers.obs import obs_select
from gradfree.solvers.pca import pca_basis, variance_preserved
from gradfree.solvers.procrustes import (
    blockwise_procrustes,
    procrustes,
    procrustes_from_cross,
    procrustes_scale,
    semi_orthogonal_map,
)
from gradfree.solvers.ridge import (
    iter_ridge_chunks,
    resolve_lambda,
    ridge_from_stats,
    ridge_from_stats_chunked,
    ridge_path_chunked,
)
from gradfree.solvers.rope_pairs import pair_rotation, rope_pair_procrustes
from gradfree.solvers.tiers import (
    align_tiers,
    joint_semi_orthogonal,
    project_cross,
    two_tier_basis,
)

__all__ = [
    "align_tiers",
    "best_reflection",
    "best_reflection_from_cross",
    "blockwise_procrustes",
    "canonical_correlations",
    "causal_attention_logprobs",
    "correlation_from_covariance",
    "gaussian_mi_per_dim",
    "gaussian_mutual_information",
    "geodesic_average",
    "grouped_hungarian",
    "householder_from_vectors",
    "hungarian",
    "iter_ridge_chunks",
    "joint_semi_orthogonal",
    "kl_rows",
    "linear_cka_from_moments",
    "linear_loss_from_stats",
    "mi_from_correlations",
    "monotone_layer_map",
    "obs_select",
    "optimal_alpha",
    "optimal_alpha_per_row",
    "pair_rotation",
    "pca_basis",
    "principal_angles",
    "procrustes",
    "procrustes_from_cross",
    "procrustes_scale",
    "project_cross",
    "refine_with_reflections",
    "reflection_gain",
    "resolve_lambda",
    "ridge_from_stats",
    "ridge_from_stats_chunked",
    "ridge_path_chunked",
    "rope_pair_procrustes",
    "semi_orthogonal_map",
    "transition_cost",
    "transition_costs",
    "two_tier_basis",
    "variance_preserved",
]
