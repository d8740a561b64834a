"""Run a merge recipe: resolve inputs, check shapes, prepare the method, stream tensors into a
plain Hugging Face checkpoint, and record what was done.

Order of work, so that a bad recipe fails before anything is loaded or written: validate the
recipe and the method's parameters, refuse an existing output, resolve every model (known names
or local folders with safetensors weights), check tokenizers and tensor names/shapes (headers
only), then merge inside :func:`gradfree.base.io.atomic_dir`. Tensors are read lazily and merged one
group at a time in float64 on ``device``, cast once to the output dtype, and written in shards.

The output folder holds the checkpoint (config, weights, tokenizer, generation config),
``merge_recipe.yaml`` (the resolved recipe), ``merge.json`` (method and resolved parameters,
input fingerprints, versions, timings, distances of the result to each input, method
diagnostics, optional evaluation) and ``report.md``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradfree.base.errors import GradfreeError
from gradfree.merge.context import InputModel, MergeContext
from gradfree.merge.recipe import EvalSpec, MergeRecipe, make_recipe, measure, recipe_yaml
from gradfree.merge.registry import MergeMethod, get_method
from gradfree.merge.tensors import ShardWriter, check_same_shapes, open_sources

# the tokenizer's files, copied byte for byte from the tokenizer source (as mergekit does):
# re-saving through transformers adds keys (is_local, local_files_only) the input never had
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclass
class MergeResult:
    path: Path
    record: dict[str, Any]


def resolve_input(spec: str, label: str) -> InputModel:
    """A model spec (known name or folder) → its folder; GGUF files and hub ids are refused."""
    from gradfree.models import resolve_model

    r = resolve_model(spec)
    if r.kind == "hub":
        raise GradfreeError(
            f"Model '{spec}' is neither a known model name nor a local Hugging Face folder."
        )
    if r.kind == "gguf":
        raise GradfreeError(
            f"Model '{spec}' is a GGUF file; merges read Hugging Face folders with safetensors "
            "(load and save_pretrained it first, or use the fetched known model)."
        )
    from gradfree.models.fp8 import folder_fp8_format

    if folder_fp8_format(r.source) is not None:  # merges read raw tensors: no scales applied
        raise GradfreeError(
            f"Model '{spec}' is an FP8 checkpoint; merges read dense safetensors, so save a "
            "dense copy first (gradfree.models.load_model, then save_checkpoint)."
        )
    return InputModel(spec=spec, label=label, folder=Path(r.source))


def _fingerprint(m: InputModel) -> dict[str, Any]:
    """The loader's fingerprint without loading weights (the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gradfree.models import resolve_model
    from gradfree.models.fetch import quiet_transformers
    from gradfree.models.load import fingerprint

    with quiet_transformers(progress=False):
        config = AutoConfig.from_pretrained(m.folder)
        tok = AutoTokenizer.from_pretrained(m.folder)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return fingerprint(resolve_model(str(m.folder)), meta, tok, dtype)


def _load_tokenizer(m: InputModel) -> Any:
    """The tokenizer of an input, or None when its folder holds no tokenizer files."""
    from transformers import AutoTokenizer

    from gradfree.models.fetch import quiet_transformers

    if not any((m.folder / f).is_file() for f in TOKENIZER_FILES[:-1]):
        return None
    try:
        with quiet_transformers(progress=False):
            return AutoTokenizer.from_pretrained(m.folder)
    except (OSError, ValueError) as e:
        raise GradfreeError(
            f"The tokenizer of model {m.label} in {m.folder} cannot be read ({type(e).__name__})."
        ) from None


def _check_tokenizers(models: list[InputModel], source: InputModel) -> list[Any]:
    """Every input's tokenizer (None: the folder has none, allowed unless it is the source),
    all with one vocabulary."""
    toks = [_load_tokenizer(m) for m in models]
    if toks[models.index(source)] is None:
        raise GradfreeError(
            f"Model {source.label} has no tokenizer files in {source.folder}; name another "
            "model as tokenizer_source or add them."
        )
    have = [(m, t) for m, t in zip(models, toks, strict=True) if t is not None]
    vocab = have[0][1].get_vocab()
    for m, t in have[1:]:
        if t.get_vocab() != vocab:
            raise GradfreeError(
                f"The tokenizer of model {m.label} differs from that of model {have[0][0].label}; "
                "merged weights need one tokenizer."
            )
    return toks


