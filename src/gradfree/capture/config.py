"""The capture recipe: a strict pydantic model, validated with one-sentence errors.

Every field that changes the statistics lives here (sites, layers, windows, masking, dumps, seed);
the device and dtype are properties of the models passed in and are recorded in the manifest.
The resolved config is written to ``config.json`` in every capture folder, and its hash decides
whether an interrupted capture may be resumed or two captures combined.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from gradfree.base.configfile import make_strict
from gradfree.base.io import sha256_text
from gradfree.capture.sites import (
    DEFAULT_CROSS_SITES,
    DEFAULT_SITES,
    check_sites,
    parse_layers,
    parse_sites,
)


class CaptureConfig(BaseModel):
    """What to capture and how. Defaults give the cheap capture: ``resid_pre`` + ``final.normed``.

    Position rules, per window of at most ``max_length`` tokens: positions ``< exclude_first`` are
    dropped; kept positions ``< split_first`` go to the "head" accumulator, the rest to "body";
    "all" is head + body. In a paired run ``layers`` are student blocks and the teacher captures
    the blocks that ``layer_map`` pairs with them.
    """

    model_config = ConfigDict(extra="forbid")

    sites: list[str] = list(DEFAULT_SITES)
    layers: list[int] | None = None
    full: list[str] = []
    diagonal: list[str] = []
    cross_sites: list[str] | None = None
    layer_map: str | list[int] = "proportional"
    max_length: int = 512
    batch_size: int = 4
    exclude_first: int = 0
    split_first: int = 1
    add_special_tokens: bool = True
    dump_sites: list[str] = []
    dump_rate: float = 0.05
    dump_max: int = 20000
    seed: int = 0
    checkpoint_every: int = 50

    @field_validator("sites", "full", "diagonal", "dump_sites", mode="before")
    @classmethod
    def _sites(cls, v: Any) -> list[str]:
        return parse_sites(v) if v is not None else []

    @field_validator("cross_sites", mode="before")
    @classmethod
    def _cross(cls, v: Any) -> list[str] | None:
        return None if v is None else parse_sites(v)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> list[int] | None:
        return parse_layers(v)

    @field_validator("layer_map", mode="before")
    @classmethod
    def _map(cls, v: Any) -> str | list[int]:
        if v is None or v == "proportional":
            return "proportional"
        if isinstance(v, str):
            try:
                return [int(p) for p in v.split(",") if p.strip()]
            except ValueError:
                raise ValueError(
                    "layer_map is 'proportional' or comma-separated teacher layer indices"
                ) from None
        return [int(i) for i in v]

    @model_validator(mode="after")
    def _consistent(self) -> CaptureConfig:
        if not self.sites:
            raise ValueError("at least one capture site is needed")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError("layers must be non-negative block indices")
        if self.max_length < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("max_length, batch_size and checkpoint_every must be at least 1")
        if self.exclude_first < 0 or self.split_first < 0:
            raise ValueError("exclude_first and split_first cannot be negative")
        if self.exclude_first >= self.max_length:
            raise ValueError("exclude_first must be smaller than max_length")
        if not 0.0 < self.dump_rate <= 1.0:
            raise ValueError("dump_rate must be in (0, 1]")
        if self.dump_max < 0:
            raise ValueError("dump_max cannot be negative")
        if set(self.full) & set(self.diagonal):
            raise ValueError("a site cannot be both in full and in diagonal")
        for name, subset in (("dump site", self.dump_sites), ("cross site", self.cross_sites)):
            for s in subset or []:
                if s not in self.sites:
                    raise ValueError(f"{name} '{s}' is not among the captured sites")
        return self

    # derived ------------------------------------------------------------------------------------
    def paired_sites(self) -> list[str]:
        """Sites whose teacher×student cross moments are accumulated in a paired run."""
        if self.cross_sites is not None:
            return list(self.cross_sites)
        return [s for s in DEFAULT_CROSS_SITES if s in self.sites]

    @property
    def has_head(self) -> bool:
        """Whether any kept position can fall in the head (``exclude_first ≤ p < split_first``)."""
        return self.split_first > self.exclude_first

    def digest(self) -> str:
        return sha256_text(json.dumps(self.model_dump(mode="json"), sort_keys=True))


def make_config(value: CaptureConfig | dict[str, Any] | None = None, **kw: Any) -> CaptureConfig:
    """A validated :class:`CaptureConfig` from a config, a dict and/or keywords (keywords win)."""
    return make_strict(CaptureConfig, value, kw, noun="capture", invalid="capture config")


__all__ = ["CaptureConfig", "check_sites", "make_config"]
