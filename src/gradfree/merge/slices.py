"""Merges assembled from layer ranges of several checkpoints (mergekit's ``slices:``): stacked
"frankenmerges" through ``passthrough``, or layer ranges merged with any tensor-wise method.

A recipe lists slices in output order; each slice lists its sources, every one a model and a
``layer_range: [start, end)`` of the same length. Output block ``i`` of slice ``s`` at offset
``o`` is, for each *slot* ``k`` (the ``k``-th source of every slice, the base's source excluded),
block ``start + o`` of that source's model; the method merges the slots' tensors as if they were
whole models. Tensors outside the blocks come from the slices' sources too, as mergekit takes
them: the embeddings from the first slice, the final norm and the head from the last.

:class:`SlicedSource` makes one slot look like an ordinary input (``get(name)`` of an output
tensor name reads the right checkpoint's tensor), so the streaming merge is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

    from gradfree.merge.tensors import TensorSource

_BLOCK = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class Piece:
    """One source of a slice: blocks [start, end) of ``model``."""

    model: str
    start: int
    end: int


def layer_plan(slices: Sequence[Sequence[Piece]]) -> list[list[tuple[str, int]]]:
    """Per output block, per slot: (model, block of that model)."""
    plan: list[list[tuple[str, int]]] = []
    for s, pieces in enumerate(slices, 1):
        lengths = {p.end - p.start for p in pieces}
        if len(lengths) != 1 or min(lengths) < 1:
            raise GradfreeError(
                f"The sources of slice {s} must cover the same number of blocks (at least one)."
            )
        for o in range(lengths.pop()):
            plan.append([(p.model, p.start + o) for p in pieces])
    return plan


class SlicedSource:
    """One slot of a sliced merge, read like a :class:`~gradfree.merge.tensors.TensorSource`
    whose tensor names are the output's."""

    def __init__(
        self,
        label: str,
        slot: int,
        slices: Sequence[Sequence[Piece]],
        opened: dict[str, TensorSource],
    ) -> None:
        self.label = label
        plan = layer_plan(slices)
        first, last = slices[0][slot].model, slices[-1][slot].model
        template = opened[slices[0][0].model]
        self.where: dict[str, tuple[str, str]] = {}  # output name -> (model, its tensor name)
        per_block: dict[int, list[str]] = {}
        outside: list[str] = []
        for n in template.names():
            m = _BLOCK.match(n)
            if m is None:
                outside.append(n)
            elif int(m.group(2)) == slices[0][0].start:
                per_block.setdefault(0, []).append(n)
        rests = [_BLOCK.match(n) for n in per_block.get(0, [])]
        for n in outside:
            # embeddings as the first slice has them, the final norm and head as the last
            self.where[n] = (first if "embed" in n else last, n)
        for i, row in enumerate(plan):
            model, block = row[slot]
            for r in rests:
                assert r is not None
                self.where[f"{r.group(1)}{i}{r.group(3)}"] = (
                    model,
                    f"{r.group(1)}{block}{r.group(3)}",
                )
        self.opened = opened
        for name, (model, src) in self.where.items():
            if src not in opened[model].where:
                raise GradfreeError(
                    f"Model {model} has no tensor '{src}' (for '{name}' of the sliced merge): is "
                    "its layer_range inside the model?"
                )

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        model, src = self.where[name]
        return self.opened[model].shape(src)

    def get(self, name: str) -> torch.Tensor:
        model, src = self.where[name]
        return self.opened[model].get(src)


def output_config(config: Any, slices: Sequence[Sequence[Piece]], configs: dict[str, Any]) -> Any:
    """``config`` with the output's number of blocks (and per-block ``layer_types``, taken from
    each block's first source)."""
    plan = layer_plan(slices)
    config.num_hidden_layers = len(plan)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [configs[row[0][0]].layer_types[row[0][1]] for row in plan]
    if hasattr(config, "max_window_layers") and isinstance(config.max_window_layers, int):
        config.max_window_layers = min(config.max_window_layers, len(plan))
    return config


__all__ = ["Piece", "SlicedSource", "layer_plan", "output_config"]
