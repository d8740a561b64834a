"""Distributed capture: one capture's batches sharded over torch.distributed ranks, every
statistic reduced onto rank 0, which alone writes the capture folder.

This is the pattern of llm-compressor's distributed GPTQ calibration: each rank runs the same
model(s) over its own share of the calibration data and accumulates sufficient statistics
locally (:class:`~gradfree.capture.runner.Accumulation`); the statistics are then
``torch.distributed.reduce``-d onto rank 0 (SUM in float64, MAX for ``absmax``, int64 counts).

Sharding. Rank r of W runs the batches ``[n·r//W, n·(r+1)//W)`` of the single-process capture
(its windows in corpus order, ``batch_size`` per batch): contiguous blocks in corpus order. Every
rank thus runs exactly the batches, padding included, that one process would, so its activations
are bitwise those of the single-process run and the reduced statistics differ from it only by
float64 summation order. Token dumps are gathered in rank order (= corpus order) by a SUM-reduce
of zero-padded blocks (exact) and cut at ``dump_max`` as one process cuts them. A document whose
windows straddle a shard boundary is split at a window boundary; every window is its own forward
pass, so nothing changes.

Work folders and resume. Rank r works in ``<out>.partial/rank-0000r-of-0000W/`` with the
single-process checkpoint protocol (``ckpt-*`` + ``progress.json``, every ``checkpoint_every``
batches) and checkpoints once more when its shard is done, before the reduce. Re-running the same
command with the same world size resumes every rank from its own checkpoint; ranks that had
finished go straight to the reduce, which is restarted (it is not itself checkpointed). Rank 0
writes ``<out>`` atomically, then every rank removes its folder. No shared filesystem is needed:
each node keeps its ranks' folders, and only rank 0's node gets ``<out>``.

Backend: NCCL when the device is CUDA (``cuda`` means ``cuda:LOCAL_RANK``, one GPU per rank),
gloo otherwise. How the ranks are started (``torchrun``, or ``--workers N``) is in :mod:`.launch`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.io import check_new_output, read_json, sha256_text, write_json_atomic
from gradfree.base.progress import ProgressFn
from gradfree.capture.config import CaptureConfig, make_config
from gradfree.capture.dumps import DumpWriter
from gradfree.capture.plan import Plan, make_plan
from gradfree.capture.runner import (
    Accumulation,
    _checkpoint,
    _finish,
    _partial_dir,
    _resume,
    run_batches,
)
from gradfree.capture.store import Capture, load_capture, read_shard, save_shard, verify_shards

_DUMP_CHUNK = 4096  # rows per dump reduce: bounds the zero-padded buffer on every rank


@dataclass(frozen=True)
class World:
    """Where this process stands in the job: global rank/size and rank/size on its node."""

    rank: int
    size: int
    local_rank: int = 0
    local_size: int = 1


def world_from_env(env: Mapping[str, str] | None = None) -> World | None:
    """The world that ``torchrun`` (or the elastic launcher) describes in the environment, or
    None when this process was not started by one."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        raise GradfreeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers.") from None
    if not 0 <= rank < size:
        raise GradfreeError(f"RANK {rank} is outside the world of WORLD_SIZE {size}.")
    return World(rank, size, local, local_size)


