"""The main job (``make demo``): the foundation pipeline on a real same-family pair.

Steps, each timed with its peak memory: fetch the Qwen2.5-Coder 1.5B (teacher) / 0.5B (student)
pair and the texts; capture paired activation statistics on the tour-guide calibration split;
compute activation and weight spectra; evaluate both models on the held-out tour-guide split
(perplexity, KL to the teacher, top-1 agreement, per-layer CKA, place questions) and on one
public text; run the alignment ablation of seed 001 §16.2 (issue 5) on the same pair; compress
the teacher into the student (issue 4, seed 000) as a small ``gradfree experiment`` (native
student, distilled head, projected teacher, closed-form and measured α merges, each measured
against the teacher); write one folder with ``report.md``, the manifests and the resolved
configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from gradfree.align.config import AblateConfig, AlignConfig
from gradfree.base.configfile import Device, DType


def _demo_ablation() -> AblateConfig:
    """Seed 001's variant matrix sized for 2 CPU cores (as scripts/align_ablation.yaml)."""
    return AblateConfig(
        align=AlignConfig(
            limit=24,
            max_length=256,
            batch_size=2,
            dump_max=1024,
            ridge_head=True,
            style_places=8,
            style_tokens=16,
        ),
        variants=[
            "base",
            "perm",
            "perm+rot",
            "perm+rot+style",
            "style",
            "perm+rot+householder",
            "perm+rot(per-stage)",
        ],
        heldout_limit=6,
        questions=16,
        max_new_tokens=12,
        prompt_places=6,
        prompt_tokens=16,
    )


def _demo_experiment() -> dict[str, Any]:
    """Issue 4's stage: four rows of ``experiments/seed000.yaml`` that tell the story (the
    student, its distilled head, the projected teacher, the closed-form α merge), sized for 2 CPU
    cores; the pair, device and dtype come from the demo's own settings."""
    return {
        "calibration": {"corpus": "tourguide", "split": "calibration", "limit": 32},
        "validation": {"corpus": "tourguide", "split": "calibration", "skip": 32, "limit": 12},
        "task": {"corpus": "tourguide", "split": "heldout", "limit": 12},
        "out_of_task": [{"corpus": "news", "split": "heldout", "limit": 6}],
        "questions": 8,
        "max_length": 256,
        "batch_size": 2,
        "recipe": {"basis": "joint", "attention_kl_windows": 1},
        "rows": [
            {"name": "student", "kind": "student"},
            {"name": "student+head", "kind": "student", "head": True},
            {"name": "joint/none", "recipe": {"merge": "none"}},
            {"name": "joint/optimal", "recipe": {"merge": "optimal"}},
        ],
    }


