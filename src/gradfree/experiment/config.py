"""The experiment config: seed 000's research matrix as one strict pydantic model.

A config names the pair, the calibration / validation / evaluation texts, a base recipe and the
rows. Studies (an α sweep on selected layers, data efficiency, task transfer, composability of
bases) expand into ordinary rows, so that the engine only knows one kind of row
(:func:`expand_rows`). Unknown or inconsistent fields fail with one sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradfree.base.configfile import Device, DType, make_strict, read_yaml_mapping


class Texts(BaseModel):
    """Documents of a corpus: ``split``, then ``skip`` documents dropped, then at most ``limit``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str = "tourguide"
    split: str | None = None
    skip: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)

    def key(self) -> str:
        return f"{self.corpus}:{self.split or 'all'}:{self.skip}:{self.limit or 'all'}"

    def overlaps(self, other: Texts) -> bool:
        """Whether both select a common document (same corpus and split, ranges intersecting)."""
        if (self.corpus, self.split) != (other.corpus, other.split):
            return False
        end = self.skip + self.limit if self.limit else float("inf")
        other_end = other.skip + other.limit if other.limit else float("inf")
        return self.skip < other_end and other.skip < end

    def label(self) -> str:
        part = f"/{self.split}" if self.split else ""
        n = f"[{self.skip}:{self.skip + self.limit}]" if self.limit else f"[{self.skip}:]"
        return f"{self.corpus}{part}{n}"


class Blend(BaseModel):
    """Composability: the residual bases are the point at ``weight`` on the Grassmann geodesic
    from this row's bases to the bases solved from a capture on ``calibration``."""

    model_config = ConfigDict(extra="forbid")

    calibration: Texts
    weight: float = Field(0.5, ge=0.0, le=1.0)


