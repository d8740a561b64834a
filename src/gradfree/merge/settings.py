"""Parameter values that change across a model's tensors, as mergekit writes them.

A method parameter (global or per model) may be

* a scalar: the same everywhere;
* a list of scalars, a *gradient* over the layers: at relative depth ``t`` (block ``i`` of
  ``L``: ``t = i/(L − 1)``; tensors outside the blocks: ``t = 0``) numbers are interpolated
  linearly between the list's evenly spaced points, other values (booleans, strings) are
  picked at ``int(t · (n − 1))``;
* a list of ``{filter: S, value: V}`` conditions: the first whose ``S`` is a substring of the
  tensor's name (or that has no filter, or ``*``) gives ``V``, itself any of these forms.

These are mergekit's rules (its ``evaluate_setting``), so its recipes mean the same here. Pure
Python, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from gradfree.base.errors import GradfreeError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_dynamic(value: Any) -> bool:
    """Whether ``value`` is a gradient or a list of conditions (not one scalar)."""
    return isinstance(value, list | dict)


def _conditions(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(e, dict) for e in value)
    )


def _check_condition(cond: Any, key: str) -> None:
    if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
        raise GradfreeError(
            f"The parameter '{key}' mixes conditions and plain values: every entry of a filtered "
            "list must be {filter: ..., value: ...}."
        )


def evaluate(value: Any, name: str, t: float, key: str = "parameter") -> Any:
    """The value of a setting for the tensor ``name`` at relative depth ``t`` (None when no
    condition matches)."""
    if not is_dynamic(value):
        return value
    if _conditions(value):
        for cond in [value] if isinstance(value, dict) else value:
            _check_condition(cond, key)
            f = cond.get("filter")
            if f is None or f == "*" or (name and str(f) in name):
                return evaluate(cond["value"], name, t, key)
        return None
    if not value:
        return None
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not numeric:
        return value[int(t * (len(value) - 1))]
    pos = t * (len(value) - 1)
    i0 = int(pos)
    i1 = min(len(value) - 1, i0 + 1)
    frac = pos - i0
    return (1 - frac) * value[i0] + frac * value[i1] if frac else value[i0]


def leaves(value: Any, key: str = "parameter") -> Iterator[Any]:
    """Every scalar a setting can resolve to at a list's points (what validation must accept;
    values between two numbers of a gradient lie between accepted ones)."""
    if not is_dynamic(value):
        yield value
        return
    if _conditions(value):
        for cond in [value] if isinstance(value, dict) else value:
            _check_condition(cond, key)
            yield from leaves(cond["value"], key)
        return
    for v in value:
        if is_dynamic(v):
            raise GradfreeError(f"The gradient of '{key}' must be a list of plain values.")
        yield v


def depth(name: str, num_layers: int) -> float:
    """``t`` of a tensor: ``i/(L − 1)`` inside block ``i`` (1 with one block), else 0."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def num_layers(names: Sequence[str]) -> int:
    """How many blocks the tensor names hold (the largest block index + 1)."""
    idx = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(idx) + 1 if idx else 0


__all__ = ["depth", "evaluate", "is_dynamic", "leaves", "num_layers"]
