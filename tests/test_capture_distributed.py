"""Distributed capture with real processes: 2 gloo ranks on CPU (torch's elastic launcher) must
give the single-process capture of the same documents (float64, ≤ 1e-12 relative), a rank that
dies gives one sentence and no capture, and the same command then resumes from the per-rank
checkpoints."""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from gradfree.base.errors import GradfreeError
from gradfree.capture import Capture, load_capture, make_config
from gradfree.capture.corpus import capture_corpus
from gradfree.capture.distributed import shard_range, world_from_env
from gradfree.capture.launch import capture_distributed, launch_capture
from gradfree.testing.tiny import save_tiny

OPTIONS = {"max_length": 32, "batch_size": 2, "dump_rate": 0.3, "checkpoint_every": 1}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    save_tiny(root / "teacher", "qwen3", num_hidden_layers=3)
    save_tiny(root / "student", "qwen3", seed=1, hidden_size=48, head_dim=12)
    # Lengths differ, so windows of one document straddle batches and the ranks' shards.
    lines = [
        json.dumps({"id": f"t{i}", "text": f"Stop {i}: the old town. " * (2 * i + 1)})
        for i in range(7)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def _one_thread_workers(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks


def _reference(work: Path, models: str | dict[str, str], name: str, **config: object) -> Capture:
    out = work / f"ref-{name}"
    if out.exists():
        return load_capture(out)
    cfg = make_config({**OPTIONS, **config})
    return capture_corpus(models, str(work / "docs.jsonl"), out, cfg, progress=False)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = float((a - b).norm()) / max(float(b.norm()), 1e-300)
    assert err <= 1e-12, f"{what}: relative difference {err:.2e}"


def assert_same_capture(got: Capture, want: Capture) -> None:
    """Every statistic, cross moment and dump of ``got`` equals ``want``'s."""
    assert got.roles == want.roles and got.cross_pairs() == want.cross_pairs()
    assert [d["id"] for d in got.documents()] == [d["id"] for d in want.documents()]
    for role in want.roles:
        assert got.manifest["roles"][role]["tokens"] == want.manifest["roles"][role]["tokens"]
        assert got.keys(role) == want.keys(role)
        for key in want.keys(role):
            for part in ("head", "body"):
                g, w = got.stats(role, key, part), want.stats(role, key, part)
                assert g.count == w.count > 0
                for f in ("sum", "m2", "m3", "m4"):
                    _close(getattr(g, f), getattr(w, f), f"{role} {key} {part} {f}")
                assert torch.equal(g.absmax, w.absmax)
        assert sorted(got.dump_keys(role)) == sorted(want.dump_keys(role))
        for key in want.dump_keys(role):
            g, w = got.dumps(role, key), want.dumps(role, key)
            assert w["x"].shape[0] > 0
            for name in ("x", "doc", "pos"):
                assert torch.equal(g[name], w[name]), f"dumps of {role} {key}: {name}"
    for tk, sk in want.cross_pairs():
        for part in ("head", "body"):
            g, w = got.cross(tk, sk, part), want.cross(tk, sk, part)
            assert g.count == w.count > 0
            for f in ("sum_a", "sum_b", "m_ab"):
                _close(getattr(g, f), getattr(w, f), f"cross {tk}~{sk} {part} {f}")


def test_world_and_shards() -> None:
    assert world_from_env({}) is None
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert w is not None and (w.rank, w.size, w.local_rank, w.local_size) == (3, 8, 1, 2)
    with pytest.raises(GradfreeError, match="outside the world"):
        world_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    for n, size in ((12, 2), (5, 3), (2, 4)):
        spans = [shard_range(n, r, size) for r in range(size)]
        assert spans[0][0] == 0 and spans[-1][1] == n  # contiguous, covering, in order
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def _rank1_start(cap: Capture) -> int:
    """The first batch of rank 1 of 2, from the reference capture's window count."""
    return shard_range(-(-int(cap.manifest["windows"]) // OPTIONS["batch_size"]), 1, 2)[0]


def _window_of(cap: Capture, doc: int, pos: int) -> int:
    """The index, in corpus order, of the window holding token ``pos`` of document ``doc``."""
    length = OPTIONS["max_length"]
    before = sum(-(-int(d["tokens"]) // length) for d in cap.documents()[:doc])
    return before + pos // length


def test_paired_capture_with_two_ranks_via_the_cli(work: Path, run_cli) -> None:
    out, dump_max = work / "paired", 250
    args = ["capture", "--teacher", str(work / "teacher"), "--student", str(work / "student")]
    args += ["--corpus", str(work / "docs.jsonl"), "--out", str(out), "--workers", "2"]
    args += ["--max-length", "32", "--batch-size", "2", "--sites", "resid_pre,v,final.normed"]
    args += ["--dump-sites", "resid_pre", "--dump-rate", "0.3", "--dump-max", str(dump_max)]
    args += ["--checkpoint-every", "1", "--no-progress"]
    code, stdout, err = run_cli(args)
    assert code == 0, err
    assert stdout.strip() == str(out) and not out.with_name("paired.partial").exists()
    got = load_capture(out)
    models = {"teacher": str(work / "teacher"), "student": str(work / "student")}
    sites = {"sites": "resid_pre,v,final.normed", "dump_sites": "resid_pre"}
    want = _reference(work, models, "paired", **sites, dump_max=dump_max)
    assert_same_capture(got, want)
    # dump_max cuts inside rank 1's rows: the gathered dumps are cut where one process cuts them
    d = want.dumps("student", "blocks.0.resid_pre")
    assert d["x"].shape[0] == dump_max
    last = _window_of(want, int(d["doc"][-1]), int(d["pos"][-1]))
    assert last // OPTIONS["batch_size"] >= _rank1_start(want)
    world = got.manifest["distributed"]
    assert world["world_size"] == 2 and world["backend"] == "gloo"
    start = _rank1_start(want)
    assert [r["batches"][0] for r in world["ranks"]] == [0, start]
    assert sum(r["windows"] for r in world["ranks"]) == got.manifest["windows"]
    assert min(r["documents"] for r in world["ranks"]) > 0


def test_sequential_ranks_give_the_single_process_capture(work: Path, run_cli) -> None:
    """``--sequential --workers 2``: each rank runs its shard block by block with lazily read
    weights, and its shard files are reduced one at a time onto rank 0."""
    out = work / "paired-seq"
    args = ["capture", "--teacher", str(work / "teacher"), "--student", str(work / "student")]
    args += ["--corpus", str(work / "docs.jsonl"), "--out", str(out), "--workers", "2"]
    args += ["--max-length", "32", "--batch-size", "2", "--sites", "resid_pre,v,final.normed"]
    args += ["--dump-sites", "resid_pre", "--dump-rate", "0.3", "--dump-max", "250"]
    args += ["--sequential", "--no-progress"]
    code, stdout, err = run_cli(args)
    assert code == 0, err
    assert stdout.strip() == str(out) and not out.with_name("paired-seq.partial").exists()
    got = load_capture(out)
    models = {"teacher": str(work / "teacher"), "student": str(work / "student")}
    sites = {"sites": "resid_pre,v,final.normed", "dump_sites": "resid_pre"}
    assert_same_capture(got, _reference(work, models, "paired", **sites, dump_max=250))
    world = got.manifest["distributed"]
    assert world["world_size"] == 2 and world["mode"] == "sequential"


def test_a_dying_sequential_rank_resumes_after_its_last_block(work: Path) -> None:
    out, docs = work / "seq-dies", str(work / "docs.jsonl")
    model, cfg = str(work / "teacher"), {**OPTIONS, "dump_sites": "resid_pre"}
    want = _reference(work, model, "single", dump_sites="resid_pre")
    rank0 = work / "seq-dies.partial/rank-00000-of-00002"
    kill = functools.partial(_die_after, str(rank0 / "shard-done.json"), 1)
    with pytest.raises(GradfreeError, match=r"^Worker 1 of 2 exited with status 3; no capture"):
        launch_capture(
            model, docs, out, cfg, workers=2, progress=False, on_batch=kill, sequential=True
        )
    assert not out.exists()
    rank1 = work / "seq-dies.partial/rank-00001-of-00002"
    state = json.loads((rank1 / "sequential.json").read_text())
    assert state["block"] == 0  # block 1 ran but was not recorded: the rank died before
    seen = work / "seen-seq"
    seen.mkdir()
    record = functools.partial(_record, str(seen))
    got = launch_capture(
        model, docs, out, cfg, workers=2, progress=False, on_batch=record, sequential=True
    )
    assert [int(b) for b in (seen / "rank-1.txt").read_text().split()] == [1, 2]
    assert not (seen / "rank-0.txt").exists()  # rank 0 had finished: straight to the reduce
    assert not (work / "seq-dies.partial").exists()
    assert_same_capture(got, want)


def _die(rank: int, how: str, at: int, batch: int) -> None:
    """``on_batch`` for the workers: rank ``rank`` raises or exits after batch ``at``."""
    if os.environ["RANK"] == str(rank) and batch >= at:
        if how == "raise":
            raise RuntimeError("the node lost its disk")
        os._exit(3)


def _die_after(done: str, at: int, block: int) -> None:
    """``on_batch`` of a sequential capture: once rank 0's shard is done, rank 1 exits after
    its block ``at`` (before recording it)."""
    import time

    if os.environ["RANK"] == "1" and block >= at:
        while not Path(done).exists():
            time.sleep(0.05)
        os._exit(3)


def _record(folder: str, batch: int) -> None:
    with open(Path(folder, f"rank-{os.environ['RANK']}.txt"), "a") as f:
        f.write(f"{batch}\n")


def test_a_dying_rank_leaves_no_capture_and_the_rerun_resumes(work: Path) -> None:
    out, docs = work / "single", str(work / "docs.jsonl")
    model, cfg = str(work / "teacher"), {**OPTIONS, "dump_sites": "resid_pre"}
    want = _reference(work, model, "single", dump_sites="resid_pre")
    start = _rank1_start(want)
    kill = functools.partial(_die, 1, "exit", start + 1)  # like a worker killed for memory
    with pytest.raises(GradfreeError) as e:
        launch_capture(model, docs, out, cfg, workers=2, progress=False, on_batch=kill)
    message = str(e.value)
    assert message.startswith("Worker 1 of 2 exited with status 3; no capture was written")
    assert "\n" not in message and ". " not in message and "single.partial" in message
    assert not out.exists()
    progress = json.loads((work / "single.partial/rank-00001-of-00002/progress.json").read_text())
    assert progress["batches_done"] == start + 2  # rank 1 checkpointed its first 2 batches

    seen = work / "seen"
    seen.mkdir()
    record = functools.partial(_record, str(seen))
    got = launch_capture(model, docs, out, cfg, workers=2, progress=False, on_batch=record)
    ran = [int(b) for b in (seen / "rank-1.txt").read_text().split()]
    assert ran[0] == start + 2 and ran == list(range(ran[0], ran[0] + len(ran)))
    assert not (work / "single.partial").exists()
    assert_same_capture(got, want)

    with pytest.raises(GradfreeError, match="already exists; choose another path"):
        launch_capture(model, docs, out, cfg, workers=2, progress=False)


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives the only rank of a one-process job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_under_torchrun_a_process_is_one_rank(work: Path, world_of_one: None) -> None:
    model = str(work / "student")
    want = _reference(work, model, "student")
    got = capture_distributed(model, str(work / "docs.jsonl"), work / "one", OPTIONS)
    assert got is not None and got.manifest["distributed"]["world_size"] == 1
    assert_same_capture(got, want)
    with pytest.raises(GradfreeError, match="leave out --workers"):
        capture_distributed(model, str(work / "docs.jsonl"), work / "two", OPTIONS, workers=2)
    (work / "two.partial/rank-00001-of-00002").mkdir(parents=True)  # left by 2 workers
    with pytest.raises(GradfreeError, match="with another number of workers; re-run it"):
        capture_distributed(model, str(work / "docs.jsonl"), work / "two", OPTIONS)
    got = capture_distributed(
        model, str(work / "docs.jsonl"), work / "two", OPTIONS, overwrite=True
    )
    assert got is not None and not (work / "two.partial").exists()


def test_a_rank_that_raises_is_reported_in_one_sentence(work: Path, world_of_one: None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from gradfree.capture.launch import _failure, _worker

    notes = work / "notes"
    notes.mkdir()
    spec = {"models": str(work / "student"), "corpus": str(work / "docs.jsonl")}
    spec.update(out=str(work / "raises"), config=OPTIONS, errors=str(notes), progress=False)
    with pytest.raises(SystemExit) as e:
        _worker(spec, functools.partial(_die, 0, "raise", 0))
    assert e.value.code == 1 and not (work / "raises").exists()
    failed = ChildFailedError("capture", {0: ProcessFailure(0, os.getpid(), 1, "")})
    message = _failure(failed, notes, work / "raises", 2)
    assert message.startswith("Worker 0 of 2 failed (RuntimeError: the node lost its disk);")
    # A rank whose reduce lost its peer is a consequence: the rank that died silently is named.
    (notes / "rank-00000.txt").rename(notes / "rank-00000.reduce.txt")
    both = {0: ProcessFailure(0, os.getpid(), 1, ""), 1: ProcessFailure(1, os.getpid(), 3, "")}
    message = _failure(ChildFailedError("capture", both), notes, work / "raises", 2)
    assert message.startswith("Worker 1 of 2 exited with status 3; no capture was written")