def _token_rows(recipe: MergeRecipe, tokenizer: Any, sources: dict[str, Any]) -> list[Any]:
    """(token id, source or None) for the recipe's ``token_sources``."""
    rows = []
    for tok, spec in recipe.token_sources.items():
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or (tid == tokenizer.unk_token_id and tok != tokenizer.unk_token):
            raise GradfreeError(f"The token '{tok}' is not in the output's vocabulary.")
        rows.append((int(tid), None if spec == "zero" else sources[spec]))
    return rows


def _tokenizer_source(
    recipe: MergeRecipe, everyone: list[InputModel], base: InputModel | None, first: InputModel
) -> InputModel:
    """The input whose tokenizer and config the output takes."""
    wanted = recipe.tokenizer_source or ("base" if base else "first")
    if wanted not in ("base", "first"):  # a model of the recipe, by its spec (mergekit's form)
        return next(m for m in everyone if m.spec == wanted)
    return base if wanted == "base" and base is not None else first


def _config_and_dtype(recipe: MergeRecipe, source: InputModel) -> tuple[Any, MergeRecipe]:
    """The source's config, and the recipe with its output dtype resolved (default: the
    source's own)."""
    from transformers import AutoConfig

    from gradfree.models.fetch import quiet_transformers

    with quiet_transformers(progress=False):
        config = AutoConfig.from_pretrained(source.folder)
    in_dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    default = in_dtype if in_dtype in ("float32", "float64", "bfloat16", "float16") else "float32"
    return config, make_recipe({**recipe.model_dump(), "dtype": recipe.dtype or default})


def _compute_dtype(recipe: MergeRecipe) -> str:
    return "float32" if recipe.dtype in ("float16", "bfloat16") else str(recipe.dtype)


def _merge_sliced(
    recipe: MergeRecipe,
    method: MergeMethod,
    out: Path,
    math_device: str,
    device: str,
    overwrite: bool,
    say: Callable[[str], None],
    keep_statistics: bool,
    save_format: str,
) -> MergeResult:
    """A recipe with ``slices``: each slot (:mod:`gradfree.merge.slices`) is read as one input."""
    from transformers import AutoConfig

    from gradfree.base.io import atomic_dir
    from gradfree.merge.slices import SlicedSource, output_config
    from gradfree.models.fetch import quiet_transformers

    pieces, base_pieces = recipe.pieces(), recipe.pieces(base=True)
    distinct = list(dict.fromkeys(p.model for row in pieces + base_pieces for p in row))
    inputs = {spec: resolve_input(spec, spec) for spec in distinct}
    base = inputs[recipe.base_model] if recipe.base_model is not None else None
    first = inputs[pieces[0][0].model]
    source = _tokenizer_source(recipe, list(inputs.values()), base, first)
    toks = _check_tokenizers(list(inputs.values()), source)
    config, recipe = _config_and_dtype(recipe, source)
    with quiet_transformers(progress=False):
        configs = {spec: AutoConfig.from_pretrained(m.folder) for spec, m in inputs.items()}
    config = output_config(config, pieces, configs)
    for m in inputs.values():
        m.fingerprint = _fingerprint(m)

    def describe(k: int, rows: list[list[Any]]) -> str:
        return " + ".join(f"{r[k].model}[{r[k].start}:{r[k].end}]" for r in rows)

    slots = [
        InputModel(describe(k, pieces), f"slot {k + 1}", first.folder)
        for k in range(len(pieces[0]))
    ]
    with open_sources([(str(m.folder), m.label) for m in inputs.values()]) as opened:
        by_spec = dict(zip(inputs, opened, strict=True))
        sources = [SlicedSource(m.label, k, pieces, by_spec) for k, m in enumerate(slots)]
        base_source = None
        base_slot = None
        if base is not None:
            base_slot = InputModel(describe(0, base_pieces), "base", base.folder)
            base_source = SlicedSource("base", 0, base_pieces, by_spec)
        names = sources[0].names()
        for src in sources[1:] + ([base_source] if base_source else []):
            for n in names:
                if src.shape(n) != sources[0].shape(n):
                    raise GradfreeError(
                        f"Tensor '{n}' has shape {list(sources[0].shape(n))} in {slots[0].spec} "
                        f"but {list(src.shape(n))} in {src.label}; the slices' sources must have "
                        "the same shapes."
                    )
        with atomic_dir(out, overwrite=overwrite) as tmp:
            ctx = MergeContext(
                recipe=recipe,
                models=slots,
                base=base_slot,
                sources=sources,  # type: ignore[arg-type]  # read like TensorSources
                base_source=base_source,  # type: ignore[arg-type]
                names=names,
                device=device,
                compute_dtype=_compute_dtype(recipe),
                work=tmp / ".statistics",
                say=say,
                token_rows=_token_rows(recipe, toks[list(inputs.values()).index(source)], by_spec),
                measurements={
                    "slice_inputs": [
                        {"spec": m.spec, "folder": str(m.folder), "fingerprint": m.fingerprint}
                        for m in inputs.values()
                    ]
                },
            )
            record = _write(
                ctx,
                method,
                tmp,
                math_device,
                config,
                toks[list(inputs.values()).index(source)],
                source,
                keep_statistics,
                save_format,
            )
    return MergeResult(out, record)


