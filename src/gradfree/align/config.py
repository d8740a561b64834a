"""Strict configurations of ``gradfree align`` and ``gradfree ablate`` (YAML recipes).

Every toggle of seed 001's pipeline is a field here, so each step can be switched off and
measured. Unknown or inconsistent fields are one-sentence errors; the resolved config is written
into every output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradfree.base.configfile import given, make_strict, read_yaml_mapping


class AlignConfig(BaseModel):
    """What ``gradfree align`` fits and applies to the student."""

    model_config = ConfigDict(extra="forbid")

    # calibration capture
    corpus: str = "tourguide"
    split: str | None = "calibration"
    limit: Annotated[int | None, Field(ge=1)] = 32
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 2
    layer_map: str | list[int] = "proportional"
    dump_max: Annotated[int, Field(ge=16)] = 1024  # paired MLP tokens for neuron correlation
    seed: int = 0
    # rotations (seed 001 §4)
    rotate: bool = True
    rotation: Literal["global", "per_stage", "per_layer"] = "global"
    stage_size: Annotated[int, Field(ge=1)] = 4
    k: Annotated[int | None, Field(ge=1)] = None  # shared width; default min(d_s, d_t)
    k_fraction: Annotated[float | None, Field(gt=0.0, le=1.0)] = None  # or a shrunk fraction of it
    whiten: bool = False
    ridge: Annotated[float, Field(ge=0.0)] = 1e-3  # relative ridge of the whitening
    # permutations (seed 001 §5)
    permute_heads: bool = True
    permute_neurons: bool = True
    neuron_layers: list[int] | None = None  # default: every block
    pattern_docs: Annotated[int, Field(ge=1)] = 4
    pattern_max_length: Annotated[int, Field(ge=4)] = 128
    # Householder refinement (seed 001 §7): changes the function
    refine: bool = False
    max_reflections: Annotated[int, Field(ge=1, le=2)] = 2
    cosine_target: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75
    # LM-head ridge (seed 001 §8): changes the function
    ridge_head: bool = False
    head_lambda: Annotated[float, Field(ge=0.0)] = 1e-2  # relative to mean diag(XᵀX)
    head_blend: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # weight of the ridge head
    head_chunk: Annotated[int, Field(ge=1)] = 8192
    style_prompts: bool = True  # add the prompt continuations to the ridge fit
    style_places: Annotated[int, Field(ge=1)] = 8
    style_tokens: Annotated[int, Field(ge=1)] = 16

    @model_validator(mode="after")
    def _consistent(self) -> AlignConfig:
        if self.k is not None and self.k_fraction is not None:
            raise ValueError("give k or k_fraction, not both")
        if self.refine and not self.rotate:
            raise ValueError("refine needs rotate: the reflections correct a rotation")
        return self


VARIANTS: dict[str, dict[str, bool]] = {
    # seed 001 §16.2, plus the Householder refinement and per-stage bases as measured extras
    "base": {},
    "perm": {"permute": True},
    "perm+rot": {"permute": True, "rotate": True},
    "perm+rot+style": {"permute": True, "rotate": True, "style": True},
    "style": {"style": True},
    "perm+rot+householder": {"permute": True, "rotate": True, "refine": True},
    "perm+rot(per-stage)": {"permute": True, "rotate": True, "per_stage": True},
}
DEFAULT_VARIANTS = ["base", "perm", "perm+rot", "perm+rot+style", "style"]


class AblateConfig(BaseModel):
    """The variant matrix and its evaluation."""

    model_config = ConfigDict(extra="forbid")

    align: AlignConfig = AlignConfig(ridge_head=True)
    variants: list[str] = list(DEFAULT_VARIANTS)
    heldout_limit: Annotated[int, Field(ge=1)] = 8
    eval_max_length: Annotated[int, Field(ge=8)] = 256
    questions: Annotated[int, Field(ge=0)] = 20
    max_new_tokens: Annotated[int, Field(ge=1)] = 16
    prompt_places: Annotated[int, Field(ge=1)] = 8
    prompt_tokens: Annotated[int, Field(ge=1)] = 16
    representative_layers: list[int] | None = None  # default: 0, L/4, L/2, 3L/4, L-1

    @model_validator(mode="after")
    def _known(self) -> AblateConfig:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variant '{bad[0]}'; known: {', '.join(VARIANTS)}")
        if not self.variants:
            raise ValueError("at least one variant is needed")
        return self


def load_config(kind: type[AlignConfig] | type[AblateConfig], path: Path | None, **kw: Any) -> Any:
    """A validated config from an optional YAML file and keyword overrides (None = unset)."""
    data = read_yaml_mapping(path) if path is not None else None
    noun = "align" if kind is AlignConfig else "ablate"
    return make_strict(kind, data, given(kw), noun=noun, invalid=f"{noun} config")
