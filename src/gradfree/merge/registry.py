"""The registry of merge methods and the plugin interface they implement (after mergekit).

A method is a :class:`MergeMethod` subclass registered under its ``name`` with a
``reference_url`` (its paper) and two strict pydantic models: ``Params`` (global parameters) and
``ModelParams`` (per-model parameters such as ``weight`` or ``density``). ``parameters()`` and
``tensor_parameters()`` describe them; ``configure(recipe)`` validates a recipe's parameters
against them with one-sentence errors. Per-model parameters given in the recipe's global
``parameters`` are defaults for every model, as in mergekit.

Variants that differ only in configuration (TIES, DARE-TIES, DARE-linear, task arithmetic) are
one class with class-level settings, registered through :meth:`MergeMethod.variant`.

Lifecycle of one merge: ``configure`` → ``prepare(ctx)`` (measure statistics: Fisher, Grams,
greedy selection; most methods do nothing) → ``groups(names)`` (tensors merged together, usually
one each) → ``merge_group`` per group on float64 tensors → ``summary()`` for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

    from gradfree.merge.context import MergeContext
    from gradfree.merge.recipe import MergeRecipe


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Weighted(BaseModel):
    """Per-model parameters of weighted methods."""

    model_config = ConfigDict(extra="forbid")
    weight: float = 1.0


def _describe(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "default": None if f.is_required() else f.default,
            "required": f.is_required(),
            "type": getattr(f.annotation, "__name__", str(f.annotation)),
            "description": f.description or "",
        }
        for name, f in model.model_fields.items()
    }


def _invalid(method: str, e: ValidationError, where: str) -> GradfreeError:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return GradfreeError(f"Invalid parameter '{field}' of method '{method}'{where}: {msg}.")


class MergeMethod:
    """Base of every merge method; subclasses set the class variables and ``merge_group``."""

    name: ClassVar[str] = ""
    reference_url: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    ModelParams: ClassVar[type[BaseModel]] = NoParams
    needs_base: ClassVar[bool] = False
    base_optional: ClassVar[bool] = False  # a base_model is used when given (task vectors)
    needs_calibration: ClassVar[bool] = False
    needs_selection: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        self.params: Any = params
        self.model_params: list[Any] = list(model_params)
        self.stats: dict[str, Any] = {}  # method-specific diagnostics for the report
        self.recipe: Any = None
        self.dynamic = False  # parameters vary by layer or tensor name (mergekit gradients)
        self.layers = 0
        self._resolved: dict[tuple[str, float], tuple[BaseModel, list[BaseModel]]] = {}

    # description ------------------------------------------------------------------------------
    @classmethod
    def parameters(cls) -> dict[str, dict[str, Any]]:
        """Global parameters: name → default, required, type, description."""
        return _describe(cls.Params)

    @classmethod
    def tensor_parameters(cls) -> dict[str, dict[str, Any]]:
        """Per-model parameters (they may also be given globally, as defaults)."""
        return _describe(cls.ModelParams)

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "description": cls.description,
            "reference_url": cls.reference_url,
            "parameters": cls.parameters(),
            "tensor_parameters": cls.tensor_parameters(),
            "needs_base": cls.needs_base,
            "base_optional": cls.base_optional,
            "needs_calibration": cls.needs_calibration,
            "needs_selection": cls.needs_selection,
        }

    @classmethod
    def variant(cls, name: str, reference_url: str, description: str, **settings: Any) -> type:
        """A configured subclass registered under ``name`` (e.g. TIES from the sparse class)."""
        attrs = {"name": name, "reference_url": reference_url, "description": description}
        return register(type(f"{cls.__name__}_{name}", (cls,), {**attrs, **settings}))

    # configuration ----------------------------------------------------------------------------
    @classmethod
    def configure(cls, recipe: MergeRecipe) -> MergeMethod:
        """Validate the recipe's method parameters, model count and base model; a new method."""
        g_fields, m_fields = cls.Params.model_fields, cls.ModelParams.model_fields
        valid = sorted({*g_fields, *m_fields})
        takes = f"it takes: {', '.join(valid)}" if valid else "it takes no parameters"
        for key in recipe.parameters:
            if key not in g_fields and key not in m_fields:
                raise GradfreeError(f"Method '{cls.name}' has no parameter '{key}'; {takes}.")
        n = len(recipe.models)
        if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
            want = (
                f"exactly {cls.min_models}"
                if cls.max_models == cls.min_models
                else f"at least {cls.min_models}"
            )
            raise GradfreeError(f"Method '{cls.name}' merges {want} models, not {n}.")
        if cls.needs_base and recipe.base_model is None:
            raise GradfreeError(
                f"Method '{cls.name}' needs a base_model (its task vectors' origin)."
            )
        if not (cls.needs_base or cls.base_optional) and recipe.base_model is not None:
            raise GradfreeError(f"Method '{cls.name}' does not use a base_model; remove it.")
        if cls.needs_calibration and recipe.calibration is None:
            raise GradfreeError(f"Method '{cls.name}' needs a calibration section (its data).")
        if cls.needs_selection and recipe.selection is None:
            raise GradfreeError(f"Method '{cls.name}' needs a selection section (its metric).")
        for i, entry in enumerate(recipe.models, 1):
            for key in entry.parameters:
                if key not in m_fields:
                    allowed = ", ".join(m_fields) or "none"
                    raise GradfreeError(
                        f"Method '{cls.name}' has no per-model parameter '{key}' (model {i}); "
                        f"per-model parameters: {allowed}."
                    )
        dynamic = sorted(_dynamic_keys(recipe))
        if dynamic and not issubclass(cls, TensorwiseMethod):
            raise GradfreeError(
                f"Method '{cls.name}' merges tensors together, so its parameters cannot vary "
                f"by layer or tensor name ({', '.join(dynamic)})."
            )
        # every value a gradient or a filter can give is validated now, before any tensor
        for key in dynamic:
            for leaf in _all_leaves(recipe, key):
                cls._build(
                    recipe, lambda v, k, key=key, leaf=leaf: leaf if k == key else _first(v, k)
                )
        params, per_model = cls._build(recipe, _first)
        method = cls(params, per_model)
        method.recipe = recipe
        method.dynamic = bool(dynamic)
        method.check(recipe)
        return method

    @classmethod
    def _build(cls, recipe: MergeRecipe, pick: Any) -> tuple[BaseModel, list[BaseModel]]:
        """The validated global and per-model parameters, each value resolved by ``pick``
        (value, key) → scalar (None: the parameter's default)."""
        g_fields, m_fields = cls.Params.model_fields, cls.ModelParams.model_fields

        def resolved(items: dict[str, Any], fields: Any) -> dict[str, Any]:
            out = {k: pick(v, k) for k, v in items.items() if k in fields}
            return {k: v for k, v in out.items() if v is not None}

        try:
            params = cls.Params(**resolved(recipe.parameters, g_fields))
        except ValidationError as e:
            raise _invalid(cls.name, e, "") from None
        defaults = resolved(recipe.parameters, m_fields)
        per_model = []
        for i, entry in enumerate(recipe.models, 1):
            try:
                per_model.append(
                    cls.ModelParams(**{**defaults, **resolved(entry.parameters, m_fields)})
                )
            except ValidationError as e:
                raise _invalid(cls.name, e, f" (model {i})") from None
        return params, per_model

    def place(self, names: Sequence[str]) -> None:
        """Learn the tensor names before merging (the depth of each for gradients)."""
        from gradfree.merge.settings import num_layers

        self.layers = num_layers(names)

    def use_tensor(self, name: str) -> None:
        """Set ``params``/``model_params`` to their values for tensor ``name`` (recipes whose
        parameters vary by layer or name; a no-op otherwise)."""
        if not self.dynamic:
            return
        from gradfree.merge.settings import depth, evaluate

        t = depth(name, self.layers)
        rec = self.recipe
        key = (name if _has_filters(rec) else "", t)
        if key not in self._resolved:
            built = self._build(rec, lambda v, k: evaluate(v, name, t, k))
            self._resolved[key] = built
        self.params, self.model_params = self._resolved[key]
        self.check(rec)

    def check(self, recipe: MergeRecipe) -> None:
        """Method-specific consistency checks after validation (override when needed)."""

    def resolved_parameters(self) -> dict[str, Any]:
        return {
            "global": self.params.model_dump(mode="json"),
            "models": [p.model_dump(mode="json") for p in self.model_params],
        }

    # running ----------------------------------------------------------------------------------
    def prepare(self, ctx: MergeContext) -> None:
        """Measure what the method needs before merging tensors (default: nothing)."""

    def groups(self, names: Sequence[str]) -> list[list[str]]:
        """Tensors that are merged together (default: each on its own)."""
        return [[n] for n in names]

    def merge_group(
        self,
        names: Sequence[str],
        xs: dict[str, list[torch.Tensor]],
        base: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """Merge one group: ``xs[name]`` holds each model's float64 tensor, in recipe order."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return dict(self.stats)


class TensorwiseMethod(MergeMethod):
    """A method that merges every tensor on its own: subclasses implement ``merge_tensor``."""

    def merge_group(
        self,
        names: Sequence[str],
        xs: dict[str, list[torch.Tensor]],
        base: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            self.use_tensor(n)
            out[n] = self.merge_tensor(n, xs[n], None if base is None else base[n])
        return out

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> list[float]:
        return [float(getattr(p, "weight", 1.0)) for p in self.model_params]


def _first(value: Any, key: str) -> Any:
    from gradfree.merge.settings import leaves

    return next(iter(leaves(value, key)), None)


def _dynamic_keys(recipe: MergeRecipe) -> set[str]:
    from gradfree.merge.settings import is_dynamic

    keys = {k for k, v in recipe.parameters.items() if is_dynamic(v)}
    for e in recipe.models:
        keys |= {k for k, v in e.parameters.items() if is_dynamic(v)}
    return keys


def _all_leaves(recipe: MergeRecipe, key: str) -> list[Any]:
    from gradfree.merge.settings import leaves

    found = []
    for src in [recipe.parameters, *(e.parameters for e in recipe.models)]:
        if key in src:
            found += list(leaves(src[key], key))
    return found


def _has_filters(recipe: MergeRecipe) -> bool:
    def has(v: Any) -> bool:
        return isinstance(v, dict) or (isinstance(v, list) and any(has(e) for e in v))

    return any(
        has(v)
        for src in [recipe.parameters, *(e.parameters for e in recipe.models)]
        for v in src.values()
    )


METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add ``cls`` to :data:`METHODS` under ``cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"merge method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise GradfreeError(
            f"Unknown merge method '{name}'{hint}; methods: {', '.join(sorted(METHODS))}."
        ) from None


def list_methods() -> list[dict[str, Any]]:
    _load_builtin()
    return [METHODS[n].info() for n in sorted(METHODS)]


def _load_builtin() -> None:
    # Importing the method modules registers them; done lazily to avoid import cycles.
    from gradfree.merge import fisher, greedy, linear, regmean, sparse, spherical, stock  # noqa: F401


__all__ = [
    "METHODS",
    "MergeMethod",
    "NoParams",
    "TensorwiseMethod",
    "Weighted",
    "get_method",
    "list_methods",
    "register",
]
