"""The recipe of ``gradfree rotate``, ``gradfree slice`` and ``gradfree prune``: a strict pydantic
model.

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
    prune: structured pruning with least-squares compensation (:mod:`.prune`, fitted by
    :mod:`.reconstruct`), calibrated on ``corpus``: ``mlp_fraction`` of the MLP neurons or
    enough neurons for ``params_fraction`` of the parameters, and/or ``heads_keep`` query heads
    per KV group. No fusion, rotation or untying: a tied head stays tied.
    slice: ``fraction`` in [0, 1) and calibration from ``capture`` or ``corpus`` (+ split, limit);
    ``recompute`` slices in ``steps`` stages, re-measuring the statistics through the model sliced
    so far (needs ``corpus``). ``reconstruct`` (needs ``corpus``, one stage) then re-fits every
    linear by ridge least squares toward the dense model (:mod:`.reconstruct`), with
    ``reconstruct_lambda`` relative to tr(C)/k (default 0.01); with it, ``mlp_fraction`` and
    ``heads_keep`` prune as well. ``per_layer`` (rotate with a capture) adds the per-layer-basis
    study.
    """

    model_config = ConfigDict(extra="forbid")

    command: Literal["rotate", "slice", "prune"]
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
    mlp_fraction: float | None = None  # share of each block's MLP neurons removed
    params_fraction: float | None = None  # prune: share of all parameters removed (by neurons)
    heads_keep: int | None = None  # query heads kept per KV group
    prune_steps: int = 64  # OBS removal rounds per selection
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

    def _check_prune(self) -> None:
        _check_prune_fields(self)

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
        elif self.command == "prune":
            self._check_prune()
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
            if self.params_fraction is not None:
                raise ValueError("--params-fraction belongs to prune")
            if (self.mlp_fraction is not None or self.heads_keep is not None) and (
                not self.reconstruct
            ):
                raise ValueError("--mlp-fraction and --heads-keep need --reconstruct")
        if self.command == "rotate" and any(
            getattr(self, n) is not None for n in ("mlp_fraction", "params_fraction", "heads_keep")
        ):
            raise ValueError("--mlp-fraction, --params-fraction and --heads-keep do not rotate")
        if self.reconstruct_lambda is not None and not (
            self.reconstruct or self.command == "prune"
        ):
            raise ValueError("--reconstruct-lambda only applies with --reconstruct")
        for name in ("mlp_fraction", "params_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be a number in (0, 1)")
        if self.heads_keep is not None and self.heads_keep < 1:
            raise ValueError("--heads-keep must be at least 1")
        if self.prune_steps < 1:
            raise ValueError("--prune-steps must be at least 1")
        if self.damping < 0:
            raise ValueError("--damping cannot be negative")
        if min(self.max_length, self.batch_size, self.check_windows) < 1 or self.check_tokens < 2:
            raise ValueError("lengths, batch sizes and check windows must be positive")
        for name in ("limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        return self


def _check_prune_fields(cfg: SurgeryConfig) -> None:
    if cfg.corpus is None or cfg.capture is not None:
        raise ValueError("prune needs --corpus (it runs the model on the calibration text)")
    if cfg.fraction is not None or cfg.recompute or cfg.reconstruct or cfg.per_layer:
        raise ValueError("--fraction, --recompute, --reconstruct and --per-layer belong to slice")
    if cfg.random_seed is not None or cfg.matrix is not None:
        raise ValueError("--random-seed and --matrix belong to rotate")
    if cfg.mlp_fraction is not None and cfg.params_fraction is not None:
        raise ValueError("give --mlp-fraction or --params-fraction, not both")
    if cfg.mlp_fraction is None and cfg.params_fraction is None and cfg.heads_keep is None:
        raise ValueError("prune needs --mlp-fraction, --params-fraction or --heads-keep")


def make_surgery_config(**kw: Any) -> SurgeryConfig:
    """A validated :class:`SurgeryConfig`; a bad field is one :class:`GradfreeError` sentence."""
    command = kw.get("command", "surgery")
    return make_strict(SurgeryConfig, kw, noun="surgery", invalid=f"{command} options")