class DemoConfig(BaseModel):
    """Resolved configuration of the demo; recorded as config.json in the output."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    corpus: str = "tourguide"
    # 32 blurbs (~5k tokens) keep a fresh-clone demo under 20 minutes on 2 CPU cores
    calibration_limit: Annotated[int | None, Field(ge=1)] = 32
    heldout_limit: Annotated[int | None, Field(ge=1)] = None
    public_corpus: str = "news"
    public_split: str = "heldout"
    public_limit: Annotated[int, Field(ge=1)] = 8
    sites: list[str] = ["resid_pre", "attn_in", "mlp_in", "attn_heads", "final.normed"]
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 4
    questions: bool = True
    # fewer than 24 cuts one correct teacher answer ("... fu il Vesuvio.", token 21+)
    max_new_tokens: Annotated[int, Field(ge=1)] = 24
    # the SVD of a 151,936-row embedding/head is most of the weight-spectra time
    weight_embeddings: bool = False
    # issue 5: the alignment ablation of seed 001 §16.2 on the same pair (None: skip it)
    ablation: AblateConfig | None = Field(default_factory=_demo_ablation)
    # issue 4: an experiment config without the pair (None: skip the compression stage)
    experiment: dict[str, Any] | None = Field(default_factory=_demo_experiment)
    device: Device = "cpu"
    dtype: DType = "float32"
    seed: int = 0


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that the earlier
    stages' peaks do not stay in the resident set of a 24 GiB machine."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _ensure_inputs(cfg: DemoConfig, say: Any) -> None:
    """Fetch the default models and public text when they are not in the cache yet."""
    from gradfree.models.fetch import fetch_model, is_fetched
    from gradfree.models.registry import MODELS
    from gradfree.texts.corpora import fetch_corpus, list_corpora

    for name in (cfg.teacher, cfg.student):
        if name in MODELS and not is_fetched(name):
            say(f"fetching {name} (first run only)")
            fetch_model(name)
    installed = {c.name: c.installed for c in list_corpora()}
    if cfg.public_corpus in installed and not installed[cfg.public_corpus]:
        say(f"fetching the '{cfg.public_corpus}' text (first run only)")
        fetch_corpus(cfg.public_corpus)


def run_demo(cfg: DemoConfig, out: str | Path, overwrite: bool = False, say: Any = print) -> Path:
    """Run the whole pipeline into ``out`` (atomically: nothing is left if a step fails)."""
    import torch

    from gradfree.adapters import get_adapter
    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.models import load_model

    torch.manual_seed(cfg.seed)
    out = check_new_output(out, overwrite)
    watch = Stopwatch()
    with watch.stage("fetch models and texts (when missing)"):
        _ensure_inputs(cfg, say)
    with watch.stage("load teacher and student"):
        teacher = load_model(cfg.teacher, device=cfg.device, dtype=cfg.dtype)
        student = load_model(cfg.student, device=cfg.device, dtype=cfg.dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        cap = _capture_stage(cfg, teacher, student, tmp, watch, say)
        spectra = _spectra_stage(cfg, teacher, student, tmp, watch, say)
        results = _eval_stage(cfg, teacher, student, tmp, watch, say)
        ablation = None
        if cfg.ablation is not None:
            from gradfree.align import run_ablation

            say(f"alignment ablation: {len(cfg.ablation.variants)} variants")
            with watch.stage("alignment ablation (fit + teacher reference + variants)"):
                ablation = run_ablation(teacher, student, cfg.ablation, tmp / "ablation", say=say)
        experiment = None
        if cfg.experiment is not None:  # last: it folds the models' norms (function-preserving)
            experiment = _experiment_stage(cfg, teacher, student, tmp, watch, say)
        models = {
            "teacher": {"spec": cfg.teacher, **get_adapter(teacher.model).describe()},
            "student": {"spec": cfg.student, **get_adapter(student.model).describe()},
        }
        record = {
            "config": cfg.model_dump(),
            "versions": versions(),
            "machine": machine(),
            "models": models,
            "fingerprints": {"teacher": teacher.fingerprint, "student": student.fingerprint},
            "capture_run_id": cap.manifest.get("run_id"),
            "ablation_run_id": ablation["run_id"] if ablation else None,
            "stages": watch.rows,
        }
        write_json_atomic(tmp / "config.json", cfg.model_dump())
        write_json_atomic(tmp / "run.json", record)
        write_text_atomic(
            tmp / "report.md",
            _report(cfg, record, cap, spectra, results, watch, ablation, experiment),
        )
    return out


def _capture_stage(
    cfg: DemoConfig, teacher: Any, student: Any, tmp: Path, watch: Any, say: Any
) -> Any:
    """The paired capture of the calibration blurbs (``capture/``)."""
    from gradfree.capture import make_config, run_capture
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    calib = load_corpus(cfg.corpus, split="calibration", limit=cfg.calibration_limit)
    say(f"capturing paired statistics on {len(calib)} calibration documents")
    with watch.stage("paired capture (teacher + student)"):
        capture_cfg = make_config(
            sites=cfg.sites,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        return run_capture(
            {"teacher": teacher, "student": student},
            calib,
            tmp / "capture",
            capture_cfg,
            corpus=corpus_manifest(calib, cfg.corpus),
        )


def _spectra_stage(
    cfg: DemoConfig, teacher: Any, student: Any, tmp: Path, watch: Any, say: Any
) -> dict[str, Any]:
    """Activation and weight spectra of both models from the capture (``spectrum/{role}/``)."""
    from gradfree.adapters import get_adapter
    from gradfree.spectrum.report import build_report, write_report

    trunk = get_adapter(student.model).hidden_size // 2
    spectra = {}
    for role, loaded in (("student", student), ("teacher", teacher)):
        say(f"spectra of the {role}")
        with watch.stage(f"spectra ({role}: activations + weights)"):
            report = build_report(
                tmp / "capture",
                roles=[role],
                loaded=loaded,
                trunk_width=trunk,
                embeddings=cfg.weight_embeddings,
            )
            write_report(report, tmp / "spectrum" / role)
            spectra[role] = report
    return spectra


def _eval_stage(
    cfg: DemoConfig, teacher: Any, student: Any, tmp: Path, watch: Any, say: Any
) -> dict[str, Any]:
    """The student against the teacher on held-out and public texts (``eval/``)."""
    from gradfree.evaluation.run import evaluate, write_eval
    from gradfree.texts.corpora import corpus_manifest, load_corpus, load_questions, system_prompt

    held = load_corpus(cfg.corpus, split="heldout", limit=cfg.heldout_limit)
    public = load_corpus(cfg.public_corpus, split=cfg.public_split, limit=cfg.public_limit)
    questions = load_questions() if cfg.questions else None
    results: dict[str, Any] = {}
    for split_name, docs, qs in (
        ("tourguide-heldout", held, questions),
        ("public", public, None),
    ):
        say(f"evaluating on {split_name} ({len(docs)} documents)")
        with watch.stage(f"eval student vs teacher on {split_name}"):
            res = evaluate(
                student.model,
                student.tokenizer,
                docs,
                teacher=teacher.model,
                teacher_tokenizer=teacher.tokenizer,
                questions=qs,
                system_prompt=system_prompt() if qs else None,
                max_new_tokens=cfg.max_new_tokens,
                max_length=cfg.max_length,
                stride=cfg.max_length // 2,
                batch_size=cfg.batch_size,
                device=cfg.device,
            )
            res["corpus"] = corpus_manifest(docs, split_name)
            write_eval(res, tmp / "eval" / f"student-{split_name}")
        if qs:
            with watch.stage(f"teacher answers the place questions ({len(qs)})"):
                tres = evaluate(
                    teacher.model,
                    teacher.tokenizer,
                    docs[:1],
                    questions=qs,
                    system_prompt=system_prompt(),
                    max_new_tokens=cfg.max_new_tokens,
                    max_length=cfg.max_length,
                    stride=cfg.max_length // 2,
                    device=cfg.device,
                )
                write_eval(tres, tmp / "eval" / "teacher-questions")
            res["teacher_qa"] = tres["qa"]
        results[split_name] = res
    return results


def _experiment_stage(
    cfg: DemoConfig, teacher: Any, student: Any, tmp: Path, watch: Any, say: Any
) -> str:
    """Issue 4's compression rows as a small ``gradfree experiment`` (``experiment/``)."""
    from gradfree.experiment import make_experiment, run_experiment

    _release_memory()  # the paired capture below needs ~11 GB beside the two models
    exp = make_experiment(
        {
            **(cfg.experiment or {}),
            "teacher": cfg.teacher,
            "student": cfg.student,
            "device": cfg.device,
            "dtype": cfg.dtype,
        }
    )
    say(f"compression experiment: {len(exp.rows)} rows")
    with watch.stage("compression experiment (issue 4: references, capture, rows)"):
        run_experiment(exp, tmp / "experiment", say=say, models=(teacher, student))
    experiment = (tmp / "experiment" / "results.md").read_text(encoding="utf-8")
    return experiment


