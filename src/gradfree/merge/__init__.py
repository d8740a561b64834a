"""Same-shape model merging (``gradfree merge``): YAML recipes, registered methods, streaming IO.

Methods (see :func:`list_methods`): ``linear``, ``uniform`` and ``greedy_soup`` (model soups),
``passthrough``, ``slerp``, ``nuslerp``, ``multislerp`` and ``karcher`` (on the sphere),
``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
``breadcrumbs_ties``, ``della``, ``della_linear`` and ``model_stock`` (task vectors), ``fisher``
(diagonal-Fisher-weighted) and ``regmean`` (closed form from input Grams).

    from gradfree.merge import merge
    merge({"method": "linear", "models": ["a", "b"]}, "runs/soup")

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from gradfree.merge import (  # noqa: F401 (registers the methods)
    fisher,
    greedy,
    linear,
    regmean,
    sparse,
    spherical,
    stock,
)
from gradfree.merge.recipe import (
    CalibrationSpec,
    EvalSpec,
    MergeRecipe,
    ModelEntry,
    load_recipe,
    make_recipe,
    recipe_yaml,
)
from gradfree.merge.registry import METHODS, MergeMethod, get_method, list_methods, register
from gradfree.merge.run import MergeResult, merge

__all__ = [
    "METHODS",
    "CalibrationSpec",
    "EvalSpec",
    "MergeMethod",
    "MergeRecipe",
    "MergeResult",
    "ModelEntry",
    "get_method",
    "list_methods",
    "load_recipe",
    "make_recipe",
    "merge",
    "recipe_yaml",
    "register",
]
