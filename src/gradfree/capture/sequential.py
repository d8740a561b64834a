"""Sequential (layer-by-layer) capture: one decoder block at a time over every window.

The layout of llm-compressor's sequential pipeline and NVIDIA Model-Optimizer's calibration of
models larger than a device: the embedding runs over all windows first, then block 0 over all
windows, then block 1, ..., then the final norm. Between blocks the hidden states of every window
wait in a scratch file in ``<out>.partial/sequential/`` (plain reads and writes, so they occupy
the page cache, not the process); with a :class:`~gradfree.models.lazy.LazyModel` a block's
weights are read from the safetensors shards just before it runs and dropped after, so memory
holds one block, one batch of activations and one block's statistics (they are written to their
shard as soon as the block is done). Models already in memory run the same way (no memory saved).

How a block is called is not written here: the model's own forward pass is run with every block
replaced by a recorder that returns its input, and the recorder of block i hands back the exact
arguments the model gives it (attention mask, rotary position embeddings, cache off). The site
hooks of :mod:`.hooks` fold the same statistics, head/body parts and dumps in the same order as
a whole-model capture, so the results agree to float64 rounding and the run hash is the same.

Paired captures run the teacher first; its activations at the paired sites are appended to
scratch files (:mod:`.scratch`), and the student's hooks read them back batch by batch for the
cross moments. After every block a state record (``sequential.json``: finished shards, dumps,
scratch indexes) is written last; an interrupted capture resumes after its last finished block.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradfree.adapters import ModelAdapter
from gradfree.base.errors import GradfreeError
from gradfree.base.io import check_new_output, read_json, write_json_atomic
from gradfree.base.progress import ProgressFn, counter, reporting
from gradfree.capture.config import CaptureConfig, make_config
from gradfree.capture.hooks import SiteHooks
from gradfree.capture.plan import RolePlan, make_plan
from gradfree.capture.runner import Accumulation, _Batch, _batches, _finish, _partial_dir
from gradfree.capture.scratch import ScratchFile
from gradfree.capture.sites import split_key
from gradfree.capture.store import Accumulators, Capture, load_capture, verify_shards
from gradfree.models.lazy import LazyModel

OnBlock = Callable[[str, int, Any], None]


class _Flushed(Accumulators):
    """Accumulators whose finished blocks were already written: ``save`` reports them too."""

    written: dict[str, dict[str, Any]]

    def save(self, root: Path) -> dict[str, dict[str, Any]]:
        return {**self.written, **super().save(root)}


class _Recorded(Exception):
    """Raised by the recorder of the wanted block once it has its call's arguments."""


