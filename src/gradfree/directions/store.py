"""The one on-disk format of concept directions: a safetensors file and a JSON manifest.

A folder holds ``directions.safetensors`` (per ``layer{L}.{pooling}`` key: the (N, d) float32
directions, concept mean − mean over concepts, and ``global_mean.<key>``: that (d,) mean in
float64) and ``directions.json`` (format ``gradfree.directions/1``: concepts and their sha256,
templates, layers, poolings, the model's identity, how the concepts were chosen, timings, and the
sha256 of the safetensors file). Loading checks both hashes, so a truncated or edited file is
refused with one sentence; :func:`check_model` refuses a model of another width or other weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradfree.base.errors import GradfreeError
from gradfree.base.io import (
    atomic_dir,
    read_json,
    sha256_file,
    sha256_text,
    share_folder,
    write_json_atomic,
)

FORMAT = "gradfree.directions/1"
TENSORS = "directions.safetensors"
MANIFEST = "directions.json"
POOLINGS = ("mean", "last")


def concepts_sha256(concepts: list[str]) -> str:
    """The hash of a concept list, in order (one concept per line)."""
    return sha256_text("\n".join(concepts))


def direction_key(layer: int, pooling: str) -> str:
    return f"layer{int(layer)}.{pooling}"


@dataclass
class Directions:
    """Concept directions of one model at some layers and poolings (see the module docstring)."""

    concepts: list[str]
    templates: list[str]
    layers: list[int]
    poolings: list[str]
    vectors: dict[str, np.ndarray]  # key -> (N, d) float32: concept mean − global mean
    global_mean: dict[str, np.ndarray]  # key -> (d,) float64
    model: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def key(layer: int, pooling: str) -> str:
        return direction_key(layer, pooling)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1])

    def get(self, layer: int, pooling: str = "mean") -> np.ndarray:
        """The (N, d) directions at ``layer`` with ``pooling``."""
        k = direction_key(layer, pooling)
        if k not in self.vectors:
            have = ", ".join(sorted(self.vectors))
            raise GradfreeError(f"These directions have no layer {layer} '{pooling}' ({have}).")
        return self.vectors[k]

    def index(self, concept: str) -> int:
        """The row of ``concept``."""
        try:
            return self.concepts.index(concept)
        except ValueError:
            raise GradfreeError(f"The concept '{concept}' is not in these directions.") from None

    def validate(self) -> None:
        """Raise a one-sentence error if the parts do not fit together."""
        n = len(self.concepts)
        expected = {direction_key(L, p) for L in self.layers for p in self.poolings}
        if set(self.vectors) != expected or set(self.global_mean) != expected:
            raise GradfreeError(
                f"The directions' tensors {sorted(self.vectors)} do not match layers "
                f"{self.layers} x poolings {self.poolings}."
            )
        widths = {v.shape[1] for v in self.vectors.values() if v.ndim == 2}
        for k, v in self.vectors.items():
            g = self.global_mean[k]
            if v.ndim != 2 or v.shape[0] != n or len(widths) != 1 or g.shape != (v.shape[1],):
                raise GradfreeError(
                    f"The directions '{k}' have shape {v.shape} (mean {g.shape}), "
                    f"not ({n}, d) for {n} concepts of one width."
                )

    def manifest(self, tensors_sha256: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "n_concepts": len(self.concepts),
            "hidden_size": self.hidden_size,
            "concepts_sha256": concepts_sha256(self.concepts),
            "templates": list(self.templates),
            "layers": [int(x) for x in self.layers],
            "poolings": list(self.poolings),
            "layer_convention": "output of decoder block L (hidden_states[L + 1])",
            "model": self.model,
            "source": self.source,
            "tensors": {"file": TENSORS, "sha256": tensors_sha256},
            "concepts": list(self.concepts),
        }

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the folder atomically; an existing folder is kept unless ``overwrite``."""
        from safetensors.numpy import save_file

        self.validate()
        tensors: dict[str, np.ndarray] = {}
        for k in self.vectors:
            tensors[k] = np.ascontiguousarray(self.vectors[k], dtype=np.float32)
            tensors[f"global_mean.{k}"] = np.ascontiguousarray(self.global_mean[k], np.float64)
        folder = Path(folder)
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
            write_json_atomic(tmp / MANIFEST, self.manifest(sha256_file(tmp / TENSORS)))
            share_folder(tmp)  # safetensors writes 0600; a directions folder is for every user
        return folder


