"""Strict configs from YAML files: one reader and one error sentence for every config kind.

The align/ablate configs, compression recipes and merge recipes are pydantic models with
``extra="forbid"``; this module reads their YAML files and turns the first validation error into
one sentence that names the option (what a CLI prints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gradfree.base.errors import GradfreeError


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