def _distill(
    recipe: MergeRecipe,
    out: str | Path,
    device: str,
    dtype: str | None,
    overwrite: bool,
    save_format: str,
) -> MergeResult:
    """A recipe naming a teacher and a student of different sizes: ``gradfree distill-head``
    with its defaults (fit on 32 tour-guide calibration blurbs, choose on the next 12)."""
    from gradfree.base.io import read_json, write_text_atomic
    from gradfree.compress.head import run_distill_head

    assert recipe.teacher is not None and recipe.student is not None
    run_distill_head(
        recipe.teacher,
        recipe.student,
        out,
        device=device,
        dtype=dtype or recipe.dtype or "float32",
        overwrite=overwrite,
        save_format=save_format,
    )
    write_text_atomic(Path(out) / "merge_recipe.yaml", recipe_yaml(recipe))
    return MergeResult(Path(out), read_json(Path(out) / "head.json", "head record"))


def _different_sizes(models: list[InputModel]) -> GradfreeError | None:
    """The sentence for inputs of one family and tokenizer but different sizes (mergekit's most
    asked-for merge): what gradfree does instead, or None when the sizes agree."""
    from transformers import AutoConfig

    from gradfree.models.fetch import quiet_transformers

    with quiet_transformers(progress=False):
        cfgs = [AutoConfig.from_pretrained(m.folder) for m in models]
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
    sizes = [tuple(getattr(c, k, None) for k in keys) for c in cfgs]
    if len(set(sizes)) == 1 or len({c.model_type for c in cfgs}) != 1:
        return None
    big = max(range(len(models)), key=lambda i: sizes[i])
    small = min(range(len(models)), key=lambda i: sizes[i])
    a, b = models[big], models[small]
    differ = ", ".join(
        f"{k} {x} vs {y}" for k, x, y in zip(keys, sizes[big], sizes[small], strict=True) if x != y
    )
    return GradfreeError(
        f"Models {a.label} and {b.label} are one family with one tokenizer but different sizes "
        f"({differ}), which weight merging cannot combine; move the larger one's knowledge into "
        f"the smaller with `gradfree distill-head --teacher {a.spec} --student {b.spec}` (or "
        "a recipe 'method: distill_head' with teacher and student; the one such transfer "
        "measured to help, docs/RESULTS.md) or `gradfree compress`."
    )


