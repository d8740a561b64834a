"""Run one model, or a teacher and a student on the same tokens, and stream sufficient statistics.

Documents are tokenized one at a time and cut into consecutive windows of at most ``max_length``
tokens (long documents are split, never truncated); windows are batched in corpus order with right
padding. Per batch, every site's activation is masked to the kept real tokens, upcast to float64
once on the stats device and folded into head/body :class:`MomentStats` as its hook fires, so at
most one batch of activations is alive. In a paired run the teacher goes first and keeps only its
paired sites' real tokens (in its own dtype); the student's hooks then fold the cross moments.

Work happens in ``<out>.partial/``: every ``checkpoint_every`` batches the accumulators go to a new
``ckpt-*`` folder and ``progress.json`` (written atomically, last) points at it. Re-running with the
same models, documents and config resumes from there; the finished folder is renamed to ``<out>``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.io import check_new_output, read_json, sha256_file, write_json_atomic
from gradfree.base.progress import ProgressFn, counter, reporting
from gradfree.base.provenance import versions
from gradfree.capture.config import CaptureConfig, make_config
from gradfree.capture.dumps import DumpWriter, doc_key, select
from gradfree.capture.hooks import SiteHooks, site_hooks
from gradfree.capture.plan import Plan, make_plan
from gradfree.capture.stats import CrossStats, MomentStats
from gradfree.capture.store import (
    FORMAT,
    Accumulators,
    Capture,
    cross_name,
    cross_shard,
    load_capture,
    moment_shard,
    verify_shards,
)
from gradfree.models.lazy import LazyModel


@dataclass
class _Window:
    doc: int  # index in the document list
    start: int  # position of the window's first token in its document
    ids: list[int]


@dataclass
class _Batch:
    """Row indices (into the flattened batch·tokens axis) of the kept tokens of one batch."""

    rows: dict[str, torch.Tensor]  # part -> rows
    dump_rows: torch.Tensor
    dump_doc: torch.Tensor
    dump_pos: torch.Tensor
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # teacher activations
    _moved: dict[torch.device, tuple[dict[str, torch.Tensor], torch.Tensor]] = field(
        default_factory=dict
    )

    def on(self, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The part rows and dump rows on ``device`` (copied once per device and batch)."""
        if device not in self._moved:
            rows = {p: r.to(device) for p, r in self.rows.items()}
            self._moved[device] = (rows, self.dump_rows.to(device))
        return self._moved[device]


def _batches(plan: Plan) -> Iterator[list[_Window]]:
    """Windows of every document in corpus order, grouped into batches."""
    size, length = plan.config.batch_size, plan.config.max_length
    batch: list[_Window] = []
    for i, ids in enumerate(plan.iter_token_ids()):
        for start in range(0, len(ids), length):
            batch.append(_Window(i, start, ids[start : start + length]))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