class _Recorder(nn.Module):
    """Stands in for block ``index``: returns its input, or records its call and stops."""

    def __init__(self, index: int, box: _Calls) -> None:
        super().__init__()
        self.index, self.box = index, box

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.index == self.box.want:
            self.box.call = (args, kwargs)
            raise _Recorded
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class _Calls:
    """The model's forward pass, run over recorders, for the arguments of one block."""

    model: nn.Module
    want: int = -1
    call: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def of(self, index: int, **inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.want, self.call = index, None
        with contextlib.suppress(_Recorded):
            self.model(**inputs, use_cache=False)
        assert self.call is not None, "the model's forward did not reach the wanted block"
        return self.call


@contextlib.contextmanager
def _recorders(adapter: ModelAdapter) -> Iterator[_Calls]:
    """Every block of ``adapter.model`` replaced by a recorder (restored on exit)."""
    layers = adapter.layer_modules
    real = list(layers)
    calls = _Calls(adapter.model)
    try:
        for i in range(len(real)):
            layers[i] = _Recorder(i, calls)
        yield calls
    finally:
        for i, block in enumerate(real):
            layers[i] = block


class _BlockHooks(SiteHooks):
    """Site hooks whose RoPE positions are set per batch (blocks are called directly)."""

    @contextlib.contextmanager
    def at(self, positions: torch.Tensor) -> Iterator[None]:
        self._positions, self._cos_sin = positions, {}
        try:
            yield
        finally:
            self._positions, self._cos_sin = None, {}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _hidden_of(call: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(
    call: tuple[tuple[Any, ...], dict[str, Any]], h: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded call with its hidden states replaced by ``h`` (positional or keyword)."""
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": h}


def _materialised(subject: Any, module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    if isinstance(subject, LazyModel):
        return subject.materialised(module)
    return contextlib.nullcontext(module)  # already in memory


@dataclass
class _Run:
    """What every role's pass shares: batches (kept rows, ids, masks), scratch files, state."""

    work: Accumulation
    batches: list[tuple[torch.Tensor, torch.Tensor, _Batch]]
    partial: Path
    run_hash: str
    on_block: OnBlock | None
    bar: Callable[[int], None] = lambda n: None
    kept: dict[str, ScratchFile] = field(default_factory=dict)  # teacher key -> activations
    kept_at: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)  # -> positions
    roles_done: list[str] = field(default_factory=list)
    files: list[ScratchFile] = field(default_factory=list)  # all closed at the end

    @property
    def scratch(self) -> Path:
        return self.partial / "sequential"

    def file(self, name: str, described: dict[str, Any] | None = None) -> ScratchFile:
        self.files.append(ScratchFile(self.scratch / name, described))
        return self.files[-1]

    def flush(self, role: str, keys: Sequence[str]) -> None:
        """Write the finished statistics of ``keys`` (and their cross pairs) and free them."""
        acc = self.work.acc
        assert isinstance(acc, _Flushed)
        done = Accumulators(moments={role: {k: acc.moments[role].pop(k) for k in keys}})
        wanted = set(keys) if role != "teacher" else set()
        for pair in [p for p in acc.cross if p[1] in wanted]:
            done.cross[pair] = acc.cross.pop(pair)
        acc.written.update(done.save(self.partial))
        self.work.dumps.flush(self.partial)

    def checkpoint(self, role: str, block: int, store: ScratchFile | None) -> None:
        """Record that ``role`` finished ``block`` (its output in ``store``), written last."""
        acc = self.work.acc
        assert isinstance(acc, _Flushed)
        for f in [*self.kept.values(), *([store] if store else [])]:
            f.flush()
        state = {
            "run_hash": self.run_hash,
            "roles_done": self.roles_done,
            "role": role,
            "block": block,
            "hidden": store.describe() if store else None,
            "written": acc.written,
            "dumps": self.work.dumps.state(),
            "kept": {k: f.describe() for k, f in self.kept.items()},
            "kept_at": [[k, b, at] for (k, b), at in self.kept_at.items()],
        }
        write_json_atomic(self.partial / _STATE, state)

    def restore(self, state: dict[str, Any]) -> tuple[str, int, ScratchFile | None]:
        """Take up a recorded state: (role in progress, its next block, that block's input)."""
        acc = self.work.acc
        assert isinstance(acc, _Flushed)
        verify_shards(self.partial, state["written"], f"the sequential capture in {self.partial}")
        acc.written = dict(state["written"])
        self.work.dumps.restore(state["dumps"])
        self.roles_done = list(state["roles_done"])
        self.kept = {k: self.file(d["file"], d) for k, d in state["kept"].items()}
        self.kept_at = {(k, int(b)): dict(at) for k, b, at in state["kept_at"]}
        hidden = state["hidden"]
        store = self.file(hidden["file"], hidden) if hidden else None
        return state["role"], int(state["block"]) + 1, store


_STATE = "sequential.json"


def _embedded(run: _Run, subject: Any, adapter: ModelAdapter, calls: _Calls) -> ScratchFile:
    """Block 0's input for every batch, from the model's own embedding step."""
    store = run.file("hidden-0.bin")
    embed = adapter.embed_tokens
    if not run.batches:  # a distributed rank with an empty shard: its statistics stay zero
        return store
    if isinstance(subject, LazyModel) and type(embed) is nn.Embedding:
        # A plain lookup reads only the rows of the tokens seen, not the whole table.
        seen = torch.unique(torch.cat([ids.reshape(-1) for ids, _, _ in run.batches]))
        table = subject.read_rows(embed, seen)
        for ids, mask, _ in run.batches:
            rows = torch.searchsorted(seen, ids).to(table.device)
            call = calls.of(0, inputs_embeds=table[rows], **_inputs(ids, mask, table.device))
            store.append(_hidden_of(call))
        del table
        return store
    with _materialised(subject, embed):
        for ids, mask, _ in run.batches:
            dev = embed.weight.device
            call = calls.of(0, input_ids=ids.to(dev), **_inputs(ids, mask, dev))
            store.append(_hidden_of(call))
    return store


def _inputs(ids: torch.Tensor, mask: torch.Tensor, device: torch.device) -> dict[str, Any]:
    b, t = ids.shape
    positions = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
    return {"attention_mask": mask.to(device), "position_ids": positions}


def _load_kept(run: _Run, b: int, batch: _Batch, keys: Sequence[str], dev: torch.device) -> None:
    for tk in keys:
        at = run.kept_at[(tk, b)]
        batch.kept[tk] = {p: run.kept[tk].read(i, dev) for p, i in at.items()}


def _layout(rp: RolePlan) -> tuple[dict[int | None, list[str]], int]:
    """The role's keys by block (None: the final norm) and the last block that must run."""
    by_layer: dict[int | None, list[str]] = {}
    for k in rp.keys:
        by_layer.setdefault(split_key(k)[0], []).append(k)
    blocks = [k for k in by_layer if k is not None]
    last = rp.adapter.num_layers - 1 if None in by_layer else max(blocks)
    return by_layer, last


def _role(
    run: _Run,
    rp: RolePlan,
    subject: Any,
    sink: Callable[[str, torch.Tensor], None],
    start: int = 0,
    store: ScratchFile | None = None,
) -> None:
    """Run one role block by block over every batch from block ``start`` (whose input is in
    ``store``; from the embedding when ``start`` is 0), folding its sites as they fire."""
    adapter, role, work = rp.adapter, rp.role, run.work
    by_layer, last = _layout(rp)
    partners: dict[int | None, list[str]] = {}
    if role == "student":
        for tk, sk in work.plan.cross_pairs:
            partners.setdefault(split_key(sk)[0], []).append(tk)
    blocks = [adapter.layer(i).module for i in range(last + 1)]  # before the recorders go in
    hooks = _BlockHooks(adapter, rp.keys, sink, stop_early=False)
    hooks.install()
    try:
        with torch.inference_mode(), _recorders(adapter) as calls:
            store = _embedded(run, subject, adapter, calls) if start == 0 else store
            assert store is not None
            for i in range(start, last + 1):
                work.allocate_keys(role, by_layer.get(i, []))
                nxt = run.file(f"hidden-{i + 1}.bin")
                with _materialised(subject, blocks[i]):
                    for b, (ids, mask, batch) in enumerate(run.batches):
                        h = store.read(b, rp.device)
                        inputs = _inputs(ids, mask, rp.device)
                        args, kwargs = _with_hidden(calls.of(i, inputs_embeds=h, **inputs), h)
                        _load_kept(run, b, batch, partners.get(i, []), rp.device)
                        work.batch = batch
                        with hooks.at(inputs["position_ids"]):
                            nxt.append(_first(blocks[i](*args, **kwargs)))
                        work.batch, batch.kept = None, {}
                    if run.on_block is not None:
                        run.on_block(role, i, subject)
                run.flush(role, by_layer.get(i, []))
                run.checkpoint(role, i, nxt)
                store.close()
                store = nxt
                run.bar(1)
            if None in by_layer:
                _final(run, rp, subject, store, by_layer[None], partners.get(None, []))
            store.close()
    finally:
        hooks.remove()
    run.roles_done.append(role)
    run.checkpoint(role, last, None)


def _final(
    run: _Run, rp: RolePlan, subject: Any, store: ScratchFile, keys: list[str], tks: list[str]
) -> None:
    run.work.allocate_keys(rp.role, keys)
    norm = rp.adapter.final_norm
    with _materialised(subject, norm):
        for b, (_, _, batch) in enumerate(run.batches):
            _load_kept(run, b, batch, tks, rp.device)
            run.work.batch = batch
            norm(store.read(b, rp.device))
            run.work.batch, batch.kept = None, {}
    run.flush(rp.role, keys)
    run.bar(1)


def _teacher_sink(run: _Run, sink: Callable[[str, torch.Tensor], None]) -> Callable[..., None]:
    """The teacher's sink, moving its paired activations to scratch files as they arrive."""
    keep = {tk for tk, _ in run.work.plan.cross_pairs}
    index = {id(b): i for i, (_, _, b) in enumerate(run.batches)}

    def wrapped(key: str, x: torch.Tensor) -> None:
        sink(key, x)
        if key in keep:
            batch = run.work.batch
            assert batch is not None
            if key not in run.kept:
                run.kept[key] = run.file(f"kept-{len(run.kept)}.bin")
            picked = batch.kept.pop(key)
            at = {p: run.kept[key].append(v) for p, v in picked.items()}
            run.kept_at[(key, index[id(batch)])] = at

    return wrapped


def _start(partial: Path, run_hash: str, overwrite: bool, resume: bool) -> dict[str, Any] | None:
    """The recorded state of an interrupted sequential capture to resume, or a fresh folder.
    A whole-model checkpoint or another capture's state is not thrown away unasked."""
    state_file = partial / _STATE
    if partial.exists() and resume:
        if (partial / "progress.json").is_file() and not overwrite:
            raise GradfreeError(
                f"{partial} holds an interrupted whole-model capture; run it again without "
                "--sequential to resume it, or pass --overwrite to discard it."
            )
        state = read_json(state_file, "sequential state") if state_file.is_file() else None
        if state is not None and state["run_hash"] == run_hash:
            return state
        if state is not None and not overwrite:
            raise GradfreeError(
                f"{partial} holds an interrupted capture with other models, documents or "
                "settings; choose a new --out or pass --overwrite to discard it."
            )
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "sequential").mkdir(parents=True)
    return None


def lazy_devices(subjects: Mapping[str, Any], plan: Any) -> None:
    """Point each lazy role's plan at its model's device (the skeleton's parameters are on
    meta), where its activations and statistics live."""
    for role, rp in plan.roles.items():
        if isinstance(subjects[role], LazyModel):
            rp.device = subjects[role].device


def sequential_pass(
    subjects: Mapping[str, Any],
    plan: Any,
    partial: Path,
    run_hash: str,
    *,
    span: tuple[int, int] | None = None,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool | ProgressFn = True,
    stats_device: str | torch.device | None = None,
    on_block: OnBlock | None = None,
    title: str | None = None,
) -> tuple[Accumulation, tuple[float, float]]:
    """Run the plan's roles block by block over batches ``span = (first, stop)`` of the plan
    (all when None) in the work folder ``partial``; every statistic ends up in shards there
    (``work.acc.written``). Returns the accumulation and (wall, CPU) seconds of the pass. A
    single process then writes its capture (:func:`run_sequential`); a distributed rank reduces
    its shards onto rank 0 (:mod:`.distributed`)."""
    lazy_devices(subjects, plan)
    state = _start(partial, run_hash, overwrite, resume)
    work = Accumulation(plan, stats_device, allocate=False)
    work.acc = _Flushed(moments=work.acc.moments)
    work.acc.written = {}
    first, stop = span if span is not None else (0, plan.n_batches)
    batches = []
    for b, windows in enumerate(_batches(plan)):
        if first <= b < stop:
            ids, mask = work.prepare(windows)
            assert work.batch is not None
            batches.append((ids, mask, work.batch))
    work.batch = None
    run = _Run(work, batches, partial, run_hash, on_block)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        current, start, store = run.restore(state) if state else ("", 0, None)
        steps = {r: _layout(rp)[1] + 1 + (None in _layout(rp)[0]) for r, rp in plan.roles.items()}
        done = sum(steps[r] for r in run.roles_done) + (
            start if current not in run.roles_done else 0
        )
        with reporting(progress) as report:
            title = title or f"capture {'+'.join(plan.roles)} (sequential)"
            run.bar = counter(report, title, sum(steps.values()), "blocks", done)
            for role, rp in plan.roles.items():  # teacher before student
                if role in run.roles_done:
                    continue
                sink = work.sink(role)
                sink = _teacher_sink(run, sink) if role == "teacher" else sink
                resumed = role == current and start > 0
                _role(run, rp, subjects[role], sink, *((start, store) if resumed else (0, None)))
    finally:
        for f in run.files:
            f.close(unlink=False)  # kept for a resume; the folder goes when the capture is done
    shutil.rmtree(run.scratch)
    (partial / _STATE).unlink()
    return work, (time.perf_counter() - t0, time.process_time() - cpu0)


def run_sequential(
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
    on_block: OnBlock | None = None,
) -> Capture:
    """:func:`~gradfree.capture.run_capture`, one block at a time (see the module docstring).

    After every block the finished statistics and a state record are written; run again, an
    interrupted capture resumes after its last finished block. ``on_block(role, i, subject)``
    is called while block ``i`` of ``role`` is materialised, after it ran over every batch."""
    cfg = make_config(config)
    if not isinstance(subjects, Mapping):
        subjects = {"model": subjects}
    plan = make_plan(subjects, documents, cfg)
    out = check_new_output(Path(out), overwrite)
    partial = _partial_dir(out)
    work, seconds = sequential_pass(
        subjects,
        plan,
        partial,
        plan.run_hash(),
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        stats_device=stats_device,
        on_block=on_block,
    )
    _finish(work, partial, out, plan.run_hash(), corpus, seconds)
    return load_capture(out, verify=False)


def capture_corpus_sequential(
    models: str | Mapping[str, str],
    corpus: str,
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Capture:
    """:func:`~gradfree.capture.corpus.capture_corpus` with lazy models: nothing is loaded
    whole; each model must be a known name or a local safetensors folder."""
    from gradfree.capture.corpus import corpus_inputs
    from gradfree.models.lazy import load_lazy

    check_new_output(Path(out), overwrite)
    docs, manifest, subjects = corpus_inputs(
        models, corpus, split, limit, lambda spec: load_lazy(spec, device=device, dtype=dtype)
    )
    return run_sequential(
        subjects, docs, out, config, corpus=manifest, overwrite=overwrite, progress=progress
    )


__all__ = ["capture_corpus_sequential", "run_sequential", "sequential_pass"]
