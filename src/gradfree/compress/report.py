"""The output folder of ``gradfree compress``: checkpoint, tokenizer, recipe, diagnostics, report.

Layout: the Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer files) at
the top so that ``AutoModelForCausalLM.from_pretrained(out)`` loads it; ``recipe.json`` (the
resolved recipe), ``report.json`` (versions, machine, inputs, layer map, bases diagnostics, head
and neuron plans, merge profile, timings, evaluation if any), ``report.md`` and ``plots/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base.io import write_json_atomic, write_text_atomic
from gradfree.base.provenance import Stopwatch, machine, versions

if TYPE_CHECKING:
    from gradfree.compress.solution import Solution


def report_data(
    sol: Solution,
    clock: Stopwatch | None = None,
    inputs: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "versions": versions(),
        "machine": machine(),
        "inputs": inputs or {},
        "recipe": sol.recipe.model_dump(mode="json"),
        "config_changes": sol.config_changes,
        "layer_map": sol.layer_map,
        "rope_max_log_frequency_gap": sol.rope_gap,
        "bases": {"kind": sol.bases.kind, "points": sol.bases.diagnostics},
        "attention": [a.describe() for a in sol.attention],
        "mlp": [m.describe() for m in sol.mlp],
        "merge": sol.alphas.describe() if sol.alphas else None,
        "merge_profile": sol.merge_profile(),
        "attention_kl": (
            {
                "windows": sol.recipe.attention_kl_windows,
                "per_group": [[sig4(v) for v in row] for row in sol.attention_kl],
            }
            if sol.attention_kl
            else None
        ),
        "recaptures": sol.recaptures,
        "timings": clock.rows if clock else [],
        "evaluation": evaluation,
    }


def sig4(x: float) -> float | None:
    """Four significant digits (attention KLs span 1e-17 to 1); NaN as null for strict JSON."""
    return None if math.isnan(x) else float(f"{x:.4g}")


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def plots(sol: Solution, folder: Path) -> list[str]:
    """Per-layer diagnostics and the merge profile as PNGs (skipped without matplotlib)."""
    try:
        from gradfree.base.plots import line_plot
    except ImportError:  # pragma: no cover - matplotlib is a core dependency
        return []
    folder.mkdir(parents=True, exist_ok=True)
    prof = sol.merge_profile()
    x = [r["layer"] for r in prof]
    written = [
        line_plot(
            {
                k: (x, [float(r[k]) for r in prof])
                for k in ("alignment", "cka", "variance_preserved", "transition_cost")
            },
            folder / "diagnostics.png",
            title="residual basis diagnostics per student block",
            xlabel="student block",
            ylabel="value",
        ),
        line_plot(
            {
                "alpha_mlp": (x, [r["alpha_mlp"] for r in prof]),
                **{
                    f"alpha_attn_g{g}": (x, [r["alpha_attn"][g] for r in prof])
                    for g in range(len(prof[0]["alpha_attn"]))
                },
            },
            folder / "merge_profile.png",
            title=f"merge profile ({sol.alphas.mode if sol.alphas else 'projected teacher'})",
            xlabel="student block",
            ylabel="alpha",
        ),
        line_plot(
            {k: (x, [float(r[k]) for r in prof]) for k in ("mutual_information", "mi_teacher")},
            folder / "mutual_information.png",
            title="Gaussian mutual information with the student stream (nats)",
            xlabel="student block",
            ylabel="nats",
        ),
    ]
    if sol.attention_kl:
        kl = sol.attention_kl
        written.append(
            line_plot(
                {f"group {g}": (x, [row[g] for row in kl]) for g in range(len(kl[0]))},
                folder / "attention_kl.png",
                title="attention KL(teacher ‖ result) per KV group",
                xlabel="student block",
                ylabel="nats per query position",
            )
        )
    return [str(p.name) for p in written]


def write_report(
    sol: Solution,
    folder: Path,
    clock: Stopwatch | None = None,
    inputs: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data = report_data(sol, clock, inputs, evaluation)
    data["plots"] = plots(sol, folder / "plots")
    write_json_atomic(folder / "recipe.json", sol.recipe.model_dump(mode="json"))
    write_json_atomic(folder / "report.json", data)
    prof = [
        {**r, "alpha_attn": "/".join(str(a) for a in r["alpha_attn"])}
        for r in data["merge_profile"]
    ]
    md = [
        "# gradfree compress report",
        "",
        f"- inputs: {data['inputs']}",
        f"- recipe: `{data['recipe']}`",
        f"- layer map (student block -> teacher block): {sol.layer_map}",
        f"- basis: {sol.bases.kind} ({'per layer' if sol.recipe.per_layer else 'global'})",
        f"- merge: {data['merge']}",
        f"- config changes: {sol.config_changes or 'none'}",
        f"- recapture passes (teacher + student, ridge_recapture): {len(sol.recaptures)}",
        f"- largest RoPE log-frequency gap of the kept q/k pairs: {sol.rope_gap:.3g}",
        "",
        "## Merge profile and diagnostics per student block",
        "",
        _table(prof),
        "",
        "## Time and peak memory",
        "",
        clock.table() if clock else "",
        "",
    ]
    if data["attention_kl"]:
        kl_rows = [
            {"layer": j, **{f"group {g}": v for g, v in enumerate(row)}}
            for j, row in enumerate(data["attention_kl"]["per_group"])
        ]
        windows = data["attention_kl"]["windows"]
        md += [f"## Attention KL(teacher ‖ result) per KV group ({windows} windows)", ""]
        md += [_table(kl_rows), ""]
    if evaluation:
        md += ["## Evaluation", "", "```", str(evaluation), "```", ""]
    write_text_atomic(folder / "report.md", "\n".join(md))
    return data
