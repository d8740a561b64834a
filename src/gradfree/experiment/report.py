"""The experiment's outputs: ``results.json`` (every number), ``results.md`` (the tables) and
``plots/`` (task KL per row, the α sweep, data efficiency), rewritten after every row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradfree.base.io import write_json_atomic, write_text_atomic
from gradfree.base.provenance import machine, versions
from gradfree.evaluation.reference import TeacherReference, bootstrap_delta
from gradfree.experiment.config import ExperimentConfig


def _f(x: float | None, d: int = 4) -> str:
    if x is None:
        return "–"
    return f"{0.0 if abs(x) < 0.5 * 10**-d else x:.{d}f}"  # no "-0.0000" from rounding


def _pct(x: float, base: float) -> str:
    return f"{100 * (x / base - 1):+.1f}%"


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per result: task KL/ppl/top-1, out-of-task ppl, questions, Δ vs student."""
    student = results.get("student")
    rows = []
    for name, r in results.items():
        task = r.get("task")
        if task is None:
            continue
        row: dict[str, Any] = {
            "row": name,
            "kind": r["kind"],
            "study": r["study"],
            "calibration": r.get("calibration") or "–",
            "task_kl": task["kl"],
            "task_ppl": task["ppl"],
            "task_top1": task["top1"],
            "out": {k[4:]: v["ppl"] for k, v in r.items() if k.startswith("out:")},
            "questions": r.get("questions"),
            "seconds": r.get("seconds"),
            "alpha": (r.get("measured_alpha") or {}).get("chosen_alpha"),
            "head": r.get("head"),
        }
        if student is not None and name != "student":
            row["kl_ci"] = bootstrap_delta(student["task"], task)
            row["out_vs_student"] = {
                k: v / student[f"out:{k}"]["ppl"] - 1 for k, v in row["out"].items()
            }
        rows.append(row)
    return rows


