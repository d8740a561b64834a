"""Read mergekit's YAML recipes as they are (issue 18 part 1).

:func:`translate` turns a mergekit mapping (it has ``merge_method``) into gradfree's own recipe
fields and lists what it did, so that a recipe means here what it means in mergekit:

* ``merge_method`` → ``method``; ``base_model`` stays; a model listed under ``models`` that is
  the base model is the base (mergekit's convention), not an input.
* ``slerp``: mergekit measures ``t`` from the base model, so the inputs become [base, other].
* task-vector methods: ``lambda`` → ``scaling``; ``normalize`` takes mergekit's default per
  method when absent (``ties`` and ``della`` true, the others false: ``dare_ties`` is *not*
  normalised there); TIES-style trims keep ``max(1, int(density·n))`` entries (the recipe's
  ``dialect: mergekit``); ``rescale`` keeps its meaning for DARE/DELLA (survivors divided by
  their keep probability here, mergekit matches the L1 norm instead: a documented difference);
  ``int8_mask`` is accepted and has no effect (a memory saving of mergekit's masks; masks are
  booleans here).
* ``dtype`` is mergekit's compute dtype; gradfree always computes in float64 (a documented
  difference), so it only sets the output dtype when ``out_dtype`` is absent.
* ``tokenizer_source``: ``base``, a model of the recipe, or ``union`` (the inputs' tokenizers
  must be identical here, so the union is that tokenizer); ``tokenizer: {source: ...}``;
  ``chat_template`` (``auto`` keeps the template, any Jinja text replaces it).
* ``tokenizer: {tokens: {TOKEN: {source: MODEL | {kind: zero}}}}``: that token's embedding
  and head rows are taken from one model (or zeroed) instead of merged.
* per-layer gradients and ``filter:`` conditions pass through unchanged
  (:mod:`gradfree.merge.settings` applies mergekit's rules).

* ``slices:`` (frankenmerges through ``passthrough``, or layer ranges merged by any
  tensor-wise method): :mod:`gradfree.merge.slices`.
"""

from __future__ import annotations

from typing import Any

from gradfree.base.errors import GradfreeError

# mergekit's default of ``normalize`` per task-vector method (its generalized task arithmetic)
NORMALIZE = {
    "task_arithmetic": False,
    "ties": True,
    "dare_ties": False,
    "dare_linear": False,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": False,
}
# the named templates read here (the ChatML layout; other names: pass the Jinja text itself)
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
TOP_LEVEL = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "max_shard_size",
}


def is_mergekit(data: dict[str, Any]) -> bool:
    return "merge_method" in data


def _spec(model: Any) -> str:
    if isinstance(model, str):
        return model
    if isinstance(model, dict) and isinstance(model.get("model"), str):
        return str(model["model"])
    raise GradfreeError("Each mergekit model entry needs a 'model' (a name or a folder).")


def translate(data: dict[str, Any]) -> dict[str, Any]:
    """The gradfree recipe fields of a mergekit recipe, with ``translation`` listing every
    change of meaning (recorded in the output)."""
    if "method" in data:
        raise GradfreeError(
            "The recipe mixes gradfree's 'method' with mergekit's 'merge_method'; use one."
        )
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise GradfreeError(
            f"Unknown mergekit recipe field '{unknown[0]}'; fields read: "
            f"{', '.join(sorted(TOP_LEVEL))}."
        )
    method = str(data["merge_method"])
    notes: list[str] = ["read as a mergekit recipe"]
    base = data.get("base_model")
    base = None if base is None else _spec(base)
    models = []
    for m in data.get("models") or []:
        params = {} if isinstance(m, str) else dict(m.get("parameters") or {})
        entry = {"model": _spec(m), "parameters": params}
        if base is not None and entry["model"] == base:
            notes.append(f"{base} is listed under models and is the base model")
            continue
        models.append(entry)
    params = dict(data.get("parameters") or {})
    out: dict[str, Any] = {"dialect": "mergekit"}
    if data.get("slices") is not None:
        if data.get("models"):
            raise GradfreeError("A mergekit recipe gives either models or slices, not both.")
        out["slices"] = _slices(data["slices"], base, method)
        notes.append("slices: stacked layer ranges, embeddings from the first, head from the last")
    if method == "slerp" and "slices" in out:
        if base is None:
            raise GradfreeError("mergekit's slerp needs a base_model: t is measured from it.")
        base = None  # each slice's sources are [base, other] (see _slices)
    elif method == "slerp":
        if base is None:
            raise GradfreeError("mergekit's slerp needs a base_model: t is measured from it.")
        models = [{"model": base, "parameters": {}}, *models]
        base = None
        notes.append("slerp: inputs [base, other], t = 0 is the base model as in mergekit")
    if method in NORMALIZE:
        if "lambda" in params:
            params["scaling"] = params.pop("lambda")
        if params.pop("int8_mask", None) is not None:
            notes.append("int8_mask has no effect here (masks are booleans)")
        params.setdefault("normalize", NORMALIZE[method])
        if method == "task_arithmetic" and params["normalize"] is False:
            params.pop("normalize")  # gradfree's task arithmetic sums, as mergekit's
        if params.get("rescale") and method.startswith("breadcrumbs"):
            raise GradfreeError(
                f"mergekit's 'rescale' for {method} (an L1-norm rescale) is not supported here."
            )
        if "rescale" in params and not method.startswith(("dare", "della")):
            params.pop("rescale")
    out |= {"method": method, "models": models, "parameters": params}
    if base is not None:
        out["base_model"] = base
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    if out_dtype is not None or dtype is not None:
        out["dtype"] = out_dtype if out_dtype is not None else dtype
        if dtype is not None:
            notes.append(f"compute dtype {dtype} read as float64 (gradfree computes in float64)")
    if data.get("max_shard_size") is not None:
        out["max_shard_size"] = data["max_shard_size"]
    known = [str(m["model"]) for m in models] + ([base] if base else [])
    known += [str(s["model"]) for sl in out.get("slices", []) for s in sl["sources"]]
    out |= _tokenizer(data, known, notes)
    out["translation"] = notes
    return out