class Continuations(BaseModel):
    """Teacher-written calibration text (issue 17 part 4): the first ``prompt_tokens`` tokens of
    each calibration document, continued greedily by the teacher for ``new_tokens`` tokens
    (:func:`gradfree.texts.continuations.continuations`), fitted on beside the documents."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(8, ge=1)


class Refit(BaseModel):
    """Closed-form refit of the last ``blocks`` MLP writers toward the final states that the
    head maps closest to the teacher's centred logits (:mod:`gradfree.compress.refit`; state
    prior ``mu`` and ridge ``lam`` relative). Each block's strength α is chosen on validation KL
    among ``alphas`` and 0; with ``rehead`` the head is distilled again on the refitted states."""

    model_config = ConfigDict(extra="forbid")

    blocks: int = Field(1, ge=1)
    mu: float = Field(1.0, gt=0)
    lam: float = Field(1e-2, ge=0)
    alphas: list[float] = [0.25, 0.5, 1.0]
    rehead: bool = True


class Row(BaseModel):
    """One model to build and measure.

    ``kind``: "student" (the native student), "teacher" (the teacher itself, reference row),
    "compress" (a recipe, optionally with a distilled head). ``recipe`` overrides the config's
    base recipe. ``calibration`` overrides the config's calibration texts. ``head`` distils the
    LM head of the result (λ, β chosen on the validation texts' KL). ``validation`` overrides
    the config's validation texts for this row's measured choices (head, measured α).
    ``continuations`` adds teacher-written text to a student row's calibration; ``refit`` moves
    a student row's last MLP writers after its head (both issue 17 part 4).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str = "compress"
    study: str = "matrix"
    recipe: dict[str, Any] = Field(default_factory=dict)
    calibration: Texts | None = None
    validation: Texts | None = None
    head: bool = False
    blend: Blend | None = None
    continuations: Continuations | None = None
    refit: Refit | None = None

    @model_validator(mode="after")
    def _check(self) -> Row:
        if self.kind not in ("student", "teacher", "compress"):
            raise ValueError(f"row {self.name!r}: kind is 'student', 'teacher' or 'compress'")
        if self.kind != "compress" and (self.recipe or self.blend or self.calibration):
            raise ValueError(f"row {self.name!r}: a {self.kind} row takes no recipe")
        if self.kind == "teacher" and self.head:
            raise ValueError(f"row {self.name!r}: the teacher row has no head to distil")
        if (self.continuations or self.refit) and not (self.kind == "student" and self.head):
            raise ValueError(
                f"row {self.name!r}: continuations and refit belong to a student row with a head"
            )
        return self


class AlphaSweep(BaseModel):
    """α from 0 to 1 on one student block at a time (the others keep the student's weights)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int]
    alphas: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    recipe: dict[str, Any] = Field(default_factory=dict)


class DataEfficiency(BaseModel):
    """The named rows again, calibrated on the first N calibration documents for each N."""

    model_config = ConfigDict(extra="forbid")

    sizes: list[int]
    rows: list[str]


class Transfer(BaseModel):
    """The named rows calibrated on other texts (evaluation stays the same). ``validation``:
    texts of the calibration's domain for the measured choices, so that no choice sees the task
    (default: the config's validation texts)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    calibration: Texts
    validation: Texts | None = None
    rows: list[str]


class Composability(BaseModel):
    """The named rows with bases blended with those of another task's capture."""

    model_config = ConfigDict(extra="forbid")

    calibration: Texts
    weights: list[float] = [0.3]
    rows: list[str]


class Studies(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha_sweep: AlphaSweep | None = None
    data_efficiency: DataEfficiency | None = None
    transfer: list[Transfer] = []
    composability: Composability | None = None


class ExperimentConfig(BaseModel):
    """Everything ``gradfree experiment`` does, recorded as ``experiment.json`` in the output."""

    model_config = ConfigDict(extra="forbid")

    teacher: str
    student: str
    device: Device = "cpu"
    dtype: DType = "float32"
    calibration: Texts = Texts(corpus="tourguide", split="calibration", skip=0, limit=32)
    validation: Texts = Texts(corpus="tourguide", split="calibration", skip=32, limit=12)
    task: Texts = Texts(corpus="tourguide", split="heldout", skip=0, limit=12)
    out_of_task: list[Texts] = [Texts(corpus="news", split="heldout", skip=0, limit=6)]
    questions: int = Field(16, ge=0)
    max_length: int = Field(256, ge=2)
    batch_size: int = Field(4, ge=1)
    recipe: dict[str, Any] = Field(default_factory=dict)
    head_lambdas: list[float] = [0.1, 1.0, 10.0]
    head_blends: list[float] = [0.25, 0.5, 0.75, 1.0]
    rows: list[Row]
    studies: Studies = Studies()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [r.name for r in self.rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"row names must be unique ({', '.join(dup)} repeated)")
        groups = [self.studies.data_efficiency, *self.studies.transfer, self.studies.composability]
        for study in groups:
            for n in study.rows if study is not None else []:
                if n not in names:
                    raise ValueError(f"a study names the row {n!r}, which is not in rows")
        sweep = self.studies.alpha_sweep
        if sweep is not None and any(not 0.0 <= a <= 1.0 for a in sweep.alphas):
            raise ValueError("alpha_sweep alphas must be between 0 and 1")
        de = self.studies.data_efficiency
        if de is not None and any(n < 1 for n in de.sizes):
            raise ValueError("data_efficiency sizes must be at least 1")
        self._check_disjoint()
        return self

    def _check_disjoint(self) -> None:
        """Calibration texts (of every row, study and blend) share no document with the
        validation, task or out-of-task texts: scores on seen documents would flatter a row."""
        tested = {"task": self.task}
        tested.update({f"out-of-task {t.label()}": t for t in self.out_of_task})
        fitted: list[tuple[str, str, Texts, Texts | None]] = [
            ("calibration", "the config", self.calibration, self.validation)
        ]
        fitted.append(("validation", "the config", self.validation, None))
        for r in expand_rows(self):
            who, val = f"row {r.name!r}", r.validation or self.validation
            fitted.append(("calibration", who, r.calibration or self.calibration, val))
            if r.blend is not None:
                fitted.append(("calibration", f"{who} (blend)", r.blend.calibration, val))
            if r.validation is not None:
                fitted.append(("validation", who, r.validation, None))
        for kind, who, texts, chosen_on in fitted:
            held = dict(tested) if chosen_on is None else {"validation": chosen_on, **tested}
            for what, other in held.items():
                if texts.overlaps(other):
                    raise ValueError(
                        f"the {kind} texts {texts.label()} of {who} overlap the {what} texts "
                        f"{other.label()}; held-out texts must be disjoint from what is fitted "
                        "or chosen on"
                    )


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    return make_experiment(read_yaml_mapping(path, "experiment file"))


def make_experiment(data: dict[str, Any]) -> ExperimentConfig:
    """A validated :class:`ExperimentConfig` from a mapping (one-sentence errors)."""
    return make_strict(ExperimentConfig, data, noun="experiment config")


def expand_rows(cfg: ExperimentConfig) -> list[Row]:
    """The config's rows followed by every study's rows (names say where each comes from)."""
    rows = list(cfg.rows)
    by_name = {r.name: r for r in cfg.rows}
    st = cfg.studies
    if st.alpha_sweep is not None:
        for layer in st.alpha_sweep.layers:
            for a in st.alpha_sweep.alphas:
                recipe = {
                    **st.alpha_sweep.recipe,
                    "merge": "uniform",
                    "alpha": a,
                    "merge_layers": [layer],
                }
                rows.append(Row(name=f"sweep/L{layer}/α={a:g}", study="alpha_sweep", recipe=recipe))

    def again(names: list[str], suffix: str, study: str, **update: Any) -> None:
        """The named rows once more, renamed ``name`` + ``suffix``, with fields replaced."""
        for name in names:
            upd = {"name": f"{name}{suffix}", "study": study, **update}
            rows.append(by_name[name].model_copy(update=upd))

    if st.data_efficiency is not None:
        for n in st.data_efficiency.sizes:
            texts = cfg.calibration.model_copy(update={"limit": n})
            again(st.data_efficiency.rows, f"@{n}", "data_efficiency", calibration=texts)
    for tr in st.transfer:
        again(
            tr.rows,
            f"@{tr.name}",
            "transfer",
            calibration=tr.calibration,
            validation=tr.validation,
        )
    comp = st.composability
    if comp is not None:
        for w in comp.weights:
            blend = Blend(calibration=comp.calibration, weight=w)
            again(comp.rows, f"+blend{w:g}", "composability", blend=blend)
    return rows
