"""What a merge method sees while it prepares: the resolved inputs, the recipe, the device, a
scratch folder for statistics, and helpers to load an input model or the calibration text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    from gradfree.merge.recipe import CalibrationSpec, EvalSpec, MergeRecipe
    from gradfree.merge.tensors import TensorSource
    from gradfree.models import LoadedModel
    from gradfree.texts.corpora import Document


@dataclass
class InputModel:
    """One input of a merge: its spec, a label for messages, its folder and fingerprint."""

    spec: str
    label: str
    folder: Path
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeContext:
    recipe: MergeRecipe
    models: list[InputModel]
    base: InputModel | None
    sources: list[TensorSource]  # the models' lazy tensors, in recipe order
    base_source: TensorSource | None
    names: list[str]  # tensor names, in the first model's file order
    device: str
    compute_dtype: str  # dtype in which models run forward/backward passes
    work: Path  # scratch folder inside the output's temporary folder
    say: Callable[[str], None] = print
    measurements: dict[str, Any] = field(default_factory=dict)
    # (token id, the source whose embedding/head row it keeps; None: a zero row)
    token_rows: list[tuple[int, Any]] = field(default_factory=list)

    def load(self, i: int) -> LoadedModel:
        """Input model ``i`` on the merge's device, in the compute dtype."""
        from gradfree.models import load_model

        return load_model(str(self.models[i].folder), device=self.device, dtype=self.compute_dtype)

    def documents(self, spec: CalibrationSpec | EvalSpec) -> list[Document]:
        from gradfree.texts.corpora import load_corpus

        return load_corpus(spec.corpus, split=spec.split, limit=spec.limit)

    def calibration(self) -> CalibrationSpec:
        if self.recipe.calibration is None:
            raise GradfreeError(f"Method '{self.recipe.method}' needs a calibration section.")
        return self.recipe.calibration


__all__ = ["InputModel", "MergeContext"]
