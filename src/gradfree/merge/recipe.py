"""Merge recipes: strict pydantic models read from YAML, validated with one-sentence errors.

A recipe, in the spirit of mergekit's YAML::

    method: ties                      # a registered method (gradfree.merge.registry)
    base_model: qwen2.5-coder-0.5b-instruct   # task-vector methods only
    models:
      - model: runs/finetuned-a       # a known model name or a local Hugging Face folder
        parameters: {weight: 0.6, density: 0.5}
      - runs/finetuned-b              # shorthand: a bare spec takes the default parameters
    parameters: {scaling: 1.0}        # method parameters; per-model ones given here are defaults
    seed: 0                           # DARE's drops
    dtype: float32                    # of the output checkpoint
    calibration: {corpus: tourguide, split: calibration, limit: 8}   # Fisher, RegMean
    selection: {metric: perplexity, corpus: tourguide, split: heldout} # greedy soup
    evaluate: {corpus: tourguide, split: heldout, limit: 8}            # optional report numbers

Method parameters are validated by the method's own pydantic models
(:meth:`gradfree.merge.registry.MergeMethod.resolve`), so an unknown or misspelt parameter is an
error naming the method and its valid parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from gradfree.base.configfile import DType, make_strict, read_yaml_mapping
from gradfree.base.errors import GradfreeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """One input model and its per-model method parameters (e.g. ``weight``, ``density``)."""

    model: str
    parameters: dict[str, Any] = {}


class SliceSource(_Strict):
    """One source of a slice: blocks ``layer_range = [start, end)`` of ``model``."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}


class SliceSpec(_Strict):
    sources: list[SliceSource]


class CalibrationSpec(_Strict):
    """Text on which Fisher information or RegMean Gram matrices are measured."""

    corpus: str = "tourguide"
    split: str | None = "calibration"
    limit: int | None = 8
    max_length: int = 128
    batch_size: int = 1

    @model_validator(mode="after")
    def _positive(self) -> CalibrationSpec:
        if (
            self.max_length < 2
            or self.batch_size < 1
            or (self.limit is not None and self.limit < 1)
        ):
            raise ValueError("calibration needs max_length >= 2, batch_size >= 1 and limit >= 1")
        return self


class EvalSpec(_Strict):
    """A held-out measurement: perplexity on a corpus split, or KL(teacher ‖ model) there."""

    metric: Literal["perplexity", "kl"] = "perplexity"
    teacher: str | None = None
    corpus: str = "tourguide"
    split: str | None = "heldout"
    limit: int | None = 8
    max_length: int = 256
    stride: int | None = None  # None: max_length (windows do not overlap)
    batch_size: int = 2

    @model_validator(mode="after")
    def _consistent(self) -> EvalSpec:
        if self.metric == "kl" and self.teacher is None:
            raise ValueError("the kl metric needs a teacher model")
        if self.stride is None:
            self.stride = self.max_length
        if not 1 <= self.stride <= self.max_length or self.max_length < 2:
            raise ValueError("evaluation needs max_length >= 2 and 1 <= stride <= max_length")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("evaluation needs batch_size >= 1 and limit >= 1")
        return self


def measure(
    model: Any, tokenizer: Any, docs: Any, spec: EvalSpec, teacher: Any, device: str
) -> dict[str, Any]:
    """``spec``'s measurement of a model on ``docs``: perplexity, and with a teacher (a loaded
    model) KL(teacher ‖ model) and top-1 agreement."""
    from gradfree.evaluation.run import evaluate

    r = evaluate(
        model,
        tokenizer,
        docs,
        teacher=None if teacher is None else teacher.model,
        teacher_tokenizer=None if teacher is None else teacher.tokenizer,
        max_length=spec.max_length,
        stride=spec.stride or spec.max_length,
        batch_size=spec.batch_size,
        device=device,
        compare_layers=[0],
    )
    out = {"ppl": r["perplexity"]["ppl"], "tokens": r["perplexity"]["tokens"]}
    if r["teacher"]:
        out["kl_mean"] = r["teacher"]["kl_mean"]
        out["top1_agreement"] = r["teacher"]["top1_agreement"]
    return out


