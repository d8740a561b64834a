"""The main job (``make demo``): the product's main path on a real same-family pair.

Steps, each timed with its peak memory: fetch the Qwen2.5-Coder 1.5B (teacher) / 0.5B (student)
pair and the texts; capture paired activation statistics (``resid_pre`` and ``final.normed``,
teacher×student cross-moments) on the first tour-guide calibration blurbs; compute activation and
weight spectra of both models (seed 002's claims, as verdicts); make the best gradient-free
student this library has, the student with its LM head distilled from the teacher in closed form
(:mod:`gradfree.compress.head`: ridge heads from the capture, λ and blend chosen by measured KL on
the next calibration blurbs); write it as a plain checkpoint (``student/``) and reload it with
plain transformers; evaluate the native student, the distilled student and the teacher on
held-out texts against one teacher reference (:mod:`gradfree.evaluation.reference`: the teacher
runs once per text); write ``report.md``, which opens with the one results table and its plot.

The research studies (seed 000's matrix, seed 001's ablation, data efficiency, transfer,
composability, slicing) are not part of it: ``make experiments`` runs them (README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradfree.base.configfile import Device, DType
from gradfree.experiment.demo_report import render_report


class DemoConfig(BaseModel):
    """Resolved configuration of the demo; recorded as config.json in the output."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    corpus: str = "tourguide"
    # The head is fitted on calibration[0:fit], chosen on calibration[fit:fit+validation] and
    # tested on heldout[0:heldout]; 32 / 12 / 12 are seed 000's matrix sizes.
    calibration_limit: Annotated[int, Field(ge=1)] = 32
    validation_limit: Annotated[int, Field(ge=1)] = 12
    heldout_limit: Annotated[int, Field(ge=1)] = 12
    # an out-of-task text (None: none): does the head cost perplexity elsewhere?
    public_corpus: str | None = "news"
    public_split: str = "heldout"
    public_limit: Annotated[int, Field(ge=1)] = 6
    sites: list[str] = ["resid_pre", "final.normed"]
    max_length: Annotated[int, Field(ge=8)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 4
    head_lambdas: list[float] = [0.1, 1.0, 10.0]
    head_blends: list[float] = [0.25, 0.5, 0.75, 1.0]
    bootstrap_samples: Annotated[int, Field(ge=100)] = 2000
    # weight spectra of these roles: the teacher's 28 blocks cost ~2 min on 2 CPU cores and
    # told the same story as the student's in every run (Df/min-dim 0.42 vs 0.42)
    weight_roles: list[Literal["student", "teacher"]] = ["student"]
    # the SVD of a 151,936-row embedding/head would be most of the weight-spectra time
    weight_embeddings: bool = False
    device: Device = "cpu"
    dtype: DType = "float32"
    seed: int = 0

    @model_validator(mode="after")
    def _head_needs_final_states(self) -> DemoConfig:
        if "final.normed" not in self.sites:
            raise ValueError(
                "sites must include 'final.normed' (the distilled head is fitted on it)"
            )
        return self


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that a model that is
    done with does not stay in the resident set."""
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


def _texts(cfg: DemoConfig) -> dict[str, list[Any]]:
    """Fit, validation, held-out and (optionally) public documents; fit and validation are
    disjoint slices of the calibration split, the held-out split is never seen by a fit."""
    from gradfree.base.errors import GradfreeError
    from gradfree.texts.corpora import load_corpus

    calib = load_corpus(cfg.corpus, split="calibration")
    need = cfg.calibration_limit + cfg.validation_limit
    if len(calib) < need:
        raise GradfreeError(
            f"The calibration split has {len(calib)} documents; the fit and validation sets "
            f"need {need}."
        )
    texts = {
        "fit": calib[: cfg.calibration_limit],
        "validation": calib[cfg.calibration_limit : need],
        "heldout": load_corpus(cfg.corpus, split="heldout", limit=cfg.heldout_limit),
    }
    if cfg.public_corpus is not None:
        texts["public"] = load_corpus(
            cfg.public_corpus, split=cfg.public_split, limit=cfg.public_limit
        )
    return texts


def run_demo(cfg: DemoConfig, out: str | Path, overwrite: bool = False, say: Any = print) -> Path:
    """Run the main path into ``out`` (atomically: nothing is left if a step fails)."""
    import shutil

    import torch

    from gradfree.adapters import get_adapter
    from gradfree.base.io import atomic_dir, check_new_output, write_json_atomic, write_text_atomic
    from gradfree.base.provenance import Stopwatch, machine, versions
    from gradfree.models import load_model
    from gradfree.texts.corpora import corpus_manifest

    torch.manual_seed(cfg.seed)
    out = check_new_output(out, overwrite)
    watch = Stopwatch()
    with watch.stage("fetch models and texts (when missing)"):
        _ensure_inputs(cfg, say)
    texts = _texts(cfg)
    with watch.stage("load teacher and student"):
        teacher = load_model(cfg.teacher, device=cfg.device, dtype=cfg.dtype)
        student = load_model(cfg.student, device=cfg.device, dtype=cfg.dtype)
    models = {
        "teacher": {"spec": cfg.teacher, **get_adapter(teacher.model).describe()},
        "student": {"spec": cfg.student, **get_adapter(student.model).describe()},
    }
    fingerprints = {"teacher": teacher.fingerprint, "student": student.fingerprint}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        cap = _capture_stage(cfg, teacher, student, texts["fit"], tmp, watch, say)
        spectra = _spectra_stage(cfg, teacher, student, tmp, watch, say)
        val = _validation_stage(cfg, teacher, student, texts["validation"], tmp, watch, say)
        refs = _reference_stage(cfg, teacher, texts, tmp, watch, say)
        # The rest needs only the teacher's LM head: its body (~5 GB for the 1.5B) goes before
        # the ridge solves, the demo's memory peak.
        teacher_head = _lm_head_weight(teacher)
        del teacher
        _release_memory()
        choice = _head_stage(cfg, teacher_head, student, cap, val, watch)
        del val, teacher_head
        _release_memory()
        capture = _capture_summary(cap)
        del cap
        scores = _score_stage(cfg, student, choice, refs, watch, say)
        reload = _checkpoint_stage(student, refs["heldout"], tmp / "student", watch, say)
        shutil.rmtree(tmp / ".scratch")  # the teacher references: 0.3 MB per token, not kept
        record = {
            "config": cfg.model_dump(),
            "versions": versions(),
            "machine": machine(),
            "models": models,
            "fingerprints": fingerprints,
            "texts": {k: corpus_manifest(v, k) for k, v in texts.items()},
            "capture": capture,
            "head": choice.describe(),
            "scores": scores,
            "reload": reload,
            "stages": watch.rows,
        }
        plot = _results_plot(scores, tmp / "plots")
        write_json_atomic(tmp / "config.json", cfg.model_dump())
        write_json_atomic(tmp / "run.json", record)
        write_text_atomic(
            tmp / "report.md", render_report(cfg, record, texts, spectra, choice, plot, watch)
        )
    return out


def _capture_stage(
    cfg: DemoConfig, teacher: Any, student: Any, docs: list[Any], tmp: Path, watch: Any, say: Any
) -> Any:
    """The paired capture of the fit blurbs (``capture/``): spectra and the head's statistics."""
    from gradfree.capture import make_config, run_capture
    from gradfree.texts.corpora import corpus_manifest

    say(f"capturing paired statistics on {len(docs)} calibration documents")
    with watch.stage("paired capture (teacher + student)"):
        # Cross-moments only where the head needs them: the resid_pre ones (550 MB for this
        # pair) served the compression recipes that left the demo for `make experiments`.
        capture_cfg = make_config(
            sites=cfg.sites,
            cross_sites=["final.normed"],
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        return run_capture(
            {"teacher": teacher, "student": student},
            docs,
            tmp / "capture",
            capture_cfg,
            corpus=corpus_manifest(docs, cfg.corpus),
        )


def _capture_summary(cap: Any) -> dict[str, Any]:
    tokens = {r: cap.manifest["roles"][r]["tokens"] for r in cap.roles}
    return {
        "run_id": cap.manifest.get("run_id"),
        "tokens": ", ".join(f"{r} {_tok(t)}" for r, t in tokens.items()),
        "layer_map": list(cap.layer_map or []),
        "shards": len(cap.manifest["shards"]),
    }


def _tok(n: Any) -> str:
    return str(n.get("all", n)) if isinstance(n, dict) else str(n)


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
        what = "activations + weights" if role in cfg.weight_roles else "activations"
        with watch.stage(f"spectra ({role}: {what})"):
            report = build_report(
                tmp / "capture",
                roles=[role],
                loaded=loaded if role in cfg.weight_roles else None,
                trunk_width=trunk,
                embeddings=cfg.weight_embeddings,
            )
            write_report(report, tmp / "spectrum" / role)
            spectra[role] = report
    return spectra


def _validation_stage(
    cfg: DemoConfig,
    teacher: Any,
    student: Any,
    docs: list[Any],
    tmp: Path,
    watch: Any,
    say: Any,
) -> Any:
    """The validation windows that choose the head: the student's final states and the
    teacher's log-probabilities (the only teacher forward passes the head needs), kept on disk
    in float16 like the other references (1.3 GB in memory as float32)."""
    from gradfree.compress.head import validation_set

    say(f"distilling the LM head: validation on {len(docs)} documents")
    with watch.stage("head: validation features (teacher + student)"):
        return validation_set(
            student.model,
            teacher.model,
            student.tokenizer,
            docs,
            cfg.max_length,
            folder=tmp / ".scratch" / "validation",
        )


def _lm_head_weight(loaded: Any) -> Any:
    from gradfree.adapters import get_adapter
    from gradfree.surgery.edit import param

    # A copy: a view would keep the whole memory-mapped checkpoint of the teacher resident.
    return param(get_adapter(loaded.model).lm_head).detach().clone()


def _head_stage(
    cfg: DemoConfig, teacher_head: Any, student: Any, cap: Any, val: Any, watch: Any
) -> Any:
    """The ridge heads from the capture, the (λ, β) with the lowest validation KL."""
    from gradfree.compress.head import select_ridge_head

    n = len(cfg.head_lambdas) * len(cfg.head_blends)
    with watch.stage(f"head: {len(cfg.head_lambdas)} ridge solves, {n} candidates scored"):
        return select_ridge_head(
            student.model, teacher_head, cap, val, cfg.head_lambdas, cfg.head_blends
        )


def _reference_stage(
    cfg: DemoConfig, teacher: Any, texts: dict[str, list[Any]], tmp: Path, watch: Any, say: Any
) -> dict[str, Any]:
    """The teacher's log-probs on every evaluated text, computed once (float16, on disk in a
    scratch folder beside the output, deleted with it)."""
    from gradfree.evaluation.reference import teacher_reference

    refs: dict[str, Any] = {}
    for name in ("heldout", "public"):
        if name not in texts:
            continue
        say(f"teacher reference on {name} ({len(texts[name])} documents)")
        with watch.stage(f"teacher reference ({name})"):
            refs[name] = teacher_reference(
                teacher.model,
                teacher.tokenizer,
                texts[name],
                tmp / ".scratch" / name,
                cfg.max_length,
            )
    return refs


def _score_stage(
    cfg: DemoConfig, student: Any, choice: Any, refs: dict[str, Any], watch: Any, say: Any
) -> dict[str, Any]:
    """The native and the distilled student scored against the same references (one pass of
    the student's body per window: they differ only in the head); the bootstrap interval (over
    documents) of their task-KL difference. The distilled head is then given to the student."""
    from gradfree.compress.head import apply_head_, score_heads
    from gradfree.evaluation.reference import bootstrap_delta

    scores: dict[str, Any] = {"native": {}, "distilled": {}}
    heads = {"native": None, "distilled": choice.head}
    say("scoring the native and the distilled student")
    with watch.stage("score the native and the distilled student"):
        for name, ref in refs.items():
            got = score_heads(student.model, ref, heads)
            for row in heads:
                scores[row][name] = got[row]
    if choice.head is not None:
        apply_head_(student.model, choice.head)
    scores["teacher"] = {name: dict(ref.teacher) for name, ref in refs.items()}
    lo, hi = bootstrap_delta(
        scores["native"]["heldout"], scores["distilled"]["heldout"], cfg.bootstrap_samples
    )
    scores["kl_difference_95ci"] = [lo, hi]
    return scores


def _checkpoint_stage(student: Any, ref: Any, folder: Path, watch: Any, say: Any) -> dict[str, Any]:
    """Write the distilled student as a plain checkpoint, reload it with plain transformers and
    compare its logits with the model in memory on the first held-out window."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradfree.models.fetch import quiet_transformers, save_checkpoint

    say(f"writing the student checkpoint ({folder.name}/)")
    with watch.stage("write the student checkpoint + reload it in transformers"):
        save_checkpoint(student.model, student.tokenizer, folder)
        ids = ref.ids[0][None]
        device = next(student.model.parameters()).device
        with torch.no_grad():
            mine = student.model(input_ids=ids.to(device)).logits.float().cpu()
            with quiet_transformers(False):
                plain = AutoModelForCausalLM.from_pretrained(folder)
            theirs = plain(input_ids=ids).logits.float()
        del plain
        _release_memory()
    return {"max_abs_logit_difference": float((mine - theirs).abs().max()), "tokens": ids.shape[1]}


def _results_plot(scores: dict[str, Any], folder: Path) -> Path:
    """Task perplexity of the three models, and per-document KL of native vs distilled."""
    from gradfree.base.plots import pyplot

    folder.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    nat, dis = scores["native"]["heldout"], scores["distilled"]["heldout"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    try:
        names = ["teacher", "native student", "distilled student"]
        ppl = [scores["teacher"]["heldout"]["ppl"], nat["ppl"], dis["ppl"]]
        a.bar(names, ppl, color=["#55A868", "#C44E52", "#4C72B0"])
        a.set(title="held-out perplexity", ylabel="perplexity")
        a.tick_params(axis="x", labelsize=8)
        kn = [k / max(n, 1) for k, n in zip(nat["doc_kl"], nat["doc_tokens"], strict=True)]
        kd = [k / max(n, 1) for k, n in zip(dis["doc_kl"], dis["doc_tokens"], strict=True)]
        b.scatter(kn, kd, s=14, color="#4C72B0")
        lim = [min(kn + kd) * 0.95, max(kn + kd) * 1.05]
        b.plot(lim, lim, "--", color="grey", linewidth=1)
        b.set(
            title="KL(teacher ‖ model) per held-out document",
            xlabel="native student",
            ylabel="distilled student",
        )
        b.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / "results.png"
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