def _model_card(record: dict[str, Any], recipe: Any) -> str:
    """README.md of the output: what was merged, how, and from what (as mergekit writes one)."""
    m = record["method"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, gradfree]",
        "---",
        "",
        f"# Merged with gradfree: {m['name']}",
        "",
        f"{m['description']} ({m['reference_url']}).",
        "",
        "## Inputs",
        "",
        *(
            f"- {i['role']}: `{i['spec']}`"
            + (f" (sha256 {i['fingerprint'].get('sha256', '')[:12]})" if i["fingerprint"] else "")
            for i in record["inputs"]
        ),
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml(recipe).rstrip(),
        "```",
        "",
        f"Output dtype {record['output']['dtype']}, {record['output']['tensors']} tensors; "
        f"computed in float64 by gradfree {record['versions'].get('gradfree', '')}. "
        "Provenance and timings: `merge.json`.",
        "",
    ]
    return "\n".join(lines)


def _math_device(device: str) -> str:
    from gradfree.models.load import _check_device

    dev = _check_device(device)
    return "cpu" if dev.type == "mps" else str(dev)  # MPS has no float64


def _distance_sums(out: Any, xs: list[Any]) -> list[tuple[float, float]]:
    return [(float(((out - x) ** 2).sum()), float((x**2).sum())) for x in xs]


def _evaluate(folder: Path, spec: EvalSpec, device: str, dtype: str) -> dict[str, Any]:
    from gradfree.models import load_model
    from gradfree.texts.corpora import load_corpus

    docs = load_corpus(spec.corpus, split=spec.split, limit=spec.limit)
    loaded = load_model(str(folder), device=device, dtype=dtype)
    teacher = load_model(spec.teacher, device=device, dtype=dtype) if spec.teacher else None
    return measure(loaded.model, loaded.tokenizer, docs, spec, teacher, device)


def merge(
    recipe: MergeRecipe | dict[str, Any],
    out: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    overwrite: bool = False,
    keep_statistics: bool = False,
    say: Callable[[str], None] = print,
    save_format: str = "safetensors",
) -> MergeResult:
    """Run ``recipe`` and write the merged checkpoint to ``out`` (see the module docstring).

    ``dtype`` overrides the recipe's output dtype; ``device`` is where tensors are merged and
    where models run for methods that need forward/backward passes. ``keep_statistics`` keeps
    the Fisher / Gram statistics in ``out/statistics``. ``save_format`` "fp8" writes the
    checkpoint in Qwen's block-FP8 format (:mod:`gradfree.models.fp8`)."""

    from gradfree.base.io import atomic_dir, check_new_output
    from gradfree.models.fp8 import check_weight_format

    recipe = make_recipe(recipe)
    check_weight_format(save_format)
    if recipe.method == "distill_head":
        return _distill(recipe, out, device, dtype, overwrite, save_format)
    if dtype is not None:
        recipe = make_recipe({**recipe.model_dump(), "dtype": dtype})
    method = get_method(recipe.method).configure(recipe)
    out = check_new_output(Path(out), overwrite)
    math_device = _math_device(device)
    if recipe.slices is not None:
        return _merge_sliced(
            recipe, method, out, math_device, device, overwrite, say, keep_statistics, save_format
        )
    specs = [e.model for e in recipe.models]
    labels = [s if specs.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(specs)]
    models = [resolve_input(s, label) for s, label in zip(specs, labels, strict=True)]
    base = None
    if recipe.base_model is not None:
        label = recipe.base_model if recipe.base_model not in specs else f"{recipe.base_model}#base"
        base = resolve_input(recipe.base_model, label)
    everyone = models + ([base] if base is not None else [])
    source = _tokenizer_source(recipe, everyone, base, models[0])
    toks = _check_tokenizers(everyone, source)
    config, recipe = _config_and_dtype(recipe, source)
    with open_sources([(str(m.folder), m.label) for m in everyone]) as sources:
        try:
            names = check_same_shapes(sources)  # headers only, before anything is written
        except GradfreeError as e:
            raise _different_sizes(everyone) or e from None
        for m in everyone:
            m.fingerprint = _fingerprint(m)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            ctx = MergeContext(
                recipe=recipe,
                models=models,
                base=base,
                sources=sources[: len(models)],
                base_source=sources[-1] if base is not None else None,
                names=names,
                device=device,
                compute_dtype=_compute_dtype(recipe),
                work=tmp / ".statistics",
                say=say,
                token_rows=_token_rows(
                    recipe,
                    toks[everyone.index(source)],
                    dict(zip([m.spec for m in everyone], sources, strict=True)),
                ),
            )
            record = _write(
                ctx,
                method,
                tmp,
                math_device,
                config,
                toks[everyone.index(source)],
                source,
                keep_statistics,
                save_format,
            )
    return MergeResult(out, record)


