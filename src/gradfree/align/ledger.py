"""Bookkeeping of an alignment run (seed 001 §16.3): the run manifest and the rotation ledger.

``rotations/<run_id>/layer_<i>.json`` holds, for student block i (and ``layer_<L>`` for the final
normed states): k, stage, the singular values of its Procrustes cross-moment, the permutation
maps, the fit cosine and residual RMS ratio before/after, the RMS of both streams, and for every
stored matrix its sha256 and max |RᵀR − I|. The matrices themselves (the applied basis and the
layer's own solution) are in ``layer_<i>.safetensors`` so that :func:`check_ledger` can recompute
every orthogonality statistic from the stored numbers, not from the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.io import read_json, sha256_text, write_json_atomic
from gradfree.surgery.ledger import orthogonality, rotation_hash


def write_ledger(root: Path, run_id: str, plan: Any, applied: list[torch.Tensor] | None) -> Path:
    """Write one JSON + safetensors pair per block (and the final states) under
    ``root/rotations/<run_id>/``; ``applied`` are the bases folded into the model (None: none)."""
    from gradfree.capture.store import save_shard

    folder = root / "rotations" / run_id
    n = len(plan.q_layer)
    for idx, diag in enumerate(plan.layers):
        mats = {"layer_solution": plan.q_layer[idx] if idx < n else plan.q}
        if applied is not None:
            mats["applied"] = applied[idx] if idx < n else applied[-1]
        j = idx if idx < n else None
        perms: dict[str, Any] = {}
        if j is not None and j in plan.head_perms:
            g, h = plan.head_perms[j]
            perms["kv_groups"], perms["heads"] = g.tolist(), h.tolist()
        if j is not None and j in plan.neuron_perms:
            perms["neurons"] = plan.neuron_perms[j].tolist()
        entry = {
            "layer": idx,
            **diag,
            "k": plan.k,
            "singular_values": plan.singular_values.get(
                f"layer_{idx}", plan.singular_values["global"]
            ),
            "permutations": perms,
            "permutation_scores": plan.perm_scores.get(j, {}) if j is not None else {},
            "matrices": {
                name: {"sha256": rotation_hash(m), "shape": list(m.shape), **orthogonality(m)}
                for name, m in mats.items()
            },
        }
        save_shard(
            folder / f"layer_{idx}.safetensors",
            {k: v.to(torch.float64).clone() for k, v in mats.items()},
        )
        write_json_atomic(folder / f"layer_{idx}.json", entry)
    return folder


def manifest(
    run_id: str,
    prompts: list[str],
    teacher: Any,
    student: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run manifest: run id, sha256 of every prompt, tokenizer version, model hashes."""
    import transformers

    return {
        "run_id": run_id,
        "prompts": [{"index": i, "sha256": sha256_text(p)} for i, p in enumerate(prompts)],
        "tokenizer": {
            "sha256": student.fingerprint.get("tokenizer_sha256"),
            "class": type(student.tokenizer).__name__,
            "transformers": transformers.__version__,
        },
        "teacher": {"name": teacher.name, "fingerprint": teacher.fingerprint},
        "student": {"name": student.name, "fingerprint": student.fingerprint},
        **(extra or {}),
    }


def _ledger_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise GradfreeError(f"The ledger folder {folder} does not exist.")
    files = sorted(folder.glob("layer_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        sub = (
            sorted(p for p in (folder / "rotations").glob("*") if p.is_dir())
            if (folder / "rotations").is_dir()
            else []
        )
        if len(sub) == 1:
            return _ledger_files(sub[0])
        raise GradfreeError(f"{folder} holds no layer_<i>.json ledger files.")
    return files


def check_ledger(folder: Path, tol: float = 1e-5) -> dict[str, Any]:
    """Re-read a ledger, recompute orthogonality from the stored matrices, compare hashes."""
    from gradfree.capture.store import read_shard

    rows = []
    for path in _ledger_files(folder):
        entry = read_json(path, "ledger file")
        tensors_path = path.with_suffix(".safetensors")
        if not tensors_path.is_file():
            raise GradfreeError(
                f"The ledger file {path.name} has no matrices ({tensors_path.name})."
            )
        mats = read_shard(tensors_path)
        row: dict[str, Any] = {"layer": entry["layer"], "name": entry.get("name")}
        for name, recorded in entry["matrices"].items():
            if name not in mats:
                raise GradfreeError(f"{tensors_path.name} lacks the matrix '{name}' of its ledger.")
            m = mats[name]
            stats = orthogonality(m)
            row[name] = {
                **stats,
                "hash_ok": rotation_hash(m) == recorded["sha256"],
                "orthogonal": max(stats.values()) <= tol,
            }
        for key in (
            "cosine_identity",
            "cosine_global",
            "cosine_refined",
            "residual_identity",
            "residual_global",
        ):
            row[key] = entry.get(key)
        rows.append(row)
    ok = all(
        v["orthogonal"] and v["hash_ok"] for r in rows for v in r.values() if isinstance(v, dict)
    )
    return {"folder": str(folder), "tolerance": tol, "layers": rows, "ok": ok}


def plot_check(result: dict[str, Any], out: Path) -> list[Path]:
    """Per-layer orthogonality errors and fit cosines/residuals as PNGs in ``out``."""
    from gradfree.base.plots import line_plot

    rows = result["layers"]
    x = [r["layer"] for r in rows]
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
    for name in ("applied", "layer_solution"):
        if all(name in r for r in rows):
            series[f"{name} max|RᵀR−I|"] = (
                x,
                [max(r[name]["max_abs_rtr_minus_i"], 1e-18) for r in rows],
            )
    paths = [
        line_plot(
            series,
            out / "orthogonality.png",
            title="orthogonality error per layer",
            xlabel="layer",
            ylabel="max |RᵀR − I|",
            logy=True,
        )
    ]
    fit: dict[str, tuple[Sequence[float], Sequence[float]]] = {
        k: (x, [r[k] if r[k] is not None else float("nan") for r in rows])
        for k in (
            "cosine_identity",
            "cosine_global",
            "cosine_refined",
            "residual_identity",
            "residual_global",
        )
    }
    paths.append(
        line_plot(
            fit,
            out / "fit.png",
            title="fit to the teacher's principal coordinates",
            xlabel="layer",
            ylabel="cosine / residual RMS ratio",
        )
    )
    return paths
