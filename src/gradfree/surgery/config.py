"""The recipe of ``gradfree rotate`` and ``gradfree slice``: a strict pydantic model.

One config covers both commands (``command`` says which); every field that changes the output
lives here and the resolved config is written into the output folder. Errors are one sentence.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from gradfree.base.configfile import Device, DType, make_strict


class SurgeryConfig(BaseModel):
    """What to do to which model, and how to check it.

    rotate: exactly one of ``capture`` (PCA basis), ``random_seed`` or ``matrix``.
    slice: ``fraction`` in [0, 1) and calibration from ``capture`` or ``corpus`` (+ split, limit);
    ``recompute`` slices in ``steps`` stages, re-measuring the statistics through the model sliced
    so far (needs ``corpus``). ``reconstruct`` (needs ``corpus``, one stage) then re-fits every
    linear by ridge least squares toward the dense model (:mod:`.reconstruct`), with
    ``reconstruct_lambda`` relative to tr(C)/k (default 0.01). ``per_layer`` (rotate with a
    capture) adds the per-layer-basis study.
    """

    model_config = ConfigDict(extra="forbid")

    command: Literal["rotate", "slice"]
    model: str
    out: str
    capture: str | None = None
    random_seed: int | None = None
    matrix: str | None = None
    fraction: float | None = None
    corpus: str | None = None
    split: str | None = None
    limit: int | None = None
    recompute: bool = False
    steps: int = 2
    per_layer: bool = False
    reconstruct: bool = False
    reconstruct_lambda: float | None = None  # None: REL_LAMBDA of :mod:`.reconstruct` (0.01)
    damping: float = 0.01
    max_length: int = 512
    batch_size: int = 4
    check_corpus: str = "tourguide"
    check_split: str | None = "heldout"
    check_windows: int = 2
    check_tokens: int = 128
    eval_corpus: str | None = None
    eval_split: str | None = "heldout"
    eval_limit: int | None = None
    device: Device = "cpu"
    dtype: DType = "float32"
    save_format: Literal["safetensors", "fp8"] = "safetensors"

    @model_validator(mode="after")
    def _consistent(self) -> SurgeryConfig:
        if self.command == "rotate":
            given = [
                n for n in ("capture", "random_seed", "matrix") if getattr(self, n) is not None
            ]
            if len(given) != 1:
                raise ValueError("rotate needs exactly one of --capture, --random-seed or --matrix")
            if (
                self.fraction is not None
                or self.corpus is not None
                or self.recompute
                or self.reconstruct
            ):
                raise ValueError(
                    "--fraction, --corpus, --recompute and --reconstruct belong to slice"
                )
            if self.per_layer and self.capture is None:
                raise ValueError("--per-layer needs --capture")
        else:
            if self.fraction is None or not 0.0 <= self.fraction < 1.0:
                raise ValueError("--fraction must be a number in [0, 1)")
            if (self.capture is None) == (self.corpus is None):
                raise ValueError("slice needs exactly one of --capture or --corpus")
            if self.random_seed is not None or self.matrix is not None or self.per_layer:
                raise ValueError("--random-seed, --matrix and --per-layer belong to rotate")
            if self.recompute and self.corpus is None:
                raise ValueError("--recompute runs the sliced model again, so it needs --corpus")
            if self.reconstruct and (self.corpus is None or self.recompute):
                raise ValueError(
                    "--reconstruct needs --corpus and works with one basis (no --recompute)"
                )
            if self.reconstruct_lambda is not None and self.reconstruct_lambda < 0:
                raise ValueError("--reconstruct-lambda cannot be negative")
            if self.recompute and self.steps < 2:
                raise ValueError("--recompute needs --steps of at least 2")
        if self.reconstruct_lambda is not None and not self.reconstruct:
            raise ValueError("--reconstruct-lambda only applies with --reconstruct")
        if self.damping < 0:
            raise ValueError("--damping cannot be negative")
        if min(self.max_length, self.batch_size, self.check_windows) < 1 or self.check_tokens < 2:
            raise ValueError("lengths, batch sizes and check windows must be positive")
        for name in ("limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        return self


def make_surgery_config(**kw: Any) -> SurgeryConfig:
    """A validated :class:`SurgeryConfig`; a bad field is one :class:`GradfreeError` sentence."""
    command = kw.get("command", "surgery")
    return make_strict(SurgeryConfig, kw, noun="surgery", invalid=f"{command} options")
