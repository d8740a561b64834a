"""Unmerge: recover which tasks a merged model was made of, and with what weights, from its
masked delta from the base (the UNMERGE idea of seed 003, Phase 4).

The dictionary D has one column per candidate task: its task vector at the mask's entries; the
target y is the merged model's delta at the same entries. The linear solvers of
:mod:`gradfree.taskvec.solve` (NNLS, OMP, LASSO, ridge) fit y ≈ D c. TIES-type merges are not
linear in the task vectors (each task is trimmed to its largest entries, then signs are elected
and agreeing entries averaged), so a sign-aware solve fits that model instead, on the dictionary
trimmed as TIES trims (each task's top-density entries of every module, by rank over the whole
module, which the mask alone cannot tell); the density comes from the merge's record, from
``density``, or is chosen on a grid by the residual. A task that is not in the dictionary can only
show as residual ‖y − D c‖/‖y‖.

When the merged folder holds the record of :func:`gradfree.taskvec.merge.merge_task_vectors`,
the report scores each solver against the truth: support precision / recall / F1 (support =
weight above ``threshold``) and coefficient errors against the record's effective coefficients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import numpy as np

    from gradfree.taskvec.mask import Mask
    from gradfree.taskvec.vector import BaseCheckpoint, TaskVector

FORMAT = "gradfree.taskvec-unmerge/1"
DENSITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TIES_SOLVER = "ties"


def trim_ranks(
    vector: TaskVector, mask: Mask, device: Any = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """For every kept entry of ``mask``: its rank by |τ| within its whole module (0 = largest,
    ties by position, as TIES' trim sorts) and the module's size; flat, in mask order."""
    import numpy as np
    import torch

    ranks, sizes = [], []
    for name, idx in mask.indices.items():
        n = 1
        for d in mask.shapes[name]:
            n *= d
        if vector.has(name):
            order = torch.sort(
                vector.delta(name, device).abs().flatten(), descending=True, stable=True
            ).indices
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=order.device)
            ranks.append(inv[idx.to(order.device).long()].cpu().numpy())
        else:
            ranks.append(np.full(idx.numel(), n, dtype=np.int64))  # never kept
        sizes.append(np.full(idx.numel(), n, dtype=np.int64))
    if not ranks:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ranks), np.concatenate(sizes)


def trimmed(D: np.ndarray, ranks: np.ndarray, sizes: np.ndarray, density: float) -> np.ndarray:
    """D with each task's entries outside its top ``round(density · module size)`` set to 0."""
    import numpy as np

    keep = ranks < np.round(density * sizes)[:, None]
    return np.where(keep, D, 0.0)


def score(
    rec: Any, labels: Sequence[str], truth: dict[str, float] | None, threshold: float
) -> dict[str, Any]:
    """A recovery as JSON, scored against ``truth`` (label → coefficient) when known."""
    import numpy as np

    from gradfree.taskvec import solve

    out = rec.to_json(list(labels))
    if truth is None:
        return out
    true = np.array([truth.get(lab, 0.0) for lab in labels])
    out.update(solve.support_metrics(true, rec.weights, threshold))
    out["coef_error"] = solve.coef_error(true, rec.weights)
    absent = [i for i, lab in enumerate(labels) if lab not in truth]
    out["largest_absent_weight"] = float(max((rec.weights[i] for i in absent), default=0.0))
    return out


def solve_all(
    D: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    *,
    solvers: Sequence[str],
    truth: dict[str, float] | None,
    threshold: float,
    ties: tuple[np.ndarray, np.ndarray] | None = None,
    density: float | None = None,
    normalize: bool = True,
) -> dict[str, Any]:
    """Every solver on (D, y), plus the sign-aware TIES solve when trim ranks are given."""
    from gradfree.taskvec import solve

    results: dict[str, Any] = {}
    for name in solvers:
        rec = solve.recover(D, y, name, threshold=threshold)
        results[name] = score(rec, labels, truth, threshold)
    if ties is not None:
        ranks, sizes = ties
        grid = [density] if density is not None else list(DENSITY_GRID)
        curve = {}
        best = None
        for d in grid:
            rec = solve.recover_ties(
                trimmed(D, ranks, sizes, d), y, normalize=normalize, threshold=threshold
            )
            lam = float(rec.params.get("scaling", 1.0))
            if normalize:
                rec.weights = rec.weights * lam  # effective coefficients λ·w/Σw
            curve[f"{d:g}"] = rec.residual
            if best is None or rec.residual < best[1].residual:
                best = (d, rec)
        assert best is not None
        out = score(best[1], labels, truth, threshold)
        out["density"] = best[0]
        out["density_from"] = "given" if density is not None else "grid (lowest residual)"
        out["residual_by_density"] = curve
        results[TIES_SOLVER] = out
    return results


def _truth(
    record: dict[str, Any] | None, labels: Sequence[str], specs: Sequence[str]
) -> tuple[dict[str, float] | None, list[str]]:
    """label → effective coefficient of the tasks in the dictionary, and labels of merged tasks
    that are not in it (matched by resolved path or by label)."""
    if record is None:
        return None, []
    by_path = {str(Path(s).resolve()): lab for s, lab in zip(specs, labels, strict=True)}
    truth: dict[str, float] = {}
    missing = []
    for t in record["tasks"]:
        lab = by_path.get(str(Path(t["spec"]).resolve())) or (
            t["label"] if t["label"] in labels else None
        )
        if lab is None:
            missing.append(t["label"])
        else:
            truth[lab] = truth.get(lab, 0.0) + float(t["effective_coefficient"])
    return truth, missing


def _column(
    spec: str,
    base: BaseCheckpoint,
    mask: Mask,
    stack: contextlib.ExitStack,
    label: str,
    device: Any,
) -> tuple[np.ndarray, TaskVector | None]:
    from gradfree.taskvec.compress import compress, is_compressed, load_compressed
    from gradfree.taskvec.vector import open_task_vector

    if is_compressed(spec):
        return load_compressed(spec).flat(mask), None
    v = open_task_vector(spec, base, stack, label)
    return compress(v, mask, dtype="float64", device=device).flat(mask), v


def unmerge(
    base: str,
    merged: str,
    dictionary: Sequence[str],
    mask: str | Path | Mask,
    out: str | Path,
    *,
    solvers: Sequence[str] | None = None,
    threshold: float = 0.05,
    density: float | None = None,
    sign_aware: bool = True,
    labels: Sequence[str] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Recover the tasks of ``merged`` from ``dictionary`` at ``mask``; write ``out``/unmerge.json
    and report.md; return the record."""
    import numpy as np

    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.taskvec import solve
    from gradfree.taskvec.mask import load_mask
    from gradfree.taskvec.merge import read_record
    from gradfree.taskvec.vector import open_base, unique_labels

    solvers = list(solve.SOLVERS if solvers is None else solvers)
    for s in solvers:
        if s not in solve.SOLVERS:
            raise GradfreeError(f"Unknown solver {s!r}; choose from {', '.join(solve.SOLVERS)}.")
    if not dictionary:
        raise GradfreeError("Unmerging needs a dictionary of at least one task vector.")
    if density is not None and not 0.0 < density <= 1.0:
        raise GradfreeError(f"The TIES density must be in (0, 1], not {density}.")
    labels = list(labels) if labels is not None else unique_labels(list(dictionary))
    out = check_new_output(Path(out), overwrite)
    m = mask if not isinstance(mask, str | Path) else load_mask(mask)
    sw = Stopwatch()
    record_in = read_record(merged) if Path(merged).is_dir() else None
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(open_base(base))
        for name, shape in m.shapes.items():
            if tuple(b.shapes.get(name, ())) != tuple(shape):
                raise GradfreeError(
                    f"The mask covers '{name}' with shape {list(shape)}, which base model {base} "
                    "does not have; it was made for another model."
                )
        with sw.stage("dictionary"):
            cols, vectors = [], []
            for i, (spec, lab) in enumerate(zip(dictionary, labels, strict=True)):
                col, v = _column(spec, b, m, stack, lab, device)
                cols.append(col)
                vectors.append(v)
                say(f"dictionary {i + 1}/{len(dictionary)}: {lab}")
            D = np.stack(cols, axis=1)
        with sw.stage("target"):
            y, _ = _column(merged, b, m, stack, "merged", device)
        ties = None
        note = None
        if sign_aware:
            if any(v is None for v in vectors):
                note = (
                    "the sign-aware solve needs full task vectors (adapters or checkpoints), "
                    "not compressed files"
                )
            else:
                with sw.stage("trim ranks"):
                    parts = [trim_ranks(v, m, device) for v in vectors if v is not None]
                    ranks = np.stack([p[0] for p in parts], axis=1)
                    ties = (ranks, parts[0][1])
        truth, missing = _truth(record_in, labels, list(dictionary))
        rec_density = density
        normalize = True
        if record_in is not None:
            g = record_in["resolved_parameters"]["global"]
            normalize = bool(g.get("normalize", True))
            ds = [t["density"] for t in record_in["tasks"] if t["density"] is not None]
            if rec_density is None and record_in["method"] == "ties" and ds and len(set(ds)) == 1:
                rec_density = float(ds[0])
        with sw.stage("solve"):
            results = solve_all(
                D,
                y,
                labels,
                solvers=solvers,
                truth=truth,
                threshold=threshold,
                ties=ties,
                density=rec_density,
                normalize=normalize,
            )
        record = {
            "format": FORMAT,
            "base": base,
            "merged": merged,
            "mask": {"sha256": m.sha256, "entries": m.entries, "modules": len(m.indices)},
            "dictionary": [
                {"label": lab, "spec": s} for lab, s in zip(labels, dictionary, strict=True)
            ],
            "threshold": threshold,
            "target_norm": float(np.linalg.norm(y)),
            "merge_record": None
            if record_in is None
            else {
                "method": record_in["method"],
                "tasks": record_in["tasks"],
                "parameters": record_in["resolved_parameters"],
            },
            "truth": truth,
            "merged_tasks_not_in_dictionary": missing,
            "solvers": results,
            # the merge model that explains the delta best: a TIES merge is fitted far better
            # by the sign-aware solve, a linear one by the linear solvers
            "best_fit": min(results, key=lambda k: results[k]["residual"]),
            "warning": _warning(results),
            "notes": [note] if note else [],
            "timings": sw.rows,
            "machine": machine(),
            "versions": versions(),
        }
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_json_atomic(tmp / "unmerge.json", record)
            write_text_atomic(tmp / "report.md", render(record))
    return record


RESIDUAL_WARNING = 0.05


def _warning(results: dict[str, Any]) -> str | None:
    """A sentence when even the best fit leaves much of the delta unexplained: measured on the
    project's adapters, a merged task missing from the dictionary leaves a residual of 0.09–0.5
    and its weight goes to the most similar tasks present (up to 0.28), so weights are then not
    to be trusted as they stand."""
    best = min(r["residual"] for r in results.values())
    if best <= RESIDUAL_WARNING:
        return None
    return (
        f"The best fit leaves {100 * best:.0f}% of the merged delta unexplained: a merged task is "
        "probably missing from the dictionary, and tasks similar to it take its weight."
    )


def render(record: dict[str, Any]) -> str:
    labels = [d["label"] for d in record["dictionary"]]
    lines = [
        "# Unmerge",
        "",
        f"Merged model {record['merged']} against {len(labels)} task vectors at "
        f"{record['mask']['entries']:,} mask entries.",
        "",
    ]
    if record["merge_record"]:
        mr = record["merge_record"]
        lines += [f"Merge record found: method {mr['method']}.", ""]
        if record["merged_tasks_not_in_dictionary"]:
            lines += [
                "Merged tasks not in the dictionary: "
                + ", ".join(record["merged_tasks_not_in_dictionary"])
                + ".",
                "",
            ]
    head = "| solver | residual | " + " | ".join(labels) + " |"
    scored = record["truth"] is not None
    if scored:
        head += " precision | recall | F1 | max coef error |"
    lines += [
        head,
        "|---|---:|" + "---:|" * len(labels) + ("---:|---:|---:|---:|" if scored else ""),
    ]
    if scored:
        t = record["truth"]
        lines.append(
            "| truth | | " + " | ".join(f"{t.get(lab, 0.0):.4f}" for lab in labels) + " | | | | |"
        )
    for name, r in record["solvers"].items():
        row = (
            f"| {name} | {r['residual']:.4f} | "
            + " | ".join(f"{r['weights'][lab]:.4f}" for lab in labels)
            + " |"
        )
        if scored:
            err = r["coef_error"]["max_abs"]
            row += f" {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {err:.2e} |"
        lines.append(row)
    lines += ["", f"Lowest residual: {record['best_fit']}.", ""]
    if record.get("warning"):
        lines += [f"Warning: {record['warning']}", ""]
    for n in record["notes"]:
        lines += [f"Note: {n}.", ""]
    return "\n".join(lines)


__all__ = [
    "DENSITY_GRID",
    "FORMAT",
    "render",
    "score",
    "solve_all",
    "trim_ranks",
    "trimmed",
    "unmerge",
]
