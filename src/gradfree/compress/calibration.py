"""The calibration of a teacher/student pair: its documents (loaded once, with their manifest)
and the paired capture every recipe is solved from, with the layer map it was captured under.

    cal = Calibration(teacher, student, docs, manifest=manifest, root="work/captures")
    cap = cal.capture(recipe)          # layer map + paired capture, cached in memory and on disk
    sol = cal.solve(recipe)            # capture → project → interpolate [→ attention KL]
    proj = cal.project(recipe)         # or the steps: one projection, many merges
    sol = cal.interpolate(proj, other_merge_recipe); sol.attention_kl = cal.attention_kl(sol)

:func:`gradfree.compress.compress` and ``gradfree experiment`` both run the pipeline through it,
so the sequence and what each step is given (documents, tokenizer, capture) exist once. A capture
is kept in ``root/<key>``: the key hashes the documents' ``source`` (e.g. the experiment's texts
spec), the capture sites and the recipe's capture fields, so recipes that differ only in how they
solve share it, and a folder that already holds a manifest is loaded instead of recaptured.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.capture import Capture, Subject, load_capture, run_capture
from gradfree.compress.bases import BasisSet
from gradfree.compress.recipe import CompressRecipe, make_recipe
from gradfree.compress.solution import Solution, interpolate, measure_attention_kl, project
from gradfree.solvers.layermap import resolve_map

# k_pre (kv_dim wide, so as cheap as v) serves kv="reuse": its teacher×student cross-moment is what
# the per-pair key rotation is solved from. It is captured for every recipe so that one capture
# serves every variant (``gradfree experiment`` solves many recipes from one capture).
CAPTURE_SITES = [
    "resid_pre",
    "attn_in",
    "mlp_in",
    "attn_heads",
    "mlp_hidden",
    "k_pre",
    "v",
    "final.normed",
]
CROSS_SITES = ["resid_pre", "attn_in", "mlp_in", "attn_heads", "k_pre", "v", "final.normed"]
# the recipe fields a paired capture depends on (the others only change how it is solved)
CAPTURE_FIELDS = ("layer_map", "max_length", "batch_size", "dump_rate", "dump_max", "seed")


def spec_hash(obj: Any) -> str:
    """A short stable hash of a JSON-like spec: the name of its cache folder."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_layer_map(
    recipe: CompressRecipe,
    teacher: nn.Module,
    student: nn.Module,
    cka: Callable[[], list[int]] | None = None,
) -> list[int]:
    n_t, n_s = get_adapter(teacher).num_layers, get_adapter(student).num_layers
    if recipe.layer_map == "cka":
        if cka is None:
            raise GradfreeError("The 'cka' layer map needs a calibration pass (use compress()).")
        return cka()
    return resolve_map(recipe.layer_map, n_t, n_s)


def as_subject(obj: Any, fallback_tok: Any = None) -> Subject:
    """A module, a loaded model (``.model``/``.tokenizer``) or a Subject, as a Subject."""
    if isinstance(obj, nn.Module):
        return Subject(obj, fallback_tok)
    return Subject(obj.model, obj.tokenizer, getattr(obj, "name", ""), getattr(obj, "source", ""))


def capture_pair(
    teacher: Any,
    student: Any,
    documents: Sequence[Any],
    folder: str | Path,
    recipe: CompressRecipe,
    layer_map: list[int],
    *,
    progress: bool = False,
    corpus: dict[str, Any] | None = None,
) -> Capture:
    """The paired capture every variant is solved from (``teacher``/``student``: loaded models
    with ``.model``/``.tokenizer`` or Subjects)."""
    cfg = {
        "sites": CAPTURE_SITES,
        "cross_sites": CROSS_SITES,
        "dump_sites": ["mlp_hidden"],
        "layer_map": layer_map,
        "max_length": recipe.max_length,
        "batch_size": recipe.batch_size,
        "dump_rate": recipe.dump_rate,
        "dump_max": recipe.dump_max,
        "seed": recipe.seed,
    }
    subjects = {"teacher": as_subject(teacher), "student": as_subject(student)}
    return run_capture(subjects, documents, folder, cfg, progress=progress, corpus=corpus)


def cka_layer_map(
    teacher: Any, student: Any, documents: Sequence[Any], folder: Path, recipe: CompressRecipe
) -> list[int]:
    """Monotone map maximising Σ_j CKA(student block j input, teacher block m(j) input), from
    token dumps of both models' block inputs (same tokens: dumps are hash-selected)."""
    from gradfree.solvers import linear_cka_from_moments, monotone_layer_map

    cfg = {
        "sites": ["resid_pre"],
        "dump_sites": ["resid_pre"],
        "max_length": recipe.max_length,
        "batch_size": recipe.batch_size,
        "dump_rate": recipe.dump_rate,
        "dump_max": recipe.dump_max,
        "seed": recipe.seed,
        "exclude_first": 1,
    }
    caps = {
        role: run_capture(as_subject(m), documents, folder / role, cfg, progress=False)
        for role, m in (("teacher", teacher), ("student", student))
    }

    def centred(role: str, key: str) -> torch.Tensor:
        x = caps[role].dumps("model", key)["x"].to(torch.float64)
        return x - x.mean(0)

    n_t = get_adapter(as_subject(teacher).model).num_layers
    n_s = get_adapter(as_subject(student).model).num_layers
    xt = [centred("teacher", f"blocks.{i}.resid_pre") for i in range(n_t)]
    xs = [centred("student", f"blocks.{j}.resid_pre") for j in range(n_s)]
    score = torch.zeros(n_s, n_t, dtype=torch.float64)
    for j in range(n_s):
        for i in range(n_t):
            n = xs[j].shape[0]
            score[j, i] = linear_cka_from_moments(
                xs[j].T @ xs[j] / n, xt[i].T @ xt[i] / n, xs[j].T @ xt[i] / n
            )
    return [int(i) for i in monotone_layer_map(score)]


