"""Strict configs: one factory, one YAML reader and one error sentence for every config kind.

The capture, surgery, align/ablate, experiment and demo configs, compression recipes and merge
recipes are pydantic models with ``extra="forbid"``. :func:`make_strict` builds any of them from
instances, mappings and keyword overrides and turns the first validation error into one sentence
that names the option (what a CLI prints). :data:`DType` and :data:`Device` are the checked field
types of a model's dtype and device: a device string is parsed when the config is read, without
touching CUDA; whether the device is present is checked only when a model is placed on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, ValidationError

from gradfree.base.errors import GradfreeError

M = TypeVar("M", bound=BaseModel)

DType = Literal["float32", "float64", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DType)


def device_problem(device: str) -> str | None:
    """Why ``device`` is not a torch device string ("cpu", "cuda", "cuda:1", "mps"...), or None.

    Only the string is parsed (``torch.device`` knows the device types); no device is probed, so
    reading a config with "cuda:0" on a CPU machine neither fails nor initialises CUDA.
    """
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"'{device}' is not a torch device (try 'cpu' or 'cuda:0')"
    return None


def _check_device(device: str) -> str:
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(problem)
    return device


Device = Annotated[str, AfterValidator(_check_device)]
"""A config field holding a device string, parsed (not probed) when the config is read."""


def check_device(device: str) -> str:
    """``device`` when it parses as a torch device, else a one-sentence :class:`GradfreeError`."""
    problem = device_problem(device)
    if problem is not None:
        raise GradfreeError(f"{problem}.")
    return device


def check_dtype(dtype: str) -> str:
    """``dtype`` when it is one of :data:`DTYPES`, else a one-sentence :class:`GradfreeError`."""
    if dtype not in DTYPES:
        raise GradfreeError(f"Unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}.")
    return dtype


def make_strict(
    kind: type[M],
    *layers: BaseModel | Mapping[str, Any] | None,
    noun: str,
    option: str = "option",
    invalid: str | None = None,
) -> M:
    """A validated ``kind`` from ``layers`` (models, mappings or None), later layers winning
    field by field; the first validation error is one :class:`GradfreeError` sentence
    (:func:`validation_message` with ``noun``, ``option`` and ``invalid``)."""
    data: dict[str, Any] = {}
    for layer in layers:
        if isinstance(layer, BaseModel):
            data.update(layer.model_dump())
        elif isinstance(layer, Mapping):
            data.update(layer)
        elif layer is not None:
            raise GradfreeError(f"A {invalid or noun} must be a mapping of {option}s.")
    try:
        return kind(**data)
    except ValidationError as e:
        raise GradfreeError(validation_message(e, noun, option, invalid)) from None


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that were given: those that are not None (unset command-line flags)."""
    return {k: v for k, v in options.items() if v is not None}


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping held by a YAML file (empty file = empty mapping); one-sentence errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GradfreeError(f"The {what} {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise GradfreeError(f"The {what} {path} is not valid YAML ({type(e).__name__}).") from None
    if not isinstance(data, dict):
        raise GradfreeError(f"The {what} {path} must hold a mapping of options.")
    return data


def validation_message(
    e: ValidationError, noun: str, option: str = "option", invalid: str | None = None
) -> str:
    """One sentence for the first error: an unknown, a missing or an invalid ``option`` of a
    ``noun`` ("Unknown recipe option 'x'.", "Invalid merge recipe: ...")."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"Unknown {noun} {option} '{where}'."
    if err["type"] == "missing":
        return f"The {noun} is missing the {option} '{where}'."
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] != "value_error" and where:
        msg = f"{where}: {msg}"
    return f"Invalid {invalid or noun}: {msg[:1].lower()}{msg[1:]}."