class MergeRecipe(_Strict):
    """A whole merge: method, inputs, parameters, seed, output dtype and data sections."""

    method: str
    models: list[ModelEntry] = []
    base_model: str | None = None
    # models of different sizes (method distill_head): the larger one's logits distilled into
    # the smaller one's LM head (gradfree distill-head), the one such transfer measured to help
    teacher: str | None = None
    student: str | None = None
    # layer ranges stacked or merged (mergekit's slices:); the k-th non-base source of every
    # slice is model k (gradfree.merge.slices)
    slices: list[SliceSpec] | None = None
    parameters: dict[str, Any] = {}
    seed: int = 0
    dtype: DType | None = None  # None: the first model's dtype
    # None: base if given, else first; or the spec of one of the recipe's models
    tokenizer_source: str | None = None
    chat_template: str | None = None  # a Jinja chat template written with the tokenizer
    # token → the model whose embedding and head rows it keeps (or "zero"), not merged
    token_sources: dict[str, str] = {}
    dialect: Literal["gradfree", "mergekit"] = "gradfree"  # whose defaults the method follows
    translation: list[str] = []  # what reading a mergekit recipe changed (recorded)
    calibration: CalibrationSpec | None = None
    selection: EvalSpec | None = None
    evaluate: EvalSpec | None = None
    max_shard_mb: int = 2048
    # transformers' / mergekit's form of the same limit ("5GB", "500MB" or bytes); wins if given
    max_shard_size: str | int | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MergeRecipe:
        if self.method == "distill_head" or self.teacher or self.student:
            if not (self.teacher and self.student) or self.models or self.method != "distill_head":
                raise ValueError(
                    "a different-size merge is 'method: distill_head' with a teacher and a "
                    "student and no models"
                )
            return self
        if self.slices is not None:
            self._slots()
        if not self.models:
            raise ValueError("a recipe needs at least one model")
        if self.tokenizer_source == "base" and self.base_model is None:
            raise ValueError("tokenizer_source 'base' needs a base_model")
        specs = [m.model for m in self.models] + [self.base_model or ""]
        specs += [s.model for sl in self.slices or [] for s in sl.sources]
        for tok, src in self.token_sources.items():
            if src != "zero" and src not in specs:
                raise ValueError(f"the source of token '{tok}' is not a model of the recipe")
        if self.tokenizer_source not in (None, "base", "first", *specs):
            raise ValueError(
                f"tokenizer_source '{self.tokenizer_source}' is neither 'base', 'first' nor a "
                "model of the recipe"
            )
        if self.max_shard_size is not None:
            self.max_shard_mb = _shard_mb(self.max_shard_size)
            self.max_shard_size = None
        if self.max_shard_mb < 1:
            raise ValueError("max_shard_mb must be at least 1")
        return self

    def _slots(self) -> None:
        """Check the slices and set ``models`` to their slots (first slice's sources)."""
        if not self.slices:
            raise ValueError("slices must list at least one slice")
        rows = []
        for i, sl in enumerate(self.slices, 1):
            for src in sl.sources:
                a, b = src.layer_range
                if not 0 <= a < b:
                    raise ValueError(f"slice {i}: a layer_range is [start, end) with start < end")
            own = [src for src in sl.sources if src.model != self.base_model]
            if self.base_model is not None and len(own) != len(sl.sources) - 1:
                raise ValueError(f"slice {i} must hold the base model's layers once")
            rows.append(own)
        if len({len(r) for r in rows}) != 1 or not rows[0]:
            raise ValueError("every slice needs the same number of sources besides the base")
        for r in rows[1:]:
            if [s.parameters for s in r] != [s.parameters for s in rows[0]]:
                raise ValueError("per-source parameters must be the same in every slice")
        slots = [ModelEntry(model=s.model, parameters=s.parameters) for s in rows[0]]
        if self.models and self.models != slots:  # a re-validated recipe has its slots already
            raise ValueError("a recipe lists either models or slices, not both")
        self.models = slots

    def pieces(self, base: bool = False) -> list[list[Any]]:
        """The slices as :class:`gradfree.merge.slices.Piece` lists: the slots', or (``base``)
        the base model's one per slice."""
        from gradfree.merge.slices import Piece

        assert self.slices is not None
        out = []
        for sl in self.slices:
            chosen = [s for s in sl.sources if (s.model == self.base_model) == base]
            out.append([Piece(s.model, *s.layer_range) for s in chosen])
        return out


def _shard_mb(size: str | int) -> int:
    """Megabytes (2^20 bytes) of a shard size: bytes, or a number with B/KB/MB/GB/TB (1000s)
    or KiB/MiB/GiB (1024s), as transformers writes it."""
    import re

    if isinstance(size, int):
        return max(1, size // 2**20)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"max_shard_size '{size}' is not a size such as '5GB' or '500MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return max(1, int(float(m.group(1)) * base**power) // 2**20)


def make_recipe(value: MergeRecipe | dict[str, Any]) -> MergeRecipe:
    """A validated :class:`MergeRecipe` from a recipe or a plain dict (one-sentence errors)."""
    if isinstance(value, MergeRecipe):
        return value
    if not isinstance(value, dict):
        raise GradfreeError("A merge recipe must be a mapping of fields (method, models, ...).")
    from gradfree.merge.mergekit import is_mergekit, translate

    if is_mergekit(value):
        value = translate(value)
    return make_strict(MergeRecipe, value, noun="recipe", option="field", invalid="merge recipe")


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a YAML recipe file."""
    data = read_yaml_mapping(path, "recipe file")
    return make_recipe(data)


def recipe_yaml(recipe: MergeRecipe) -> str:
    """The recipe as YAML, every default filled in (what an output records)."""
    import yaml

    return str(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


__all__ = [
    "CalibrationSpec",
    "EvalSpec",
    "MergeRecipe",
    "ModelEntry",
    "load_recipe",
    "make_recipe",
    "measure",
    "recipe_yaml",
]