class Accumulation:
    """The running statistics of one capture and the hook sinks that feed them."""

    def __init__(
        self,
        plan: Plan,
        stats_device: str | torch.device | None = None,
        allocate: bool = True,
    ) -> None:
        self.plan, self.cfg = plan, plan.config
        self.parts = ("head", "body") if self.cfg.has_head else ("body",)
        self.acc = Accumulators()
        self.dumps = DumpWriter(self.cfg.dump_max)
        self.tokens = {"all": 0, "head": 0, "body": 0}
        self.dev: dict[str, torch.device] = {}
        self.batch: _Batch | None = None
        for role, rp in plan.roles.items():
            # Statistics live with the model, except where float64 is unsupported (Apple MPS).
            dev = torch.device(stats_device) if stats_device else rp.device
            self.dev[role] = torch.device("cpu") if dev.type == "mps" else dev
            self.acc.moments[role] = {}
            if allocate:  # a sequential capture allocates block by block (allocate_keys)
                self.allocate_keys(role, rp.keys)
        seed = self.cfg.seed
        self.doc_keys = np.array([doc_key(seed, d["id"]) for d in plan.documents], np.uint64)

    def allocate_keys(self, role: str, keys: Sequence[str]) -> None:
        """Empty accumulators for ``keys`` of ``role``, and for the cross pairs of student keys."""
        rp, dev = self.plan.roles[role], self.dev[role]
        for k in keys:
            self.acc.moments[role][k] = {
                p: MomentStats.empty(rp.widths[k], rp.full[k], dev) for p in self.parts
            }
        if role == "student":
            t, wanted = self.plan.roles["teacher"], set(keys)
            for tk, sk in self.plan.cross_pairs:
                if sk in wanted:
                    self.acc.cross[(tk, sk)] = {
                        p: CrossStats.empty(t.widths[tk], rp.widths[sk], dev) for p in self.parts
                    }

    def prepare(self, windows: list[_Window]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad a batch, compute its kept rows per part and its dumped rows; count tokens."""
        cfg = self.cfg
        b, t = len(windows), max(len(w.ids) for w in windows)
        ids = torch.full((b, t), self.plan.pad_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for r, w in enumerate(windows):
            ids[r, : len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
            mask[r, : len(w.ids)] = 1
        pos = torch.arange(t).expand(b, t)
        keep = mask.bool() & (pos >= cfg.exclude_first)
        rows = {
            "head": (keep & (pos < cfg.split_first)).flatten().nonzero().squeeze(1),
            "body": (keep & (pos >= cfg.split_first)).flatten().nonzero().squeeze(1),
        }
        for p in ("head", "body"):
            self.tokens[p] += int(rows[p].numel())
        self.tokens["all"] = self.tokens["head"] + self.tokens["body"]
        dump_rows = dump_doc = dump_pos = torch.zeros(0, dtype=torch.long)
        if cfg.dump_sites:
            kept = keep.flatten().nonzero().squeeze(1)
            docs = torch.tensor([w.doc for w in windows])[kept // t]
            doc_pos = torch.tensor([w.start for w in windows])[kept // t] + kept % t
            chosen = torch.from_numpy(
                select(self.doc_keys[docs.numpy()], doc_pos.numpy(), cfg.dump_rate)
            )
            dump_rows, dump_doc, dump_pos = kept[chosen], docs[chosen], doc_pos[chosen]
        self.batch = _Batch(rows, dump_rows, dump_doc, dump_pos)
        return ids, mask

    def sink(self, role: str) -> Callable[[str, torch.Tensor], None]:
        """The function that the role's hooks call with each (key, activation)."""
        moments, dev = self.acc.moments[role], self.dev[role]
        dump_keys = set(self.plan.roles[role].dump_keys)
        keep = {tk for tk, _ in self.plan.cross_pairs} if role == "teacher" else set()
        partners: dict[str, list[str]] = {}
        if role == "student":
            for tk, sk in self.plan.cross_pairs:
                partners.setdefault(sk, []).append(tk)

        def sink(key: str, x: torch.Tensor) -> None:
            batch = self.batch
            assert batch is not None, "activations arrived outside a batch"
            flat = x.reshape(-1, x.shape[-1])
            rows, dump_rows = batch.on(x.device)
            picked = {p: flat.index_select(0, rows[p]) for p in self.parts}
            wide = {p: v.to(dev, torch.float64) for p, v in picked.items()}  # upcast once
            for p, st in moments[key].items():
                st.update(wide[p])
            if key in dump_keys and not self.dumps.full(role, key):
                dumped = flat.index_select(0, dump_rows)
                self.dumps.add(role, key, dumped, batch.dump_doc, batch.dump_pos)
            if key in keep:
                batch.kept[key] = picked
            for tk in partners.get(key, []):
                for p, cs in self.acc.cross[(tk, key)].items():
                    cs.update(batch.kept[tk][p].to(dev, torch.float64), wide[p])

        return sink

    def run_batch(self, windows: list[_Window], hooks: Mapping[str, SiteHooks]) -> None:
        ids, mask = self.prepare(windows)
        try:
            with torch.inference_mode():
                for role, rp in self.plan.roles.items():  # teacher before student
                    hooks[role].forward(ids.to(rp.device), mask.to(rp.device))
        finally:
            self.batch = None  # drop every activation of the batch


# checkpoints -------------------------------------------------------------------------------------
def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _checkpoint(work: Accumulation, partial: Path, run_hash: str, batches_done: int) -> None:
    ckpt = partial / f"ckpt-{batches_done:08d}"
    shutil.rmtree(ckpt, ignore_errors=True)
    shards = work.acc.save(ckpt)
    work.dumps.flush(partial)
    progress = {
        "run_hash": run_hash,
        "batches_done": batches_done,
        "checkpoint": ckpt.name,
        "shards": shards,
        "tokens": work.tokens,
        "dumps": work.dumps.state(),
    }
    write_json_atomic(partial / "progress.json", progress)
    _clean(partial, keep=ckpt.name, dumps=work.dumps.state())


def _clean(partial: Path, keep: str | None, dumps: dict[str, Any]) -> None:
    """Remove checkpoints other than ``keep`` and dump shards that no checkpoint records."""
    for p in partial.glob("ckpt-*"):
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    recorded = {s["file"] for entry in dumps.values() for s in entry["shards"]}
    for p in partial.glob("dumps/**/*.safetensors"):
        if p.relative_to(partial).as_posix() not in recorded:
            p.unlink()


def _resume(work: Accumulation, partial: Path, run_hash: str, overwrite: bool) -> int:
    """Load the last checkpoint of a matching interrupted run; return the batches it covers."""
    progress_file = partial / "progress.json"
    if not partial.exists():
        return 0
    progress = read_json(progress_file, "progress file") if progress_file.is_file() else None
    if progress is None and (partial / "sequential.json").is_file() and not overwrite:
        raise GradfreeError(
            f"{partial} holds an interrupted sequential capture; run it again with --sequential "
            "to resume it, or pass --overwrite to discard it."
        )
    if progress is None or (progress["run_hash"] != run_hash and overwrite):
        shutil.rmtree(partial)
        return 0
    if progress["run_hash"] != run_hash:
        raise GradfreeError(
            f"{partial} holds an interrupted capture with other models, documents or settings; "
            "choose a new --out or pass --overwrite to discard it."
        )
    ckpt = partial / progress["checkpoint"]
    verify_shards(ckpt, progress["shards"], f"the checkpoint in {partial}")
    work.acc.load(ckpt)
    work.tokens = dict(progress["tokens"])
    work.dumps.restore(progress["dumps"])
    _clean(partial, keep=ckpt.name, dumps=progress["dumps"])
    return int(progress["batches_done"])


def run_batches(
    work: Accumulation,
    span: tuple[int, int, int],
    folder: Path,
    run_hash: str,
    stage: str,
    progress: bool | ProgressFn,
    on_batch: Callable[[int], None] | None,
) -> None:
    """Run batches ``[begin, stop)`` of the plan into ``work`` (``span = (first, begin, stop)``:
    the progress bar counts from ``first``), checkpointing into ``folder`` every
    ``checkpoint_every`` batches before ``stop``. One process runs (0, start, n_batches); a
    distributed rank runs its shard."""
    plan = work.plan
    first, begin, stop = span
    with ExitStack() as stack:
        hooks = {
            role: stack.enter_context(site_hooks(rp.adapter, rp.keys, work.sink(role)))
            for role, rp in plan.roles.items()
        }
        report = stack.enter_context(reporting(progress))
        bar = counter(report, stage, stop - first, "batches", begin - first)
        for b, windows in enumerate(_batches(plan)):
            if b >= stop:
                break
            if b < begin:
                continue
            work.run_batch(windows, hooks)
            if (b + 1) % work.cfg.checkpoint_every == 0 and b + 1 < stop:
                _checkpoint(work, folder, run_hash, b + 1)
            bar(1)
            if on_batch is not None:
                on_batch(b)


# the public entry point ---------------------------------------------------------------------------
def run_capture(
    subjects: Any,
    documents: Sequence[Any],
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    corpus: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool | ProgressFn = True,
    stats_device: str | torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
    sequential: bool = False,
) -> Capture:
    """Capture activation statistics of one model or a teacher/student pair into ``out``.

    ``subjects`` is one subject (a ``LoadedModel`` or :class:`Subject`: .model, .tokenizer and
    optionally .name/.source/.fingerprint) or a mapping ``{"teacher": ..., "student": ...}``.
    ``documents`` are strings or objects with ``.id`` and ``.text``; ``corpus`` is the corpus
    manifest recorded as given. ``on_batch(i)`` is called after batch i (and its checkpoint).
    ``progress``: True reports batches on stderr (:mod:`gradfree.base.progress`), or a reporter.
    ``sequential`` (implied by :class:`~gradfree.models.lazy.LazyModel` subjects) runs one block
    at a time over all windows (:mod:`gradfree.capture.sequential`): same statistics, same run
    hash, a fraction of the memory; it resumes after its last finished block; no ``on_batch``.
    """
    cfg = make_config(config)
    if not isinstance(subjects, Mapping):
        subjects = {"model": subjects}
    if sequential or any(isinstance(s, LazyModel) for s in subjects.values()):
        from gradfree.capture.sequential import run_sequential

        return run_sequential(
            subjects,
            documents,
            out,
            cfg,
            corpus=corpus,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            stats_device=stats_device,
        )
    plan = make_plan(subjects, documents, cfg)
    out = check_new_output(Path(out), overwrite)
    partial = _partial_dir(out)
    run_hash = plan.run_hash()
    work = Accumulation(plan, stats_device)
    if not resume and partial.exists():
        shutil.rmtree(partial)
    start = _resume(work, partial, run_hash, overwrite)
    partial.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    stage = f"capture {'+'.join(plan.roles)}"
    run_batches(work, (0, start, plan.n_batches), partial, run_hash, stage, progress, on_batch)
    seconds = (time.perf_counter() - t0, time.process_time() - cpu0)
    _finish(work, partial, out, run_hash, corpus, seconds)
    return load_capture(out, verify=False)  # just written and hashed


def _finish(
    work: Accumulation,
    partial: Path,
    out: Path,
    run_hash: str,
    corpus: dict[str, Any] | None,
    seconds: tuple[float, float],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the final shards, documents, config and manifest; rename ``partial`` to ``out``.
    ``extra`` adds manifest entries (a distributed capture records its world there)."""
    plan, cfg = work.plan, work.cfg
    shards = work.acc.save(partial)
    work.dumps.flush(partial)
    dumps = work.dumps.state()
    for entry in dumps.values():
        for s in entry["shards"]:
            path = partial / s["file"]
            shards[s["file"]] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_json_atomic(partial / "documents.json", plan.documents)
    write_json_atomic(partial / "config.json", cfg.model_dump(mode="json"))
    manifest = {
        "format": FORMAT,
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "run_hash": run_hash,
        "settings_hash": plan.settings_hash(),
        "roles": {
            r: {**rp.describe(), "tokens": dict(work.tokens)} for r, rp in plan.roles.items()
        },
        "corpus": corpus or {},
        "documents": {
            "file": "documents.json",
            "count": len(plan.documents),
            "sha256": sha256_file(partial / "documents.json"),
        },
        "sites": cfg.sites,
        "cross_sites": cfg.paired_sites() if plan.paired else [],
        "layer_map": plan.layer_map,
        "dtypes": {"stats": "float64", "dumps": "float32"},
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "exclude_first": cfg.exclude_first,
        "split_first": cfg.split_first,
        "seed": cfg.seed,
        "windows": plan.n_windows,
        "seconds": round(seconds[0], 3),  # the batch loop (this session, if resumed): wall
        "cpu_seconds": round(seconds[1], 3),  # and CPU time of all threads
        "stats_index": {
            r: {k: moment_shard(r, k) for k in rp.keys} for r, rp in plan.roles.items()
        },
        "cross_index": {cross_name(t, s): cross_shard(s) for t, s in plan.cross_pairs},
        "dumps": dumps,
        "shards": shards,
        **(extra or {}),
    }
    write_json_atomic(partial / "manifest.json", manifest)
    _clean(partial, keep=None, dumps=dumps)
    (partial / "progress.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