class Calibration:
    """A (folded) teacher and student, the documents they are calibrated on, and the paired
    captures of those documents, one per set of capture fields.

    ``teacher``/``student``: loaded models (``.model``, ``.tokenizer``) or Subjects; fold their
    norms (:func:`~gradfree.compress.pipeline.fold_pair_`) before the first capture. ``manifest``
    (the corpus manifest, when the documents come from a corpus) is recorded in every capture;
    ``source`` names the documents in the cache key (default: the manifest's hash). ``root`` is
    where captures are kept when :meth:`capture` is given no folder. ``clock``/``label``/``say``
    time and announce the stages; ``progress`` shows progress bars.
    """

    def __init__(
        self,
        teacher: Any,
        student: Any,
        documents: Sequence[Any],
        *,
        manifest: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        root: str | Path | None = None,
        label: str = "",
        progress: bool = False,
        clock: Any = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.teacher, self.student, self.documents = teacher, student, documents
        self.manifest = manifest
        if source is None:
            source = {"documents": manifest["sha256"]} if manifest else {}
        self.source = source
        self.root = Path(root) if root is not None else None
        self.label, self.progress, self.clock, self.say = label, progress, clock, say
        self.captures: dict[str, Capture] = {}
        self.last: Capture | None = None  # the capture most recently made or loaded

    @property
    def models(self) -> tuple[nn.Module, nn.Module]:
        return as_subject(self.teacher).model, as_subject(self.student).model

    @property
    def tokenizer(self) -> Any:
        return as_subject(self.student).tokenizer

    def key(self, recipe: CompressRecipe) -> str:
        """The cache key of ``recipe``'s capture of these documents."""
        fields = {f: getattr(recipe, f) for f in CAPTURE_FIELDS}
        return spec_hash({**self.source, "sites": [CAPTURE_SITES, CROSS_SITES], **fields})

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        if self.clock is None:
            yield
            return
        with self.clock.stage(f"{name}: {self.label}" if self.label else name):
            yield

    def capture(self, recipe: CompressRecipe, folder: str | Path | None = None) -> Capture:
        """The layer map and paired capture for ``recipe``'s capture fields (made once; a
        ``folder`` that holds a finished capture is loaded). Default folder: ``root/<key>``."""
        key = self.key(recipe)
        if key in self.captures:
            return self.captures[key]
        if folder is None:
            if self.root is None:
                raise GradfreeError("This calibration has no folder to keep its captures in.")
            folder = self.root / key
        folder = Path(folder)
        if (folder / "manifest.json").exists():
            cap = load_capture(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            cka = folder.with_suffix(".cka")
            tm, sm = self.models
            with self._stage("layer map"):
                lmap = resolve_layer_map(
                    recipe,
                    tm,
                    sm,
                    lambda: cka_layer_map(self.teacher, self.student, self.documents, cka, recipe),
                )
            if self.say is not None:
                self.say(f"paired capture of {self.label} ({len(self.documents)} documents)")
            with self._stage("paired capture"):
                cap = capture_pair(
                    self.teacher,
                    self.student,
                    self.documents,
                    folder,
                    recipe,
                    lmap,
                    progress=self.progress,
                    corpus=self.manifest,
                )
            shutil.rmtree(cka, ignore_errors=True)
        self.captures[key] = self.last = cap
        return cap

    def project(
        self,
        recipe: CompressRecipe,
        *,
        bases: BasisSet | None = None,
        config_changes: Sequence[str] = (),
    ) -> Solution:
        """:func:`~gradfree.compress.solution.project` from this recipe's capture."""
        tm, sm = self.models
        cap = self.capture(recipe)
        return project(tm, sm, cap, recipe, config_changes=config_changes, bases=bases)

    def interpolate(self, projection: Solution, recipe: CompressRecipe) -> Solution:
        """:func:`~gradfree.compress.solution.interpolate`, with these documents for the ridge
        recapture."""
        tm, sm = self.models
        return interpolate(
            projection,
            tm,
            sm,
            self.capture(recipe),
            recipe,
            documents=self.documents,
            tokenizer=self.tokenizer,
            progress=self.progress,
        )

    def attention_kl(self, sol: Solution) -> list[list[float]]:
        """The attention KL of ``sol.model`` against the teacher on these documents."""
        tm, _ = self.models
        cap = self.capture(sol.recipe)
        return measure_attention_kl(sol, tm, self.tokenizer, self.documents, cap)

    def solve(
        self, recipe: CompressRecipe | dict[str, Any] | None, *, config_changes: Sequence[str] = ()
    ) -> Solution:
        """Capture (once), project, interpolate, and measure the attention KL when the recipe
        asks for it (``recipe.attention_kl_windows``)."""
        recipe = make_recipe(recipe)
        self.capture(recipe)
        with self._stage("solve + project + merge"):
            sol = self.interpolate(self.project(recipe, config_changes=config_changes), recipe)
        if recipe.attention_kl_windows:
            with self._stage("attention KL"):
                sol.attention_kl = self.attention_kl(sol)
        return sol