def markdown(
    cfg: ExperimentConfig,
    results: dict[str, dict[str, Any]],
    refs: dict[str, TeacherReference],
    clock: Any,
) -> str:
    rows = summary_rows(results)
    student = next((r for r in rows if r["row"] == "student"), None)
    outs = [k[4:] for k in refs if k.startswith("out:")]
    task = refs.get("task")
    lines = [
        "# gradfree experiment: seed 000's research matrix",
        "",
        f"Teacher `{cfg.teacher}`, student `{cfg.student}`, {cfg.dtype} on {cfg.device}. "
        f"Calibration {cfg.calibration.label()}, validation (measured choices) "
        f"{cfg.validation.label()}, task {cfg.task.label()}"
        + (
            f" ({int(task.teacher['tokens'])} scored tokens, teacher ppl {task.teacher['ppl']:.2f})"
            if task and task.teacher
            else ""
        )
        + f", out of task {', '.join(outs) or '–'}, {cfg.questions} place questions. "
        f"KL = KL(teacher ‖ model) per token; the interval is the 95% bootstrap interval (over "
        "documents) of the row's task KL minus the student's.",
        "",
    ]
    head = ["row", "study", "calibration", "task KL", "ΔKL 95% CI", "task ppl", "top-1"]
    head += [f"{o} ppl (vs student)" for o in outs] + ["questions", "s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = r.get("kl_ci")
        cells = [
            f"`{r['row']}`",
            r["study"],
            r["calibration"],
            _f(r["task_kl"]),
            f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–",
            _f(r["task_ppl"], 2),
            _f(r["task_top1"], 3),
        ]
        for o in outs:
            v = r["out"].get(o)
            rel = (
                f" ({_pct(v, student['out'][o])})"
                if student and v is not None and r is not student
                else ""
            )
            cells.append(f"{_f(v, 2)}{rel}")
        q = r["questions"]
        cells.append(f"{q['matched']}/{q['n']}" if q else "–")
        cells.append(_f(r["seconds"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_verdict(rows, outs), ""]
    chosen = [(n, r) for n, r in results.items() if r.get("measured_alpha") or r.get("head")]
    if chosen:
        lines += ["## Choices made on validation KL", ""]
        for n, r in chosen:
            if r.get("measured_alpha"):
                m = r["measured_alpha"]
                tried = ", ".join(
                    f"α={c['alpha']:g}: {c['validation_kl']:.4f}" for c in m["candidates"]
                )
                where = f" on {r['validation']}" if r.get("validation") else ""
                lines.append(f"- `{n}`: α = {m['chosen_alpha']:g}{where} ({tried})")
            if r.get("head"):
                h, where = r["head"], f" on {r['validation']}" if r.get("validation") else ""
                lines.append(
                    f"- `{n}` head: λ = {h['lambda']}, β = {h['blend']} (validation KL{where} "
                    f"{h['validation_student']['kl']:.4f} → {h['validation_chosen']['kl']:.4f})"
                )
        lines.append("")
    lines += ["## Time and peak memory per stage", "", clock.table(), ""]
    return "\n".join(lines)


def _verdict(rows: list[dict[str, Any]], outs: list[str]) -> list[str]:
    """Which rows beat the student on task KL and perplexity without losing >2% out of task."""
    student = next((r for r in rows if r["row"] == "student"), None)
    if student is None:
        return []
    good = [
        r["row"]
        for r in rows
        if r["kind"] != "teacher"
        and r["row"] != "student"
        and r.get("kl_ci")
        and r["kl_ci"][1] < 0
        and r["task_ppl"] < student["task_ppl"]
        and all(v <= 0.02 for v in r.get("out_vs_student", {}).values())
    ]
    if not good:
        return [
            "**No row is better than the native student** on task KL (95% interval below 0) and "
            "task perplexity while staying within 2% of its out-of-task perplexity."
        ]
    return [
        "Rows better than the native student on task KL (95% interval below 0) and task "
        "perplexity, within 2% of its out-of-task perplexity: " + ", ".join(f"`{g}`" for g in good)
    ]


def _series(
    results: dict[str, dict[str, Any]],
    study: str,
    where: Callable[[str, dict[str, Any]], tuple[str, float]],
) -> dict[str, tuple[Sequence[float], Sequence[float]]]:
    """Task KL of a study's rows as named (x, y) series sorted by x (rows run in any order);
    ``where`` gives (series name, x)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for n, r in results.items():
        if r["study"] == study:
            label, x = where(n, r)
            points.setdefault(label, []).append((x, r["task"]["kl"]))
    return {k: ([x for x, _ in sorted(v)], [y for _, y in sorted(v)]) for k, v in points.items()}


def plots(results: dict[str, dict[str, Any]], folder: Path) -> list[str]:
    """Task KL per row (log scale), KL against α per swept layer, KL against calibration size."""
    from gradfree.base.plots import bar_plot, line_plot

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    main = {n: r["task"]["kl"] for n, r in results.items() if r["kind"] != "teacher"}
    if main:
        written.append(
            bar_plot(
                main,
                folder / "task_kl.png",
                title="KL(teacher ‖ model) on the task texts",
                xlabel="KL per token (log scale)",
                logx=all(k > 0 for k in main.values()),
            ).name
        )
    sweep = _series(results, "alpha_sweep", lambda n, r: (n.split("/")[1], r["recipe"]["alpha"]))
    if sweep:
        written.append(
            line_plot(
                sweep,
                folder / "alpha_sweep.png",
                title="α sweep, one block at a time",
                xlabel="α",
                ylabel="task KL",
            ).name
        )
    eff = _series(
        results,
        "data_efficiency",
        lambda n, _r: (n.rpartition("@")[0], float(n.rpartition("@")[2])),
    )
    if eff:
        written.append(
            line_plot(
                eff,
                folder / "data_efficiency.png",
                title="Data efficiency",
                xlabel="calibration documents",
                ylabel="task KL",
            ).name
        )
    return written


def write_results(
    out: Path,
    cfg: ExperimentConfig,
    results: dict[str, dict[str, Any]],
    refs: dict[str, TeacherReference],
    clock: Any,
    *,
    final: bool,
) -> None:
    data = {
        "rows": results,
        "summary": summary_rows(results),
        "references": {k: v.teacher for k, v in refs.items()},
        "stages": clock.rows,
        "machine": machine(),
        "versions": versions(),
        "complete": final,
    }
    write_json_atomic(out / "results.json", data)
    write_text_atomic(out / "results.md", markdown(cfg, results, refs, clock))
    if final:
        plots(results, out / "plots")