def _write(
    ctx: MergeContext,
    method: MergeMethod,
    tmp: Path,
    math_device: str,
    config: Any,
    tokenizer: Any,
    source: InputModel,
    keep_statistics: bool,
    save_format: str = "safetensors",
) -> dict[str, Any]:
    """Prepare, stream every tensor group into ``tmp``, save config/tokenizer and the record."""
    from transformers import GenerationConfig

    from gradfree.adapters import set_saved_dtype_
    from gradfree.base.io import write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.models.load import resolve_dtype

    recipe = ctx.recipe
    torch_out = resolve_dtype(str(recipe.dtype))
    everyone = ctx.models + ([ctx.base] if ctx.base is not None else [])
    ctx.work.mkdir()
    sw = Stopwatch()
    with sw.stage("prepare"):
        method.prepare(ctx)
    with sw.stage("merge"):
        writer, files, dist = _stream(ctx, method, tmp, math_device, torch_out, len(everyone))
    if keep_statistics:
        ctx.work.rename(tmp / "statistics")
    else:
        shutil.rmtree(ctx.work)
    set_saved_dtype_(config, torch_out)
    config.save_pretrained(tmp)
    if save_format == "fp8":
        from gradfree.models.fp8 import save_fp8_

        save_fp8_(None, tmp)
    copied = [f for f in TOKENIZER_FILES if (source.folder / f).is_file()]
    if copied:
        for f in copied:
            shutil.copyfile(source.folder / f, tmp / f)
    else:  # a tokenizer without files of its own (rare): let transformers write it
        tokenizer.save_pretrained(tmp)
    if ctx.recipe.chat_template is not None:  # the one edit: the recipe's chat template
        (tmp / "chat_template.jinja").write_text(ctx.recipe.chat_template)
    with contextlib.suppress(OSError):  # the input may have no generation config
        GenerationConfig.from_pretrained(source.folder).save_pretrained(tmp)
    evaluation = None
    if recipe.evaluate is not None:
        with sw.stage("evaluate"):
            spec, dev, dt = recipe.evaluate, ctx.device, ctx.compute_dtype
            evaluation = {"merged": _evaluate(tmp, spec, dev, dt)}
            for m in everyone:
                evaluation[m.label] = _evaluate(m.folder, spec, dev, dt)
    record = {
        "format": "gradfree.merge/1",
        "method": method.info(),
        "resolved_parameters": method.resolved_parameters(),
        "recipe": recipe.model_dump(mode="json"),
        "inputs": [
            {
                "role": "base" if m is ctx.base else "model",
                "label": m.label,
                "spec": m.spec,
                "folder": str(m.folder),
                "fingerprint": m.fingerprint,
            }
            for m in everyone
        ],
        "output": {
            "dtype": recipe.dtype,
            "save_format": save_format,
            "files": files,
            "tensors": len(ctx.names),
            "bytes": writer.total_bytes,
            "config_and_tokenizer_from": source.label,
        },
        "relative_distance_to_inputs": {
            m.label: (d2 / x2) ** 0.5 if x2 > 0 else None
            for m, (d2, x2) in zip(everyone, dist, strict=True)
        },
        "method_summary": method.summary(),
        **({"slice_inputs": ctx.measurements["slice_inputs"]} if ctx.recipe.slices else {}),
        "evaluation": evaluation,
        "device": ctx.device,
        "timings": sw.rows,
        "machine": machine(),
        "versions": versions(),
    }
    write_text_atomic(tmp / "merge_recipe.yaml", recipe_yaml(recipe))
    write_json_atomic(tmp / "merge.json", record)
    write_text_atomic(tmp / "README.md", _model_card(record, recipe))
    write_text_atomic(tmp / "report.md", render_report(record, sw.table()))
    return record