def _slices(raw: Any, base: str | None, method: str) -> list[dict[str, Any]]:
    """mergekit's slices as gradfree's (for slerp the base's source first in every slice)."""
    if not isinstance(raw, list) or not raw:
        raise GradfreeError("mergekit 'slices:' must be a non-empty list of {sources: [...]}.")
    out = []
    for i, sl in enumerate(raw, 1):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            raise GradfreeError(f"Slice {i} needs a list of sources (model, layer_range).")
        srcs = []
        for src in sl["sources"]:
            if not isinstance(src, dict) or "layer_range" not in src:
                raise GradfreeError(f"Every source of slice {i} needs a model and a layer_range.")
            srcs.append(
                {
                    "model": _spec(src),
                    "layer_range": src["layer_range"],
                    "parameters": dict(src.get("parameters") or {}),
                }
            )
        if method == "slerp":
            srcs.sort(key=lambda s: s["model"] != base)
        out.append({"sources": srcs})
    return out


def _tokenizer(data: dict[str, Any], known: list[str], notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    source = data.get("tokenizer_source")
    block = data.get("tokenizer")
    if block is not None:
        if not isinstance(block, dict) or set(block) - {"source", "tokens"}:
            raise GradfreeError(
                "A mergekit tokenizer block is read for 'source' and 'tokens' only "
                "(pad_to_multiple_of and other keys are not supported)."
            )
        source = block.get("source", source)
        if block.get("tokens"):
            out["token_sources"] = _token_sources(block["tokens"], known, notes)
    if source == "union":
        notes.append("tokenizer_source union: the inputs' tokenizers must be identical here")
        source = None
    if source is not None:
        if source != "base" and source not in known:
            raise GradfreeError(
                f"The tokenizer source '{source}' is not a model of the recipe (nor 'base' or "
                "'union')."
            )
        out["tokenizer_source"] = source
    template = data.get("chat_template")
    if template is not None and template != "auto":
        template = CHAT_TEMPLATES.get(str(template), template)
        if "{%" not in str(template) and "{{" not in str(template):
            raise GradfreeError(
                f"The chat template '{template}' is neither 'auto', a bundled name "
                f"({', '.join(CHAT_TEMPLATES)}) nor a Jinja template."
            )
        out["chat_template"] = str(template)
    return out


def _token_sources(tokens: Any, known: list[str], notes: list[str]) -> dict[str, str]:
    """mergekit's per-token embedding sources: token → a model of the recipe, or "zero"."""
    if not isinstance(tokens, dict):
        raise GradfreeError("The tokenizer block's 'tokens' must map tokens to their sources.")
    out = {}
    for tok, spec in tokens.items():
        src = spec.get("source") if isinstance(spec, dict) else None
        if isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero":
                src = "zero"
            elif kind == "model_token" and src.get("token", tok) == tok:
                src = src.get("model")
            else:
                raise GradfreeError(
                    f"The source of token '{tok}' must be a model, zero, or the same token of a "
                    "model (tokenizers are identical here)."
                )
        if src != "zero" and src not in known:
            raise GradfreeError(f"The source of token '{tok}' is not a model of the recipe.")
        if isinstance(spec, dict) and spec.get("force") is not None:
            notes.append(f"token {tok}: force has no effect (one vocabulary)")
        out[str(tok)] = str(src)
    return out


__all__ = ["NORMALIZE", "is_mergekit", "translate"]
