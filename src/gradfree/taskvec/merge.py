"""Merge task vectors (LoRA adapters or fine-tuned checkpoints) into a plain checkpoint with the
merge toolkit's own methods, and record what went in.

The methods are those of ``gradfree merge`` (task arithmetic, TIES, DARE-TIES, DARE-linear),
configured from the same recipe fields and run tensor by tensor on base + ΔWᵢ in float64; a
tensor no task changes is the base's, byte for byte. Nothing is materialised per task: a merge of
8 adapters holds one module of each at a time.

``taskvec_merge.json`` records the method, its resolved parameters, every task (spec, label,
weight, density) and the *effective coefficients* cᵢ that unmerging should find: λ·wᵢ for
task arithmetic and DARE-linear (the merged delta is Σ cᵢ τᵢ, exactly or in expectation), and
λ·wᵢ/Σw for TIES-type merges with ``normalize`` (where all agreeing tasks are present, the merged
entry is Σ cᵢ τᵢ; only w/Σw and λ are identifiable).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradfree.base.errors import GradfreeError

FORMAT = "gradfree.taskvec-merge/1"
RECORD = "taskvec_merge.json"
METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
_SKIP = {"model.safetensors.index.json", "gradfree_model.json"}


def effective_coefficients(
    method: str, weights: Sequence[float], params: dict[str, Any]
) -> list[float]:
    """The cᵢ of the module docstring, from the resolved parameters."""
    lam = float(params.get("scaling", 1.0))
    if method in ("ties", "dare_ties") and params.get("normalize", True):
        total = float(sum(weights))
        return [lam * w / total if total else 0.0 for w in weights]
    return [lam * float(w) for w in weights]


def configure(
    method: str,
    base: str,
    labels: Sequence[str],
    weights: Sequence[float],
    densities: Sequence[float] | None,
    scaling: float,
    normalize: bool,
    seed: int,
) -> Any:
    """The merge toolkit's method ``method`` configured for these tasks (one-sentence errors)."""
    from gradfree.merge.recipe import make_recipe
    from gradfree.merge.registry import get_method

    if method not in METHODS:
        raise GradfreeError(
            f"Task vectors merge with {', '.join(METHODS)}, not {method!r} (other methods: "
            "`gradfree merge` on checkpoints)."
        )
    entries = []
    for i, label in enumerate(labels):
        p: dict[str, Any] = {"weight": float(weights[i])}
        if densities is not None:
            p["density"] = float(densities[i])
        entries.append({"model": label, "parameters": p})
    global_params: dict[str, Any] = {"scaling": scaling}
    if method in ("ties", "dare_ties"):
        global_params["normalize"] = normalize
    recipe = make_recipe(
        {
            "method": method,
            "base_model": base,
            "models": entries,
            "parameters": global_params,
            "seed": seed,
        }
    )
    return get_method(method).configure(recipe)


def merge_tensor(merger: Any, name: str, x0: Any, vectors: Sequence[Any]) -> Any:
    """One merged tensor (float64): the method on base + ΔWᵢ (the base where a task has none)."""
    device = x0.device
    xs = [x0 + v.delta(name, device) if v.has(name) else x0.clone() for v in vectors]
    return merger.merge_group([name], {name: xs}, {name: x0})[name]


def merged_delta_at(
    merger: Any,
    base: Any,
    vectors: Sequence[Any],
    mask: Any,
    device: Any = "cpu",
    out_dtypes: Sequence[str | None] = (None,),
) -> dict[str | None, Any]:
    """The merged model's delta from the base at ``mask``'s entries (flat, float64 numpy) for
    each of ``out_dtypes``, as the checkpoint :func:`merge_task_vectors` writes in that dtype
    gives it (the merged weights rounded before the base is subtracted; None: exact). Only the
    mask's modules are merged (benchmarks sweep many merges this way)."""
    import numpy as np
    import torch

    parts: dict[str | None, list[Any]] = {dt: [] for dt in out_dtypes}
    for name, idx in mask.indices.items():
        x0 = base.tensor(name, device)
        merged = merge_tensor(merger, name, x0, vectors)
        at = idx.to(device).long()
        for dt in out_dtypes:
            m = merged if dt is None else merged.to(getattr(torch, dt)).to(torch.float64)
            parts[dt].append((m.flatten()[at] - x0.flatten()[at]).cpu().numpy())
    return {dt: np.concatenate(p) for dt, p in parts.items()}


