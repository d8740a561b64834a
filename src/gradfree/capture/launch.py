"""Starting a distributed capture (:mod:`.distributed`): one command, two ways of running.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) this process is one rank
(:func:`capture_rank`); otherwise ``--workers N`` starts N local ranks with torch's elastic
launcher (:func:`launch_capture`: ``LaunchConfig`` + ``elastic_launch``, a c10d rendezvous on
127.0.0.1, the machinery of ``torchrun`` itself). A rank that fails leaves its one-sentence
reason in a file the launcher reads, so the command ends with one sentence, not a traceback
per rank.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.io import check_new_output
from gradfree.capture.config import CaptureConfig, make_config
from gradfree.capture.distributed import (
    ReduceFailed,
    World,
    process_group,
    rank_device,
    run_rank,
    world_from_env,
)
from gradfree.capture.runner import _partial_dir
from gradfree.capture.store import Capture, load_capture


def _set_threads(world: World) -> None:
    # Ranks on one node share its cores; an explicit OMP_NUM_THREADS (torchrun sets 1) wins.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world.local_size)))


def capture_rank(
    models: str | Mapping[str, str],
    corpus: str,
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    world: World,
    split: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    sequential: bool = False,
) -> Capture | None:
    """:func:`~gradfree.capture.corpus.capture_corpus` as one rank of a distributed capture:
    loads the models on the rank's device (``sequential``: lazily, block by block), joins the
    process group, runs :func:`run_rank`."""
    from gradfree.capture.corpus import corpus_inputs
    from gradfree.models import load_model
    from gradfree.models.lazy import load_lazy

    _set_threads(world)
    dev = rank_device(device, world)
    check_new_output(out, overwrite)
    load = load_lazy if sequential else load_model
    with process_group(dev):
        docs, manifest, subjects = corpus_inputs(
            models, corpus, split, limit, lambda spec: load(spec, device=dev, dtype=dtype)
        )
        return run_rank(
            subjects,
            docs,
            out,
            config,
            world=world,
            corpus=manifest,
            overwrite=overwrite,
            progress=progress,
            on_batch=on_batch,
            sequential=sequential,
        )


def _worker(spec: dict[str, Any], on_batch: Callable[[int], None] | None) -> str | None:
    """The function each launched rank runs: its failure becomes one sentence in a file that
    the launcher reads (a traceback would be printed by every rank)."""
    world = world_from_env()
    assert world is not None, "the elastic launcher sets RANK and WORLD_SIZE"
    args = {k: v for k, v in spec.items() if k != "errors"}
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        cap = capture_rank(**args, world=world, on_batch=on_batch)
    except SignalException:
        raise  # the launcher stops this rank because another one failed: that one reports
    except Exception as e:
        text = str(e) if isinstance(e, GradfreeError) else f"{type(e).__name__}: {e}"
        kind = ".reduce" if isinstance(e, ReduceFailed) else ""  # a consequence, not a cause
        Path(spec["errors"], f"rank-{world.rank:05d}{kind}.txt").write_text(text)
        raise SystemExit(1) from None
    return None if cap is None else str(cap.path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _failure(error: Any, errors: Path, out: Path, workers: int) -> str:
    """One sentence for a failed launch. The cause is, in this order: the first rank that failed
    with its own error, a rank that died without one (killed, exited), a rank whose reduce
    failed (its peer had gone)."""
    notes = sorted(errors.glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)
    noted = {int(p.name.split(".")[0].split("-")[1]): p for p in notes}
    causes = [p for p in notes if not p.name.endswith(".reduce.txt")]
    silent = sorted(r for r in error.failures if r not in noted)
    if causes or not silent:
        note = (causes or notes)[0]
        rank = int(note.name.split(".")[0].split("-")[1])
        what = f"failed ({note.read_text().strip().rstrip('.')})"
    else:
        rank, failure = silent[0], error.failures[silent[0]]
        if failure.exitcode < 0:
            what = f"was killed by {failure.signal_name()}"
        else:
            what = f"exited with status {failure.exitcode}"
    return (
        f"Worker {rank} of {workers} {what}; no capture was written, and the same command "
        f"resumes from the per-rank checkpoints in {_partial_dir(out)}."
    )


def launch_capture(
    models: str | Mapping[str, str],
    corpus: str,
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    workers: int,
    split: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    sequential: bool = False,
) -> Capture:
    """Capture with ``workers`` local ranks started by torch's elastic launcher (a c10d
    rendezvous on 127.0.0.1, no restarts); returns the capture rank 0 wrote. ``on_batch`` runs
    in the workers and must be picklable."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if workers < 1:
        raise GradfreeError(f"--workers must be at least 1, not {workers}.")
    out = check_new_output(Path(out), overwrite)
    spec = {
        "models": models if isinstance(models, str) else dict(models),
        "corpus": corpus,
        "out": str(out),
        "config": make_config(config).model_dump(mode="json"),
        "split": split,
        "limit": limit,
        "device": device,
        "dtype": dtype,
        "overwrite": overwrite,
        "progress": progress,
        "sequential": sequential,
    }
    errors = Path(tempfile.mkdtemp(prefix="gradfree-workers-"))
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        local_addr="127.0.0.1",
        logs_specs=DefaultLogsSpecs(log_dir=str(errors / "logs")),
    )
    # The launcher's own failure reports would repeat (with tracebacks) our one sentence.
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        elastic_launch(launch, _worker)({**spec, "errors": str(errors)}, on_batch)
    except ChildFailedError as e:
        raise GradfreeError(_failure(e, errors, out, workers)) from None
    except SignalException:
        raise KeyboardInterrupt from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        shutil.rmtree(errors, ignore_errors=True)
    return load_capture(out, verify=False)


def capture_distributed(
    models: str | Mapping[str, str],
    corpus: str,
    out: str | Path,
    config: CaptureConfig | dict[str, Any] | None = None,
    *,
    workers: int = 1,
    **kw: Any,
) -> Capture | None:
    """One command for both ways of running: under ``torchrun`` this process is one rank
    (the capture on rank 0, None elsewhere); otherwise ``workers`` local ranks are launched."""
    world = world_from_env()
    if world is None:
        return launch_capture(models, corpus, out, config, workers=workers, **kw)
    if workers > 1:
        raise GradfreeError(
            "Under torchrun the workers are its --nproc-per-node; leave out --workers."
        )
    return capture_rank(models, corpus, out, config, world=world, **kw)


__all__ = ["capture_distributed", "capture_rank", "launch_capture"]