def shard_range(n_batches: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of batches that ``rank`` of ``size`` runs."""
    return n_batches * rank // size, n_batches * (rank + 1) // size


def rank_device(device: str, world: World) -> str:
    """``cuda`` means the rank's own GPU, ``cuda:LOCAL_RANK``; anything else is kept."""
    return f"cuda:{world.local_rank}" if device == "cuda" else device


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """The default process group (from the environment) for ranks on ``device``; a group the
    caller already initialised is used as it is."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    # Ranks wait for the slowest one in the reduce: the timeout bounds that wait, not the work.
    timeout = timedelta(seconds=float(os.environ.get("GRADFREE_DIST_TIMEOUT", 7200)))
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


# one rank ---------------------------------------------------------------------------------------
def _rank_dir(root: Path, world: World) -> Path:
    return root / f"rank-{world.rank:05d}-of-{world.size:05d}"


def _check_partial(root: Path, world: World, discard: bool) -> None:
    """Refuse work in ``root`` left by another world size (or a single-process run), or, when
    ``discard``, remove it (once per node)."""
    if not root.is_dir():
        return
    suffix = f"-of-{world.size:05d}"
    foreign = [p for p in root.iterdir() if not p.name.endswith(suffix) and p.name != "final"]
    if not foreign:
        return
    if not discard:
        raise GradfreeError(
            f"{root} holds an interrupted capture with another number of workers; re-run it "
            "with that number, or pass --overwrite to discard it."
        )
    if world.local_rank == 0:
        for p in foreign:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _run_shard(
    work: Accumulation,
    rank_dir: Path,
    rank_hash: str,
    span: tuple[int, int, int],
    progress: bool | ProgressFn,
    on_batch: Callable[[int], None] | None,
) -> tuple[float, float]:
    """Run batches ``[begin, stop)`` of the plan (``span = (first, begin, stop)``); checkpoint
    as one process would, and once more at the end of the shard."""
    plan = work.plan
    _, begin, stop = span
    t0, cpu0 = time.perf_counter(), time.process_time()
    stage = f"capture {'+'.join(plan.roles)}, rank {rank_dir.name.removeprefix('rank-')}"
    run_batches(work, span, rank_dir, rank_hash, stage, progress, on_batch)
    if begin < stop:  # the shard's statistics are safe on disk before the reduce, which may fail
        _checkpoint(work, rank_dir, rank_hash, stop)
    return time.perf_counter() - t0, time.process_time() - cpu0


def _shard_info(plan: Plan, world: World, first: int, stop: int) -> dict[str, Any]:
    """Batches, windows and documents (those with a window in the shard) of one rank."""
    size, length = plan.config.batch_size, plan.config.max_length
    w0, w1 = first * size, min(stop * size, plan.n_windows)
    docs, seen = [], 0
    for i, d in enumerate(plan.documents):
        n = -(-int(d["tokens"]) // length)
        if n and seen < w1 and seen + n > w0:
            docs.append(i)
        seen += n
    return {
        "rank": world.rank,
        "batches": [first, stop],
        "windows": max(0, w1 - w0),
        "documents": len(docs),
        "first_document": docs[0] if docs else None,
    }


_DONE = "shard-done.json"


def _sequential_shard(
    subjects: Mapping[str, Any],
    plan: Plan,
    rank_dir: Path,
    rank_hash: str,
    span: tuple[int, int],
    overwrite: bool,
    progress: bool | ProgressFn,
    stats_device: str | torch.device | None,
    on_block: Callable[[str, int, Any], None] | None = None,
) -> tuple[Accumulation, tuple[float, float]]:
    """This rank's batches block by block into shard files in ``rank_dir``; a record written
    last (``shard-done.json``) lets a resumed run go straight to the reduce."""
    from gradfree.capture.sequential import _Flushed, lazy_devices, sequential_pass

    done_file = rank_dir / _DONE
    done = read_json(done_file, "finished shard record") if done_file.is_file() else None
    if done is not None and done["run_hash"] == rank_hash:
        lazy_devices(subjects, plan)
        work = Accumulation(plan, stats_device, allocate=False)
        acc = _Flushed(moments=work.acc.moments)
        acc.written = dict(done["written"])
        verify_shards(rank_dir, acc.written, f"the finished shard in {rank_dir}")
        work.acc = acc
        work.dumps.restore(done["dumps"])
        work.tokens = dict(done["tokens"])
        return work, (float(done["seconds"][0]), float(done["seconds"][1]))
    done_file.unlink(missing_ok=True)
    title = (
        f"capture {'+'.join(plan.roles)} (sequential), rank {rank_dir.name.removeprefix('rank-')}"
    )
    work, seconds = sequential_pass(
        subjects,
        plan,
        rank_dir,
        rank_hash,
        span=span,
        overwrite=overwrite,
        progress=progress,
        stats_device=stats_device,
        on_block=on_block,
        title=title,
    )
    record = {
        "run_hash": rank_hash,
        "written": work.acc.written,  # type: ignore[attr-defined]
        "dumps": work.dumps.state(),
        "tokens": work.tokens,
        "seconds": list(seconds),
    }
    write_json_atomic(done_file, record)
    return work, seconds


def run_rank(
    subjects: Any,
    documents: Sequence[Any],
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    world: World,
    corpus: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool | ProgressFn = True,
    stats_device: str | torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
    sequential: bool = False,
) -> Capture | None:
    """This rank's part of a distributed capture of ``documents`` (every rank passes all of
    them, in the same order); the default process group must be initialised. Returns the
    capture on rank 0 and None on the other ranks. Arguments as for
    :func:`~gradfree.capture.runner.run_capture`; ``sequential``: the rank runs its shard block
    by block (:mod:`.sequential`; the subjects may be lazy models) and reduces its shard files
    one at a time."""
    cfg = make_config(config)
    if not isinstance(subjects, Mapping):
        subjects = {"model": subjects}
    plan = make_plan(subjects, documents, cfg)
    out = check_new_output(Path(out), overwrite)
    root = _partial_dir(out)
    _check_partial(root, world, discard=overwrite or not resume)
    rank_dir = _rank_dir(root, world)
    first, stop = shard_range(plan.n_batches, world.rank, world.size)
    run_hash = plan.run_hash()
    rank_hash = sha256_text(f"{run_hash}: rank {world.rank} of {world.size}, {first}-{stop}")
    if not resume:
        shutil.rmtree(rank_dir, ignore_errors=True)
    if sequential:
        shown = progress if world.rank == 0 else False
        # on_batch(i) hears of each finished block i here
        blocks = None if on_batch is None else (lambda _role, i, _s: on_batch(i))
        work, seconds = _sequential_shard(
            subjects,
            plan,
            rank_dir,
            rank_hash,
            (first, stop),
            overwrite,
            shown,
            stats_device,
            blocks,
        )
        info = {**_shard_info(plan, world, first, stop), "tokens": dict(work.tokens)}
        info.update(seconds=round(seconds[0], 3), cpu_seconds=round(seconds[1], 3))
        return _reduce_and_write(work, world, out, rank_dir, run_hash, corpus, info)
    work = Accumulation(plan, stats_device)
    begin = max(first, _resume(work, rank_dir, rank_hash, overwrite))
    rank_dir.mkdir(parents=True, exist_ok=True)
    span = (first, begin, stop)
    shown = progress if world.rank == 0 else False
    seconds = _run_shard(work, rank_dir, rank_hash, span, shown, on_batch)
    info = {**_shard_info(plan, world, first, stop), "tokens": dict(work.tokens)}
    info.update(seconds=round(seconds[0], 3), cpu_seconds=round(seconds[1], 3))
    return _reduce_and_write(work, world, out, rank_dir, run_hash, corpus, info)


# the reduce -------------------------------------------------------------------------------------
class ReduceFailed(GradfreeError):
    """A collective of the reduce failed on this rank (typically: another rank died)."""


def _reduce_stats(work: Accumulation) -> None:
    """SUM-reduce every accumulator onto rank 0, in place (MAX for absmax); counts and token
    totals travel as one int64 tensor."""
    import torch.distributed as dist

    acc = work.acc
    moments = [st for keys in acc.moments.values() for ps in keys.values() for st in ps.values()]
    cross = [cs for parts in acc.cross.values() for cs in parts.values()]
    counts = [s.count for s in moments] + [c.count for c in cross]
    counts += [work.tokens["head"], work.tokens["body"]]
    n = torch.tensor(counts, dtype=torch.int64, device=moments[0].device)
    dist.reduce(n, dst=0, op=dist.ReduceOp.SUM)
    for st in moments:
        for t in (st.sum, st.m2, st.m3, st.m4):
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
        dist.reduce(st.absmax, dst=0, op=dist.ReduceOp.MAX)
    for cs in cross:
        for t in (cs.sum_a, cs.sum_b, cs.m_ab):
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
    totals = [int(v) for v in n.tolist()]
    for st, c in zip(moments, totals, strict=False):
        st.count = c
    for cs, c in zip(cross, totals[len(moments) :], strict=False):
        cs.count = c
    work.tokens = {"head": totals[-2], "body": totals[-1], "all": totals[-2] + totals[-1]}


def _reduce_shards(work: Accumulation, rank_dir: Path, final: Path, rank: int) -> dict[str, Any]:
    """SUM-reduce (MAX for absmax) the shard files a sequential rank wrote, one file at a time
    (every rank holds the same files: the plan is the same); rank 0 writes each into ``final``
    and returns their records. The token totals are reduced too."""
    import torch.distributed as dist

    dev = next(iter(work.dev.values()))
    written: dict[str, Any] = {}
    for rel in sorted(work.acc.written):  # type: ignore[attr-defined]
        tensors = read_shard(rank_dir / rel)
        for name in sorted(tensors):
            t = tensors[name].to(dev, copy=True)
            op = dist.ReduceOp.MAX if name.endswith("/absmax") else dist.ReduceOp.SUM
            dist.reduce(t, dst=0, op=op)
            tensors[name] = t
        if rank == 0:
            written[rel] = save_shard(final / rel, tensors)
    n = torch.tensor([work.tokens["head"], work.tokens["body"]], dtype=torch.int64, device=dev)
    dist.reduce(n, dst=0, op=dist.ReduceOp.SUM)
    head, body = (int(v) for v in n.tolist())
    work.tokens = {"head": head, "body": body, "all": head + body}
    return written


def _reduce_dumps(work: Accumulation, rank: int, size: int, rank_dir: Path) -> DumpWriter:
    """The dumped rows of every rank, in rank order and cut at ``dump_max``, on rank 0 (an
    empty writer elsewhere). Each rank fills its rows into a zero block; the SUM is exact."""
    import torch.distributed as dist

    limit, state = work.cfg.dump_max, work.dumps.state()
    merged = DumpWriter(limit)
    for role, rp in work.plan.roles.items():
        dev = work.dev[role]
        for key in rp.dump_keys:
            shards = state.get(f"{role}/{key}", {"shards": []})["shards"]
            parts = [read_shard(rank_dir / s["file"]) for s in shards]
            width = rp.widths[key]
            mine = torch.zeros(0, width + 2, dtype=torch.float64)
            if parts:
                cols = [torch.cat([p["x"] for p in parts]).to(torch.float64)]
                cols += [torch.cat([p[n] for p in parts]).double()[:, None] for n in ("doc", "pos")]
                mine = torch.cat(cols, dim=1)
            rows = torch.zeros(size, dtype=torch.int64, device=dev)
            rows[rank] = mine.shape[0]
            dist.all_reduce(rows, op=dist.ReduceOp.SUM)
            offset = int(rows[:rank].sum())
            total = min(limit, int(rows.sum()))
            for c0 in range(0, total, _DUMP_CHUNK):
                c1 = min(total, c0 + _DUMP_CHUNK)
                block = torch.zeros(c1 - c0, width + 2, dtype=torch.float64, device=dev)
                lo, hi = max(c0, offset), min(c1, offset + mine.shape[0])
                if lo < hi:
                    block[lo - c0 : hi - c0] = mine[lo - offset : hi - offset].to(dev)
                dist.reduce(block, dst=0, op=dist.ReduceOp.SUM)
                if rank == 0:
                    doc, pos = block[:, width].long(), block[:, width + 1].long()
                    merged.add(role, key, block[:, :width].float(), doc, pos)
            if rank == 0 and total == 0:  # the site is listed with no rows, as one process does
                empty = torch.zeros(0, dtype=torch.long)
                merged.add(role, key, torch.zeros(0, width), empty, empty)
    return merged


def _reduce_and_write(
    work: Accumulation,
    world: World,
    out: Path,
    rank_dir: Path,
    run_hash: str,
    corpus: dict[str, Any] | None,
    info: dict[str, Any],
) -> Capture | None:
    """Reduce onto rank 0, which writes ``out`` with the world in its manifest; then every rank
    removes its work folder."""
    import torch.distributed as dist

    infos: list[Any] = [None] * world.size
    final = rank_dir.parent / "final"
    if world.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
    sequential = hasattr(work.acc, "written")  # a sequential rank: its statistics are in files
    try:
        if sequential:
            written = _reduce_shards(work, rank_dir, final, world.rank)
        else:
            _reduce_stats(work)
        dumps = _reduce_dumps(work, world.rank, world.size, rank_dir)
        dist.all_gather_object(infos, info)
    except RuntimeError as e:  # most often a peer that died: then that one is the cause
        raise ReduceFailed(f"The reduce onto rank 0 failed ({e})") from e
    if world.rank == 0:
        work.dumps = dumps
        if sequential:
            work.acc.written = written  # type: ignore[attr-defined]
        extra = {
            "distributed": {
                "world_size": world.size,
                "backend": dist.get_backend(),
                "sharding": "contiguous blocks of batches in corpus order",
                "mode": "sequential" if sequential else "whole-model",
                "ranks": infos,
            }
        }
        wall = max(float(i["seconds"]) for i in infos)
        cpu = sum(float(i["cpu_seconds"]) for i in infos)
        _finish(work, final, out, run_hash, corpus, (wall, cpu), extra)
    dist.barrier()  # the capture exists: the per-rank checkpoints are no longer needed
    shutil.rmtree(rank_dir, ignore_errors=True)
    dist.barrier()
    if world.local_rank == 0:
        shutil.rmtree(rank_dir.parent, ignore_errors=True)
    return load_capture(out, verify=False) if world.rank == 0 else None


__all__ = [
    "ReduceFailed",
    "World",
    "backend_for",
    "process_group",
    "rank_device",
    "run_rank",
    "shard_range",
    "world_from_env",
]
