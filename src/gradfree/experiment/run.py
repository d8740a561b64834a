"""The engine of ``gradfree experiment``: build every row's model, measure it, write the table.

    refs   = teacher references of the validation, task and out-of-task texts (once, on disk)
    for each calibration set:     one Calibration: its documents, one paired capture (kept
                                  under work/captures, reused by its rows)
        for each projection:      bases + head/neuron plans + projected teacher (once)
            for each row:         merge [+ measured α] [+ distilled head] → score → results

Rows are ordered so that captures and projections are computed once; every set of texts is read
once. Results are written (atomically) after every row, so a long run can be followed, and
``resume`` skips the rows already measured with the same config. Time and peak memory of every
stage are recorded. The capture → project → interpolate steps are those of ``gradfree compress``
(:class:`~gradfree.compress.calibration.Calibration`).
"""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.base.errors import GradfreeError
from gradfree.base.io import read_json, write_json_atomic, write_text_atomic
from gradfree.compress.calibration import Calibration
from gradfree.compress.calibration import spec_hash as _hash
from gradfree.evaluation.reference import (
    TeacherReference,
    bootstrap_delta,
    score,
    teacher_reference,
)
from gradfree.experiment.config import (
    Continuations,
    ExperimentConfig,
    Refit,
    Row,
    Texts,
    expand_rows,
)


def load_texts(t: Texts) -> list[Any]:
    from gradfree.texts.corpora import load_corpus

    docs = load_corpus(t.corpus, split=t.split)[t.skip :]
    docs = docs[: t.limit] if t.limit is not None else docs
    if not docs:
        raise GradfreeError(f"The texts {t.label()} hold no documents after skipping {t.skip}.")
    return docs