def _stream(
    ctx: MergeContext,
    method: MergeMethod,
    tmp: Path,
    math_device: str,
    torch_out: Any,
    n_inputs: int,
) -> tuple[ShardWriter, list[str], list[list[float]]]:
    """Merge tensor group by group in float64 and write the shards; also the sums of each
    input's squared distance to the result (for ``relative_distance_to_inputs``)."""
    import torch

    dist = [[0.0, 0.0] for _ in range(n_inputs)]
    writer = ShardWriter(tmp, ctx.recipe.max_shard_mb * 2**20)
    method.place(ctx.names)
    groups = method.groups(ctx.names)
    for gi, group in enumerate(groups):
        xs = {n: [s.get(n).to(math_device, torch.float64) for s in ctx.sources] for n in group}
        bx = None
        if ctx.base_source is not None:
            bx = {n: ctx.base_source.get(n).to(math_device, torch.float64) for n in group}
        merged = method.merge_group(group, xs, bx)
        for n in group:
            if ctx.token_rows and ("embed_tokens" in n or n.startswith("lm_head")):
                merged[n] = merged[n].clone()  # never an input's own tensor
                for row, src in ctx.token_rows:  # the recipe's per-token sources, not merged
                    merged[n][row] = 0.0 if src is None else src.get(n)[row].to(torch.float64)
            y = merged[n].to(torch_out)
            refs = xs[n] + ([bx[n]] if bx is not None else [])
            for k, (d2, x2) in enumerate(_distance_sums(y.to(torch.float64), refs)):
                dist[k][0] += d2
                dist[k][1] += x2
            writer.add(n, y)
        del xs, bx, merged
        if (gi + 1) % 100 == 0:
            ctx.say(f"merged {gi + 1}/{len(groups)} tensor groups")
    files = writer.close()
    return writer, files, dist


def render_report(record: dict[str, Any], timings: str) -> str:
    m = record["method"]
    lines = [
        f"# Merge: {m['name']}",
        "",
        f"{m['description']} ({m['reference_url']}).",
        "",
        "## Inputs",
        "",
        "| role | model | folder | weights sha256 (first file) |",
        "|---|---|---|---|",
    ]
    for inp in record["inputs"]:
        w = inp["fingerprint"].get("weights_sha256", {})
        first = next(iter(w.values()), "")[:16]
        lines.append(f"| {inp['role']} | {inp['label']} | {inp['folder']} | {first} |")
    lines += ["", "## Parameters", "", "```json", _json(record["resolved_parameters"]), "```", ""]
    lines += ["## Result", "", "| input | ‖merged − input‖ / ‖input‖ |", "|---|---:|"]
    for label, d in record["relative_distance_to_inputs"].items():
        lines.append(f"| {label} | {'n/a' if d is None else f'{d:.4g}'} |")
    o = record["output"]
    lines += [
        "",
        f"{o['tensors']} tensors, {o['bytes'] / 1e6:.1f} MB in {o['dtype']}: "
        f"{', '.join(o['files'])}.",
        "",
    ]
    if record["method_summary"]:
        lines += [
            "## Method diagnostics",
            "",
            "```json",
            _json(record["method_summary"]),
            "```",
            "",
        ]
    if record["evaluation"]:
        lines += ["## Evaluation", "", "| model | perplexity | tokens | KL to teacher |"]
        lines += ["|---|---:|---:|---:|"]
        for label, e in record["evaluation"].items():
            kl = e.get("kl_mean")
            kl_text = "" if kl is None else f"{kl:.4f}"
            lines.append(f"| {label} | {e['ppl']:.3f} | {e['tokens']} | {kl_text} |")
        lines.append("")
    lines += ["## Timings", "", timings, ""]
    return "\n".join(lines)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


__all__ = ["MergeResult", "merge", "render_report", "resolve_input"]