def load_directions(folder: str | Path) -> Directions:
    """Read a folder written by :meth:`Directions.save`, checking the format and both hashes."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise GradfreeError(f"The directions folder {folder} does not exist.")
    man = read_json(folder / MANIFEST, "directions manifest")
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise GradfreeError(f"{folder / MANIFEST} is not a {FORMAT} manifest.")
    path = folder / TENSORS
    if not path.is_file():
        raise GradfreeError(f"The directions file {path} is missing.")
    if sha256_file(path) != man["tensors"]["sha256"]:
        raise GradfreeError(
            f"{path} does not match the sha256 in its manifest (changed or truncated)."
        )
    concepts = [str(c) for c in man["concepts"]]
    if concepts_sha256(concepts) != man["concepts_sha256"]:
        raise GradfreeError(f"The concept list in {folder / MANIFEST} does not match its sha256.")
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise GradfreeError(f"{path} is not a readable safetensors file ({e}).") from e
    vectors = {k: v for k, v in tensors.items() if not k.startswith("global_mean.")}
    means = {k.removeprefix("global_mean."): v for k, v in tensors.items() if k not in vectors}
    d = Directions(
        concepts=concepts,
        templates=list(man["templates"]),
        layers=[int(x) for x in man["layers"]],
        poolings=list(man["poolings"]),
        vectors=vectors,
        global_mean=means,
        model=dict(man.get("model", {})),
        source=dict(man.get("source", {})),
    )
    d.validate()
    return d


def _describe(obj: Any) -> tuple[dict[str, Any], Any]:
    """(fingerprint or {}, the model or None) of a LoadedModel, a fingerprint or a model."""
    if isinstance(obj, Mapping):
        return dict(obj), None
    fp = getattr(obj, "fingerprint", None)
    if isinstance(fp, Mapping) and hasattr(obj, "model"):
        return dict(fp), obj.model
    if hasattr(obj, "config"):
        return {}, obj
    raise GradfreeError(
        "check_model needs a loaded model, its fingerprint or a Hugging Face model, "
        f"not a {type(obj).__name__}."
    )


def check_model(d: Directions, model: Any) -> None:
    """Refuse (one sentence) a model whose width, depth, type or weights differ from ``d``'s.

    ``model`` is a :class:`~gradfree.models.LoadedModel` (everything checked), a fingerprint dict
    (weights and type checked) or a bare Hugging Face model (width, depth and type checked).
    The weights are compared only when both sides know their hash.
    """
    from gradfree.models.load import weights_digest

    fp, m = _describe(model)
    name = d.model.get("name") or "another model"
    if m is not None:
        from gradfree.adapters import get_adapter

        a = get_adapter(m)
        if a.hidden_size != d.hidden_size:
            raise GradfreeError(
                f"These directions are {d.hidden_size}-wide (from {name}) but the model's "
                f"residual stream is {a.hidden_size}-wide."
            )
        n_layers = d.model.get("num_layers")
        if n_layers is not None and int(n_layers) != a.num_layers:
            raise GradfreeError(
                f"These directions come from a {n_layers}-layer model ({name}), "
                f"not this {a.num_layers}-layer one."
            )
    mtype = fp.get("model_type") or (getattr(m.config, "model_type", None) if m else None)
    if mtype and d.model.get("model_type") and mtype != d.model["model_type"]:
        raise GradfreeError(
            f"These directions come from a {d.model['model_type']} model ({name}), not a {mtype}."
        )
    want = d.model.get("weights_sha256")
    if fp.get("weights_sha256") and want and weights_digest(fp) != want:
        raise GradfreeError(
            f"These directions come from {name} (weights {want}), not from this model "
            f"(weights {weights_digest(fp)})."
        )