def _report(
    cfg: DemoConfig,
    record: dict[str, Any],
    cap: Any,
    spectra: dict[str, Any],
    results: dict[str, Any],
    watch: Any,
    ablation: dict[str, Any] | None = None,
    experiment: str | None = None,
) -> str:
    m = record["models"]
    lines = [
        "# gradfree demo report",
        "",
        f"Teacher `{cfg.teacher}`, student `{cfg.student}`; calibration: `{cfg.corpus}` "
        f"(calibration split, {cfg.calibration_limit or 'all'} documents); evaluation: "
        f"`{cfg.corpus}` held-out split and `{cfg.public_corpus}` ({cfg.public_split}, "
        f"{cfg.public_limit} documents). Device `{cfg.device}`, dtype `{cfg.dtype}`, "
        f"seed {cfg.seed}.",
        f"Machine: {record['machine']['cpus']} CPUs, {record['machine']['memory_gib']} GiB; "
        f"versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.",
        "",
        "## Models",
        "",
        "| role | type | layers | hidden | MLP | Q heads | KV heads | head_dim | tied |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for role in ("teacher", "student"):
        d = m[role]
        lines.append(
            f"| {role} | {d['model_type']} | {d['num_layers']} | {d['hidden_size']} | "
            f"{d['intermediate_size']} | {d['num_heads']} | {d['num_kv_heads']} | "
            f"{d['head_dim']} | {d['tied_embeddings']} |"
        )
    lines += _capture_section(cfg, cap, spectra)
    lines += _evaluation_section(results)
    lines += _attached_sections(ablation, experiment)
    lines += ["", "## Time and memory per stage", "", watch.table(), ""]
    return "\n".join(lines)


def _capture_section(cfg: DemoConfig, cap: Any, spectra: dict[str, Any]) -> list[str]:
    from gradfree.spectrum.report import seed002_rows

    tokens = {r: cap.manifest["roles"][r]["tokens"] for r in cap.roles}
    lines = [
        "",
        "## Capture",
        "",
        f"Run `{cap.manifest.get('run_id')}`: sites {', '.join(cfg.sites)}; tokens "
        f"{', '.join(f'{r} {_tok(t)}' for r, t in tokens.items())}; layer map (student → teacher) "
        f"{cap.layer_map}; {len(cap.manifest['shards'])} shards, each with its sha256 in "
        "`capture/manifest.json`.",
        "",
        "## Spectra (seed 002's claims, measured)",
        "",
        "Medians over layers; u = un-centered, c = centered, /body = without the first token. "
        "Full tables and plots: `spectrum/student/spectrum.md`, `spectrum/teacher/spectrum.md`.",
        "",
        "| role | site | layers | Df u/all | Df c/all | Df c/body | k95 u/all | k95 c/body | "
        "mean share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role in ("student", "teacher"):
        lines += seed002_rows(spectra[role])
    lines += ["", *_weights_vs_acts(spectra, cfg)]
    return lines


def _evaluation_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Evaluation",
        "",
        "| text | tokens | teacher ppl | student ppl | KL(teacher‖student) | top-1 agreement | "
        "questions teacher | questions student |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        t = res["teacher"]
        qa_s = res.get("qa")
        qa_t = res.get("teacher_qa")
        lines.append(
            f"| {name} | {res['perplexity']['tokens']} | {_fmt(t['teacher_ppl'], 2)} | "
            f"{_fmt(res['perplexity']['ppl'], 2)} | {_fmt(t['kl_mean'], 4)} | "
            f"{_fmt(t['top1_agreement'], 3)} | {_qa(qa_t)} | {_qa(qa_s)} |"
        )
    res = results["tourguide-heldout"]["teacher"]
    lines += [
        "",
        "Linear CKA between the student's and the teacher's residual streams at mapped layers "
        "(tour-guide held-out tokens):",
        "",
        "| student layer | teacher layer | CKA |",
        "|---|---|---:|",
    ]
    for row in res["layers"]:
        lines.append(f"| {row['student_layer']} | {row['teacher_layer']} | {_fmt(row['cka'])} |")
    return lines


def _attached_sections(ablation: dict[str, Any] | None, experiment: str | None) -> list[str]:
    """The ablation's and the experiment's own reports, as sections of this one."""
    lines: list[str] = []
    if ablation is not None:
        from gradfree.align.report import render_ablation

        page = render_ablation(ablation).splitlines()
        lines += ["", "## " + page[0].removeprefix("# "), *page[1:]]
        lines += [
            "",
            "Files: `ablation/ablation.md`, `ablation/ablation.json`, the ledger in "
            "`ablation/rotations/`, the run manifest in `ablation/manifest.json`.",
        ]
    if experiment is not None:
        page = experiment.split("\n## Time and peak memory")[0].splitlines()
        lines += ["", "## Compression (issue 4): " + page[0].removeprefix("# gradfree "), *page[1:]]
        lines += [
            "",
            "Files: `experiment/results.md` (with per-stage times), `experiment/results.json` "
            "(every number, merge profiles), `experiment/plots/`. The full matrix: "
            "`gradfree experiment --config experiments/seed000.yaml`.",
        ]
    return lines


def _weights_vs_acts(spectra: dict[str, Any], cfg: DemoConfig) -> list[str]:
    """Seed 002's "activations compress, weights don't": median Df/dim of both."""
    import statistics

    lines = [
        "| role | median Df/dim, activations (c/body, resid_pre) | median Df/min-dim, weights | "
        "trunk share (top half of student width, c/body resid_pre) |",
        "|---|---:|---:|---:|",
    ]
    for role, rep in spectra.items():
        acts = [s for s in rep.activations if s.site == "resid_pre"]
        body = [s.summaries["centered/body"] for s in acts if "centered/body" in s.summaries]
        dfs = [b["df_over_dim"] for b in body]
        trunk = [b.get("trunk_share") for b in body]
        w = [x.summary["df_over_dim"] for x in rep.weights or []]
        tr = [t for t in trunk if t is not None]
        lines.append(
            f"| {role} | {_fmt(statistics.median(dfs) if dfs else None)} | "
            f"{_fmt(statistics.median(w) if w else None)} | "
            f"{_fmt(statistics.median(tr) if tr else None)} |"
        )
    return lines


def _qa(qa: dict[str, Any] | None) -> str:
    return "–" if not qa else f"{qa['matched']}/{qa['n']}"


def _tok(n: Any) -> str:
    return str(n.get("all", n)) if isinstance(n, dict) else str(n)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