class Engine:
    """State of one run: models, documents, references, calibrations (with their captures), the
    current projection, the results."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out: Path,
        teacher: Any,
        student: Any,
        say: Callable[[str], None],
        clock: Any,
    ) -> None:
        from gradfree.compress import make_recipe

        self.cfg, self.out, self.t, self.s, self.say, self.clock = (
            cfg,
            out,
            teacher,
            student,
            say,
            clock,
        )
        self.base = make_recipe(cfg.recipe, max_length=cfg.max_length, batch_size=cfg.batch_size)
        self.work = out / "work"
        self.refs: dict[str, TeacherReference] = {}
        self.docs: dict[str, list[Any]] = {}  # texts key -> its documents, read once
        self.calibrations: dict[str, Calibration] = {}  # texts key -> its calibration
        self._proj: tuple[str, Any] | None = None
        self.questions: list[Any] = []
        self.results: dict[str, dict[str, Any]] = {}

    # inputs ---------------------------------------------------------------------------------
    def references(self) -> None:
        cfg = self.cfg
        named = {"validation": cfg.validation, "task": cfg.task}
        for t in cfg.out_of_task:
            named[f"out:{t.label()}"] = t
        for name, texts in named.items():
            self._reference(name, texts)
        if cfg.questions:
            from gradfree.texts.corpora import load_questions

            self.questions = load_questions()[: cfg.questions]

    def documents(self, texts: Texts) -> list[Any]:
        """The documents of ``texts`` (read once per spec)."""
        if texts.key() not in self.docs:
            self.docs[texts.key()] = load_texts(texts)
        return self.docs[texts.key()]

    def calibration(self, texts: Texts) -> Calibration:
        """The calibration on ``texts``; its captures are kept in work/captures/<key>."""
        from gradfree.texts.corpora import corpus_manifest

        if texts.key() not in self.calibrations:
            docs = self.documents(texts)
            self.calibrations[texts.key()] = Calibration(
                self.t,
                self.s,
                docs,
                manifest=corpus_manifest(docs, texts.label()),
                source={"texts": texts.model_dump()},
                root=self.work / "captures",
                label=texts.label(),
                clock=self.clock,
                say=self.say,
            )
        return self.calibrations[texts.key()]

    def capture(self, texts: Texts, recipe: Any) -> Any:
        """The paired capture of ``texts`` for a recipe's capture fields (cached on disk)."""
        return self.calibration(texts).capture(recipe)

    # building ---------------------------------------------------------------------------------
    def projection(self, row: Row, recipe: Any, cal: Calibration) -> Any:
        from gradfree.compress.recipe import PROJECTION_FIELDS

        cap = cal.capture(recipe)
        blend = None
        if row.blend is not None:
            blend = self.blended_bases(recipe, cap, row)
        key = _hash(
            {
                "cap": str(cap.path),
                "fields": {f: getattr(recipe, f) for f in PROJECTION_FIELDS},
                "blend": row.blend.model_dump() if row.blend else None,
            }
        )
        if self._proj is not None and self._proj[0] == key:
            return self._proj[1]
        self._proj = None
        gc.collect()
        with self.clock.stage(f"project {recipe.basis}{'/per-layer' if recipe.per_layer else ''}"):
            proj = cal.project(recipe, bases=blend)
        self._proj = (key, proj)
        return proj

    def blended_bases(self, recipe: Any, cap: Any, row: Row) -> Any:
        """Composability: the point at ``weight`` on the Grassmann geodesic from this capture's
        bases to another task's (columns kept in the student's coordinates)."""
        from gradfree.compress.bases import BasisSet, residual_bases
        from gradfree.solvers import geodesic_average

        assert row.blend is not None
        other = self.capture(row.blend.calibration, recipe)
        n = len(cap.layer_map)
        kw = {
            "trunk_fraction": recipe.trunk_fraction,
            "align": recipe.align,
            "per_layer": recipe.per_layer,
            "part": recipe.basis_stats,
        }
        a = residual_bases(cap, n, cap.layer_map, recipe.basis, **kw)
        b = residual_bases(other, n, other.layer_map, recipe.basis, **kw)
        w = row.blend.weight
        mixed = [geodesic_average(va, vb, w) for va, vb in zip(a.bases, b.bases, strict=True)]
        out = BasisSet(mixed, f"{recipe.basis}+blend")
        out.diagnostics = a.diagnostics
        return out

    def _reference(self, name: str, texts: Texts) -> TeacherReference:
        """The teacher reference of ``texts`` under ``name`` (computed once, kept on disk)."""
        if name not in self.refs:
            folder = self.work / "refs" / _hash(texts.model_dump())
            with self.clock.stage(f"teacher reference: {name}"):
                self.refs[name] = teacher_reference(
                    self.t.model,
                    self.s.tokenizer,
                    self.documents(texts),
                    folder,
                    self.cfg.max_length,
                )
        return self.refs[name]

    def validation(self, row: Row) -> TeacherReference:
        """The teacher reference of the texts ``row``'s measured choices are made on."""
        if row.validation is None:
            return self.refs["validation"]
        return self._reference(f"validation:{row.validation.label()}", row.validation)

    def measured_alpha(
        self, proj: Any, recipe: Any, cal: Calibration, val: TeacherReference
    ) -> tuple[Any, dict[str, Any]]:
        """The uniform α (from ``recipe.alpha_grid``, 0 included) with the lowest validation KL."""
        from gradfree.compress import make_recipe

        best: tuple[float, float, Any] | None = None
        tried = []
        for a in sorted({0.0, *recipe.alpha_grid}):
            r = make_recipe(recipe, merge="uniform", alpha=a, alpha_grid=[])
            sol = cal.interpolate(proj, r)
            kl = score(sol.model, val)["kl"]
            tried.append({"alpha": a, "validation_kl": kl})
            if best is None or kl < best[0]:
                best = (kl, a, sol)
            else:
                del sol
        assert best is not None
        return best[2], {"chosen_alpha": best[1], "candidates": tried}

    def _final_settings(self) -> dict[str, Any]:
        return {
            "sites": ["final.normed"],
            "max_length": self.cfg.max_length,
            "batch_size": self.cfg.batch_size,
        }

    def final_states(self, texts: Texts) -> Any:
        """The teacher's and the native student's final states on ``texts`` (kept on disk).

        When a shorter prefix of the same texts was captured, only the documents after it are
        captured and the two are merged: the statistics are sums, so the merge equals one
        capture of all of them, and data-efficiency rows cost one pass over the largest size.
        """
        from gradfree.capture import Subject, combine_captures, load_capture, run_capture

        root = self.work / "final-states"
        key = _hash(texts.model_dump())
        folder = root / key
        if (folder / "manifest.json").exists():
            return load_capture(folder)
        have = [Texts(**read_json(p, "capture record")) for p in sorted(root.glob("*.json"))]
        have = [h for h in have if (root / _hash(h.model_dump()) / "manifest.json").exists()]
        prefix = longest_prefix(texts, have)
        rest = texts
        if prefix is not None:
            assert prefix.limit is not None and texts.limit is not None
            rest = texts.model_copy(
                update={"skip": texts.skip + prefix.limit, "limit": texts.limit - prefix.limit}
            )
        subjects = {"teacher": self.t, "student": Subject(self.s.model, self.s.tokenizer)}
        shutil.rmtree(folder, ignore_errors=True)
        part = folder if prefix is None else root / f"{key}.part"
        shutil.rmtree(part, ignore_errors=True)
        self.say(f"final-state capture of {rest.label()}")
        run_capture(subjects, self.documents(rest), part, self._final_settings())
        if prefix is not None:
            combine_captures([root / _hash(prefix.model_dump()), part], folder)
            shutil.rmtree(part)
        write_json_atomic(root / f"{key}.json", texts.model_dump())
        return load_capture(folder)

    def distil_head(
        self, model: nn.Module, cap: Any | None, texts: Texts, ref: TeacherReference
    ) -> dict[str, Any]:
        """Replace ``model``'s head by the (λ, β) blend of lowest validation KL (in place);
        ``cap`` None: ``model`` is a built model, whose final states are captured for it alone."""
        import tempfile

        from gradfree.capture import Subject, run_capture
        from gradfree.compress.head import apply_head_, select_ridge_head, validation_docs

        val = validation_docs(model, ref)
        with tempfile.TemporaryDirectory(prefix="head-", dir=self.work) as tmp:
            if cap is None:
                cap = run_capture(
                    {"teacher": self.t, "student": Subject(model, self.s.tokenizer)},
                    self.documents(texts),
                    Path(tmp) / "cap",
                    self._final_settings(),
                )
            choice = select_ridge_head(
                model, self.t.model, cap, val, self.cfg.head_lambdas, self.cfg.head_blends
            )
        if choice.head is not None:
            apply_head_(model, choice.head)
        del val
        return choice.describe()

    def continuation_docs(self, texts: Texts, spec: Continuations) -> list[Any]:
        """The teacher's continuations of ``texts`` (generated once, kept in the work folder)."""
        from gradfree.texts.continuations import continuations
        from gradfree.texts.corpora import read_jsonl

        path = self.work / "continuations" / f"{_hash([texts.model_dump(), spec.model_dump()])}"
        path = path.with_suffix(".jsonl")
        if path.exists():
            return read_jsonl(path, source="teacher greedy continuation")
        with self.clock.stage(f"continuations of {texts.label()}"):
            docs = continuations(
                self.t.model,
                self.s.tokenizer,
                self.documents(texts),
                prompt_tokens=spec.prompt_tokens,
                new_tokens=spec.new_tokens,
                batch_size=spec.batch_size,
                # a line per batch into the run's log: generation takes minutes on a CPU
                progress=lambda stage, done, total, unit="": self.say(
                    f"{stage}: {done}/{total} {unit}"
                ),
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(d.to_json()) + "\n" for d in docs))
        self.say(f"{len(docs)} teacher continuations of {texts.label()}")
        return docs

    def with_documents(
        self, cap: Any, texts: Texts, spec: Continuations, extra: Sequence[Any]
    ) -> Any:
        """``cap`` (final states of ``texts``) merged with a final-state capture of ``extra``
        (kept on disk; statistics are sums, so the merge is one capture of both)."""
        from gradfree.capture import Subject, combine_captures, load_capture, run_capture

        root = self.work / "final-states"
        key = _hash(["with", texts.model_dump(), spec.model_dump()])
        folder, part = root / key, root / f"{key}.extra"
        if (folder / "manifest.json").exists():
            return load_capture(folder)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(part, ignore_errors=True)
        subjects = {"teacher": self.t, "student": Subject(self.s.model, self.s.tokenizer)}
        self.say(f"final-state capture of {len(extra)} continuations")
        run_capture(subjects, list(extra), part, self._final_settings())
        combine_captures([cap, part], folder)
        shutil.rmtree(part)
        return load_capture(folder)

    def teacher_states(self, windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher's final normed states of ``windows`` (computed once per set of windows,
        kept in the work folder: the teacher's pass is the refit's largest cost)."""
        from safetensors.torch import load_file, save_file

        from gradfree.compress.refit import teacher_states

        key = _hash([_ids_digest(w) for w in windows])
        path = self.work / "teacher-states" / f"{key}.safetensors"
        if path.exists():
            got = load_file(str(path))
            return [got[str(i)] for i in range(len(windows))]
        with self.clock.stage("teacher final states of the calibration windows"):
            self.say(f"teacher final states of {len(windows)} calibration windows")
            x_t = [x.cpu().contiguous() for x in teacher_states(self.t.model, windows)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({str(i): x for i, x in enumerate(x_t)}, str(tmp))
        tmp.replace(path)
        return x_t

    def refit(
        self, model: nn.Module, spec: Refit, docs: Sequence[Any], val: TeacherReference
    ) -> dict[str, Any]:
        """Refit ``model``'s last MLP writers on ``docs`` (in place; α per block on ``val``),
        then, with ``spec.rehead``, choose its head again on the refitted final states."""
        from gradfree.adapters import get_adapter
        from gradfree.compress.head import (
            HeadMoments,
            apply_head_,
            final_states,
            select_ridge_head,
            validation_docs,
        )
        from gradfree.compress.refit import refit_last_writers_
        from gradfree.surgery.edit import param
        from gradfree.texts.windows import iter_windows

        windows = [
            torch.tensor(ids, dtype=torch.long)
            for _, ids in iter_windows(self.s.tokenizer, docs, self.cfg.max_length)
            if len(ids) > 1
        ]
        x_t = self.teacher_states(windows)
        tried: list[list[dict[str, float]]] = []

        def choose(m: nn.Module, apply: Callable[[float], None]) -> float:
            rows = []
            for a in sorted({0.0, *spec.alphas}):
                apply(a)
                rows.append({"alpha": a, "validation_kl": float(score(m, val)["kl"])})
            tried.append(rows)
            return min(rows, key=lambda r: (r["validation_kl"], r["alpha"]))["alpha"]

        rec = refit_last_writers_(
            model,
            param(get_adapter(self.t.model).lm_head).detach(),
            windows,
            x_t,
            blocks=spec.blocks,
            rel_mu=spec.mu,
            rel_lam=spec.lam,
            choose=choose,
            say=self.say,
        )
        rec["candidates"] = tried
        if spec.rehead and any(b["alpha"] > 0 for b in rec["blocks"]):
            moments = HeadMoments.from_states([final_states(model, w) for w in windows], x_t)
            choice = select_ridge_head(
                model,
                self.t.model,
                moments,
                validation_docs(model, val),
                self.cfg.head_lambdas,
                self.cfg.head_blends,
            )
            if choice.head is not None:
                apply_head_(model, choice.head)
            rec["head_again"] = choice.describe()
        return rec

    # measuring ---------------------------------------------------------------------------------
    def measure(self, model: nn.Module) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name, ref in self.refs.items():
            if not name.startswith("validation"):
                res[name] = score(model, ref)
        if self.questions:
            from gradfree.evaluation.questions import answer_questions
            from gradfree.texts.corpora import system_prompt

            qa = answer_questions(
                model,  # type: ignore[arg-type]  # any HF causal LM module
                self.s.tokenizer,
                self.questions,
                system_prompt(),
            )
            res["questions"] = {"matched": qa["matched"], "n": qa["n"], "score": qa["score"]}
        return res

    def run_row(self, row: Row) -> dict[str, Any]:
        from gradfree.compress import make_recipe

        info: dict[str, Any] = {"study": row.study, "kind": row.kind}
        texts = row.calibration or self.cfg.calibration
        if row.validation is not None:
            info["validation"] = row.validation.label()
        if row.kind == "teacher":
            return {**info, **self.measure(self.t.model)}
        if row.kind == "student":
            model = self.s.model
            if row.head:
                model = _copy(self.s.model)
                # Reuse a full paired capture of these texts when one exists (it holds the
                # final states); otherwise capture only the final states (much cheaper).
                cal = self.calibrations.get(texts.key())
                cap = cal.last if cal is not None else None
                cap = self.final_states(texts) if cap is None else cap
                docs = list(self.documents(texts))
                if row.continuations is not None:
                    extra = self.continuation_docs(texts, row.continuations)
                    cap = self.with_documents(cap, texts, row.continuations, extra)
                    docs += extra
                    info["continuations"] = {"documents": len(extra)}
                info["head"] = self.distil_head(model, cap, texts, self.validation(row))
                if row.refit is not None:
                    with self.clock.stage(f"refit {row.name}"):
                        info["refit"] = self.refit(model, row.refit, docs, self.validation(row))
            info["calibration"] = texts.label() if row.head else None
            return {**info, **self.measure(model)}
        recipe = make_recipe(self.base, **row.recipe)
        info["recipe"] = recipe.model_dump(mode="json")
        info["calibration"] = texts.label()
        cal = self.calibration(texts)
        proj = self.projection(row, recipe, cal)
        with self.clock.stage(f"merge {row.name}"):
            if recipe.merge == "measured":
                sol, info["measured_alpha"] = self.measured_alpha(
                    proj, recipe, cal, self.validation(row)
                )
            else:
                sol = cal.interpolate(proj, recipe)
        if recipe.attention_kl_windows:
            with self.clock.stage(f"attention KL {row.name}"):
                sol.attention_kl = cal.attention_kl(sol)
            info["attention_kl"] = sol.attention_kl
        info["merge"] = sol.alphas.describe() if sol.alphas else None
        info["profile"] = sol.merge_profile()
        info["recaptures"] = sol.recaptures
        model = sol.model if sol.model is not proj.projected else _copy(proj.projected)
        if row.head:
            with self.clock.stage(f"head {row.name}"):
                info["head"] = self.distil_head(model, None, texts, self.validation(row))
        del sol
        out = {**info, **self.measure(model)}
        del model
        gc.collect()
        return out


def _ids_digest(ids: torch.Tensor) -> str:
    """A stable digest of one window's token ids."""
    import hashlib

    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def longest_prefix(texts: Texts, have: Sequence[Texts]) -> Texts | None:
    """The longest of ``have`` that is a strict prefix of ``texts`` (same corpus, split, skip)."""
    if texts.limit is None:
        return None
    fits = [
        h
        for h in have
        if (h.corpus, h.split, h.skip) == (texts.corpus, texts.split, texts.skip)
        and h.limit is not None
        and h.limit < texts.limit
    ]
    return max(fits, key=lambda h: h.limit or 0, default=None)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def order_rows(rows: Sequence[Row], cfg: ExperimentConfig) -> list[Row]:
    """The matrix's student/teacher rows first, then compress rows grouped by calibration and
    projection (so each capture and projection is computed once, groups in the order they first
    appear in the config), then distilled-head rows whose texts were captured in full (they reuse
    that capture), then the studies' other rows."""
    from gradfree.compress import make_recipe
    from gradfree.compress.recipe import PROJECTION_FIELDS

    def group(r: Row) -> str:
        rec = make_recipe(cfg.recipe, **r.recipe)
        texts = (r.calibration or cfg.calibration).key()
        proj = json.dumps({f: getattr(rec, f) for f in PROJECTION_FIELDS}, default=str)
        return texts + (r.blend.model_dump_json() if r.blend else "") + proj

    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.kind == "compress":
            first.setdefault(group(r), i)

    compress_texts = {
        (r.calibration or cfg.calibration).key() for r in rows if r.kind == "compress"
    }

    def key(r: Row) -> tuple[int, int]:
        if r.kind != "compress":
            if r.head and (r.calibration or cfg.calibration).key() in compress_texts:
                return (2, 0)  # after the full capture of its texts, whose final states it reuses
            return (0 if r.study == "matrix" else 3, 0)
        return (1, first[group(r)])

    return sorted(rows, key=key)  # stable: the config's order within a group


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    keep_work: bool = False,
    say: Callable[[str], None] = print,
    models: tuple[Any, Any] | None = None,
) -> Path:
    """Run every row of ``cfg`` into ``out``: results.json, results.md, plots/, experiment.json.

    ``models`` = (teacher, student) already loaded (their norms are folded in place, which
    preserves their function); otherwise they are loaded from the config's names.
    """
    from gradfree.base.provenance import Stopwatch
    from gradfree.compress import fold_pair_
    from gradfree.experiment.report import write_results

    out = Path(out)
    record = cfg.model_dump(mode="json")
    if out.exists():
        prev = out / "experiment.json"
        if resume and prev.exists():
            old = read_json(prev, "experiment record")
            if {k: v for k, v in old.items() if k not in ("rows", "studies")} != {
                k: v for k, v in record.items() if k not in ("rows", "studies")
            }:
                raise GradfreeError(
                    f"{out} holds an experiment with other settings; resume needs the same ones."
                )
        elif overwrite:
            shutil.rmtree(out)
        else:
            raise GradfreeError(
                f"The output folder {out} already exists; pass --resume or --overwrite."
            )
    prior: dict[str, Any] = {}
    results_path = out / "results.json"
    if resume and results_path.exists():  # checked before any model is loaded
        data = read_json(results_path, "results file")
        if not isinstance(data, dict) or not isinstance(data.get("rows"), dict):
            raise GradfreeError(f"The results file {results_path} holds no rows; cannot resume.")
        prior = data["rows"]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "experiment.json", record)
    clock = Stopwatch()
    if models is None:
        from gradfree.models import load_pair

        with clock.stage("load teacher and student"):
            teacher, student, _ = load_pair(cfg.teacher, cfg.student, cfg.device, cfg.dtype)
    else:
        teacher, student = models
    torch.manual_seed(0)
    eng = Engine(cfg, out, teacher, student, say, clock)
    eng.results = prior
    rows = order_rows(expand_rows(cfg), cfg)
    with clock.stage("fold norms (function-preserving)"):
        fold_pair_(teacher.model, student.model)
    eng.references()
    for i, row in enumerate(rows):
        if row.name in eng.results and eng.results[row.name].get("config") == _hash(
            row.model_dump(mode="json")
        ):
            continue
        say(f"[{i + 1}/{len(rows)}] {row.name}")
        with clock.stage(f"row {row.name}"):
            res = eng.run_row(row)
        res["config"] = _hash(row.model_dump(mode="json"))
        res["seconds"] = clock.rows[-1]["seconds"]
        res["peak_rss_gib"] = clock.rows[-1]["peak_rss_gib"]
        eng.results[row.name] = res
        write_results(out, cfg, eng.results, eng.refs, clock, final=False)
    write_results(out, cfg, eng.results, eng.refs, clock, final=True)
    if not keep_work:
        shutil.rmtree(eng.work, ignore_errors=True)
    return out


__all__ = ["bootstrap_delta", "run_experiment"]