def merge_task_vectors(
    base: str,
    tasks: Sequence[str],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: str = "task_arithmetic",
    densities: Sequence[float] | None = None,
    scaling: float = 1.0,
    normalize: bool = True,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Merge ``tasks`` (adapter folders or checkpoints) into ``base`` and write ``out``; returns
    the record (also in ``out``/taskvec_merge.json)."""
    import torch

    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.merge.run import _math_device
    from gradfree.merge.tensors import ShardWriter
    from gradfree.models.load import resolve_dtype
    from gradfree.taskvec.vector import open_base, open_task_vector, unique_labels

    if not tasks:
        raise GradfreeError("A merge needs at least one task vector.")
    n = len(tasks)
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    labels = list(labels) if labels is not None else unique_labels(list(tasks))
    if len(weights) != n or len(labels) != n or (densities is not None and len(densities) != n):
        raise GradfreeError(
            f"{n} task vectors were given but {len(weights)} weights"
            + ("" if densities is None else f" and {len(densities)} densities")
            + "; give one per task."
        )
    merger = configure(method, base, labels, weights, densities, scaling, normalize, seed)
    check_new_output(Path(out), overwrite)
    math_device = _math_device(device)
    sw = Stopwatch()
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(open_base(base))
        vectors = [
            open_task_vector(s, b, stack, label) for s, label in zip(tasks, labels, strict=True)
        ]
        in_dtype = str(b.config.get("dtype") or b.config.get("torch_dtype") or "float32")
        out_dtype = dtype or (
            in_dtype if in_dtype in ("float32", "float64", "bfloat16", "float16") else "float32"
        )
        torch_out = resolve_dtype(out_dtype)
        names = b.source.names()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            writer = ShardWriter(tmp, 2048 * 2**20)
            changed = 0
            with sw.stage("merge"):
                for i, name in enumerate(names):
                    if any(v.has(name) for v in vectors):
                        y = merge_tensor(merger, name, b.tensor(name, math_device), vectors)
                        writer.add(name, y.to(torch_out))
                        changed += 1
                        del y
                    else:
                        writer.add(name, b.source.get(name).to(torch_out))
                    if (i + 1) % 50 == 0 or i + 1 == len(names):
                        say(f"merged {i + 1}/{len(names)} tensors")
                files = writer.close()
            _copy_side_files(b.folder, tmp, out_dtype, torch_out)
            resolved = merger.resolved_parameters()
            coefs = effective_coefficients(method, weights, resolved["global"])
            record = {
                "format": FORMAT,
                "method": method,
                "base": {"spec": base, "folder": str(b.folder), "model_type": b.model_type},
                "resolved_parameters": resolved,
                "seed": seed,
                "tasks": [
                    {
                        "label": v.label,
                        "spec": s,
                        "kind": v.kind,
                        "weight": weights[i],
                        "density": None if densities is None else float(densities[i]),
                        "effective_coefficient": coefs[i],
                    }
                    for i, (v, s) in enumerate(zip(vectors, tasks, strict=True))
                ],
                "output": {"dtype": out_dtype, "files": files, "bytes": writer.total_bytes},
                "tensors": {"total": len(names), "changed": changed},
                "method_summary": merger.summary(),
                "timings": sw.rows,
                "machine": machine(),
                "versions": versions(),
                "torch": torch.__version__,
            }
            write_json_atomic(tmp / RECORD, record)
            write_text_atomic(tmp / "report.md", _report(record))
    return record


def _copy_side_files(src: Path, dst: Path, out_dtype: str, torch_out: Any) -> None:
    """Config (with the output dtype), tokenizer, generation config and chat template."""
    from transformers import AutoConfig

    from gradfree.adapters import set_saved_dtype_
    from gradfree.models.fetch import quiet_transformers

    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix not in (".safetensors", ".bin") and p.name not in _SKIP:
            shutil.copy2(p, dst / p.name)
    with quiet_transformers(progress=False):
        config = AutoConfig.from_pretrained(src)
    set_saved_dtype_(config, torch_out)
    config.save_pretrained(dst)


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The merge record of a folder made by :func:`merge_task_vectors`, if any."""
    import json

    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def _report(record: dict[str, Any]) -> str:
    lines = [
        f"# Task-vector merge: {record['method']}",
        "",
        f"Base: {record['base']['spec']}. {record['tensors']['changed']} of "
        f"{record['tensors']['total']} tensors changed; output {record['output']['dtype']}.",
        "",
        "| task | kind | weight | density | effective coefficient |",
        "|---|---|---:|---:|---:|",
    ]
    for t in record["tasks"]:
        d = "" if t["density"] is None else f"{t['density']:g}"
        lines.append(
            f"| {t['label']} | {t['kind']} | {t['weight']:g} | {d} | "
            f"{t['effective_coefficient']:.4g} |"
        )
    lines += ["", "Parameters: `" + str(record["resolved_parameters"]["global"]) + "`", ""]
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "METHODS",
    "RECORD",
    "effective_coefficients",
    "merge_task_vectors",
    "read_record",
]
