"""The compression recipe: every choice of ``gradfree compress`` as one strict pydantic model.

A recipe is loadable from YAML (:func:`load_recipe`) or built from a dict/keywords
(:func:`make_recipe`); unknown or inconsistent fields fail with one sentence. The resolved recipe
is written to ``recipe.json`` in every output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from gradfree.base.configfile import given, make_strict, read_yaml_mapping

Basis = Literal["svd", "two_tier", "joint", "identity"]
Merge = Literal["none", "uniform", "alignment", "optimal", "ridge", "measured"]

# The fields that decide the projection (bases, head and neuron plans); the others only the merge.
PROJECTION_FIELDS = (
    "layer_map",
    "basis",
    "trunk_fraction",
    "align",
    "per_layer",
    "basis_stats",
    "head_select",
    "head_match",
    "value_align",
    "mlp_match",
    "mlp_reduce",
    "depth",
    "kv",
    "head_rotation",
)


class CompressRecipe(BaseModel):
    """How a teacher is projected into the student's shape and merged with it.

    * ``layer_map``: "proportional", "cka" (monotone DP maximising summed linear CKA of the
      block inputs) or explicit teacher layer indices, one per student layer.
    * ``depth``: how a student block uses the teacher blocks its layer map skips: "pick" (only
      block m(j)) or "fold" (its MLP draws neurons from every teacher block up to m(j+1); see
      :mod:`.mlp`; attention is always picked).
    * ``basis``: residual basis V (d_T×d_S). ``svd`` = top principal directions (aligned to the
      student by one Procrustes rotation when ``align``), ``two_tier`` = trunk + PCA of the
      residual, each tier aligned by Procrustes, ``joint`` = semi-orthogonal Procrustes from the
      teacher×student cross-moment, ``identity`` = the first d_S teacher coordinates (tests).
    * ``per_layer``: one basis per student block (no transition matrices: a block reads and writes
      in its own basis) instead of one global basis.
    * ``basis_stats``: "all" tokens (the first token's massive activations dominate the second
      moment, so those dimensions are kept) or "body" (first token excluded).
    * ``merge``: "none" (the projected teacher alone, α = 1), "uniform" (``alpha``), "alignment"
      (α = ``alpha`` · alignment cosine, 0 below ``alignment_threshold``), "optimal" (closed-form α
      per block and KV group from the captured statistics), "ridge" (closed-form layer-wise
      distillation of every reader linear toward the teacher, ridge ``ridge_lambda`` toward the
      student's weights). "measured" = "uniform" with α chosen from ``alpha_grid`` (0, the
      student, always included) by the measured KL(teacher ‖ model) on validation texts: it
      needs a validation set, which ``gradfree experiment`` provides.
    * ``merge_layers``: when given, only these student blocks are merged; every other block, the
      embedding and the LM head keep the student's weights (α = 0): the per-layer α sweep.
    * ``mlp_reduce``: the teacher neurons beyond the student's width are dropped ("select") or
      merged into the kept neuron that best predicts each of them ("cluster", from the token
      dumps; see :func:`gradfree.compress.mlp.absorb_dropped`).
    * ``kv``: "rotate" (the teacher's keys/values projected into the student's head shape) or
      "reuse" (seed 000's KV-basis reuse: the student's k/v projections are kept, the teacher's
      queries are turned into the student's key coordinates by a per-RoPE-pair SO(2) rotation and
      o reads the student's values through a least-squares map; in a merge only q and o mix).
    * ``head_rotation``: value compression per KV group ("block_diagonal", one P_g per group) or
      "dense" (seed 000's ablation: one PCA over all value dims, groups mixed).
    * ``ridge_recapture``: with ``merge: ridge``, fit the blocks in order, each from inputs
      recaptured through the blocks already fitted (:mod:`.recapture`; needs the calibration
      documents in ``merge()``), ``recapture_every`` blocks per recapture (1 is exact, more
      divides the 2·L teacher + student passes at the price of exactness within a chunk).
    * ``ridge_head``: replace the merged LM head by the ridge regression of the student's final
      normed states onto the teacher's exact logits (λ = ``ridge_lambda``, toward the student);
      with ``ridge_recapture`` the states are recaptured from the fitted model.
    * ``attention_kl_windows``: after solving, measure the attention KL per block and KV group of
      the result against the teacher on the first N capture windows (0: off); see
      :mod:`gradfree.compress.attention_kl`.
    """

    model_config = ConfigDict(extra="forbid")

    layer_map: str | list[int] = "proportional"
    depth: Literal["pick", "fold"] = "pick"
    basis: Basis = "joint"
    trunk_fraction: float = 0.5
    align: bool = True
    per_layer: bool = False
    basis_stats: Literal["all", "body"] = "all"
    head_select: Literal["importance", "first"] = "importance"
    head_match: Literal["hungarian", "none"] = "hungarian"
    value_align: bool = True
    mlp_match: Literal["hungarian", "none"] = "hungarian"
    mlp_reduce: Literal["select", "cluster"] = "select"
    kv: Literal["rotate", "reuse"] = "rotate"
    head_rotation: Literal["block_diagonal", "dense"] = "block_diagonal"
    merge: Merge = "optimal"
    alpha: float = 0.5
    alignment_threshold: float = 0.3
    alpha_embed: float | None = None
    alpha_grid: list[float] = [0.05, 0.1, 0.2, 0.3]
    merge_layers: list[int] | None = None
    ridge_lambda: float = 1.0
    ridge_head: bool = False
    attention_kl_windows: int = 2
    ridge_recapture: bool = False
    recapture_every: int = 1
    # capture
    max_length: int = 256
    batch_size: int = 2
    dump_rate: float = 0.25
    dump_max: int = 4000
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> CompressRecipe:
        if not 0.0 <= self.trunk_fraction <= 1.0:
            raise ValueError("trunk_fraction must be between 0 and 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be between 0 and 1")
        if self.alpha_embed is not None and not 0.0 <= self.alpha_embed <= 1.0:
            raise ValueError("alpha_embed must be between 0 and 1")
        if not -1.0 <= self.alignment_threshold <= 1.0:
            raise ValueError("alignment_threshold must be between -1 and 1")
        if self.ridge_lambda <= 0:
            raise ValueError("ridge_lambda must be positive")
        if self.max_length < 2 or self.batch_size < 1 or self.dump_max < 1:
            raise ValueError("max_length must be at least 2 and batch_size, dump_max at least 1")
        if not 0.0 < self.dump_rate <= 1.0:
            raise ValueError("dump_rate must be in (0, 1]")
        if isinstance(self.layer_map, str) and self.layer_map not in ("proportional", "cka"):
            raise ValueError("layer_map is 'proportional', 'cka' or a list of teacher layers")
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError("alpha_grid values must be between 0 and 1")
        if self.merge_layers is not None and any(j < 0 for j in self.merge_layers):
            raise ValueError("merge_layers are student block indices (0 or more)")
        if self.attention_kl_windows < 0:
            raise ValueError("attention_kl_windows must be 0 (off) or a number of windows")
        if self.ridge_head and self.merge == "none":
            raise ValueError("ridge_head needs a merge with the student (merge is 'none')")
        if self.kv == "reuse" and self.head_rotation == "dense":
            raise ValueError(
                "head_rotation 'dense' compresses the teacher's values, which kv 'reuse' replaces "
                "by the student's"
            )
        if self.recapture_every < 1:
            raise ValueError("recapture_every must be at least 1")
        if self.ridge_recapture and self.merge != "ridge":
            raise ValueError("ridge_recapture needs merge 'ridge'")
        if self.recapture_every != 1 and not self.ridge_recapture:
            raise ValueError("recapture_every applies only with ridge_recapture")
        if self.basis == "svd" and self.per_layer and self.align is False and self.merge != "none":
            raise ValueError("merging with unaligned per-layer svd bases mixes unrelated axes")
        return self


def make_recipe(value: CompressRecipe | dict[str, Any] | None = None, **kw: Any) -> CompressRecipe:
    """A validated recipe from a recipe, a dict and/or keywords (keywords win)."""
    return make_strict(CompressRecipe, value, given(kw), noun="recipe")


def load_recipe(path: str | Path, **overrides: Any) -> CompressRecipe:
    """Read a YAML recipe (a mapping of recipe options); ``overrides`` win over the file."""
    data = read_yaml_mapping(path, "recipe file")
    return make_recipe(data, **overrides)
