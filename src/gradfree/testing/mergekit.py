"""mergekit recipes, in mergekit's own YAML form, that every method gradfree shares with it
can run: the side-by-side comparison's inputs (tests and ``scripts/bench_mergekit.py``).
Written for this project (not copied from mergekit's examples); deterministic methods only
(DARE's and DELLA's random drops differ by construction)."""

from __future__ import annotations

from typing import Any


def side_by_side_recipes(a: str, b: str, base: str) -> dict[str, dict[str, Any]]:
    """Method name → a mergekit recipe over the model folders ``a``, ``b`` and ``base``."""

    def entry(model: str, **params: float) -> dict[str, Any]:
        return {"model": model, "parameters": params}

    return {
        "linear": {
            "merge_method": "linear",
            "models": [entry(a, weight=0.3), entry(b, weight=0.7)],
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [entry(a, weight=0.6, density=0.5), entry(b, weight=0.4, density=0.5)],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [entry(base), entry(a)],
            "parameters": {"t": [0.0, 0.5, 1.0]},
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [entry(a), entry(b)],
        },
        "karcher": {"merge_method": "karcher", "models": [entry(a), entry(b)]},
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [entry(a, weight=0.5), entry(b, weight=0.8)],
            "parameters": {"lambda": 0.7},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [entry(a, weight=1.0, density=0.6), entry(b, weight=0.5, density=0.6)],
            "parameters": {"gamma": 0.05},
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [entry(a, weight=1.0, density=0.6), entry(b, weight=0.5, density=0.6)],
        },
        "nuslerp": {"merge_method": "nuslerp", "models": [entry(a, weight=1), entry(b, weight=3)]},
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [entry(a, weight=1), entry(b, weight=2)],
        },
        "passthrough": {"merge_method": "passthrough", "models": [entry(a)]},
    }
